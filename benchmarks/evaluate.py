"""Times the evaluator's two heavy paths: full-catalog DREAM scoring, and TIFU-KNN.

Usage::

    python benchmarks/evaluate.py [--items 50000] [--dim 128] [--users 8192]

1. Scoring: a randomly initialised DreamModel (``--items`` items, ``--dim``
   dimensions, the default 2-layer RNN_RELU) ranks every item of the catalog for
   synthetic users (8 to 16 baskets of 4 to 12 items, last basket held out) and
   keeps the top 20, exactly as ``dream_dist.evaluate`` does per batch: collate,
   ``user_vectors``, ``score``, top-K. Reports users per second after one warm-up
   batch, the same without collating (model and top-K only), and users per
   CPU-second of this process (less sensitive to other load on a shared machine).
2. TIFU-KNN on TaFeng (``../shared/data/tafeng``, keyset_0; skipped when absent):
   seconds to build the train users' vectors and rank every item for the 2,772
   test users (k=300), reading the JSON not counted; and its Recall@10.

OpenMP threads that spin while waiting take most of a shared CPU from each other,
so the script re-runs itself with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable
is already set (set it to ACTIVE to measure the default).

Last line: one JSON object with ``users_per_s`` and ``tifu_knn_tafeng_s``.
Targets on the 2-core development machine: >= 3,000 users/s; TIFU-KNN < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dream_dist.baselines import Baskets, TifuKnn
from dream_dist.config import EvalConfig, ModelConfig
from dream_dist.data.batching import collate
from dream_dist.data.shards import UserSequence
from dream_dist.evaluate import CatalogScorer
from dream_dist.metrics import finalize, metric_sums
from dream_dist.model import DreamModel

TAFENG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tafeng"
K = 20


def synthetic_users(num_users: int, num_items: int, seed: int) -> list[UserSequence]:
    """Returns users with 8 to 16 baskets of 4 to 12 distinct-ish random items."""
    rng = np.random.default_rng(seed)
    users = []
    for user in range(num_users):
        sizes = rng.integers(4, 13, rng.integers(8, 17)).astype(np.int32)
        items = rng.integers(1, num_items + 1, int(sizes.sum())).astype(np.int32)
        users.append(UserSequence(user, str(user), items, sizes))
    return users


def time_scoring(args: argparse.Namespace) -> dict[str, float]:
    """Returns users/s with and without collation, and users per CPU-second."""
    torch.manual_seed(0)
    model = DreamModel(args.items, ModelConfig(dim=args.dim)).eval()
    users = synthetic_users(args.users, args.items, seed=0)
    size = args.batch_size
    chunks = [users[i : i + size] for i in range(0, len(users), size)]
    device = torch.device("cpu")
    scorer = CatalogScorer(model, device)
    scorer.top_k(collate(chunks[0], drop_last_basket=True), K)

    start, cpu_start = time.perf_counter(), time.process_time()
    batches = [collate(chunk, drop_last_basket=True) for chunk in chunks]
    collated = time.perf_counter()
    for batch in batches:
        scorer.top_k(batch, K)
    done, cpu_done = time.perf_counter(), time.process_time()
    return {
        "users_per_s": len(users) / (done - start),
        "model_users_per_s": len(users) / (done - collated),
        "users_per_cpu_s": len(users) / (cpu_done - cpu_start),
    }


def _tafeng_users(history: dict, users: list[str]) -> list[UserSequence]:
    seqs = []
    for user in users:
        baskets = [np.asarray(b, np.int32) + 1 for b in history[user][1:-1]]
        sizes = np.array([len(b) for b in baskets], np.int32)
        seqs.append(UserSequence(0, user, np.concatenate(baskets), sizes))
    return seqs


def time_tifu_knn() -> tuple[float, float] | None:
    """Returns (seconds, Recall@10) of TIFU-KNN on TaFeng keyset_0, or None."""
    if not TAFENG.is_dir():
        return None
    history = json.loads((TAFENG / "tafeng_history.json").read_text())
    future = json.loads((TAFENG / "tafeng_future.json").read_text())
    keyset = json.loads((TAFENG / "keyset_0.json").read_text())
    train = _tafeng_users(history, keyset["train"])
    test = _tafeng_users(history, keyset["test"])

    start = time.perf_counter()
    tifu = TifuKnn(Baskets.from_sequences(train), keyset["item_num"], EvalConfig())
    topk_BK = torch.cat(
        [
            tifu(Baskets.from_sequences(test[i : i + 512]), K)
            for i in range(0, len(test), 512)
        ]
    )
    seconds = time.perf_counter() - start

    targets = [np.asarray(future[u][1]) + 1 for u in keyset["test"]]
    sums = metric_sums(topk_BK, targets, [s.items for s in test], [10])
    return seconds, finalize(sums)["recall@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--users", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    with torch.inference_mode():
        speed = time_scoring(args)
    print(
        f"scoring {args.items:,} items x {args.dim} dims, top {K}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}: {speed['users_per_s']:,.0f} users/s "
        f"({speed['model_users_per_s']:,.0f} without collating; "
        f"{speed['users_per_cpu_s']:,.0f} users per CPU-second)"
    )
    tifu = time_tifu_knn()
    if tifu is None:
        print(f"TIFU-KNN: skipped, no TaFeng data at {TAFENG}")
    else:
        print(f"TIFU-KNN on TaFeng keyset_0: {tifu[0]:.2f} s, Recall@10 {tifu[1]:.4f}")
    result = {name: round(value, 1) for name, value in speed.items()}
    result["tifu_knn_tafeng_s"] = None if tifu is None else round(tifu[0], 3)
    print(json.dumps({**result, "items": args.items, "dim": args.dim}))


if __name__ == "__main__":
    main()
