"""Sharded offline evaluation of a DREAM checkpoint beside the baselines.

Usage (one process, or any number under torchrun with the same flags)::

    python -m dream_dist.evaluate --config FILE --eval.checkpoint=PATH
    torchrun --nproc_per_node=N -m dream_dist.evaluate --config FILE ...

Every rank scores the users of its own shards of ``eval.split`` (input: every
basket but the last; target: the last) against the whole catalog and keeps the
top max(``eval.k``). Each method's metric sums are added over ranks before any
division, so N ranks give exactly the figures of one. Without a checkpoint
(``eval.checkpoint=none``) only the baselines are scored.

Baselines see what the protocol allows: popularity counts every user's input
baskets (split=users: the train, val and test users; split=last: the evaluated
split, which holds every user), and TIFU-KNN's neighbours are the train
samples' input baskets.

Written to ``eval.out``::

    metrics.json     {method: {"recall@10": .., "ndcg@10": .., ..., "users": ..}}
    topk.parquet     method, user_id, rank (1 = best), item_id: original ids
    metrics.jsonl    the figures as W&B saw them (W&B run under wandb/ unless disabled)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from dream_dist import distributed
from dream_dist.baselines import (
    Baskets,
    Recommender,
    build_baselines,
    input_baskets,
    item_counts,
)
from dream_dist.checkpoint import (
    build_model_from_checkpoint,
    check_compatible,
    load_checkpoint,
)
from dream_dist.config import Config, from_dict, parse_config
from dream_dist.data.batching import Batch, collate
from dream_dist.data.shards import (
    MANIFEST,
    UserSequence,
    iter_users,
    load_manifest,
    shard_paths,
)
from dream_dist.data.stream import rank_share
from dream_dist.errors import InputError, run_entry_point
from dream_dist.metrics import (
    finalize,
    metric_sums,
    reduce,
    sums_from_tensor,
    sums_to_tensor,
    top_k,
    zero_sums,
)
from dream_dist.tracking import Tracker, setup_logging

log = logging.getLogger("dream_dist.evaluate")

MODEL_METHOD = "dream"
"""Name of the checkpoint's figures in metrics.json and topk.parquet."""
TOPK_FILE = "topk.parquet"
PARTS = ".topk-parts"


@dataclass
class ShardSet:
    """A prepared shard folder and what the evaluation reads of it."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def rule(self) -> str:
        return self.manifest.get("split", {}).get("rule", "users")

    def paths(self, split: str) -> list[str]:
        """Returns the split's shard paths; raises InputError if one is missing."""
        return shard_paths(self.folder, self.manifest, split)

    def read_map(self, key: str) -> pl.DataFrame:
        """Returns the id map ``key`` (``item_map`` or ``user_map``) of the set."""
        default = {"item_map": "items.parquet", "user_map": "users.parquet"}[key]
        path = self.folder / self.manifest.get(key, default)
        try:
            return pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError) as err:
            raise InputError(f"{path}: cannot read the id map ({err})") from None

    def num_samples(self, paths: list[str]) -> int:
        """Returns the number of users in the given shards of this set."""
        sizes = {
            str(self.folder / shard["path"]): shard["samples"]
            for entry in self.manifest["splits"].values()
            for shard in entry["shards"]
        }
        return sum(sizes.get(path, 0) for path in paths)


def open_shards(cfg: Config) -> ShardSet:
    """Returns the shard set of ``data.shards``; raises InputError if it is unusable.

    Checks that max(``eval.k``) fits in the catalog.
    """
    shards = ShardSet(Path(cfg.data.shards), load_manifest(cfg.data.shards))
    largest = max(cfg.eval.k)
    if largest > shards.num_items:
        raise InputError(
            f"--eval.k: {largest} is larger than the catalog of "
            f"{shards.num_items} items in {shards.folder / MANIFEST}"
        )
    return shards


def wants_model(cfg: Config) -> bool:
    """True when ``eval.checkpoint`` names a checkpoint (not empty or ``none``)."""
    return cfg.eval.checkpoint.strip().lower() not in ("", "none")


def load_model(cfg: Config, shards: ShardSet, device: torch.device) -> torch.nn.Module:
    """Returns the checkpoint's DreamModel in eval mode on ``device``.

    Raises InputError when the checkpoint is unreadable or its vocabulary is not
    the shard set's.
    """
    ckpt = load_checkpoint(cfg.eval.checkpoint)
    check_compatible(ckpt, shards.num_items, from_dict(ckpt["config"]).model)
    return build_model_from_checkpoint(ckpt).to(device)


class CatalogScorer:
    """The model's top K over the whole catalog, batch after batch.

    NOTE: one B x I score buffer serves every batch; a fresh one (100 MB at 512
    users and 50k items) costs as much time as the product that fills it.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self._scores: torch.Tensor | None = None

    @torch.inference_mode()
    def top_k(
        self, batch: Batch, k: int, exclude: Baskets | None = None
    ) -> torch.Tensor:
        """Returns ``topk_BK`` (on CPU) for the users of ``batch``.

        Items of ``exclude`` (one row per user) are never recommended.
        """
        h_BD = self.model.user_vectors(batch.to(self.device)).float()
        scores_BI = self.model.score(h_BD, out=self._buffer(h_BD))
        if exclude is not None:
            rows, items = exclude.rows.to(self.device), exclude.items.to(self.device)
            scores_BI[rows, items] = -torch.inf
        topk_BK = top_k(scores_BI, k)
        if exclude is not None:
            # an excluded item only surfaces when fewer items are left than k
            listed = scores_BI.gather(1, topk_BK) > -torch.inf
            topk_BK = topk_BK * listed
        return topk_BK.cpu()

    def _buffer(self, h_BD: torch.Tensor) -> torch.Tensor:
        """Returns a B x I view of the score buffer, grown when a batch is larger."""
        num_users = h_BD.shape[0]
        num_columns = self.model.item_embedding.num_embeddings
        if self._scores is None or self._scores.shape[0] < num_users:
            self._scores = h_BD.new_empty(num_users, num_columns)
        return self._scores[:num_users]


# ------------------------------------------------------------------ baselines


def popularity_splits(rule: str, split: str) -> list[str]:
    """Returns the splits whose input baskets G-TopFreq counts (see module doc)."""
    return ["train", "val", "test"] if rule == "users" else [split]


def popularity_counts(
    cfg: Config, shards: ShardSet, rank: int, world_size: int
) -> torch.Tensor:
    """Returns int64 purchase counts over every user's input baskets, all ranks'."""
    counts_I = torch.zeros(shards.num_items + 1, dtype=torch.int64)
    for split in popularity_splits(shards.rule, cfg.eval.split):
        paths = rank_share(shards.paths(split), rank, world_size)
        for users in chunks(iter_users(paths), 4096):
            counts_I += item_counts(input_baskets(users), shards.num_items)
    return distributed.all_reduce_sum(counts_I)


def chunks(users: Iterator[UserSequence], size: int) -> Iterator[list[UserSequence]]:
    """Yields lists of up to ``size`` users."""
    chunk: list[UserSequence] = []
    for user in users:
        chunk.append(user)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_baselines(
    cfg: Config, shards: ShardSet, rank: int, world_size: int
) -> dict[str, Recommender]:
    """Returns the baselines of ``eval.baselines``, fitted on the shard set."""
    names = list(dict.fromkeys(cfg.eval.baselines))
    if not names:
        return {}
    counts_I = popularity_counts(cfg, shards, rank, world_size)
    pool = Baskets.from_sequences([])
    if "tifu_knn" in names:
        pool = input_baskets(list(iter_users(shards.paths("train"))))
    return build_baselines(names, counts_I, pool, cfg.eval)


# ------------------------------------------------------------------ scoring


@dataclass
class EvalBatch:
    """One batch of evaluated users, in every form the methods need."""

    users: list[UserSequence]
    inputs: Baskets
    """Every basket but the last (for the baselines)."""
    targets: list[np.ndarray]
    histories: list[np.ndarray]

    @classmethod
    def of(cls, users: list[UserSequence]) -> EvalBatch:
        """Returns the EvalBatch of ``users`` (each needs at least two baskets)."""
        cuts = [u.target_start for u in users]
        return cls(
            users=users,
            inputs=input_baskets(users),
            targets=[u.items[c:] for u, c in zip(users, cuts, strict=True)],
            histories=[u.items[:c] for u, c in zip(users, cuts, strict=True)],
        )

    @functools.cached_property
    def batch(self) -> Batch:
        """The users collated with the last basket as target (for the model)."""
        return collate(self.users, drop_last_basket=True)

    @property
    def user_index(self) -> np.ndarray:
        return np.array([u.user for u in self.users], dtype=np.int64)


Method = Callable[[EvalBatch, int], torch.Tensor]


def methods_of(
    cfg: Config, shards: ShardSet, info: distributed.DistInfo
) -> dict[str, Method]:
    """Returns every method to score: the checkpoint (if any), then the baselines."""
    methods: dict[str, Method] = {}
    if wants_model(cfg):
        scorer = CatalogScorer(load_model(cfg, shards, info.device), info.device)
        methods[MODEL_METHOD] = lambda b, k: scorer.top_k(b.batch, k)
    baselines = load_baselines(cfg, shards, info.rank, info.world_size)
    for name, baseline in baselines.items():
        methods[name] = lambda b, k, f=baseline: f(b.inputs, k)
    return methods


@dataclass
class Scores:
    """One rank's running metric sums and top-K lists of each method."""

    sums: dict[str, dict[str, int]]
    users: list[np.ndarray]
    lists: dict[str, list[torch.Tensor]]


def score_rank(
    cfg: Config,
    shards: ShardSet,
    methods: dict[str, Method],
    info: distributed.DistInfo,
) -> Scores:
    """Returns this rank's sums and lists over its share of ``eval.split``."""
    ks = sorted(set(cfg.eval.k))
    paths = rank_share(shards.paths(cfg.eval.split), info.rank, info.world_size)
    scores = Scores({m: zero_sums(ks) for m in methods}, [], {m: [] for m in methods})
    show = info.is_main and cfg.logging.progress and sys.stderr.isatty()
    bar = tqdm(total=shards.num_samples(paths), unit="user", disable=not show)
    with bar:
        for users in chunks(iter_users(paths), cfg.eval.batch_size):
            batch = EvalBatch.of(users)
            scores.users.append(batch.user_index)
            for name, method in methods.items():
                topk_BK = method(batch, max(ks))
                sums = metric_sums(topk_BK, batch.targets, batch.histories, ks)
                scores.sums[name] = reduce([scores.sums[name], sums])
                scores.lists[name].append(topk_BK.to(torch.int32))
            bar.update(len(users))
    return scores


def reduce_over_ranks(
    sums: dict[str, dict[str, int]], ks: list[int]
) -> dict[str, dict[str, float]]:
    """Returns each method's metrics from its sums added over every rank."""
    names = list(sums)
    packed = torch.stack([sums_to_tensor(sums[name], ks) for name in names])
    packed = distributed.all_reduce_sum(packed)
    return {
        name: finalize(sums_from_tensor(packed[i], ks)) for i, name in enumerate(names)
    }


# ------------------------------------------------------------------ output


PART_SCHEMA = {
    "order": pl.Int32,
    "method": pl.String,
    "user": pl.Int64,
    "rank": pl.Int32,
    "item": pl.Int64,
}
"""Columns of a rank's part: dense indices, before the merge maps them."""


def write_part(
    folder: Path,
    rank: int,
    users: list[np.ndarray],
    lists: dict[str, list[torch.Tensor]],
) -> None:
    """Writes this rank's top-K lists (dense indices) as one Parquet part."""
    frames = [pl.DataFrame(schema=PART_SCHEMA)]
    user_U = np.concatenate(users) if users else np.zeros(0, np.int64)
    for order, (name, parts) in enumerate(lists.items()):
        if not parts:
            continue
        topk_UK = torch.cat(parts).numpy()
        num_users, k = topk_UK.shape
        frames.append(
            pl.DataFrame(
                {
                    "order": np.full(num_users * k, order, np.int32),
                    "method": [name] * (num_users * k),
                    "user": np.repeat(user_U, k),
                    "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), num_users),
                    "item": topk_UK.reshape(-1).astype(np.int64),
                },
                schema=PART_SCHEMA,
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(pl.concat(frames), folder / f"part-{rank:05d}.parquet")


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def original_ids(shards: ShardSet, frame: pl.DataFrame) -> pl.DataFrame:
    """Returns ``frame`` with dense ``user``/``item`` replaced by original ids.

    Empty slots (item 0) are dropped.
    """
    items = shards.read_map("item_map").select(pl.col("item").cast(pl.Int64), "item_id")
    users = shards.read_map("user_map").select(pl.col("user").cast(pl.Int64), "user_id")
    return (
        frame.filter(pl.col("item") > 0)
        .join(users, on="user", how="left")
        .join(items, on="item", how="left")
    )


def merge_parts(
    shards: ShardSet, folder: Path, out: Path, keep_method: bool = True
) -> int:
    """Merges every rank's part into ``out`` in original ids; returns its rows.

    Rows are ordered by method, then dense user index, then rank, so the file
    does not depend on the number of ranks.
    """
    parts = sorted(folder.glob("part-*.parquet"))
    frame = pl.concat([pl.read_parquet(p) for p in parts])
    frame = original_ids(shards, frame.sort("order", "user", "rank"))
    columns = ["method"] if keep_method else []
    frame = frame.select(*columns, "user_id", "rank", "item_id")
    _write_atomic(frame, out)
    for part in parts:
        part.unlink()
    folder.rmdir()
    return frame.height


def write_metrics(metrics: dict[str, dict[str, float]], path: Path) -> None:
    """Writes ``metrics.json`` (NaN, a metric over no users, becomes null)."""
    clean = {
        method: {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in values.items()
        }
        for method, values in metrics.items()
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    os.replace(tmp, path)


TABLE_COLUMNS = (
    "recall",
    "ndcg",
    "phr",
    "recall_rep",
    "phr_rep",
    "recall_expl",
    "phr_expl",
)


def format_table(metrics: dict[str, dict[str, float | None]], ks: list[int]) -> str:
    """Returns the console table: one block per K, one row per method.

    Takes ``evaluate``'s metrics or metrics.json's; a metric over no users
    (NaN or null) shows as ``-``.
    """
    lines = []
    for k in sorted(set(ks)):
        header = f"{'@' + str(k):<12}" + "".join(f"{c:>12}" for c in TABLE_COLUMNS)
        lines += [header, "-" * len(header)]
        for method, values in metrics.items():
            cells = "".join(_cell(values.get(f"{c}@{k}")) for c in TABLE_COLUMNS)
            lines.append(f"{method:<12}{cells}")
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return f"{'-':>12}"
    return f"{value:>12.4f}"


def log_to_wandb(cfg: Config, out: Path, metrics: dict[str, dict[str, float]]) -> None:
    """Logs ``eval/<method>/<metric>`` once, so the W&B run summary holds them."""
    if cfg.logging.wandb == "disabled":
        return
    flat = {
        f"eval/{method}/{name}": float(value)
        for method, values in metrics.items()
        for name, value in values.items()
        if not math.isnan(value)
    }
    tracker = Tracker(cfg, out, is_main=True)
    try:
        tracker.log(0, flat)
    finally:
        tracker.close()


# ------------------------------------------------------------------ entry


def evaluate(cfg: Config, info: distributed.DistInfo) -> dict[str, dict[str, float]]:
    """Runs the evaluation (every rank calls it); returns the metrics of each method.

    Rank 0 writes metrics.json, topk.parquet and the console table. Raises
    InputError for a checkpoint that does not fit the shards, missing shards, or
    a K larger than the catalog.
    """
    shards = open_shards(cfg)
    shards.paths(cfg.eval.split)
    methods = methods_of(cfg, shards, info)
    if not methods:
        raise InputError(
            "--eval.baselines is empty and --eval.checkpoint is none: "
            "nothing to evaluate"
        )
    ks = sorted(set(cfg.eval.k))
    scores = score_rank(cfg, shards, methods, info)
    metrics = reduce_over_ranks(scores.sums, ks)

    out = Path(cfg.eval.out)
    write_part(out / PARTS, info.rank, scores.users, scores.lists)
    distributed.barrier()
    if info.is_main:
        num_rows = merge_parts(shards, out / PARTS, out / TOPK_FILE)
        write_metrics(metrics, out / "metrics.json")
        print(format_table(metrics, ks), flush=True)
        log.info(
            "wrote %s and %s (%s rows)",
            out / "metrics.json",
            out / TOPK_FILE,
            f"{num_rows:,}",
        )
        log_to_wandb(cfg, out, metrics)
    return metrics


def main(argv: list[str]) -> int:
    """Entry point of ``python -m dream_dist.evaluate``; returns the exit status."""
    cfg = parse_config(argv)
    info = distributed.init(cfg.train.device)
    setup_logging(cfg.logging.level, info.rank)
    try:
        evaluate(cfg, info)
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    run_entry_point(main, "dream_dist.evaluate")
