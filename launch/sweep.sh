#!/usr/bin/env bash
# Run a W&B sweep agent on this machine; every run it starts is
# `torchrun --standalone -m dream_dist.train ...` with NPROC processes.
#
#   wandb sweep configs/sweeps/dream_random.yaml      # prints ENTITY/PROJECT/SWEEP_ID
#   bash launch/sweep.sh ENTITY/PROJECT/SWEEP_ID --count 20
#   NPROC=2 bash launch/sweep.sh ENTITY/PROJECT/SWEEP_ID
#
# Arguments go to `wandb agent` (--count N: runs before the agent exits). Run it
# from the repository root: the sweep's command names configs/ relative to it.
# Needs a W&B login (WANDB_API_KEY or `wandb login`); sweeps need the server.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

if (($# == 0)); then
  echo "usage: bash launch/sweep.sh ENTITY/PROJECT/SWEEP_ID [--count N]" >&2
  exit 2
fi

# torchrun reads --nproc-per-node from PET_NPROC_PER_NODE
PET_NPROC_PER_NODE="${NPROC:-$(default_nproc)}"
export PET_NPROC_PER_NODE
exec wandb agent "$@"
