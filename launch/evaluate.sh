#!/usr/bin/env bash
# Evaluate a checkpoint beside the baselines on this machine: NPROC processes
# (default: one a GPU, or 1) each score their own shards of users.
#
#   bash launch/evaluate.sh --config configs/dream_paper.toml \
#     --eval.checkpoint=runs/dream_paper/checkpoints/best.pt --eval.out=runs/eval
#   CONFIG=configs/debug.toml NPROC=2 bash launch/evaluate.sh --eval.split=val
#
# Arguments go to `python -m dream_dist.evaluate` after `--config $CONFIG` (when
# CONFIG is set). Without --eval.checkpoint only the baselines are scored.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

run_module dream_dist.evaluate "$@"
