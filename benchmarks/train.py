"""Training speed, loader speed and trainer memory at Instacart's catalogue size.

``python benchmarks/train.py [--quick] [--threads N] [--sparse] [--workdir DIR]``

1. Writes synthetic shards straight through ``ShardSetWriter`` (Instacart-like
   users: 4 to 100 baskets, mean near 16.6; about 10 items a basket drawn from a
   Zipf popularity over 49,688 items), for 20k and 200k train users.
2. Trainer: ``python -m dream_dist.train --config configs/dream_paper.toml`` for a
   fixed number of steps on the 20k set; users/s is the mean of its logged
   ``train/users_per_s`` after the first (warm-up) interval.
3. Reference: ``benchmarks/reference_dream.py`` (one user and one basket at a
   time, whole-catalogue scores) on the same users, same config, same threads
   and the same malloc settings (``dream_dist.cpu``).
4. Loader alone: users/s out of ``TrainLoader`` (decode, bucket, collate) with the
   config's loader workers, nothing else running.
5. Peak memory: the trainer on 20k and on 200k users, each in a fresh process
   tree for the same number of steps; the figure is the sum of the peak RSS
   (VmHWM) of the trainer and its loader workers.

The last line printed is one JSON object with ``users_per_s``,
``reference_users_per_s``, ``speedup``, ``loader_users_per_s``, ``peak_rss_gb_20k``
and ``peak_rss_gb_200k`` (plus the settings it ran with).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dream_dist.config import parse_config
from dream_dist.cpu import keep_freed_blocks
from dream_dist.data.batching import length_buckets
from dream_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardSetWriter,
    UserSequence,
    iter_users,
    num_shards_for,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "configs" / "dream_paper.toml"
NUM_ITEMS = 49_688
"""Products in Instacart's catalogue."""
NUM_VAL_USERS = 512
"""Validation users of every synthetic set (the trainer validates once at the end)."""


def synthetic_users(
    num_users: int, num_items: int, seed: int, first_user: int = 0
) -> Iterator[UserSequence]:
    """Yields Instacart-like users (baskets and sizes drawn in bulk, then split)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(num_items) + 10.0)
    cdf = np.cumsum(weights) / weights.sum()
    chunk = 10_000
    for start in range(0, num_users, chunk):
        n = min(chunk, num_users - start)
        num_baskets = np.minimum(4 + rng.geometric(1 / 12.6, n), 100)
        sizes = 1 + rng.poisson(9.0, num_baskets.sum())
        items = np.searchsorted(cdf, rng.random(sizes.sum())) + 1
        user_sizes = np.split(sizes, np.cumsum(num_baskets)[:-1])
        user_items = np.split(items, np.cumsum([s.sum() for s in user_sizes])[:-1])
        for i, (s, it) in enumerate(zip(user_sizes, user_items, strict=True)):
            user = first_user + start + i
            yield UserSequence(user, str(user), it.astype(np.int32), s.astype(np.int32))


def write_shards(folder: Path, num_users: int, seed: int) -> Path:
    """Writes train and val shards plus a manifest; returns the folder.

    A folder that already has a manifest (from an earlier run in ``--workdir``)
    is kept as it is.
    """
    if (folder / MANIFEST).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    splits, totals = {}, {"baskets": 0, "purchases": 0, "max_baskets": 0}
    counts = {"train": num_users, "val": NUM_VAL_USERS}
    first_user = 0
    for split, n in counts.items():
        writer = ShardSetWriter(folder, split, num_shards_for(n, 20_000, 4))
        num_baskets = 0
        for seq in synthetic_users(n, NUM_ITEMS, seed + len(splits), first_user):
            writer.write(seq)
            num_baskets += seq.num_baskets
            totals["purchases"] += len(seq.items)
            totals["max_baskets"] = max(totals["max_baskets"], seq.num_baskets)
        splits[split] = {"users": n, "baskets": num_baskets, "shards": writer.close()}
        totals["baskets"] += num_baskets
        first_user += n
    splits["test"] = {"users": 0, "baskets": 0, "shards": []}
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_items": NUM_ITEMS,
        "num_users": first_user,
        "num_baskets": totals["baskets"],
        "num_purchases": totals["purchases"],
        "input_rows": totals["purchases"],
        "dropped": {},
        "has_reordered": False,
        "split": {"rule": "users", "seed": seed, "keyset": None},
        "max_baskets": totals["max_baskets"],
        "source": {"format": "synthetic", "input": "benchmarks/train.py"},
        "item_map": None,
        "user_map": None,
        "splits": splits,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def _tree_pids(pid: int) -> list[int]:
    """Returns ``pid`` and its descendants (from /proc's children lists)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return pids


def _peak_rss_kb(pid: int) -> int:
    """Returns VmHWM (peak resident set, kB) of one process, or 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_trainer(
    shards: Path, run_dir: Path, num_steps: int, log_every: int, env: dict, flags: list
) -> dict[str, float]:
    """Runs the trainer in a fresh process tree; returns users/s and peak RSS (GB)."""
    argv = [
        sys.executable,
        "-m",
        "dream_dist.train",
        "--config",
        str(PAPER_CONFIG),
        f"--data.shards={shards}",
        f"--train.run_dir={run_dir}",
        f"--train.max_steps={num_steps}",
        f"--logging.log_every={log_every}",
        "--logging.wandb=disabled",
        "--train.resume=never",
        *flags,
    ]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks: dict[int, int] = {}

    # every 20 ms, the latest VmHWM of every process in the tree
    def sample() -> None:
        while process.poll() is None:
            for pid in _tree_pids(process.pid):
                peaks[pid] = max(peaks.get(pid, 0), _peak_rss_kb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"trainer failed ({process.returncode}):\n{output[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    speeds = [r["train/users_per_s"] for r in records if "train/users_per_s" in r]
    return {
        "users_per_s": float(np.mean(speeds[1:] or speeds)),
        "peak_rss_gb": sum(peaks.values()) / 2**20,
        "num_processes": len(peaks),
        "peaks_gb": sorted(round(v / 2**20, 3) for v in peaks.values()),
    }


def reference_speed(
    shards: Path, num_batches: int, threads: int
) -> tuple[float, float]:
    """Returns users/s of the per-user reference on length-bucketed batches, and the
    mean number of baskets of the users it timed."""
    import torch
    from reference_dream import ReferenceDream, reference_step

    torch.set_num_threads(threads)
    keep_freed_blocks()  # the trainer's allocator settings (see dream_dist.cpu)
    cfg = parse_config(["--config", str(PAPER_CONFIG)])
    users = list(iter_users(sorted(shards.glob("train-*.tar"))[:1]))[: 32 * 64]
    batches = length_buckets(users, cfg.train.batch_size, np.random.default_rng(0))
    torch.manual_seed(0)
    model = ReferenceDream(NUM_ITEMS, cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    rng = random.Random(0)
    # batches at evenly spaced quantiles of length: the timed users have about
    # as many baskets as the training set (a user's cost grows with them)
    batches.sort(key=lambda batch: np.mean([seq.num_baskets for seq in batch]))
    timed = [
        batches[(2 * i + 1) * len(batches) // (2 * num_batches)]
        for i in range(num_batches)
    ]
    reference_step(model, optimizer, batches[0], rng, cfg.train.clip)  # warm-up
    start = time.perf_counter()
    for batch in timed:
        reference_step(model, optimizer, batch, rng, cfg.train.clip)
    seconds = time.perf_counter() - start
    num_users = sum(len(batch) for batch in timed)
    num_baskets = sum(seq.num_baskets for batch in timed for seq in batch)
    return num_users / seconds, num_baskets / num_users


def loader_speed(shards: Path, num_batches: int) -> float:
    """Returns users/s out of the training loader alone (config's workers)."""
    from dream_dist.data.shards import load_manifest, shard_paths
    from dream_dist.data.stream import TrainLoader

    cfg = parse_config(["--config", str(PAPER_CONFIG)])
    manifest = load_manifest(shards)
    loader = TrainLoader(
        shard_paths(shards, manifest, "train"),
        num_users=manifest["splits"]["train"]["users"],
        world_size=1,
        batch_size=cfg.train.batch_size,
        bucket_buffer=cfg.train.bucket_buffer,
        num_workers=cfg.train.num_workers,
        seed=0,
    )
    batches = loader.epoch(0)
    for _ in range(20):  # workers started and their buffers filled
        next(batches)
    start, num_users = time.perf_counter(), 0
    for _, batch in zip(range(num_batches), batches, strict=False):
        num_users += batch.num_users
    return num_users / (time.perf_counter() - start)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of trainer and reference alike",
    )
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="train with --train.sparse=true (SparseAdam item table)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep shards here and reuse them (default: a temporary folder)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    steps, ref_batches, loader_batches = (60, 2, 300) if args.quick else (300, 8, 2000)
    log_every = 10 if args.quick else 25
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    flags = ["--train.sparse=true"] if args.sparse else []
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        results: dict[str, float] = {}
        for num_users in (20_000, 200_000):
            start = time.perf_counter()
            shards = write_shards(work / f"shards_{num_users}", num_users, seed=0)
            print(
                f"wrote {num_users} users in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            run_dir = Path(tempfile.mkdtemp(prefix=f"run_{num_users}_", dir=work))
            run = run_trainer(shards, run_dir, steps, log_every, env, flags)
            shutil.rmtree(run_dir)  # checkpoints of a 50k-item model are large
            print(f"trainer on {num_users} users: {run}", flush=True)
            tag = f"{num_users // 1000}k"
            results[f"users_per_s_{tag}"] = run["users_per_s"]
            results[f"peak_rss_gb_{tag}"] = run["peak_rss_gb"]
        results["loader_users_per_s"] = loader_speed(
            work / "shards_20000", loader_batches
        )
        print(f"loader: {results['loader_users_per_s']:.0f} users/s", flush=True)
        reference, ref_baskets = reference_speed(
            work / "shards_20000", ref_batches, args.threads
        )
        results["reference_users_per_s"] = reference
        manifest = json.loads((work / "shards_20000" / MANIFEST).read_text())
        train = manifest["splits"]["train"]
        print(
            f"reference: {reference:.2f} users/s over {ref_batches} batches "
            f"({ref_baskets:.1f} baskets a user; the training set has "
            f"{train['baskets'] / train['users']:.1f})",
            flush=True,
        )

    users_per_s = results["users_per_s_20k"]
    summary = {
        "users_per_s": round(users_per_s, 1),
        "reference_users_per_s": round(results["reference_users_per_s"], 2),
        "speedup": round(users_per_s / results["reference_users_per_s"], 1),
        "loader_users_per_s": round(results["loader_users_per_s"], 1),
        "peak_rss_gb_20k": round(results["peak_rss_gb_20k"], 3),
        "peak_rss_gb_200k": round(results["peak_rss_gb_200k"], 3),
        "threads": args.threads,
        "sparse": args.sparse,
        "quick": args.quick,
        "train_steps": steps,
    }
    print(
        f"{'users/s':>10} {'reference':>10} {'speedup':>8} {'loader':>10} "
        f"{'rss 20k':>8} {'rss 200k':>9}"
    )
    print(
        f"{summary['users_per_s']:>10} {summary['reference_users_per_s']:>10} "
        f"{summary['speedup']:>8} {summary['loader_users_per_s']:>10} "
        f"{summary['peak_rss_gb_20k']:>8} {summary['peak_rss_gb_200k']:>9}"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
