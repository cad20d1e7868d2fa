"""Training logs: `WORKDIR/metrics.jsonl`, TensorBoard events, a progress bar (on a
terminal), log lines.

The train loop hands every step's metrics (still on the device) to `Reporter.update`;
the reporter keeps them and only fetches them with `jax.device_get` when the *next*
step has been dispatched, and only if the kept step is a log step. Logging therefore
never makes the host wait for the step it has just launched (JAX training cookbook).
Only process 0 writes files; every process may call the methods.

On resume from step N (`initial_step`), the lines past N that the interrupted run wrote
after its last checkpoint are dropped from metrics.jsonl (the file is replaced
atomically), and TensorBoard is told to hide those steps (`purge_step`: a new event
file that marks them as purged; the old events stay on disk, tensorboardX cannot
delete them), so a resumed run shows every step once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import PIL.Image
import tensorboardX
import tqdm
from absl import logging


def _to_python(value: Any) -> float | int:
    value = np.asarray(value)
    return value.item() if value.dtype.kind in "iub" else float(value)


class Profiler:
    """A `jax.profiler` trace of train steps `start_step + 1 .. start_step + num_steps`
    into the run's TensorBoard folder (`config.profile`; start_step 0 = off), viewable
    with TensorBoard's profile plugin or Perfetto. Process 0 traces."""

    def __init__(self, workdir: str, start_step: int, num_steps: int) -> None:
        self._directory = os.path.join(workdir, "tensorboard")
        self._start, self._stop = start_step, start_step + num_steps
        self._on = start_step > 0 and jax.process_index() == 0

    def before_step(self, step: int) -> None:
        """Called with the steps done before dispatching the next one."""
        if self._on and step == self._start:
            jax.profiler.start_trace(self._directory)

    def after_step(self, step: int, state: Any) -> None:
        """Called with the steps done; ends the trace once its steps have run."""
        if self._on and step == self._stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self._on = False
            steps = f"{self._start + 1}-{self._stop}"
            logging.info("Wrote a profile of steps %s to %s.", steps, self._directory)


class Reporter:
    """Writes scalars to metrics.jsonl and TensorBoard; drives the progress bar."""

    def __init__(
        self,
        workdir: str,
        *,
        num_steps: int,
        initial_step: int,
        log_every_steps: int,
        images_per_step: int,
    ) -> None:
        self._is_writer = jax.process_index() == 0
        self._log_every = log_every_steps
        self._num_steps = num_steps
        self._images_per_step = images_per_step
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._last_time = time.perf_counter()
        self._last_step = initial_step
        self._jsonl = None
        self._tb = None
        if self._is_writer:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_metrics(path, initial_step)
            self._jsonl = open(path, "a")  # noqa: SIM115
            tensorboard_dir = os.path.join(workdir, "tensorboard")
            purge = initial_step + 1 if os.path.isdir(tensorboard_dir) else None
            self._tb = tensorboardX.SummaryWriter(tensorboard_dir, purge_step=purge)
        self._bar = tqdm.tqdm(
            total=num_steps,
            initial=initial_step,
            # Only on a terminal: in a log file its redraws would glue the log lines
            # onto bar lines (the log lines report progress every log_every_steps).
            disable=not (self._is_writer and sys.stderr.isatty()),
            dynamic_ncols=True,
            mininterval=1.0,
            desc="train",
        )

    def _is_log_step(self, step: int) -> bool:
        return step % self._log_every == 0 or step == self._num_steps

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records the metrics of `step` (1-based: steps done); writes the previous one."""
        self._write_pending()
        self._pending = (step, metrics)
        self._bar.update(step - self._bar.n)

    def flush(self) -> None:
        """Writes the kept metrics now (end of training, before a preemption exit)."""
        self._write_pending()

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not self._is_log_step(step):
            return
        scalars = {name: _to_python(v) for name, v in jax.device_get(dict(metrics)).items()}
        now = time.perf_counter()
        if step > self._last_step:
            seconds = now - self._last_time
            scalars["images_per_sec"] = self._images_per_step * (step - self._last_step) / seconds
        self._last_time, self._last_step = now, step
        self.write_scalars(step, scalars)
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
        logging.info("step %d/%d: %s", step, self._num_steps, shown)
        self._bar.set_postfix(total=scalars.get("total", float("nan")), refresh=False)

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        """One metrics.jsonl line and one TensorBoard scalar per entry."""
        if not self._is_writer:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def write_eval_images(self, step: int, eval_dir: str) -> None:
        """The evaluation's PNGs of `step` (`eval_dir/STEP_MODEL_KIND.png`: panels,
        confusion matrices) as TensorBoard images `eval/MODEL_KIND`, beside the scalars."""
        if not self._is_writer:
            return
        prefix = f"{step}_"
        for name in sorted(os.listdir(eval_dir)):
            if name.startswith(prefix) and name.endswith(".png") and name.count("_") == 2:
                with PIL.Image.open(os.path.join(eval_dir, name)) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tag = "eval/" + name[len(prefix) : -len(".png")]
                self._tb.add_image(tag, pixels, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        """Writes what is kept and closes the files."""
        self.flush()
        self._bar.close()
        if self._is_writer:
            self._jsonl.close()
            self._tb.close()


def truncate_metrics(path: str, last_step: int) -> int:
    """Drops the lines of `path` past `last_step` (and any line cut short by a crash, or
    that is not JSON at all); returns how many were dropped. Writes a new file and renames
    it over the old one, so a crash here leaves either file whole."""
    if not os.path.exists(path):
        return 0
    kept, dropped, unreadable = [], 0, 0
    with open(path, "rb") as f:  # Bytes: a damaged (binary) line must not stop the run.
        for line in f:
            try:
                keep = json.loads(line)["step"] <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
                unreadable += bool(line.strip())
            if keep:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                dropped += bool(line.strip())
    if dropped:
        temporary = f"{path}.tmp"
        with open(temporary, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        logging.info("Dropped %d lines past step %d from %s.", dropped, last_step, path)
    if unreadable:
        logging.warning("Dropped %d unreadable (not JSON) lines from %s.", unreadable, path)
    return dropped
