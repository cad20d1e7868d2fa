"""The real GTA5 -> Cityscapes config wires up end to end on tiny raw trees.

Tiny GTA5 and Cityscapes trees in the real download layouts (`fixture_trees`) are
prepared with the real CLI (`python -m wsda_jax.data.prepare`), then
`python -m wsda_jax.main --config=configs/gta2cs_image.py` trains two steps of a tiny
model on them and evaluates student and teacher. Only sizes are overridden on the
command line: datasets, stage, weak label and every loss term come from the config.
One run (module fixture) is shared by the assertions.
"""

import json
import math
import os
import subprocess
import sys

import fixture_trees
import pytest
import subprocesses

from wsda_jax import classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/gta2cs_image.py"
NUM_STEPS = 2

# A tiny model, 32x32 crops and two steps. Feature maps are 4x4 = 16 pixels, so the
# anchor slots per (image, class) must not exceed 16; the pseudo-label row masks are the
# reference's 15 top / 120 bottom rows of 512 scaled to 32 rows.
TINY_OVERRIDES = (
    "--config.model.depth=18",
    "--config.model.stage_sizes=(1,1,1,1)",
    "--config.model.width=8",
    "--config.model.proj_dim=16",
    "--config.model.aspp_dilations=(1,2)",
    "--config.data.crop_size=(32,32)",
    "--config.data.num_workers=0",
    "--config.data.prefetch_buffer_size=1",
    "--config.batch_size=2",
    f"--config.num_steps={NUM_STEPS}",
    "--config.optim.warmup_steps=1",
    "--config.loss.contrast_start=1",  # The contrastive and image terms count at step 2.
    "--config.loss.max_views=4",
    "--config.loss.inter_max_samples=32",
    "--config.loss.intra_max_samples=16",
    "--config.pseudo.ignore_top=1",
    "--config.pseudo.ignore_bottom=8",
    "--config.eval.batch_size=2",
    "--config.eval.max_images=2",
    "--config.eval.num_panels=1",
    f"--config.checkpoint_every_steps={NUM_STEPS}",
    "--config.log_every_steps=1",
)


def _prepare_command(dataset, manual_dir, data_dir):
    return [
        sys.executable,
        "-m",
        "wsda_jax.data.prepare",
        f"--dataset={dataset}",
        f"--manual_dir={manual_dir}",
        f"--data_dir={data_dir}",
        "--num_workers=1",
    ]


def _summary(stdout):
    """The JSON summary the prepare CLI prints after its 'Prepared ...' line."""
    return json.loads(stdout[stdout.index("{") :])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = tmp_path_factory.mktemp("real_configs")
    gta5 = fixture_trees.make_gta5_tree(str(root / "raw" / "gta5"))
    cityscapes = fixture_trees.make_cityscapes_tree(str(root / "raw" / "cityscapes"))
    data_dir, workdir = root / "data", root / "run"
    env = subprocesses.jax_env(base)

    # Both preparations at once: each spends most of its time importing TFDS.
    processes = {
        dataset: subprocess.Popen(
            _prepare_command(dataset, tree.root, data_dir),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for dataset, tree in (("gta5", gta5), ("cityscapes_weak", cityscapes))
    }
    summaries = {}
    for dataset, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"prepare {dataset}:\n{stderr[-4000:]}"
        summaries[dataset] = _summary(stdout)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.main",
            f"--config={CONFIG}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--config.data.manual_dir={cityscapes.root}",
            f"--config.data.source_manual_dir={gta5.root}",
            *TINY_OVERRIDES,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"workdir": workdir, "summaries": summaries, "gta5": gta5, "cityscapes": cityscapes}


def test_prepare_cli_resizes_the_gta5_mismatch(run):
    # The config's source 'gta5' is the 'resize' variant: the mismatched image is kept.
    gta5 = run["summaries"]["gta5"]
    assert gta5["options"] == {"size_mismatch": "resize"}
    counts = gta5["splits"]["train"]
    assert counts["resized"] == len(run["gta5"].info["mismatched"])
    assert counts.get("skipped", 0) == 0
    assert set(run["summaries"]["cityscapes_weak"]["splits"]) == {"train", "val"}


def test_train_steps_have_finite_losses(run):
    lines = [json.loads(line) for line in open(run["workdir"] / "metrics.jsonl")]
    train_lines = [line for line in lines if "total" in line]
    assert [line["step"] for line in train_lines] == list(range(1, NUM_STEPS + 1))
    # The 'image' weak label trains the image-level terms; no dense target term.
    expected = {"seg_s", "edge_s", "seg_mix", "im_u", "im_proto", "inter", "intra_src"}
    for line in train_lines:
        assert expected <= set(line), sorted(line)
        assert "seg_u" not in line
        for key in (*expected, "total"):
            assert math.isfinite(line[key]), (key, line)
    assert any("eval/teacher_miou" in line for line in lines)


def test_eval_json_has_student_and_teacher(run):
    workdir = run["workdir"]
    report = json.load(open(workdir / "eval" / f"{NUM_STEPS}.json"))
    tree = run["cityscapes"]
    val = [name for name, split in tree.info["splits"].items() if split == "val"]
    assert len(val) == 2  # == config.eval.max_images: the whole val split.
    labelled = sum(int((tree.labels[name] != 255).sum()) for name in val)
    assert report["step"] == NUM_STEPS
    for name in ("student", "teacher"):
        assert 0.0 <= report[name]["miou"] <= 1.0
        assert set(report[name]["iou"]) == set(classes.CLASS_NAMES)
        assert report[name]["pixels"] == labelled  # Both val images, full size, no padding.
    assert os.listdir(workdir / "checkpoints") == [str(NUM_STEPS)]
