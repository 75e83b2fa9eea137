"""Tiny shard sets with a learnable pattern, written straight with ShardSetWriter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dream_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardSetWriter,
    UserSequence,
)

NUM_GROUPS = 6
ITEMS_PER_GROUP = 4


def pattern_user(user: int, num_baskets: int) -> UserSequence:
    """Returns a user who cycles through their group's items, two a basket.

    Basket t holds items t and t+1 (mod 4) of the group, so basket t+1 follows
    from basket t: a model can learn it, a random ranking cannot.
    """
    group = user % NUM_GROUPS
    first = 1 + group * ITEMS_PER_GROUP
    phase = user % ITEMS_PER_GROUP
    baskets = [
        [
            first + (phase + t) % ITEMS_PER_GROUP,
            first + (phase + t + 1) % ITEMS_PER_GROUP,
        ]
        for t in range(num_baskets)
    ]
    return UserSequence(
        user=user,
        user_id=f"id{user}",
        items=np.array(baskets, dtype=np.int32).reshape(-1),
        sizes=np.full(num_baskets, 2, dtype=np.int32),
    )


def write_shards(
    folder: Path,
    num_users: dict[str, int] | None = None,
    num_shards: dict[str, int] | None = None,
    num_items: int = NUM_GROUPS * ITEMS_PER_GROUP,
) -> Path:
    """Writes train/val/test shards and a manifest to ``folder``; returns it.

    Users have 3 to 8 baskets (by index), so lengths differ for bucketing.
    """
    num_users = num_users or {"train": 256, "val": 48, "test": 48}
    num_shards = num_shards or {"train": 4, "val": 2, "test": 2}
    folder.mkdir(parents=True, exist_ok=True)
    splits, next_user = {}, 0
    for split, count in num_users.items():
        writer = ShardSetWriter(folder, split, num_shards[split])
        for user in range(next_user, next_user + count):
            writer.write(pattern_user(user, 3 + user % 6))
        next_user += count
        shards = writer.close()
        splits[split] = {"users": count, "baskets": 0, "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_items": num_items,
        "num_users": next_user,
        "splits": splits,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder
