"""Smoke test of the synthetic-table experiment: one seed, few steps, two variants.

It checks that the command keeps working (stage 2 starts from the source-only run,
the table, chart and results are written, a finished table resumes without
retraining); the numbers of so short a run mean nothing.
"""

import json
import os
import time

import pytest

from wsda_jax.experiments import synthetic_table


def test_smoke_table_runs_and_resumes(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("table"))
    data_dir = str(tmp_path_factory.getbasetemp() / "data")
    results = synthetic_table.run_table(
        ["coarse"], seeds=1, outdir=outdir, smoke=True, data_dir=data_dir
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

    start = time.time()
    again = synthetic_table.run_table(
        ["coarse"], seeds=1, outdir=outdir, smoke=True, data_dir=data_dir
    )
    assert time.time() - start < 5, "finished runs must be read back, not retrained"
    assert again == results


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="nonsense"):
        synthetic_table.run_table(["nonsense"], seeds=1, outdir=str(tmp_path))
