"""Smoke test of the synthetic-table experiment: one seed, few steps, two variants.

It checks that the command keeps working (stage 2 starts from the source-only run,
the table, chart and results are written, a finished table resumes without
retraining); the numbers of so short a run mean nothing.
"""

import json
import os
import shutil

import pytest

from wsda_jax import train
from wsda_jax.experiments import synthetic_table


def test_smoke_table_runs_and_resumes(tmp_path_factory, monkeypatch):
    outdir = str(tmp_path_factory.mktemp("table"))
    kept = str(tmp_path_factory.mktemp("kept_results"))
    data_dir = str(tmp_path_factory.getbasetemp() / "data")
    results = synthetic_table.run_table(
        ["coarse"], seeds=1, outdir=outdir, smoke=True, data_dir=data_dir, results_dir=kept
    )
    # The stage-2 variant pulled in its source-only initialisation, in table order.
    assert list(results) == ["source_only", "coarse"]
    coarse = results["coarse"][0]
    assert 0.0 <= coarse["student"]["miou"] <= 1.0 and "teacher" in coarse
    assert "teacher" not in results["source_only"][0]
    config = synthetic_table.make_config("coarse", 0, outdir, smoke=True)
    assert config.init.init_from == os.path.join(outdir, "source_only_seed0")

    table = open(os.path.join(outdir, "table.md")).read()
    assert "| source_only |" in table and "| coarse |" in table
    assert os.path.getsize(os.path.join(outdir, "chart.png")) > 0
    saved = json.load(open(os.path.join(outdir, "results.json")))
    assert saved["coarse"][0]["student"]["miou"] == coarse["student"]["miou"]

    assert sorted(os.listdir(kept)) == ["coarse_seed0.json", "source_only_seed0.json"]

    # Finished runs are read back, never retrained: from the workdirs, or, once those
    # are gone (a new machine), from the kept results.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    again = synthetic_table.run_table(
        ["coarse"], seeds=1, outdir=outdir, smoke=True, data_dir=data_dir
    )
    assert again == results
    for name in ("coarse_seed0", "source_only_seed0"):
        shutil.rmtree(os.path.join(outdir, name))
    again = synthetic_table.run_table(
        ["coarse"], seeds=1, outdir=outdir, smoke=True, data_dir=data_dir, results_dir=kept
    )
    assert again == results


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="nonsense"):
        synthetic_table.run_table(["nonsense"], seeds=1, outdir=str(tmp_path))
