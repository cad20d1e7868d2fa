"""Faults met through the CLI, on the tiny synthetic config: each ends with the run going
on with nothing lost, or with one clear line on stderr and nothing damaged.

The session's one CLI training run (`tiny_cli_run` in conftest.py: checkpoints 2 and 4) is
copied by the tests that change a workdir. Subprocesses share the JAX compilation cache
and the tiny dataset with the other CLI tests under pytest's base temp directory.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import subprocesses
from subprocesses import ROOT, TINY, assert_one_line_error, copy_workdir, run_main

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_cli_run):
    return tiny_cli_run


@pytest.fixture
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def _truncate_arrays(workdir, step):
    """Cuts every array data file of checkpoint `step` short, as a failing disk would;
    its metadata stays readable, so the restore itself fails."""
    data = workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"
    names = os.listdir(data)
    assert names
    for name in names:
        with open(data / name, "r+b") as f:
            f.truncate(64)


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def _train_steps(workdir):
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [line["step"] for line in lines if "total" in line]


def _warnings(stderr, text):
    return [line for line in stderr.splitlines() if text in line]


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_corrupt_latest_checkpoint_is_moved_aside_and_rewritten(trained, tmp_path, base):
    workdir = copy_workdir(trained, tmp_path)
    _truncate_arrays(workdir, 4)
    # A lock left by a run that was killed: stale, so this run takes over.
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 0}
    (workdir / "lock").write_text(json.dumps(lock))

    result = run_main(base, TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-4000:]
    unreadable = _warnings(result.stderr, "is unreadable")
    assert len(unreadable) == 1, result.stderr[-4000:]
    assert f"moved to {workdir / 'checkpoints' / 'corrupt' / '4'}" in unreadable[0]
    assert "Traceback" not in result.stderr and "Event loop" not in result.stderr
    assert "Resuming from step 2" in result.stderr
    assert "%|" not in result.stderr  # No progress bar in a file: log lines stay whole.
    assert "Removed the stale lock" in result.stderr
    # Step 4 was trained again and rewritten: the same evaluation as the first time.
    assert _steps(workdir) == [2, 4]
    assert os.listdir(workdir / "checkpoints" / "corrupt") == ["4"]
    assert json.load(open(workdir / "eval" / "4.json")) == json.load(
        open(trained / "eval" / "4.json")
    )
    # The lines the first run wrote past step 2 were dropped before steps 3-4 reran.
    assert _train_steps(workdir) == [1, 2, 3, 4]
    assert not (workdir / "lock").exists()  # Released at exit.


def test_a_run_whose_checkpoints_were_all_set_aside_does_not_start_over(trained, tmp_path, base):
    """Every checkpoint unreadable: the run sets them aside and stops; the next start
    refuses to start from scratch (that would overwrite the run's metrics)."""
    workdir = copy_workdir(trained, tmp_path)
    for step in _steps(workdir):
        _truncate_arrays(workdir, step)
    metrics = (workdir / "metrics.jsonl").read_bytes()
    first = run_main(base, TINY, f"--workdir={workdir}")
    assert_one_line_error(first, f"no readable checkpoint in {workdir / 'checkpoints'}")
    second = run_main(base, TINY, f"--workdir={workdir}")
    corrupt = workdir / "checkpoints" / "corrupt"
    assert_one_line_error(second, f"its unreadable ones are in {corrupt} (steps 2, 4)")
    assert sorted(os.listdir(corrupt)) == ["2", "4"] and _steps(workdir) == []
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


def test_eval_mode_falls_back_to_the_previous_checkpoint(trained, tmp_path, base):
    workdir = copy_workdir(trained, tmp_path)
    _truncate_arrays(workdir, 4)
    shutil.rmtree(workdir / "eval")
    result = run_main(base, TINY, f"--workdir={workdir}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(_warnings(result.stderr, "is unreadable")) == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(workdir / "eval")) == [
        "2.json",
        "2_student_confusion.png",
        "2_student_panels.png",
        "2_teacher_confusion.png",
        "2_teacher_panels.png",
    ]
    assert _steps(workdir) == [2]
    assert os.listdir(workdir / "checkpoints" / "corrupt") == ["4"]


def _tree_bytes(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {
        os.path.relpath(os.path.join(folder, name), directory): open(
            os.path.join(folder, name), "rb"
        ).read()
        for folder, _, names in os.walk(directory)
        for name in names
    }


def test_stage_one_workdir_resumed_with_a_stage_two_config_is_refused(trained, tmp_path, base):
    """A stage-1 workdir (its saved configs say stage 'source_only', weak label 'none':
    written here into a copy of the session's run) resumed with the stage-2 config: the
    run would train on from the stage-1 step and rotate its checkpoints away."""
    workdir = copy_workdir(trained, tmp_path)
    for step in _steps(workdir):
        path = workdir / "checkpoints" / str(step) / "config" / "metadata"
        saved = json.loads(path.read_text())
        saved.update(stage="source_only", weak_label="none")
        path.write_text(json.dumps(saved))
    before = _tree_bytes(workdir)
    result = run_main(base, TINY, f"--workdir={workdir}", "--config.num_steps=8")
    assert_one_line_error(
        result,
        f"--workdir={workdir} holds another run: its checkpoint 4 was saved with "
        "stage='source_only', weak_label='none', this config has stage='adapt', "
        f"weak_label='coarse'; nothing was changed (to start stage 2 from it, use a new "
        f"--workdir with --config.init.init_from={workdir})",
    )
    assert _tree_bytes(workdir) == before  # Checkpoints, metrics, evaluations: untouched.


def test_checkpoint_of_another_model_is_named_and_kept(trained, tmp_path, base):
    workdir = copy_workdir(trained, tmp_path)
    before = _tree_bytes(workdir)
    result = run_main(base, TINY, f"--workdir={workdir}", "--config.model.width=16")
    assert_one_line_error(
        result, "its checkpoint 4 was saved with model.width=8, this config has model.width=16"
    )
    assert "use another --workdir" in result.stderr
    assert "Event loop" not in result.stderr
    assert _tree_bytes(workdir) == before
    assert not (workdir / "lock").exists()


def test_second_run_in_a_workdir_is_refused(trained, tmp_path, base):
    workdir = copy_workdir(trained, tmp_path)
    lock = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0})
    (workdir / "lock").write_text(lock)  # This live process "runs" there.
    lines_before = (workdir / "metrics.jsonl").read_text()
    result = run_main(base, TINY, f"--workdir={workdir}")
    assert_one_line_error(result, f"is in use by another run (pid {os.getpid()} on ")
    assert (workdir / "lock").read_text() == lock
    assert (workdir / "metrics.jsonl").read_text() == lines_before


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint_every_steps=0", "config.checkpoint_every_steps=0 must be >= 1"),
        ("eval.every_steps=0", "config.eval.every_steps=0 must be >= 1"),
        ("log_every_steps=0", "config.log_every_steps=0 must be >= 1"),
        ("num_steps=0", "config.num_steps=0 must be >= 1"),
        ("optim.lr=-0.01", "config.optim.lr=-0.01 must be >= 0"),
        ("keep_checkpoints=0", "config.keep_checkpoints=0 must be >= 1"),
        ("ema.decay=1.5", "config.ema.decay=1.5 must be in [0.0, 1.0]"),
        ("data.eval_resize=abc", "config.data.eval_resize=('abc',) must be a sequence of int"),
        ("data.crop_size=5", "config.data.crop_size=(5,) must be a pair (2 values)"),
        ("seed=-1", "config.seed=-1 must be >= 0"),
    ],
)
def test_out_of_range_config_value_is_one_line(override, message, tmp_path):
    result = run_main(tmp_path, TINY, f"--config.{override}", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, message)
    # Before JAX starts (main logs the devices right after), data or compilation.
    assert "devices:" not in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override, hint",
    [
        ("data.rare_class_sampling.min_crop_ratio=0.5", "rare_class_sampling.min_crop_pixels?)"),
        ("optim.learning_rate=0.1", None),  # Nothing close beside it: no guess.
    ],
)
def test_unknown_override_key_names_the_closest_key_beside_it(override, hint, tmp_path):
    result = run_main(tmp_path, TINY, f"--config.{override}", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, "unknown key in a --config.KEY override")
    assert (hint in result.stderr) if hint else ("did you mean" not in result.stderr)


def test_garbage_imagenet_file_is_named(tmp_path, base):
    weights = tmp_path / "resnet.npz"
    weights.write_bytes(b"this is not a weight file")
    result = run_main(
        base, TINY, f"--config.init.imagenet={weights}", f"--workdir={tmp_path / 'w'}"
    )
    assert_one_line_error(result, f"config.init.imagenet='{weights}'")
    assert "is not a weight file" in result.stderr
    assert "allow_pickle" not in result.stderr


def test_predict_skips_unreadable_files_and_keeps_names_distinct(trained, tmp_path, base):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.png", "x.jpg", "y.png"):
        PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(inputs / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    os.mkfifo(inputs / "fifo.png")  # Opening it would block until a writer comes.
    before = {
        name: (inputs / name).read_bytes() for name in os.listdir(inputs) if name != "fifo.png"
    }

    def predict(output_dir):
        return run_main(
            base,
            TINY,
            f"--workdir={trained}",
            "--mode=predict",
            f"--input_dir={inputs}",
            f"--output_dir={output_dir}",
        )

    result = predict(tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["x_jpg.png", "x_png.png", "y.png"]
    assert len(_warnings(result.stderr, "broken.png: not a readable image")) == 1
    assert len(_warnings(result.stderr, "fifo.png: not a regular file")) == 1
    assert f"Predicting with the teacher of checkpoint 4 of {trained}" in result.stderr
    assert "Skipped 1 of 4 images" in result.stderr
    assert "Wrote 3 predictions" in result.stderr

    assert_one_line_error(predict(inputs), "is the input folder")
    assert_one_line_error(predict(inputs / "x.png"), "x.png' is a file, not a folder")
    assert {n: (inputs / n).read_bytes() for n in os.listdir(inputs) if n != "fifo.png"} == before


def _chattr(path, flag):
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_unwritable_checkpoint_directory_fails_fast(tmp_path, base):
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _chattr(probe, "+i"):  # Root ignores permission bits; immutability it obeys.
        pytest.skip("chattr +i is not available here")
    _chattr(probe, "-i")
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "wsda_jax.main",
        TINY,
        "--config.checkpoint_every_steps=1",
        "--config.keep_checkpoints=10",
        f"--config.data.data_dir={base / 'data'}",
        f"--workdir={workdir}",
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=subprocesses.jax_env(base),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = workdir / "checkpoints"
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints / "1").is_dir():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert _chattr(checkpoints, "+i")
        try:  # The next save (one step later) fails; the old code hung for minutes.
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            pytest.fail("the run hung after its checkpoint directory became unwritable")
    finally:
        _chattr(checkpoints, "-i")
    assert_one_line_error(
        subprocess.CompletedProcess(command, process.returncode, "", stderr),
        f"cannot write checkpoints to {checkpoints}",
    )
    assert "the last good checkpoint is step" in stderr
    assert 1 in _steps(workdir)


def test_tool_with_an_impossible_setting_is_one_line(base):
    """The tools report bad input like the entry point (`cli_errors.run_tool`): 32-px
    crops leave 4x4 features, fewer pixels than the contrastive loss samples views."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.tools.benchmarks.train_step",
            "--depth=18",
            "--width=4",
            "--crop=32",
            "--compile_only",
        ],
        cwd=ROOT,
        env=subprocesses.jax_env(base),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result, "max_views=20 must be in [1, h * w = 16]")


def test_damaged_metrics_files_do_not_block_a_resume(trained, tmp_path, base):
    """Garbage in the metrics file of the best checkpoint (Orbax reads every step's when
    it opens the folder) and a binary metrics.jsonl: the run goes on, naming the file."""
    workdir = copy_workdir(trained, tmp_path)
    metrics = workdir / "checkpoints" / "4" / "metrics" / "metrics"
    metrics.write_bytes(b"\xff\xfe not json")
    (workdir / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    result = run_main(base, TINY, f"--workdir={workdir}")  # Finished: evaluates again.
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert _warnings(result.stderr, f"Unreadable metrics {metrics} (UnicodeDecodeError")
    assert _warnings(result.stderr, f"unreadable (not JSON) lines from {workdir}/metrics.jsonl")
    assert "Resuming from step 4" in result.stderr
    assert _steps(workdir) == [2, 4]


def _damaged_data_base(base, tmp_path):
    """A base folder for `run_main` with a copy of the session's tiny dataset (to damage)
    and the session's compilation cache."""
    copy = tmp_path / "base"
    copy.mkdir()
    shutil.copytree(base / "data", copy / "data")
    (copy / "jax_cache").symlink_to(base / "jax_cache")
    folder = next((copy / "data" / "synthetic_target").iterdir()) / "1.0.0"
    return copy, folder


def test_damaged_prepared_dataset_is_named(trained, tmp_path, base):
    copy, folder = _damaged_data_base(base, tmp_path)
    val = next(folder.glob("*-val.array_record-*"))
    os.truncate(val, 1000)
    result = run_main(copy, TINY, f"--workdir={copy_workdir(trained, tmp_path)}", "--mode=eval")
    assert_one_line_error(result, f"record 0 of {folder}/synthetic_target-val.array_record-*")
    assert "delete the dataset's folder: the next run generates it again" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_stops_the_run_and_frees_its_workdir(tmp_path, base, signum):
    """SIGINT or SIGTERM while the run opens its data and compiles (its lock is taken
    first): the command stops with 128 + signal and one line, and releases the lock; the
    handler is in place from the start (test_checkpointing covers a Ctrl-C that Python
    discards inside a gc callback)."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "wsda_jax.main", TINY, f"--workdir={workdir}"]
    command.append(f"--config.data.data_dir={base / 'data'}")
    process = subprocess.Popen(
        command, cwd=ROOT, env=subprocesses.jax_env(base), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (workdir / "lock").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-4000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-4000:]
    # "Interrupted (SIGTERM) outside the train loop", or, when Python discarded the
    # signal's KeyboardInterrupt in a gc callback, "Interrupted by SIGTERM at step 1".
    assert "Interrupted" in stderr.splitlines()[-1]
    assert signal.Signals(signum).name in stderr.splitlines()[-1]
    assert not (workdir / "lock").exists()


@pytest.mark.parametrize(
    "tool, args, expected",
    [
        ("wsda_jax.tools.browse", ["--config=configs/missing.py", "--out=o"], "missing.py"),
        ("wsda_jax.tools.browse", [TINY, "--config.num_step=3"], 'Did you mean "num_steps"'),
        ("wsda_jax.tools.browse", [TINY, "--out=o", "--bogus=1"], "Unknown command line flag"),
        ("wsda_jax.tools.browse", [TINY, "--out=README.md"], "--out='README.md' is a file"),
        ("wsda_jax.data.prepare", [], "Flag --dataset must have a value other than None"),
        ("wsda_jax.data.prepare", ["--dataset=gta5", "x"], "unexpected arguments ['x']"),
        (
            "wsda_jax.tools.benchmarks.device_check",
            ["--dry_run", "--reference_remat=none,conv"],
            "--reference_remat: a comma-separated list of none, blocks, conv_outputs",
        ),
    ],
)
def test_tools_fail_in_one_line(tool, args, expected, base):
    """All commands share `cli_errors.parse_flags` and `run_tool`."""
    command = [sys.executable, "-m", tool, *args]
    result = subprocess.run(
        command, cwd=ROOT, env=subprocesses.jax_env(base), capture_output=True, text=True
    )
    assert_one_line_error(result, expected)


def test_browse_shows_the_batches_of_rare_class_sampling(trained, base, tmp_path):
    """The browser builds the train iterator as training does, with the source's class
    pixel counts that rare class sampling needs (`trained` made the tiny dataset)."""
    del trained
    copy, _ = _damaged_data_base(base, tmp_path)
    out = tmp_path / "browse"
    command = [sys.executable, "-m", "wsda_jax.tools.browse", TINY, f"--out={out}"]
    command += ["--num_batches=1", f"--config.data.data_dir={copy / 'data'}"]
    command.append("--config.data.rare_class_sampling.enabled=True")
    result = subprocess.run(
        command, cwd=ROOT, env=subprocesses.jax_env(base), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.load(open(out / "batches.json"))) >= 1


def test_unreadable_checkpoint_in_a_read_only_folder_is_one_line(trained, tmp_path, base):
    workdir = copy_workdir(trained, tmp_path)
    _truncate_arrays(workdir, 4)
    if not _chattr(workdir / "checkpoints", "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        result = run_main(base, TINY, f"--workdir={workdir}", "--mode=eval")
    finally:
        _chattr(workdir / "checkpoints", "-i")
    assert_one_line_error(
        result, f"checkpoint {workdir}/checkpoints/4 is unreadable (Exception: Encountered"
    )
    assert f"and cannot be moved to corrupt/: Operation not permitted: {workdir}" in result.stderr
    assert _steps(workdir) == [2, 4]


def test_full_disk_stops_with_the_last_good_checkpoint(tmp_path, base):
    """A 3 MiB tmpfs holds two checkpoints of the tiny run, not three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        workdir = disk / "run"
        result = run_main(
            base,
            TINY,
            f"--workdir={workdir}",
            "--config.checkpoint_every_steps=1",
            "--config.keep_checkpoints=4",
        )
        steps = _steps(workdir)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    assert_one_line_error(result, f"cannot write checkpoints to {workdir}/checkpoints: No space")
    assert f"(the last good checkpoint is step {steps[-1]})" in result.stderr
    assert "Event loop" not in result.stderr
