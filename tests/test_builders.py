"""Tests of the TFDS builders, record format and sources on tiny trees in the real layouts."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import fixture_trees
import numpy as np
import pytest
import subprocesses

from wsda_jax import classes, config_lib, errors
from wsda_jax.data import builders, records, sources
from wsda_jax.data.builders import base, image_io, layout


def _read(dataset, split, data_dir, pre_resize=False):
    source = sources.open_split(
        dataset, split, fixture_trees.config_data(data_dir, pre_resize=pre_resize)
    )
    examples = [records.decode_example(source[i]) for i in range(len(source))]
    return {example["name"]: example for example in examples}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {
        "gta5": fixture_trees.make_gta5_tree(str(root / "gta5")),
        "synthia": fixture_trees.make_synthia_tree(str(root / "synthia")),
        "cityscapes": fixture_trees.make_cityscapes_tree(str(root / "cityscapes")),
        "folder": fixture_trees.make_folder_tree(str(root / "folder")),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, trees):
    """One data_dir with every real-layout dataset prepared once; summaries by dataset."""
    data_dir = tmp_path_factory.mktemp("prepared")
    summaries = {
        "gta5": fixture_trees.prepare("gta5", data_dir, trees["gta5"].root),
        "gta5/skip": fixture_trees.prepare("gta5/skip", data_dir, trees["gta5"].root),
        "synthia": fixture_trees.prepare("synthia", data_dir, trees["synthia"].root),
        "cityscapes_weak": fixture_trees.prepare(
            "cityscapes_weak", data_dir, trees["cityscapes"].root
        ),
        "folder_pairs/mine": fixture_trees.prepare(
            "folder_pairs/mine",
            data_dir,
            trees["folder"].root,
            options={
                "image_glob": "img/*_rgb.png",
                "label_glob": "gt/*_ids.png",
                "id_map": trees["folder"].info["id_map"],
            },
        ),
    }
    return data_dir, summaries


def test_png_rgb16_reader_all_filters():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 65536, (21, 13, 3), dtype=np.uint16)
    array[:5] = 7  # Flat rows too, as in real label maps.
    np.testing.assert_array_equal(
        records.read_png_rgb16(fixture_trees.encode_png_rgb16(array)), array
    )
    rgb8 = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    decoded = records.read_png_rgb16(records.encode_png(rgb8))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, rgb8)


def test_record_round_trip():
    rng = np.random.default_rng(1)
    example = {
        "image": rng.integers(0, 256, (6, 7, 3), dtype=np.uint8),
        "label": rng.integers(0, 19, (6, 7), dtype=np.uint8),
        "coarse_label": np.full((6, 7), 255, np.uint8),
        "point_label": np.full((6, 7), 255, np.uint8),
        "presence": np.eye(19, dtype=np.uint8)[3],
        "name": "aachen_000000_000019",
    }
    record = records.encode_example(example)
    assert record["image"].startswith(records.PNG_SIGNATURE)
    assert record["label"].startswith(records.PNG_SIGNATURE)
    decoded = records.decode_example(dict(record, name=record["name"].encode()))
    for key, value in example.items():
        np.testing.assert_array_equal(decoded[key], value)
    assert decoded["name"] == "aachen_000000_000019"
    with pytest.raises(ValueError, match="unknown record key"):
        records.encode_example({"depth": example["label"]})


def test_gta5_labels_resize_and_counts(trees, data_dir):
    data_dir, summaries = data_dir
    tree = trees["gta5"]
    examples = _read("gta5", "train", data_dir)
    assert sorted(examples) == sorted(tree.labels)
    for name, example in examples.items():
        np.testing.assert_array_equal(example["label"], tree.labels[name])
        assert example["image"].shape == (*tree.labels[name].shape, 3)
        assert set(example) == {"image", "label", "name"}
    np.testing.assert_array_equal(examples["00001"]["image"], tree.images["00001"])
    assert tree.images["00002"].shape != examples["00002"]["image"].shape  # Resized to the label.
    counts = summaries["gta5"]["splits"]["train"]
    assert counts["images"] == 3 and counts["resized"] == 1
    assert counts["out_of_map_pixels"] == tree.info["out_of_map_pixels"]


def test_gta5_skip_variant(trees, data_dir):
    data_dir, summaries = data_dir
    examples = _read("gta5/skip", "train", data_dir)
    assert sorted(examples) == ["00001", "00003"]
    assert summaries["gta5/skip"]["splits"]["train"]["skipped"] == 1


def test_synthia_16bit_labels(trees, data_dir):
    data_dir, summaries = data_dir
    tree = trees["synthia"]
    examples = _read("synthia", "train", data_dir)
    assert sorted(examples) == sorted(tree.labels)
    for name, example in examples.items():
        np.testing.assert_array_equal(example["label"], tree.labels[name])
        np.testing.assert_array_equal(example["image"], tree.images[name])
    assert summaries["synthia"]["splits"]["train"]["out_of_map_pixels"] == 4


def _check_weak_labels(example, k):
    fine, points, coarse = example["label"], example["point_label"], example["coarse_label"]
    present = [c for c in np.unique(fine) if c != 255]
    np.testing.assert_array_equal(np.flatnonzero(example["presence"]), present)
    labelled = points != 255
    np.testing.assert_array_equal(points[labelled], fine[labelled])
    for c in present:
        assert np.count_nonzero(points == c) == min(k, np.count_nonzero(fine == c))
    kept = coarse != 255
    np.testing.assert_array_equal(coarse[kept], fine[kept])


def test_cityscapes_weak(trees, data_dir):
    data_dir, summaries = data_dir
    tree = trees["cityscapes"]
    train, val = (
        _read("cityscapes_weak", "train", data_dir),
        _read("cityscapes_weak", "val", data_dir),
    )
    splits = tree.info["splits"]
    assert sorted(train) == sorted(n for n, s in splits.items() if s == "train")
    assert sorted(val) == sorted(n for n, s in splits.items() if s == "val")
    for name, example in {**train, **val}.items():
        np.testing.assert_array_equal(example["label"], tree.labels[name])
        np.testing.assert_array_equal(example["image"], tree.images[name])
        _check_weak_labels(example, k=2)
    for name, example in train.items():  # gtCoarse, mapped to train ids.
        np.testing.assert_array_equal(
            example["coarse_label"], fixture_trees.coarse_of(tree.labels[name])
        )
    counts = summaries["cityscapes_weak"]["splits"]
    assert counts["train"]["images"] == 4 and "coarse_synthesised" not in counts["train"]
    assert counts["val"]["coarse_synthesised"] == 2  # The fixture has no gtCoarse/val.


def test_point_labels_identical_across_preparations(trees, data_dir, tmp_path):
    data_dir, _ = data_dir
    fixture_trees.prepare("cityscapes_weak", tmp_path, trees["cityscapes"].root, num_workers=2)
    first, second = (
        _read("cityscapes_weak", "train", data_dir),
        _read("cityscapes_weak", "train", tmp_path),
    )
    for name in first:
        for key in ("image", "label", "coarse_label", "point_label", "presence"):
            np.testing.assert_array_equal(first[name][key], second[name][key])


def test_folder_pairs(trees, data_dir):
    data_dir, summaries = data_dir
    tree = trees["folder"]
    examples = _read("folder_pairs/mine", "train", data_dir)
    assert sorted(examples) == sorted(tree.labels)
    for name, example in examples.items():
        np.testing.assert_array_equal(example["label"], tree.labels[name])
    assert summaries["folder_pairs/mine"]["splits"]["train"]["out_of_map_pixels"] == 0
    with pytest.raises(ValueError, match="prepared with options"):
        fixture_trees.prepare(
            "folder_pairs/mine", data_dir, tree.root, options={"image_glob": "img/*.png"}
        )


def test_folder_pairs_val_split(tmp_path):
    train = fixture_trees.make_folder_tree(str(tmp_path / "raw"), num_images=2)
    val = fixture_trees.make_folder_tree(str(tmp_path / "raw" / "val"), num_images=1, first=5)
    options = {
        "image_glob": "img/*_rgb.png",
        "label_glob": "gt/*_ids.png",
        "val_image_glob": "val/img/*_rgb.png",
        "val_label_glob": "val/gt/*_ids.png",
        "id_map": train.info["id_map"],
        "weak_labels": True,
    }
    data_dir = tmp_path / "prepared"
    summary = fixture_trees.prepare("folder_pairs/split", data_dir, train.root, options=options)
    assert sorted(summary["splits"]) == ["train", "val"]
    for split, tree in (("train", train), ("val", val)):
        examples = _read("folder_pairs/split", split, data_dir)
        assert sorted(examples) == sorted(tree.labels)
        for name, example in examples.items():
            np.testing.assert_array_equal(example["label"], tree.labels[name])
            assert example["coarse_label"].shape == tree.labels[name].shape
    with pytest.raises(ValueError, match="both val_image_glob and val_label_glob"):
        fixture_trees.prepare(
            "folder_pairs/half", data_dir, train.root, options={**options, "val_label_glob": ""}
        )


def test_synthetic_prepared_on_first_use(tmp_path):
    config_data = fixture_trees.config_data(tmp_path)
    source = sources.open_split("synthetic_target", "val", config_data)
    assert len(source) == 2
    example = records.decode_example(source[0])
    assert example["image"].shape == (32, 64, 3)
    _check_weak_labels(example, k=2)
    assert len(sources.open_split("synthetic_target", "train", config_data)) == 3
    assert len(sources.open_split("synthetic_source", "train", config_data)) == 2
    config_data.synthetic.seed = 1  # A new identity: prepared anew, not reused.
    sources.open_split("synthetic_source", "train", config_data)
    assert len(os.listdir(tmp_path / "synthetic_source")) == 2


def test_damaged_prepared_dataset_names_the_file(tmp_path):
    config_data = fixture_trees.config_data(tmp_path)
    assert len(sources.open_split("synthetic_target", "val", config_data)) == 2
    folder = next((tmp_path / "synthetic_target").iterdir()) / "1.0.0"
    with open(next(folder.glob("*-val.array_record-*")), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(errors.DamagedDatasetError, match="record 1 of .*-val.array_record-"):
        sources.open_split("synthetic_target", "val", config_data)[1]
    (folder / "dataset_info.json").write_text("{garbage")
    with pytest.raises(errors.DamagedDatasetError) as error:
        sources.open_split("synthetic_target", "train", config_data)
    assert f"{folder}/dataset_info.json: ParseError" in str(error.value)
    assert "the next run generates it again" in str(error.value)


def test_unprepared_dataset_error_shows_command(tmp_path):
    config_data = fixture_trees.config_data(tmp_path, "/data/cityscapes")
    with pytest.raises(sources.DatasetNotPreparedError) as error:
        sources.open_split("cityscapes_weak", "train", config_data)
    command = (
        f"python -m wsda_jax.data.prepare --dataset=cityscapes_weak --manual_dir=/data/cityscapes "
        f"--data_dir={tmp_path} --points_per_class=2"
    )
    assert command in str(error.value)


def test_builder_of_an_unprepared_dataset_leaves_no_temporary_folder(tmp_path, monkeypatch):
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    config_data = fixture_trees.config_data(tmp_path / "data", "/data/cityscapes")
    builder = builders.make_builder("cityscapes_weak", config_data)
    assert not builder.is_prepared()
    assert list(temp_root.iterdir()) == []


def test_missing_manual_dir_lists_expected_paths(tmp_path):
    with pytest.raises(layout.LayoutError) as error:
        fixture_trees.prepare("gta5", tmp_path / "data", tmp_path / "nowhere")
    assert "images/*.png" in str(error.value) and "labels/*.png" in str(error.value)
    assert "does not exist" in str(error.value)


def test_wrong_layout_lists_expected_and_found(trees, tmp_path):
    # A SYNTHIA tree given as GTA5.
    with pytest.raises(layout.LayoutError) as error:
        fixture_trees.prepare("gta5", tmp_path / "data", trees["synthia"].root)
    message = str(error.value)
    assert "images/*.png" in message and "RGB/" in message and "GT/" in message
    assert not os.path.exists(tmp_path / "data" / "gta5" / "resize_npy" / "1.0.0")


def test_corrupt_png_is_named(trees, tmp_path):
    raw = tmp_path / "gta5"
    shutil.copytree(trees["gta5"].root, raw)
    bad = raw / "labels" / "00003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(image_io.PreparationError, match="00003.png"):
        fixture_trees.prepare("gta5", tmp_path / "data", raw)
    builder = builders.make_builder("gta5", fixture_trees.config_data(tmp_path / "data", raw))
    assert not builder.is_prepared()
    # The temp folder is removed (the preparation lock file stays).
    assert os.listdir(tmp_path / "data" / "gta5" / "resize_npy") == [".prepare.lock"]


def test_interrupted_preparation_leaves_nothing_complete(trees, tmp_path):
    """A process killed in the middle of writing leaves only an `incomplete.*` folder."""
    data_dir = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import fixture_trees
        from wsda_jax.data.builders import base
        original, seen = base.finish_example, []
        def crash(*args, **kwargs):
            seen.append(1)
            if len(seen) == 3:
                os._exit(3)  # Like a kill: no exception handling, no cleanup.
            return original(*args, **kwargs)
        base.finish_example = crash
        fixture_trees.prepare("cityscapes_weak", {str(data_dir)!r}, {trees["cityscapes"].root!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    variant = data_dir / "cityscapes_weak" / "points2_npy"
    left = [p for p in os.listdir(variant) if p != ".prepare.lock"]
    assert [p.startswith("incomplete.") for p in left] == [True]
    with pytest.raises(sources.DatasetNotPreparedError):
        sources.open_split("cityscapes_weak", "train", fixture_trees.config_data(data_dir))
    fixture_trees.prepare(
        "cityscapes_weak", data_dir, trees["cityscapes"].root
    )  # A rerun completes...
    assert (
        len(sources.open_split("cityscapes_weak", "val", fixture_trees.config_data(data_dir))) == 2
    )
    assert not (variant / left[0]).exists()  # ...and removes the killed run's leftovers.


def test_label_reader_handles_palette_and_grey(tmp_path):
    ids = np.array([[7, 26], [33, 0]], np.uint8)
    fixture_trees.save_palette_png(str(tmp_path / "p.png"), ids)
    fixture_trees.save_png(str(tmp_path / "g.png"), ids)
    np.testing.assert_array_equal(image_io.read_label_ids(str(tmp_path / "p.png")), ids)
    np.testing.assert_array_equal(image_io.read_label_ids(str(tmp_path / "g.png")), ids)
    mapped, _ = classes.map_labels(
        image_io.read_label_ids(str(tmp_path / "p.png")), classes.CITYSCAPES_ID_TO_TRAIN
    )
    np.testing.assert_array_equal(mapped, [[0, 13], [18, 255]])


def test_pre_resize_to_the_reference_working_sizes(trees, tmp_path):
    """GTA5 to 1280x720 and Cityscapes train to 1024x512 at preparation (val untouched);
    points drawn at that size; the size is part of the dataset's name."""
    data_dir = tmp_path / "data"
    gta5_summary = fixture_trees.prepare("gta5", data_dir, trees["gta5"].root, pre_resize=True)
    assert gta5_summary["splits"]["train"]["pre_resized"] == 3
    assert os.path.isdir(data_dir / "gta5" / "resize_1280x720_npy")
    for example in _read("gta5", "train", data_dir, pre_resize=True).values():
        assert example["image"].shape == (720, 1280, 3) and example["label"].shape == (720, 1280)

    tree = trees["cityscapes"]
    summary = fixture_trees.prepare("cityscapes_weak", data_dir, tree.root, pre_resize=True)
    assert summary["splits"]["train"]["pre_resized"] == 4
    assert "pre_resized" not in summary["splits"]["val"]
    assert os.path.isdir(data_dir / "cityscapes_weak" / "points2_train1024x512_npy")
    up = lambda label: np.repeat(np.repeat(label, 16, axis=0), 16, axis=1)  # 32x64 -> 512x1024.
    for name, example in _read("cityscapes_weak", "train", data_dir, pre_resize=True).items():
        assert example["image"].shape == (512, 1024, 3)
        np.testing.assert_array_equal(example["label"], up(tree.labels[name]))
        np.testing.assert_array_equal(
            example["coarse_label"], up(fixture_trees.coarse_of(tree.labels[name]))
        )
        _check_weak_labels(example, k=2)  # Points lie on the resized fine label.
    for name, example in _read("cityscapes_weak", "val", data_dir, pre_resize=True).items():
        np.testing.assert_array_equal(example["image"], tree.images[name])


def test_dataset_prepared_without_pre_resize_is_not_reused(trees, data_dir, tmp_path):
    """A dataset prepared the old way (full size) has another name: a config that asks
    for the pre-resize is told to prepare, never handed full-size records."""
    data_dir, _ = data_dir  # Holds gta5 and cityscapes_weak prepared without pre-resize.
    for dataset in ("gta5", "cityscapes_weak"):
        with pytest.raises(sources.DatasetNotPreparedError, match="--dataset=" + dataset):
            sources.open_split(
                dataset, "train", fixture_trees.config_data(data_dir, pre_resize=True)
            )
    message = sources.prepare_command("gta5", fixture_trees.config_data(data_dir, pre_resize=False))
    assert "--nopre_resize" in message


def test_image_format_npy_and_png_hold_the_same_pixels(trees, tmp_path):
    """'npy' (the default, '_npy' in the name) and 'png' datasets decode to equal examples;
    a config asking for one format never reads the other's folder."""
    data_dir = tmp_path / "data"
    examples = {}
    for image_format in ("npy", "png"):
        config_data = fixture_trees.config_data(data_dir, trees["gta5"].root)
        config_data.image_format = image_format
        builders.prepare(builders.make_builder("gta5", config_data))
        split = sources.open_split("gta5", "train", config_data)
        examples[image_format] = [records.decode_example(split[i]) for i in range(len(split))]
        first_image = split[0]["image"]
        signature = records.NPY_SIGNATURE if image_format == "npy" else records.PNG_SIGNATURE
        assert bytes(first_image[: len(signature)]) == signature
    assert sorted(os.listdir(data_dir / "gta5")) == ["resize", "resize_npy"]
    for npy, png in zip(examples["npy"], examples["png"], strict=True):
        assert npy["name"] == png["name"]
        np.testing.assert_array_equal(npy["image"], png["image"])
        np.testing.assert_array_equal(npy["label"], png["label"])
    config_data = fixture_trees.config_data(tmp_path / "other", trees["gta5"].root)
    config_data.image_format = "png"
    with pytest.raises(sources.DatasetNotPreparedError, match="--image_format=png"):
        sources.open_split("gta5", "train", config_data)


def test_a_worker_that_dies_stops_the_preparation_with_one_line():
    """A pool worker killed (the OOM killer) used to leave the preparation waiting for
    its results forever; `os._exit` ends the worker the same way."""
    with pytest.raises(base.PreparationError, match="a gta5 train worker process died"):
        list(base.parallel_map(os._exit, [0] * 8, num_workers=2, desc="gta5 train"))


def test_the_worker_pool_keeps_the_task_order():
    assert list(base.parallel_map(abs, range(-40, 0), num_workers=2, desc="x")) == list(
        range(40, 0, -1)
    )


class _FailingRecords:
    """Records whose every read raises `error`."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise self.error


def test_a_record_the_machine_cannot_read_is_not_called_damaged():
    """Permission denied is not damage: deleting and preparing the dataset again (the
    damaged-dataset advice) would not help and would throw away a good dataset."""
    denied = OSError("open() failed: Permission denied [/data/x-train.array_record-00000]")
    records = sources.CheckedRecords(_FailingRecords(denied), "x-train.*", "prepare it again")
    with pytest.raises(ValueError, match="cannot be read now .*the files are not damaged") as error:
        records[0]
    assert not isinstance(error.value, errors.DamagedDatasetError)
    garbage = sources.CheckedRecords(_FailingRecords(RuntimeError("bad record")), "x", "again")
    with pytest.raises(errors.DamagedDatasetError, match="record 0 of x is unreadable"):
        garbage[0]


def test_a_damaged_folder_pairs_dataset_is_prepared_again_with_its_own_options(tmp_path):
    """The advice repeats the globs and id map the dataset was prepared with; example
    globs and `--id_map=identity` would build other labels under the same name."""
    options = {"image_glob": "img/*.jpg", "label_glob": "gt/*_ids.png", "id_map": {"7": 0}}
    options.update(val_image_glob="", size_mismatch="resize", weak_labels=True)
    (tmp_path / "preparation_summary.json").write_text(json.dumps({"options": options}))
    config_data = fixture_trees.config_data(tmp_path / "data", "/data/mine")
    hint = sources.reprepare_hint("folder_pairs/mine", config_data, str(tmp_path))
    assert "--dataset=folder_pairs/mine --manual_dir=/data/mine" in hint
    for flag in ("--image_glob='img/*.jpg'", "--label_glob='gt/*_ids.png'", "--weak_labels"):
        assert flag in hint
    assert """--id_map='{"7": 0}' --size_mismatch=resize""" in hint
    assert "val_image_glob" not in hint


def test_val_images_of_several_sizes_need_eval_resize_before_training(tmp_path):
    """Evaluation batches val images of one size: a run on a dataset prepared with
    several is refused when it opens its data, not at its first evaluation."""
    train = fixture_trees.make_folder_tree(str(tmp_path / "raw"), num_images=1)
    val = fixture_trees.make_folder_tree(str(tmp_path / "raw" / "val"), num_images=2, first=5)
    fixture_trees.save_png(f"{val.root}/img/scene6_rgb.png", val.images["scene6"][:16])
    ids = np.where(val.labels["scene6"] == 255, 0, val.labels["scene6"] + 1)[:16]
    fixture_trees.save_png(f"{val.root}/gt/scene6_ids.png", ids.astype(np.uint8))
    options = {"image_glob": "img/*_rgb.png", "label_glob": "gt/*_ids.png"}
    options.update(val_image_glob="val/img/*_rgb.png", val_label_glob="val/gt/*_ids.png")
    options["id_map"] = train.info["id_map"]
    summary = fixture_trees.prepare(
        "folder_pairs/mixed", tmp_path / "data", train.root, options=options
    )
    height, width = val.labels["scene5"].shape
    assert summary["splits"]["val"] == {
        "images": 2,
        "out_of_map_pixels": 0,
        f"size_{height}x{width}": 1,
        f"size_16x{width}": 1,
    }
    config = config_lib.base_config()
    config.data = fixture_trees.config_data(tmp_path / "data", train.root)
    config.data.target = "folder_pairs/mixed"
    expected = f"have 2 sizes \\(16x{width}, {height}x{width}; height x width\\)"
    with pytest.raises(ValueError, match=expected):
        sources.open_val(config)
    config.data.eval_resize = (16, width)
    assert len(sources.open_val(config)) == 2


def test_a_stopped_preparation_does_not_wait_for_its_queued_work():
    """The map stopped early (an error, Ctrl-C): the workers are ended at once, not left
    to finish every chunk already handed to them while the process waits to exit."""
    script = (
        "import sys, time\n"
        "from wsda_jax.data.builders import base\n"
        "tasks = base.parallel_map(time.sleep, [2.0] * 16, num_workers=2, desc='x')\n"
        "next(tasks)\n"
        "tasks.close()\n"
        "print(time.monotonic(), flush=True)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script],
        cwd=subprocesses.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    # Without the ending, exit waits for the queued chunks: 2 s tasks, 2 per chunk.
    assert time.monotonic() - float(process.stdout.split()[-1]) < 3.0
