"""`python -m wsda_jax.data.prepare` as a user meets it: bad input is one line on stderr
(the layout error: what was expected and what was found) and exit status 1, never a
traceback; a killed preparation's `incomplete.*` folder is removed by the next run."""

import json
import os
import subprocess
import sys

import fixture_trees
import numpy as np
import pytest

from wsda_jax import classes

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fixture tree's ids: train id + 1, 0 = ignore.
ID_MAP = json.dumps({0: 255, **{k + 1: k for k in range(classes.NUM_CLASSES)}})


def _prepare_cli(data_dir, manual_dir, *flags):
    command = [
        sys.executable,
        "-m",
        "wsda_jax.data.prepare",
        "--dataset=folder_pairs/mine",
        f"--data_dir={data_dir}",
        f"--manual_dir={manual_dir}",
        "--image_glob=img/*_rgb.png",
        "--label_glob=gt/*_ids.png",
        "--num_workers=2",
        f"--id_map={ID_MAP}",
        *flags,  # A later --id_map wins.
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _folder(tmp_path):
    return fixture_trees.make_folder_tree(str(tmp_path / "raw"), num_images=2).root


def _errors(result):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_wrong_layout_is_the_layout_message(tmp_path):
    result = _prepare_cli(tmp_path / "data", _folder(tmp_path), "--image_glob=images/*.png")
    errors = _errors(result)
    assert errors == ["error: folder_pairs: found 0 images and 2 labels"]
    assert "Expected files matching:" in result.stderr and "Found: " in result.stderr


def test_truncated_png_is_one_line(tmp_path):
    raw = _folder(tmp_path)
    path = os.path.join(raw, "img", "scene1_rgb.png")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    errors = _errors(_prepare_cli(tmp_path / "data", raw))
    assert len(errors) == 1 and path in errors[0] and "truncated" in errors[0], errors


def test_val_size_mismatch_is_one_line(tmp_path):
    raw = _folder(tmp_path)
    fixture_trees.save_png(os.path.join(raw, "vimg", "a_rgb.png"), np.zeros((16, 16, 3), np.uint8))
    fixture_trees.save_png(os.path.join(raw, "vgt", "a_ids.png"), np.zeros((8, 16), np.uint8))
    result = _prepare_cli(
        tmp_path / "data", raw, "--val_image_glob=vimg/*_rgb.png", "--val_label_glob=vgt/*_ids.png"
    )
    errors = _errors(result)
    assert len(errors) == 1 and "is 16x16 but its label" in errors[0], errors


@pytest.mark.parametrize(
    "id_map",
    [
        "{bad",
        '{"1": "road"}',
        '{"7": null}',
        '{"7": 300}',
        '{"-1": 3}',
        '{"7": 25}',
        "[1, 2]",
        '{"1099511627776": 0}',  # Would allocate a 1 TiB lookup table.
    ],
)
def test_bad_id_map_is_one_line_before_anything_is_written(tmp_path, id_map):
    """Train ids 0-18 or 255, source ids >= 0: out of range, an id would wrap around (-1
    is 255) or be dropped by training without a word."""
    errors = _errors(_prepare_cli(tmp_path / "data", _folder(tmp_path), f"--id_map={id_map}"))
    assert len(errors) == 1 and "--id_map=" in errors[0], errors
    assert not (tmp_path / "data").exists()


def test_stale_incomplete_folder_is_removed(tmp_path):
    raw, data_dir = _folder(tmp_path), tmp_path / "data"
    stale = data_dir / "folder_pairs" / "mine_npy" / "incomplete.ABC123_1.0.0"
    stale.mkdir(parents=True)
    (stale / "folder_pairs-train.array_record-00000-of-00001").write_bytes(b"\0" * 1000)
    result = _prepare_cli(data_dir, raw)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Removed {stale}, left by an interrupted preparation." in result.stderr
    assert not stale.exists()
    assert "1.0.0" in os.listdir(data_dir / "folder_pairs" / "mine_npy")
