"""What a finished 4-step run of configs/synthetic_coarse.py:tiny leaves in its workdir,
checked the same way for the in-process run (test_train) and the CLI run (test_main)."""

import json
import math
import os
import struct

from tensorboardX.proto import event_pb2

from wsda_jax import classes


def train_lines(workdir):
    """The training lines of DIR/metrics.jsonl (evaluation lines have no `total`)."""
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [line for line in lines if "total" in line]


def assert_tiny_run_outputs(workdir):
    """Metrics of steps 1-4, checkpoints 2 and 4, the step-4 evaluation of student and
    teacher with its PNGs, TensorBoard events; returns the final report."""
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = train_lines(workdir)
    assert [line["step"] for line in train] == [1, 2, 3, 4]
    for line in train:
        assert math.isfinite(line["total"]) and line["images_per_sec"] > 0
        assert line["skipped_steps"] == 0 and "learning_rate" in line
    assert any("eval/teacher_miou" in line for line in lines)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # keep_checkpoints=2
    report = json.load(open(workdir / "eval" / "4.json"))
    for name in ("student", "teacher"):
        assert 0.0 <= report[name]["miou"] <= 1.0
        assert set(report[name]["iou"]) == set(classes.CLASS_NAMES)
        assert report[name]["pixels"] == 8 * 32 * 64  # Every val pixel, no padding.
        for kind in KINDS:
            assert os.path.getsize(workdir / "eval" / f"4_{name}_{kind}.png") > 0
    tags = tensorboard_tags(workdir / "tensorboard")
    assert {"total", "eval/student_miou", "eval/teacher_miou"} <= tags["simple_value"]
    assert tags["image"] == {f"eval/{m}_{k}" for m in ("student", "teacher") for k in KINDS}
    return report


KINDS = ("panels", "confusion")


def tensorboard_tags(directory):
    """{'simple_value' | 'image': {tag}} of the TensorBoard event files in `directory`
    (read as TFRecords: length, its CRC, the Event proto, its CRC)."""
    found = {}
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                found.setdefault(value.WhichOneof("value"), set()).add(value.tag)
    return found
