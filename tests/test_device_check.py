"""launch/device_check.sh --dry_run: the accelerator check runs end to end on the CPU."""

import os
import subprocess

import jax
import numpy as np
import pytest
from subprocesses import jax_env

from wsda_jax import optim, train_state
from wsda_jax.models import deeplab
from wsda_jax.tools.benchmarks import device_check
from wsda_jax.tools.benchmarks import train_step as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_peak_row_is_found_by_its_name_inside_a_device_kind():
    """Rows match in order on a substring of device_kind: no earlier row may shadow a later
    one (e.g. 'H100' before 'H100 PCIe'), and the dtype picks the column."""
    for name, bfloat16, float32 in device_check.PEAK_TFLOPS:
        kind = f"Vendor {name.upper()} 80GB"
        assert device_check.peak_tflops(kind, "bfloat16") == bfloat16, name
        assert device_check.peak_tflops(kind, "float32") == float32, name


@pytest.mark.parametrize(
    ("kind", "row"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("TPU v5 lite", "TPU v5 lite"),
        ("TPU v5p", "TPU v5p"),
    ],
)
def test_real_device_kinds_find_their_row(kind, row):
    (entry,) = [entry for entry in device_check.PEAK_TFLOPS if entry[0] == row]
    assert device_check.peak_tflops(kind, "bfloat16") == entry[1]
    assert device_check.peak_tflops(kind, "float32") == entry[2]


def test_unknown_device_has_no_peak():
    assert device_check.peak_tflops("cpu", "float32") is None


def test_reference_rows_skip_a_remat_mode_the_architecture_lacks():
    settings = device_check.reference_settings(
        ["deeplabv2", "daformer"], ["none", "conv_outputs"], ["bfloat16"]
    )
    assert settings == [
        ("deeplabv2", "none", "bfloat16"),
        ("deeplabv2", "conv_outputs", "bfloat16"),
        ("daformer", "none", "bfloat16"),
    ]


def test_processes_take_only_the_accelerator_memory_they_use():
    """The check and each reference row's subprocess share one GPU: none preallocates."""
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_the_daformer_rows_random_state_is_a_train_state_with_its_frozen_encoder():
    """The reference rows' host-random state has the tree of a real one, the frozen
    ImageNet encoder of the feature distance included, equal to the student's encoder."""
    config = device_check.reference_config("daformer", "float32", "none", dry_run=True)
    assert config.loss.imnet_fd > 0
    model, optimizer = deeplab.build_model(config), optim.make_optimizer(config)
    state = bench.random_state(config, model, optimizer)
    abstract = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), optimizer=optimizer, abstract=True
    )
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, abstract)
    frozen, student = state.imnet_encoder["params"]["backbone"], state.params["backbone"]
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(student), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # The launch script in a fresh process.
def test_dry_run_prints_one_table(tiny_cli_run, tmp_path_factory, tmp_path):
    """The launch script in a fresh process. Its synthetic row trains the program of the
    session's CLI run (`tiny_cli_run`), which is therefore in the compilation cache."""
    del tiny_cli_run
    done = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch", "device_check.sh"),
            "--dry_run",
            f"--profile_dir={tmp_path / 'profile'}",
            "--reference_archs=deeplabv2",
            "--reference_dtypes=float32",  # Row 1's program: read from the compilation cache.
        ],
        capture_output=True,
        text=True,
        env=jax_env(tmp_path_factory.getbasetemp()),
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[:2] == list(device_check.HEADER)
    rows = table[2:]
    assert [row.split("|")[1].strip().split(" ")[0] for row in rows] == ["1.", "2.", "3."]
    assert all("| ok" in row for row in rows), rows
    assert "ResNet-18 w4, 32x32, 2+2, float32, remat=none" in rows[1]
    assert "DRY RUN" in done.stdout
    assert f"Profile of the last synthetic_coarse steps: {tmp_path / 'profile'}" in done.stdout
    assert list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
