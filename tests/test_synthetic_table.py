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
from wsda_jax.tools.experiments import synthetic_table


@pytest.mark.extended  # Real training; the skipping is also tested with a stub below.
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


def _result(variant, seed, miou):
    iou = {name: None for name in synthetic_table.classes.CLASS_NAMES}
    iou["road"] = miou
    run = {"miou": miou, "iou": iou}
    return {"variant": variant, "seed": seed, "seconds": 60.0, "student": run, "teacher": run}


def _record_training(monkeypatch):
    """Replaces train.train_and_evaluate by a stub that makes the workdir and returns a
    fixed result; returns the list of workdir names it was called with, in order."""
    trained = []

    def record(config, workdir):
        trained.append(os.path.basename(workdir))
        os.makedirs(workdir, exist_ok=True)
        return {"student": _result("any", 0, 0.3)["student"]}

    monkeypatch.setattr(train, "train_and_evaluate", record)
    return trained


def test_finished_runs_are_never_retrained(tmp_path, monkeypatch):
    """A run whose result exists, in its workdir or in --results_dir (a new machine), is
    read back, not trained again."""
    outdir, kept = str(tmp_path / "out"), str(tmp_path / "kept")
    trained = _record_training(monkeypatch)
    first = synthetic_table.run_table(["coarse"], seeds=1, outdir=outdir, results_dir=kept)
    assert trained == ["source_only_seed0", "coarse_seed0"]
    assert sorted(os.listdir(kept)) == ["coarse_seed0.json", "source_only_seed0.json"]
    again = synthetic_table.run_table(["coarse"], seeds=1, outdir=outdir)
    assert again == first and len(trained) == 2
    for name in ("coarse_seed0", "source_only_seed0"):
        shutil.rmtree(os.path.join(outdir, name))
    again = synthetic_table.run_table(["coarse"], seeds=1, outdir=outdir, results_dir=kept)
    assert again == first and len(trained) == 2


def test_a_resumed_run_is_marked_so_its_time_is_not_averaged(tmp_path, monkeypatch):
    _record_training(monkeypatch)
    outdir = tmp_path / "out"
    os.makedirs(outdir / "source_only_seed0" / "checkpoints" / "200")  # Interrupted once.
    assert synthetic_table.run_variant("source_only", 0, str(outdir), smoke=True)["resumed"]
    assert "resumed" not in synthetic_table.run_variant("source_only", 1, str(outdir), True)


def test_report_only_tables_the_finished_runs_in_the_asked_order(tmp_path, monkeypatch):
    """Nothing is trained; a variant with no finished seed is left out, the others keep
    the order of --variants and list their seeds."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for variant, seed, miou in (("coarse", 0, 0.40), ("coarse", 2, 0.42), ("uda", 0, 0.2)):
        (kept / f"{variant}_seed{seed}.json").write_text(json.dumps(_result(variant, seed, miou)))
    resumed = {**_result("uda", 1, 0.2), "seconds": 6.0, "resumed": True}  # Its last part.
    (kept / "uda_seed1.json").write_text(json.dumps(resumed))

    def no_training(*args, **kwargs):
        raise AssertionError("report_only trained")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    results = synthetic_table.run_table(
        ["coarse", "point", "uda"],
        seeds=3,
        outdir=str(tmp_path / "out"),
        results_dir=str(kept),
        report_only=True,
    )
    assert [len(results[v]) for v in ("coarse", "point", "uda")] == [2, 0, 2]
    table = open(tmp_path / "out" / "table.md").read()
    rows = [line for line in table.splitlines() if line.startswith("| coarse |")]
    assert rows[0] == "| coarse | 41.0 ± 1.4 | 41.0 ± 1.4 | 40.0, 42.0 | 2 | 1.0 |"
    assert "| uda | 20.0 ± 0.0 | 20.0 ± 0.0 | 20.0, 20.0 | 2 | 1.0 (1 resumed left out) |" in table
    assert "| point |" not in table
    assert table.index("| coarse |") < table.index("| uda |")


def test_warm_variant_starts_from_the_warm_stage_one(tmp_path, monkeypatch):
    """coarse_long_warm trains source_only_warm first (stage 1 with the source contrastive
    loss) and starts from its checkpoint, not from source_only's."""
    outdir = str(tmp_path / "out")
    warm = synthetic_table.make_config("source_only_warm", 0, outdir, smoke=True)
    assert warm.loss.source_only_contrast
    assert not synthetic_table.make_config(
        "source_only", 0, outdir, smoke=True
    ).loss.source_only_contrast
    config = synthetic_table.make_config("coarse_long_warm", 1, outdir, smoke=True)
    assert config.init.init_from == os.path.join(os.path.abspath(outdir), "source_only_warm_seed1")
    assert not config.loss.source_only_contrast and config.num_steps == 2400

    trained = _record_training(monkeypatch)
    results = synthetic_table.run_table(["coarse_long_warm"], seeds=1, outdir=outdir)
    assert list(results) == ["source_only_warm", "coarse_long_warm"]
    assert trained == ["source_only_warm_seed0", "coarse_long_warm_seed0"]


def test_beyond_group_expands_to_both_labels_and_starts_from_source_only(tmp_path, monkeypatch):
    """--variants=beyond: 10 stage-2 runs (coarse and point, each alone and with rcs, mic,
    no warm-up, rcs + mic) from the same seed's source_only, which trains once; a second
    call skips every finished run."""
    outdir = str(tmp_path / "out")
    expected = [
        f"beyond_{label}{suffix}"
        for label in ("coarse", "point")
        for suffix in ("", "_rcs", "_mic", "_no_warmup", "_all")
    ]
    assert synthetic_table.expand_groups(["beyond", "beyond_coarse"]) == expected
    settings = {}
    for variant in expected:
        label, _, option = variant.removeprefix("beyond_").partition("_")
        config = synthetic_table.make_config(variant, 2, outdir, smoke=False)
        assert config.init.init_from == os.path.join(os.path.abspath(outdir), "source_only_seed2")
        assert config.weak_label == label
        settings[option] = (
            config.data.rare_class_sampling.enabled,
            config.mic.enabled,
            config.optim.warmup_steps,
        )
    assert settings == {
        "": (False, False, 50),
        "rcs": (True, False, 50),
        "mic": (False, True, 50),
        "no_warmup": (False, False, 0),
        "all": (True, True, 50),
    }
    trained = _record_training(monkeypatch)
    synthetic_table.run_table(["beyond"], seeds=1, outdir=outdir)
    assert trained == ["source_only_seed0"] + [f"{v}_seed0" for v in expected]
    trained.clear()
    synthetic_table.run_table(["beyond"], seeds=1, outdir=outdir)
    assert trained == []


def test_daformer_group_is_one_stage_beside_the_resnet_rows(tmp_path, monkeypatch):
    """--variants=daformer: the ResNet-18 method rows (two-stage, from source_only), six
    one-stage DAFormer runs (no init_from) with and without the contrastive terms and
    with MIC at the corrected block size, coarse and point labels, and both networks'
    oracle and source-only bounds; the report has the rare-class table."""
    outdir = str(tmp_path / "out")
    daformer = [
        f"daformer_{label}{suffix}"
        for label in ("coarse", "point")
        for suffix in ("", "_no_contrast", "_mic")
    ]
    bounds = ["oracle", "mit_oracle", "source_only", "mit_source_only"]
    assert synthetic_table.expand_groups(["daformer"]) == [
        *bounds,
        "beyond_coarse",
        "beyond_point",
        *daformer,
    ]
    for variant, stage in (("mit_oracle", "oracle"), ("mit_source_only", "source_only")):
        config = synthetic_table.make_config(variant, 1, outdir, smoke=False)
        assert config.stage == stage and config.init.init_from == ""
        assert not config.init.one_stage and config.model.arch == "daformer"
        assert config.optim.name == "adamw"
        assert config.num_steps == synthetic_table.make_config(stage, 1, outdir, False).num_steps
    for variant in daformer:
        config = synthetic_table.make_config(variant, 1, outdir, smoke=False)
        assert config.init.init_from == "" and config.init.one_stage
        assert config.model.arch == "daformer" and config.optim.name == "adamw"
        assert config.weak_label == variant.split("_")[1]
        assert config.loss.use_contrast == (not variant.endswith("_no_contrast"))
        assert config.mic.enabled == variant.endswith("_mic") and config.mic.block_size == 6
        tiny = synthetic_table.make_config(variant, 1, outdir, smoke=True)
        assert tiny.model.arch == "daformer" and tiny.num_steps <= 8
    trained = _record_training(monkeypatch)
    synthetic_table.run_table(["daformer"], seeds=1, outdir=outdir)
    assert trained == [
        f"{v}_seed0"
        for v in ("oracle", "source_only", "beyond_coarse", "beyond_point", *daformer)
        + ("mit_oracle", "mit_source_only")
    ]
    kept = tmp_path / "kept"
    kept.mkdir()
    for seed, miou in ((0, 0.2), (1, 0.4)):
        result = _result("daformer_point", seed, miou)
        result["student"]["iou"]["bicycle"] = miou
        (kept / f"daformer_point_seed{seed}.json").write_text(json.dumps(result))
    synthetic_table.run_table(
        ["daformer_point"],
        seeds=2,
        outdir=str(tmp_path / "report"),
        results_dir=str(kept),
        report_only=True,
    )
    table = open(tmp_path / "report" / "table.md").read()
    rare = table[table.index("The rarest source classes") :]
    assert (
        "| variant | traffic sign | traffic light | motorcycle | bicycle | pole | seeds |" in rare
    )
    assert "| daformer_point | n/a | n/a | n/a | 30.0 ± 14.1 | n/a | 2 |" in rare
