"""A full-size rehearsal of the real path: raw trees at the real resolutions -> prepare CLI
-> the REAL configs on 4 (and 1) simulated devices: stage 1, stage 2 from it, evaluation,
predict.

Raw trees: GTA5 at 1914x1052 (one image/label size mismatch), SYNTHIA at 1280x760 with
16-bit labels, Cityscapes at 2048x1024 with gtFine and gtCoarse. They are prepared with
`python -m wsda_jax.data.prepare` (pre-resize on: GTA5 to 1280x720, Cityscapes train to
1024x512, val at 2048x1024). Then `python -m wsda_jax.main` runs the real configs
with the reference's per-device batch (4 + 4) and eval batch (8), overriding only the
model size, the step counts, the crop size (128x128, for the CPU) and the step where the
contrastive terms start. The GTA5 stage 1 runs once on 4 devices, evaluates on the
full-size Cityscapes val and predicts at full size. With `-m extended` (docs/testing.md)
the stage-2 configs run too: the coarse and image stage 2 and the SYNTHIA chain on 4
devices, the point stage 2 on 1 device from the 4-device stage 1 and predict there, and
the evaluation of a checkpoint converted from the reference's layout.

Time goes into compiling the train step (one program per device count and weak label,
two where the contrastive terms switch on mid-run), so only synthia2cs_coarse switches
them on at step 2 (`CONTRAST_SWITCH`); the other stage-2 runs have them on from step 1
and compile one program (the switch is also tested in test_train and
test_contrast_switch).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import fixture_trees
import numpy as np
import pytest
import reference_layout
import subprocesses
from PIL import Image

from wsda_jax import classes

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 2
CROP = 128
SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048)}
# Model size, step counts, crop size with the pseudo-label row margins scaled to it (15 and
# 120 of 512 rows), and contrast_start per run: nothing else differs from the real configs.
MARGINS = ("--config.pseudo.ignore_top=4", "--config.pseudo.ignore_bottom=30")
OVERRIDES = (
    "--config.model.depth=18",
    "--config.model.stage_sizes=(1,1,1,1)",
    "--config.model.width=8",
    "--config.model.proj_dim=16",
    f"--config.num_steps={NUM_STEPS}",
    "--config.optim.warmup_steps=1",
    "--config.log_every_steps=1",
    f"--config.data.crop_size=({CROP},{CROP})",
    *MARGINS,
    "--config.data.num_workers=0",
)
CONTRAST_SWITCH = "--config.loss.contrast_start=1"  # The contrastive and image terms at step 2.
CONTRAST_ON = "--config.loss.contrast_start=0"  # From step 1: one compiled program.


def _prepare(dataset, manual_dir, data_dir, env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsda_jax.data.prepare",
            f"--dataset={dataset}",
            f"--manual_dir={manual_dir}",
            f"--data_dir={data_dir}",
            "--num_workers=1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Raw trees at the real sizes, prepared with the CLI; returns paths and the trees."""
    base = tmp_path_factory.getbasetemp()
    root = tmp_path_factory.mktemp("rehearsal")
    trees = {
        "gta5": fixture_trees.make_gta5_tree(str(root / "raw" / "gta5"), 3, *SIZES["gta5"]),
        "synthia": fixture_trees.make_synthia_tree(
            str(root / "raw" / "synthia"), 2, *SIZES["synthia"]
        ),
        "cityscapes_weak": fixture_trees.make_cityscapes_tree(
            str(root / "raw" / "cityscapes"),
            cities={"train": ("aachen", "bochum"), "val": ("frankfurt",)},
            per_city=1,
            height=SIZES["cityscapes"][0],
            width=SIZES["cityscapes"][1],
        ),
    }
    data_dir = root / "data"
    env = subprocesses.jax_env(base)
    processes = {name: _prepare(name, tree.root, data_dir, env) for name, tree in trees.items()}
    summaries = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"prepare {name}:\n{stderr[-3000:]}"
        summaries[name] = json.loads(stdout[stdout.index("{") :])
    predict_dir = root / "predict_in"
    predict_dir.mkdir()
    for name, split in trees["cityscapes_weak"].info["splits"].items():
        if split == "val":
            Image.fromarray(trees["cityscapes_weak"].images[name]).save(predict_dir / f"{name}.png")
    return {
        "root": root,
        "data_dir": data_dir,
        "trees": trees,
        "summaries": summaries,
        "predict_dir": predict_dir,
        "base": base,
    }


def _main(prepared, devices, config, workdir, *extra):
    trees = prepared["trees"]
    source = "synthia" if "synthia" in config else "gta5"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.main",
            f"--config=configs/{config}.py",
            f"--workdir={workdir}",
            f"--config.data.data_dir={prepared['data_dir']}",
            f"--config.data.manual_dir={trees['cityscapes_weak'].root}",
            f"--config.data.source_manual_dir={trees[source].root}",
            *OVERRIDES,
            *extra,
        ],
        cwd=ROOT,
        env=subprocesses.jax_env(prepared["base"], devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{config} on {devices} devices:\n{result.stderr[-4000:]}"
    return result


def _train_lines(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [line for line in lines if "total" in line]


def test_prepared_at_the_reference_working_sizes(prepared):
    summaries, data_dir = prepared["summaries"], prepared["data_dir"]
    gta5 = summaries["gta5"]["splits"]["train"]
    assert gta5["pre_resized"] == 3 and gta5["resized"] == 1  # The mismatched pair too.
    assert summaries["cityscapes_weak"]["splits"]["train"]["pre_resized"] == 2
    assert "pre_resized" not in summaries["synthia"]["splits"]["train"]
    assert os.path.isdir(data_dir / "gta5" / "resize_1280x720_npy")
    assert os.path.isdir(data_dir / "cityscapes_weak" / "points1_train1024x512_npy")


def _check_eval(prepared, workdir, step, models, subsets=("miou",)):
    report = json.load(open(os.path.join(workdir, "eval", f"{step}.json")))
    tree = prepared["trees"]["cityscapes_weak"]
    val = [name for name, split in tree.info["splits"].items() if split == "val"]
    labelled = sum(int((tree.labels[name] != 255).sum()) for name in val)
    for model in models:
        for subset in subsets:
            assert 0.0 <= report[model][subset] <= 1.0, (model, subset, report[model])
        # Both val images at full size (2048x1024), each counted once despite the padding.
        assert report[model]["pixels"] == labelled


@pytest.fixture(scope="module")
def gta_stage_one(prepared, tmp_path_factory):
    """configs/gta_source_only.py on 4 devices: (workdir, stderr); the stage 1 that the
    stage 2 of both device counts starts from."""
    workdir = tmp_path_factory.mktemp("stage1") / "gta_source_only"
    result = _main(prepared, 4, "gta_source_only", workdir)
    return workdir, result.stderr


def _stage_two(prepared, devices, config, workdir, stage1, contrast):
    """Stage 2 of `config` from `stage1`; checks its metrics and evaluations; returns the
    run. `contrast` is CONTRAST_SWITCH (checks the switch at step 2) or CONTRAST_ON."""
    init_from = f"--config.init.init_from={stage1}"
    result = _main(prepared, devices, config, workdir, init_from, contrast)
    lines = _train_lines(workdir)
    assert [line["step"] for line in lines] == [1, 2]
    terms = {"seg_s", "edge_s", "seg_mix", "im_u", "im_proto", "inter", "intra_src"}
    for line in lines:
        assert terms <= set(line) and all(math.isfinite(line[t]) for t in terms), line
    # The source side always has anchors; the cross-domain `inter` term needs target
    # anchors too, which (from a 2-step stage 1, no confident pseudo labels) only the large
    # gtCoarse regions provide.
    if contrast == CONTRAST_SWITCH:
        assert lines[-1]["intra_src"] != 0.0 and lines[0]["intra_src"] == 0.0
    else:
        assert all(line["intra_src"] != 0.0 for line in lines), lines
    if config.endswith("_coarse"):
        assert lines[-1]["inter"] != 0.0
    _check_eval(prepared, workdir, 0, ["student", "teacher"])  # The stage-1 starting point.
    _check_eval(prepared, workdir, NUM_STEPS, ["student", "teacher"])
    return result


def _check_predict(prepared, devices, config, workdir, out):
    """`--mode=predict` with the run in `workdir`: one palette PNG per input at full size."""
    _main(
        prepared,
        devices,
        config,
        workdir,
        "--mode=predict",
        f"--input_dir={prepared['predict_dir']}",
        f"--output_dir={out}",
    )
    written = sorted(os.listdir(out))
    assert written == sorted(os.listdir(prepared["predict_dir"]))
    prediction = np.asarray(Image.open(out / written[0]).convert("RGB"))
    assert prediction.shape == (1024, 2048, 3)
    palette = {tuple(c) for c in classes.PALETTE[: classes.NUM_CLASSES]}
    assert {tuple(c) for c in prediction.reshape(-1, 3)[::4099]} <= palette


def test_four_devices_stage1_eval_predict(prepared, gta_stage_one, tmp_path):
    stage1, stderr = gta_stage_one
    assert "x 4 device(s) = 16 per domain" in stderr
    assert [line["step"] for line in _train_lines(stage1)] == [1, 2]
    _check_eval(prepared, stage1, NUM_STEPS, ["student"])
    _check_predict(prepared, 4, "gta_source_only", stage1, tmp_path / "predictions")


@pytest.mark.extended
def test_four_devices_coarse_stage2(prepared, gta_stage_one, tmp_path):
    """gta2cs_coarse from the GTA5 stage 1 on 4 devices: its terms, both evaluations."""
    stage1, _ = gta_stage_one
    runs = tmp_path / "devices4"
    _stage_two(prepared, 4, "gta2cs_coarse", runs / "gta2cs_coarse", stage1, CONTRAST_ON)
    shutil.rmtree(runs)  # Checkpoints of every run would fill the disk otherwise.


@pytest.mark.extended
def test_four_devices_image_labels_and_the_synthia_chain(prepared, gta_stage_one, tmp_path):
    """The other 4-device configs: gta2cs_image from the GTA5 stage 1, and SYNTHIA's
    stage 1 and coarse stage 2 with their 16- and 13-class mIoU."""
    stage1, _ = gta_stage_one
    runs = tmp_path / "devices4"
    _stage_two(prepared, 4, "gta2cs_image", runs / "gta2cs_image", stage1, CONTRAST_ON)

    synthia = runs / "synthia_source_only"
    _main(prepared, 4, "synthia_source_only", synthia)
    _check_eval(prepared, synthia, NUM_STEPS, ["student"], ("miou", "miou_16", "miou_13"))
    workdir = runs / "synthia2cs_coarse"
    _stage_two(prepared, 4, "synthia2cs_coarse", workdir, synthia, CONTRAST_SWITCH)
    _check_eval(
        prepared, workdir, NUM_STEPS, ["student", "teacher"], ("miou", "miou_16", "miou_13")
    )
    shutil.rmtree(runs)


@pytest.mark.extended
def test_one_device_stage2_from_the_four_device_stage1_and_predict(
    prepared, gta_stage_one, tmp_path
):
    """The 4-device stage-1 checkpoint initialises a 1-device stage 2 (gta2cs_point)."""
    stage1, _ = gta_stage_one
    runs = tmp_path / "devices1"
    result = _stage_two(prepared, 1, "gta2cs_point", runs / "gta2cs_point", stage1, CONTRAST_ON)
    assert "x 1 device(s) = 4 per domain" in result.stderr
    _check_predict(prepared, 1, "gta2cs_point", runs / "gta2cs_point", runs / "predictions")
    shutil.rmtree(runs)


def _browse(prepared, config, out, *overrides):
    """`python -m wsda_jax.tools.browse` on the rehearsal's records; returns batches.json."""
    trees = prepared["trees"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.tools.browse",
            f"--config=configs/{config}.py",
            f"--out={out}",
            "--num_batches=2",
            f"--config.data.data_dir={prepared['data_dir']}",
            f"--config.data.manual_dir={trees['cityscapes_weak'].root}",
            f"--config.data.source_manual_dir={trees['gta5'].root}",
            f"--config.data.crop_size=({CROP},{CROP})",
            *MARGINS,
            "--config.data.num_workers=0",
            *overrides,
        ],
        cwd=ROOT,
        env=subprocesses.jax_env(prepared["base"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(os.path.join(out, "batches.json")))


def test_browse_shows_crop_presence(prepared, tmp_path):
    """The batch browser on the full-size Cityscapes records: target crops have the crop
    size and the presence vector is the weak-label crop's classes (gtCoarse for coarse and
    image labels); with presence='image' it is the whole image's fine-label classes."""
    entries = _browse(prepared, "gta2cs_coarse", tmp_path / "coarse")
    assert len(entries) == 2 * 4 and len(list((tmp_path / "coarse").glob("batch*_*.png"))) == 8
    image_entries = _browse(prepared, "gta2cs_image", tmp_path / "image")
    for entry in entries + image_entries:
        assert entry["target_shape"] == [CROP, CROP] and entry["source_shape"] == [CROP, CROP]
        assert entry["presence"] == entry["weak_label_classes"], entry
    assert any(entry["presence"] for entry in entries)

    tags = _browse(prepared, "gta2cs_image", tmp_path / "tags", "--config.presence=image")
    tree = prepared["trees"]["cityscapes_weak"]
    fine = [
        [c for c in np.unique(tree.labels[name]).tolist() if c != 255]
        for name, split in tree.info["splits"].items()
        if split == "train"
    ]
    assert all(entry["presence"] in fine for entry in tags), (tags, fine)
    assert all(entry["weak_label_classes"] == [] for entry in tags)  # No map travels.


@pytest.mark.extended
def test_eval_of_a_converted_reference_checkpoint(prepared, tmp_path):
    """A checkpoint in the reference's layout (npz, DDP names; the rehearsal's model size)
    -> `wsda_jax.models.convert` -> `--mode=eval` on the full-size Cityscapes val; the
    JSON names its settings (other settings' own file: test_main)."""
    import jax

    from configs import gta2cs_coarse
    from wsda_jax.models import deeplab

    config = gta2cs_coarse.get_config()
    config.model.depth, config.model.stage_sizes = 18, (1, 1, 1, 1)
    config.model.width, config.model.proj_dim = 8, 16
    variables = deeplab.build_model(config).init(
        jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), train=False
    )
    state_dict = reference_layout.reference_state_dict(jax.device_get(variables))
    checkpoint = tmp_path / "wdass.npz"
    np.savez(checkpoint, **{f"state_dict/{k}": v for k, v in state_dict.items()})
    workdir = tmp_path / "converted"
    model_overrides = [o for o in OVERRIDES if o.startswith("--config.model.")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.models.convert",
            f"--checkpoint={checkpoint}",
            "--config=configs/gta2cs_coarse.py",
            f"--out={workdir}",
            *model_overrides,
        ],
        cwd=ROOT,
        env=subprocesses.jax_env(prepared["base"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _main(prepared, 1, "gta2cs_coarse", workdir, "--mode=eval")
    _check_eval(prepared, workdir, 0, ["student", "teacher"])
    report = json.load(open(workdir / "eval" / "0.json"))
    assert report["settings"]["scales"] == [1.0] and report["settings"]["flip"] is False
    assert (
        report["settings"]["target"] == "cityscapes_weak"
        and report["settings"]["eval_resize"] == []
    )
