"""launch/device_check.sh --dry_run: the accelerator check runs end to end on the CPU."""

import os
import subprocess

import pytest
from subprocesses import jax_env

from wsda_jax.tools.benchmarks import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    ("kind", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
        ("NVIDIA H100 PCIe", "float32", 378.0),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
        ("TPU v5 lite", "bfloat16", 197.0),
        ("TPU v5p", "float32", 459.0),
        ("cpu", "float32", None),
    ],
)
def test_peak_table_matches_device_kind(kind, dtype, expected):
    assert device_check.peak_tflops(kind, dtype) == expected


@pytest.mark.slow  # The launch script in a fresh process.
def test_dry_run_prints_one_table(tmp_path_factory):
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "device_check.sh"), "--dry_run"],
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
