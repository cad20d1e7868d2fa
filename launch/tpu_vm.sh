#!/usr/bin/env bash
# Creates a Cloud TPU VM, copies this checkout to every worker, installs the pinned
# requirements with jax[tpu] and runs `python -m wsda_jax.main` on all workers at once.
# Usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [flags...]
#   launch/tpu_vm.sh wsda-v4 us-central2-b v4-8 configs/gta2cs_coarse.py \
#       /home/$USER/runs/gta2cs_coarse --config.init.init_from=/home/$USER/runs/gta_source_only
# Datasets must be prepared on the VM (config.data.data_dir). On a multi-host slice
# (e.g. v4-32) WORKDIR and data_dir must be a filesystem every worker sees (e.g. a
# gcsfuse or Filestore mount); WSDA_DISTRIBUTED=1 makes each worker call
# jax.distributed.initialize(), which finds its peers from the TPU metadata.
set -euo pipefail
NAME=${1:?usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [flags...]}
ZONE=${2:?zone, e.g. us-central2-b}
ACCELERATOR=${3:?accelerator type, e.g. v4-8}
CONFIG=${4:?config file, e.g. configs/gta2cs_coarse.py}
WORKDIR=${5:?workdir on the VM}
shift 5
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
REPO=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR" --version="$VERSION"
gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME":~/wsda_jax \
  --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="\
  cd ~/wsda_jax && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && \
  WSDA_DISTRIBUTED=1 python -m wsda_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
