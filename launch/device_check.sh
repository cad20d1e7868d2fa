#!/bin/bash
# The first command to run on an accelerator host: correctness, speed and memory as one
# markdown table, and a jax.profiler trace of the last synthetic steps in
# runs/device_check/tensorboard (see wsda_jax/tools/benchmarks/device_check.py). --dry_run:
# tiny sizes, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m wsda_jax.tools.benchmarks.device_check "$@"
