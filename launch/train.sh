#!/usr/bin/env bash
# Train on this machine with torchrun: NPROC processes (default: one a GPU, or 1).
#
#   bash launch/train.sh --config configs/dream_paper.toml --data.shards=data/shards
#   CONFIG=configs/debug.toml NPROC=2 bash launch/train.sh --train.lr=0.01
#
# Arguments go to `python -m dream_dist.train` after `--config $CONFIG` (when
# CONFIG is set), so they win over the file. Run it again with the same
# --train.run_dir to resume from checkpoints/last.pt.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

run_module dream_dist.train "$@"
