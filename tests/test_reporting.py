"""The reporter writes log steps only, one step late, to metrics.jsonl and TensorBoard;
the evaluation report turns a confusion matrix into IoU JSON and plots."""

import json
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest

from wsda_jax import config_lib, evaluation, prediction, reporting


class _Unfetchable(dict):
    """Metrics that fail if anyone reads them: non-log steps must never be fetched."""

    def items(self):
        raise AssertionError("metrics of a non-log step were fetched")


def read_metrics(workdir: str) -> list[dict]:
    """The lines of WORKDIR/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _reporter(workdir, **kwargs):
    defaults = dict(
        num_steps=5,
        initial_step=0,
        log_every_steps=2,
        images_per_step=8,
    )
    return reporting.Reporter(str(workdir), **{**defaults, **kwargs})


def test_writes_log_steps_one_step_late(tmp_path):
    reporter = _reporter(tmp_path)
    reporter.update(1, _Unfetchable())
    reporter.update(2, {"loss": jnp.asarray(2.5), "skipped": jnp.asarray(0, jnp.int32)})
    assert read_metrics(str(tmp_path)) == []  # Step 2 is kept until step 3 runs.
    reporter.update(3, _Unfetchable())
    lines = read_metrics(str(tmp_path))
    assert [line["step"] for line in lines] == [2]
    assert lines[0]["loss"] == 2.5 and lines[0]["skipped"] == 0
    assert isinstance(lines[0]["skipped"], int)
    assert lines[0]["images_per_sec"] > 0
    reporter.update(4, {"loss": jnp.asarray(1.0)})
    reporter.update(5, {"loss": jnp.asarray(0.5)})  # The last step is always logged.
    reporter.close()
    lines = read_metrics(str(tmp_path))
    assert [line["step"] for line in lines] == [2, 4, 5]
    assert [line["loss"] for line in lines] == [2.5, 1.0, 0.5]


def test_resumed_run_appends_and_tensorboard_written(tmp_path):
    reporter = _reporter(tmp_path)
    reporter.update(2, {"loss": jnp.asarray(1.0)})
    reporter.close()
    reporter = _reporter(tmp_path, initial_step=2)
    reporter.update(4, {"loss": jnp.asarray(3.0)})
    reporter.write_scalars(4, {"eval/miou": 0.25})
    reporter.close()
    lines = read_metrics(str(tmp_path))
    assert [(line["step"], sorted(line)) for line in lines] == [
        (2, ["images_per_sec", "loss", "step"]),
        (4, ["eval/miou", "step"]),
        (4, ["images_per_sec", "loss", "step"]),
    ]
    events = os.listdir(tmp_path / "tensorboard")
    assert events and all(os.path.getsize(tmp_path / "tensorboard" / e) > 0 for e in events)


def test_eval_report_json_and_plots(tmp_path):
    config = config_lib.base_config()
    config.data.source, config.eval.num_panels = "synthia", 1
    confusion = np.zeros((19, 19), np.int64)
    confusion[0, 0], confusion[0, 1] = 3, 1  # road: IoU 3/4; sidewalk predicted, never true.
    confusion[9, 9] = 5  # terrain: perfect, but not among SYNTHIA's 16 classes.
    examples = [{"image": np.zeros((8, 16, 3), np.uint8), "label": np.zeros((8, 16), np.int32)}]
    predictions = np.ones((1, 8, 16), np.uint8)
    report = evaluation.write_report(
        config, str(tmp_path), 7, {"student": (confusion, predictions)}, examples
    )
    student = report["student"]
    assert student["iou"]["road"] == 0.75 and student["iou"]["sidewalk"] == 0.0
    assert student["iou"]["terrain"] == 1.0 and student["iou"]["car"] is None
    assert student["miou"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert student["miou_16"] == pytest.approx(0.75 / 2)  # road, sidewalk
    assert student["miou_13"] == pytest.approx(0.75 / 2)
    assert json.load(open(tmp_path / "eval" / "7.json")) == report
    assert report["settings"]["scales"] == [1.0] and report["settings"]["flip"] is False
    assert report["settings"]["target"] == config.data.target
    for name in ("7_student_panels.png", "7_student_confusion.png"):
        assert os.path.getsize(tmp_path / "eval" / name) > 0


def test_resume_drops_the_lines_past_the_restored_step(tmp_path):
    reporter = _reporter(tmp_path, log_every_steps=1)
    for step in range(1, 6):
        reporter.update(step, {"loss": jnp.asarray(float(step))})
    reporter.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # A line cut short by a kill.
    time.sleep(1.1)  # Event file names carry the second they were made.
    # Resumed from the checkpoint of step 3: steps 4 and 5 are trained (and logged) again.
    reporter = _reporter(tmp_path, log_every_steps=1, initial_step=3)
    reporter.update(4, {"loss": jnp.asarray(40.0)})
    reporter.close()
    lines = read_metrics(str(tmp_path))
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    # TensorBoard: the resumed writer's file starts with SessionLog START at step 4, on
    # which TensorBoard hides the older files' events from step 4 on.
    files = sorted(os.listdir(tmp_path / "tensorboard"))
    assert len(files) == 2
    starts = [e.step for e in _events(tmp_path / "tensorboard" / files[-1]) if e.session_log.status]
    assert starts == [4]


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12 : offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def test_predict_output_names_are_distinct():
    names = prediction.output_names(["a.png", "x.jpg", "x.png", "x_png.png", "y.JPEG"])
    assert names == {
        "a.png": "a.png",
        "x.jpg": "x_jpg.png",
        "x.png": "x_png.png",
        "x_png.png": "x_png_png_1.png",  # Its plain name is taken by x.png.
        "y.JPEG": "y.png",
    }
    assert len(set(names.values())) == len(names)
