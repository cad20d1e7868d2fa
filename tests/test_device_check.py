"""launch/device_check.sh --dry_run: the accelerator check runs end to end on the CPU."""

import os
import subprocess

import pytest
from subprocesses import jax_env

from wsda_jax.tools.benchmarks import device_check

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


@pytest.mark.slow  # The launch script in a fresh process.
def test_dry_run_prints_one_table(tmp_path_factory, tmp_path):
    done = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch", "device_check.sh"),
            "--dry_run",
            f"--profile_dir={tmp_path / 'profile'}",
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
    assert [row.split("|")[1].strip().split(" ")[0] for row in rows] == ["1.", "2.", "2.", "3."]
    assert all("| ok" in row for row in rows), rows
    assert "float32, remat=none" in rows[1] and "bfloat16, remat=none" in rows[2]
    assert "DRY RUN" in done.stdout
    assert f"Profile of the last synthetic_coarse steps: {tmp_path / 'profile'}" in done.stdout
    assert list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
