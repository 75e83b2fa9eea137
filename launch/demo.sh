#!/usr/bin/env bash
# The main job, end to end, from a fresh clone on a machine with Python 3.11 and
# no GPU: set up a virtualenv, generate synthetic Instacart-style data, prepare
# shards, train DREAM on 2 processes, evaluate it beside the baselines on the test
# users, write recommendations, and print the metrics table.
#
#   bash launch/demo.sh
#
# Everything it writes goes under runs/demo/ (raw CSVs, shards, the training run,
# evaluation and recommendations); a second run starts that folder afresh.
# Environment: USERS (synthetic users, default 8000), ITEMS (catalog size,
# default 5000), EPOCHS (default: the
# config's), PYTHON (interpreter for the virtualenv, default python3).
# Settings: configs/demo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/demo.toml
demo=runs/demo
users="${USERS:-8000}"
items="${ITEMS:-5000}"
epoch_flags=()
if [[ -n "${EPOCHS:-}" ]]; then
  epoch_flags=(--train.epochs="$EPOCHS")
fi
start=$SECONDS
stage() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }

stage "set up: .venv with the CPU torch wheel, then this package"
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import dream_dist, torch, polars, webdataset" 2>/dev/null; then
  pip install --quiet torch==2.13.0
  pip install --quiet -e .
fi
rm -rf "$demo"

stage "synthetic data: $users users, $items items in Instacart's CSV layout"
python -m dream_dist.synth --out "$demo/raw" --users "$users" --items "$items" --seed 0

stage "prepare: CSVs -> shards + manifest"
python -m dream_dist.prepare --config "$config"

stage "train: DREAM on 2 processes (torchrun, gloo)"
torchrun --standalone --nproc-per-node=2 \
  -m dream_dist.train --config "$config" "${epoch_flags[@]}"

stage "evaluate: DREAM beside G-, P-, GP-TopFreq and TIFU-KNN on the test users"
torchrun --standalone --nproc-per-node=2 -m dream_dist.evaluate --config "$config"

stage "recommend: top-20 for every user, in the original ids"
python -m dream_dist.recommend --config "$config"

stage "done"
python - "$config" <<'EOF'
import json
import sys
from pathlib import Path

from dream_dist.config import parse_config
from dream_dist.evaluate import format_table

cfg = parse_config(["--config", sys.argv[1]])
out = Path(cfg.eval.out)
metrics = json.loads((out / "metrics.json").read_text())
print(f"test users: {metrics['dream']['users']}   ({out / 'metrics.json'})\n")
print(format_table(metrics, cfg.eval.k))
print(f"run:             {cfg.train.run_dir} (checkpoints/, metrics.jsonl, config.toml)")
print(f"recommendations: {out / 'recommendations.parquet'}")
EOF
