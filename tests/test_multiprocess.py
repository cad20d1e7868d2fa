"""Two JAX processes (one CPU device each) train the tiny synthetic config together.

What a multi-host TPU or GPU job does, on one machine: `jax.distributed` through
`--coordinator_address/--num_processes/--process_id`, per-host data shards assembled
into global arrays, collectives across processes (gloo on the CPU), Orbax checkpoints
written by both, evaluation split across hosts, and the embedded datasets generated
once by process 0 while the other waits.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import subprocesses

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=configs/synthetic_coarse.py:tiny"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _main(base, data_dir, workdir, *flags):
    return [
        sys.executable,
        "-m",
        "wsda_jax.main",
        CONFIG,
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]


def test_two_processes_train_and_evaluate_like_one(tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp()
    data_dir, workdir = tmp_path / "data", tmp_path / "run"
    port = _free_port()
    processes = [
        subprocess.Popen(
            _main(
                base,
                data_dir,
                workdir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ),
            cwd=ROOT,
            env=subprocesses.jax_env(base, devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    (stdout0, _), (stdout1, stderr1) = outputs
    assert "Target val mIoU" in stdout0 and "Target val mIoU" not in stdout1
    # Process 0 generated the embedded datasets; process 1 waited and reused them.
    assert "Downloading and preparing" not in stderr1

    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert (workdir / "checkpoints" / "4").is_dir()
    two_hosts = json.load(open(workdir / "eval" / "4.json"))

    # One process evaluating the same checkpoint sees every val image exactly once too.
    result = subprocess.run(
        _main(base, data_dir, workdir, "--mode=eval"),
        cwd=ROOT,
        env=subprocesses.jax_env(base, devices=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    one_host = json.load(open(workdir / "eval" / "4.json"))
    for model in ("student", "teacher"):
        assert one_host[model]["pixels"] == two_hosts[model]["pixels"] > 0
        assert abs(one_host[model]["miou"] - two_hosts[model]["miou"]) < 1e-6
