"""Top-K recommendations of a DREAM checkpoint, in the user's own ids.

Usage::

    python -m dream_dist.recommend --config FILE --eval.checkpoint=PATH \\
        [--eval.users=FILE] [--eval.exclude_last_basket=true] [--eval.k=20]

For every user of the prepared data (or the original ids listed one a line in
``eval.users``), the whole sequence is the input and the next, unknown basket is
predicted: the top max(``eval.k``) items, optionally leaving out the items of the
user's last basket. Under torchrun every rank scores its own shards and rank 0
merges. Written to ``eval.out/recommendations.parquet``: ``user_id``, ``rank``
(1 = best), ``item_id`` (original ids).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from dream_dist import distributed
from dream_dist.baselines import Baskets
from dream_dist.config import Config, parse_config
from dream_dist.data.batching import collate
from dream_dist.data.shards import UserSequence, iter_users
from dream_dist.data.stream import rank_share
from dream_dist.errors import InputError, run_entry_point
from dream_dist.evaluate import (
    PARTS,
    CatalogScorer,
    ShardSet,
    chunks,
    load_model,
    merge_parts,
    open_shards,
    wants_model,
    write_part,
)
from dream_dist.tracking import setup_logging

log = logging.getLogger("dream_dist.recommend")

OUT_FILE = "recommendations.parquet"


def sequence_splits(shards: ShardSet) -> list[str]:
    """Returns the splits that hold every user's whole sequence exactly once.

    split=users: each user is in one split; split=last: test holds every user whole.
    """
    return ["train", "val", "test"] if shards.rule == "users" else ["test"]


def read_user_list(path: str, shards: ShardSet) -> set[int]:
    """Returns the dense indices of the original user ids listed in ``path``.

    Raises InputError naming the file, line and id of an unknown user.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise InputError(f"--eval.users: cannot read {path} ({err.strerror})") from None
    users = pl.read_parquet(
        shards.folder / shards.manifest.get("user_map", "users.parquet")
    )
    dense = dict(zip(users["user_id"].cast(pl.String), users["user"], strict=True))
    wanted = set()
    for number, line in enumerate(lines, start=1):
        user_id = line.strip()
        if not user_id:
            continue
        if user_id not in dense:
            raise InputError(f"{path}: line {number}: unknown user id {user_id!r}")
        wanted.add(int(dense[user_id]))
    return wanted


def last_baskets(users: list[UserSequence]) -> Baskets:
    """Returns each user's last basket (row b: user b's items)."""
    return Baskets.from_sequences(
        [
            UserSequence(
                u.user,
                u.user_id,
                u.items[u.target_start :],
                u.sizes[-1:],
            )
            for u in users
        ]
    )


def recommend(cfg: Config, info: distributed.DistInfo) -> int:
    """Writes ``eval.out/recommendations.parquet``; returns its rows (0 off rank 0).

    Raises InputError for a missing or unfit checkpoint, missing shards, an unknown
    user id, or a K larger than the catalog.
    """
    if not wants_model(cfg):
        raise InputError("--eval.checkpoint: recommend needs a checkpoint")
    shards = open_shards(cfg)
    paths = [p for split in sequence_splits(shards) for p in shards.paths(split)]
    wanted = read_user_list(cfg.eval.users, shards) if cfg.eval.users else None
    scorer = CatalogScorer(load_model(cfg, shards, info.device), info.device)

    k, mine = max(cfg.eval.k), rank_share(paths, info.rank, info.world_size)
    users = (u for u in iter_users(mine) if wanted is None or u.user in wanted)
    show = info.is_main and cfg.logging.progress and sys.stderr.isatty()
    user_parts, lists = [], []
    total = shards.num_samples(mine) if wanted is None else None
    with tqdm(total=total, unit="user", disable=not show) as bar:
        for chunk in chunks(users, cfg.eval.batch_size):
            exclude = last_baskets(chunk) if cfg.eval.exclude_last_basket else None
            batch = collate(chunk, drop_last_basket=False)
            lists.append(scorer.top_k(batch, k, exclude))
            user_parts.append(np.array([u.user for u in chunk], dtype=np.int64))
            bar.update(len(chunk))

    out = Path(cfg.eval.out)
    write_part(out / PARTS, info.rank, user_parts, {"dream": lists})
    distributed.barrier()
    if not info.is_main:
        return 0
    num_rows = merge_parts(shards, out / PARTS, out / OUT_FILE, keep_method=False)
    log.info("wrote %s rows to %s", f"{num_rows:,}", out / OUT_FILE)
    return num_rows


def main(argv: list[str]) -> int:
    """Entry point of ``python -m dream_dist.recommend``; returns the exit status."""
    cfg = parse_config(argv)
    info = distributed.init(cfg.train.device)
    setup_logging(cfg.logging.level, info.rank)
    try:
        with torch.inference_mode():
            recommend(cfg, info)
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    run_entry_point(main, "dream_dist.recommend")
