"""End to end on the CPU: `python -m wsda_jax.main` trains, evaluates and predicts on the
tiny synthetic config, and bad input gets one line and exit status 1.

The session's one CLI training run (`tiny_cli_run` in conftest.py) is shared by the
assertions. Subprocesses share a JAX compilation cache and the generated tiny dataset
under pytest's base temp directory.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import tiny_runs
from subprocesses import TINY, assert_one_line_error, copy_workdir, run_main

from wsda_jax import classes

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_cli_run):
    return tiny_cli_run


def test_train_writes_metrics_checkpoints_and_eval(trained):
    """The CLI run leaves what the in-process run does (tests/test_train.py)."""
    tiny_runs.assert_tiny_run_outputs(trained)


def test_eval_mode_reproduces_the_training_evaluation(trained, tmp_path, tmp_path_factory):
    during_training = json.load(open(trained / "eval" / "4.json"))
    workdir = copy_workdir(trained, tmp_path)
    (workdir / "eval" / "4.json").write_text("{}")  # Rewritten, with a notice.
    result = run_main(tmp_path_factory.getbasetemp(), TINY, f"--workdir={workdir}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.load(open(workdir / "eval" / "4.json")) == during_training
    assert f"Replacing the earlier evaluation {workdir}/eval/4.json" in result.stderr
    scores = ", ".join(
        f"{m} {100 * during_training[m]['miou']:.1f}" for m in ("student", "teacher")
    )
    assert f"Target val mIoU (%) at step 4: {scores} (eval/4.json)." in result.stdout


def test_eval_mode_with_other_settings_writes_its_own_file(trained, tmp_path_factory):
    """Flip and two scales are not the training run's settings: their report goes to
    eval/4_scales1-0.5_flip_first8_float32.json (with its settings) and 4.json stays."""
    during_training = json.load(open(trained / "eval" / "4.json"))
    assert during_training["settings"]["flip"] is False
    result = run_main(
        tmp_path_factory.getbasetemp(),
        TINY,
        f"--workdir={trained}",
        "--mode=eval",
        "--config.eval.flip=True",
        "--config.eval.scales=(1.0,0.5)",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    name = "4_scales1-0.5_flip_first8_float32"
    other = json.load(open(trained / "eval" / f"{name}.json"))
    assert other["settings"]["flip"] is True and other["settings"]["scales"] == [1.0, 0.5]
    assert os.path.exists(trained / "eval" / f"{name}_student_confusion.png")
    assert json.load(open(trained / "eval" / "4.json")) == during_training


def test_predict_mode_writes_colourised_pngs(trained, tmp_path, tmp_path_factory):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(inputs / name)
    (inputs / "notes.txt").write_text("not an image")
    result = run_main(
        tmp_path_factory.getbasetemp(),
        TINY,
        f"--workdir={trained}",
        "--mode=predict",
        f"--input_dir={inputs}",
        f"--output_dir={outputs}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(outputs)) == ["a.png", "b.png"]
    palette = {tuple(c) for c in classes.PALETTE[: classes.NUM_CLASSES]}
    for name in ("a.png", "b.png"):
        prediction = np.asarray(PIL.Image.open(outputs / name))
        assert prediction.shape == (32, 48, 3)
        assert {tuple(c) for c in prediction.reshape(-1, 3)} <= palette


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config=configs/missing.py"], "No such file or directory: 'configs/missing.py'"),
        ([TINY, "--config.num_step=3"], 'Did you mean "num_steps"'),
        (["--config=configs/gta2cs_coarse.py"], "Prepare it with: python -m wsda_jax.data.prepare"),
        ([TINY, "--process_id=1"], "need --coordinator_address, --num_processes as well"),
        (
            [TINY, "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
            "--process_id=2 must be in [0, 2)",
        ),
        ([TINY, "stray"], "unexpected arguments ['stray'] (flags are --name=value)"),
        (["--config={tmp}/syntax.py"], "cannot load the config: {tmp}/syntax.py:2: SyntaxError"),
        (["--config={tmp}/raises.py"], "the config: {tmp}/raises.py:3: RuntimeError: no GPU"),
        (["--config={tmp}/imports.py"], "{tmp}/imports.py:1: ModuleNotFoundError: No module"),
        (["--config={tmp}/typo.py"], "the config: {tmp}/typo.py:3: AttributeError: 'dpeth'"),
        ([TINY], "Not a directory: {tmp}/data/synthetic_"),  # run_main's data_dir.
        (
            ["--config=configs/synthetic_coarse.py:daformr"],
            "cannot load the config --config=configs/synthetic_coarse.py:daformr: unknown config "
            "variant 'daformr': this config takes 'tiny', 'daformer', 'mit' (comma-separated)",
        ),
        (
            ["--config={tmp}/raises.py:tiny"],
            "the config --config={tmp}/raises.py:tiny: TypeError: get_config() takes 0 positional",
        ),
    ],
    ids=[
        "missing_config",
        "unknown_key",
        "dataset_not_prepared",
        "half_process_flags",
        "bad_id",
        "positional_argument",
        "config_syntax_error",
        "config_raises",
        "config_missing_import",
        "config_reads_an_unknown_key",
        "data_dir_a_file",
        "config_variant_typo",
        "config_takes_no_argument",
    ],
)
def test_bad_input_is_one_line(args, expected, tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config():\n    return {\n")
    (tmp_path / "raises.py").write_text(
        "def get_config():\n    x = 1\n    raise RuntimeError('no GPU')\n"
    )
    (tmp_path / "imports.py").write_text("import no_such_module\n")
    (tmp_path / "typo.py").write_text(  # Not an override: the file's own code.
        "from wsda_jax import config_lib\n"
        "def get_config():\n"
        "    return config_lib.base_config().model.dpeth\n"
    )
    (tmp_path / "data").write_text("")  # A file where run_main puts the dataset.
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    expected = expected.replace("{tmp}", str(tmp_path))
    if args[0].startswith("--config=configs/gta"):
        args = [*args, f"--config.data.data_dir={tmp_path / 'empty'}"]
    result = run_main(tmp_path, *args, f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, expected)


def test_a_config_that_cannot_run_is_refused_before_the_workdir_is_made(tmp_path):
    result = run_main(
        tmp_path, TINY, "--config.model.aspp_dilations=(0,)", f"--workdir={tmp_path / 'w'}"
    )
    assert_one_line_error(result, "config.model.aspp_dilations=(0,): one or more positive")
    assert not (tmp_path / "w").exists()


def test_help_exits_with_zero(tmp_path):
    result = run_main(tmp_path, "--help")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--workdir" in result.stdout


def test_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_main(tmp_path, TINY, f"--workdir={tmp_path / 'file' / 'w'}")
    assert_one_line_error(result, "cannot be written")


def test_init_from_shape_mismatch_is_one_line(trained, tmp_path, tmp_path_factory):
    result = run_main(
        tmp_path_factory.getbasetemp(),
        TINY,
        "--config.model.width=16",
        f"--config.init.init_from={trained}",
        f"--workdir={tmp_path / 'stage2'}",
    )
    # The checkpoint's network, named from the config saved with it (TINY's).
    tiny_model = "ResNet-18 w8"
    assert_one_line_error(result, f"written by a different model ({tiny_model}): params/backbone/")
    assert ", this config (" in result.stderr


def test_init_from_stage_one_workdir_trains(trained, tmp_path, tmp_path_factory):
    workdir = tmp_path / "stage2"
    result = run_main(
        tmp_path_factory.getbasetemp(),
        TINY,
        f"--config.init.init_from={trained}",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Initialised the student from" in result.stderr
    assert "and the teacher from its EMA teacher" in result.stderr
    assert json.load(open(workdir / "eval" / "4.json"))["step"] == 4
