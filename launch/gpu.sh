#!/usr/bin/env bash
# One host, all of its GPUs, one process: JAX shards the batch over the local GPUs.
# Install first: pip install -r requirements.txt "jax[cuda13]==0.10.2"
# Usage: launch/gpu.sh CONFIG WORKDIR [more flags, e.g. --config.init.init_from=DIR]
#   launch/gpu.sh configs/gta2cs_coarse.py runs/gta2cs_coarse \
#       --config.init.init_from=runs/gta_source_only
# Several hosts: use launch/slurm.sbatch.
set -euo pipefail
CONFIG=${1:?usage: launch/gpu.sh CONFIG WORKDIR [flags...]}
WORKDIR=${2:?usage: launch/gpu.sh CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
# Let JAX take most of each GPU's memory up front (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m wsda_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
