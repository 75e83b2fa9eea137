"""Raw purchase logs -> WebDataset shards, id maps and manifest.json.

Usage::

    python -m dream_dist.prepare --config configs/tafeng.toml \\
        --data.input=PATH --data.shards=DIR [--data.overwrite=true]

The steps, in order; every row, basket or user a step drops is counted in the
manifest's ``dropped`` as ``<reason>_rows``, ``<reason>_baskets``, ``<reason>_users``:

1. read the input into the canonical frame (``dream_dist.data.sources``);
2. ``duplicate``: an item listed twice in one basket keeps one row (reordered if
   any of its rows is);
3. ``not_in_keyset``: with ``data.keyset``, users the keyset does not name;
4. ``rare_item``: rows of items bought fewer than ``data.min_item_count`` times
   (counted after steps 2-3), and the baskets and users left empty;
5. ``few_baskets``: users with fewer baskets than the effective minimum,
   ``max(data.min_baskets, 2)`` for split=users and ``max(data.min_baskets, 4)``
   for split=last (whose train sample needs two baskets);
6. ``over_max``: all but each user's ``data.max_baskets`` most recent baskets.

Vocabulary: items are numbered 1..N by ascending original id (0 is padding) and
users 0..U-1 by ascending original id, both over what is left after step 6.
Inside a basket, items keep their input order (Instacart's add-to-cart order; a
repeated item keeps the place of its first row), which also breaks P-TopFreq's ties.

Splits: ``users`` puts each user in one split (a seeded permutation gives
``test_fraction`` then ``val_fraction`` of the users, rounded; the rest train; or
the keyset decides); ``last`` puts every user in all three splits: train holds
baskets[:-2], val baskets[:-1], test all. ``users.parquet``'s split is ``all``
under ``last``.

Everything is written to a hidden sibling folder that is renamed into place when
complete, so a reader never sees a half-written shard set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from dream_dist.config import ConfigError, DataConfig, parse_config
from dream_dist.data.shards import (
    FORMAT_VERSION,
    ITEM_MAP,
    MANIFEST,
    SPLITS,
    USER_MAP,
    ShardSetWriter,
    UserSequence,
    num_shards_for,
    shard_name,
)
from dream_dist.data.sources import Source, load_source, read_keyset
from dream_dist.errors import InputError, run_entry_point
from dream_dist.tracking import setup_logging

log = logging.getLogger("dream_dist.prepare")

TRIM_LAST = {"train": 2, "val": 1, "test": 0}
"""split=last: baskets left off the end of every user's sequence, per split."""
AUTO_WORKERS_FROM = 20_000
"""With data.num_workers=0, fewer samples than this are written in-process."""
LOOKUP_LIMIT = 1 << 27
"""Largest item id mapped through a dense lookup table (else a hash map)."""


# ---------------------------------------------------------------- filters


def _new_user() -> pl.Expr:
    """True on the first row of each user (frame sorted by user_id)."""
    return pl.col("user_id").ne_missing(pl.col("user_id").shift(1))


def _new_basket() -> pl.Expr:
    """True on the first row of each basket (frame sorted by user_id, basket)."""
    return _new_user() | pl.col("basket").ne_missing(pl.col("basket").shift(1))


def count_sizes(frame: pl.DataFrame) -> dict[str, int]:
    """Returns the rows, baskets and users of a frame sorted by user_id, basket."""
    return frame.select(
        rows=pl.len(), baskets=_new_basket().sum(), users=_new_user().sum()
    ).row(0, named=True)


@dataclass
class Tally:
    """What is left after each filter, and what each filter dropped."""

    sizes: dict[str, int]
    """Rows, baskets and users left now."""
    input_baskets: int
    """Baskets in the input, empty ones included."""
    dropped: dict[str, int]
    """``<reason>_<unit>``: count, in the order the filters ran."""
    input: str
    """The input's path, for messages."""

    def keep(self, frame: pl.DataFrame, keep: pl.Expr, reason: str) -> pl.DataFrame:
        """Returns the rows of ``frame`` where ``keep`` holds; counts the rest."""
        kept = frame.filter(keep)
        after = count_sizes(kept)
        for unit in ("rows", "baskets", "users"):
            self.dropped[f"{reason}_{unit}"] = self.sizes[unit] - after[unit]
        self.sizes = after
        log.info(
            "%s: dropped %s rows, %s baskets, %s users",
            reason,
            *(
                f"{self.dropped[f'{reason}_{u}']:,}"
                for u in ("rows", "baskets", "users")
            ),
        )
        if after["rows"] == 0:
            raise InputError(f"{self.input}: no rows left after the {reason} filter")
        return kept


def sort_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """Returns ``frame`` sorted by user_id, basket, item_id, reordered rows first."""
    packed = packed_key(frame)
    if packed is not None:
        return frame.sort(packed)
    flags = ["reordered"] if "reordered" in frame.columns else []
    descending = [False] * 3 + [True] * len(flags)
    return frame.sort(["user_id", "basket", "item_id", *flags], descending=descending)


def packed_key(frame: pl.DataFrame) -> pl.Expr | None:
    """Returns one UInt64 key that sorts like ``sort_rows``, or None if none fits.

    A single-column sort is several times faster than a four-column one.
    """
    columns = ["user_id", "basket", "item_id"]
    if not all(frame.schema[c].is_integer() for c in columns):
        return None
    bounds = frame.select(
        *[pl.col(c).min().alias(f"{c}:min") for c in columns],
        *[pl.col(c).max().alias(f"{c}:max") for c in columns],
    ).row(0, named=True)
    parts = [
        (pl.col(c) - bounds[f"{c}:min"], bounds[f"{c}:max"] - bounds[f"{c}:min"])
        for c in columns
    ]
    if "reordered" in frame.columns:
        parts.append((1 - pl.col("reordered").cast(pl.Int64), 1))
    if sum(span.bit_length() for _, span in parts) > 64:
        return None
    key, shift = pl.lit(0, dtype=pl.UInt64), 0
    for value, span in reversed(parts):
        key = key + value.cast(pl.UInt64) * pl.lit(1 << shift, dtype=pl.UInt64)
        shift += span.bit_length()
    return key


def min_baskets_for(cfg: DataConfig) -> int:
    """Returns the effective minimum number of baskets a user needs."""
    return max(cfg.min_baskets, 4 if cfg.split == "last" else 2)


def filter_frame(
    source: Source, cfg: DataConfig, keyset: dict[str, str] | None
) -> tuple[pl.DataFrame, Tally]:
    """Returns the sorted, filtered canonical frame and its tally.

    Raises InputError when the keyset names users missing from the input or when
    a filter leaves nothing.
    """
    # eager: every filter reports counts, so each result is materialized once
    frame = sort_rows(source.frame.with_row_index("position"))
    sizes = count_sizes(frame)
    sizes["baskets"] += source.empty_baskets
    tally = Tally(sizes, sizes["baskets"], dict(source.dropped), cfg.input)

    is_repeat = ~_new_basket() & pl.col("item_id").eq_missing(
        pl.col("item_id").shift(1)
    )
    if frame.select(is_repeat.any()).item():
        # a repeated item keeps the place of its first row (and, sorted first, its flag)
        first = pl.col("position").min().over((~is_repeat).cum_sum())
        frame = frame.with_columns(position=first)
    frame = tally.keep(frame, ~is_repeat, "duplicate")
    # items back in input order inside each basket (the sort above was for repeats)
    frame = frame.sort("user_id", "basket", "position").drop("position")
    if keyset is not None:
        frame = tally.keep(
            frame, _in_keyset(frame, keyset, cfg.keyset), "not_in_keyset"
        )
    if cfg.min_item_count > 1:
        enough = pl.len().over("item_id") >= cfg.min_item_count
        frame = tally.keep(frame, enough, "rare_item")
    num_baskets = _new_basket().sum().over("user_id")
    frame = tally.keep(frame, num_baskets >= min_baskets_for(cfg), "few_baskets")
    if cfg.max_baskets:
        from_end = num_baskets - _new_basket().cum_sum().over("user_id")
        frame = tally.keep(frame, from_end < cfg.max_baskets, "over_max")
    return frame, tally


def _in_keyset(frame: pl.DataFrame, keyset: dict[str, str], path: str) -> pl.Expr:
    """Returns the row mask of keyset users; raises InputError for unknown ones."""
    named = pl.Series(list(keyset), dtype=pl.String)
    present = frame.select(pl.col("user_id").cast(pl.String).unique()).to_series()
    missing = named.filter(~named.is_in(present.implode()))
    if len(missing):
        raise InputError(
            f"{path}: {len(missing):,} users of the keyset are not in the input "
            f"(first: {missing[0]!r})"
        )
    return pl.col("user_id").cast(pl.String).is_in(named.implode())


# ---------------------------------------------------------------- vocabulary


@dataclass
class Sequences:
    """Every kept user's baskets as flat arrays: no Python object per user."""

    items: np.ndarray
    """int32 dense item indices of all rows, by user, basket, input order."""
    reordered: np.ndarray | None
    """uint8 flags aligned with ``items`` (None without the flag)."""
    basket_rows: np.ndarray
    """int64 [num_baskets + 1]: first row of each basket, then the row count."""
    user_baskets: np.ndarray
    """int64 [num_users + 1]: first basket of each user, then the basket count."""
    user_ids: np.ndarray
    """The users' original ids, by dense user index."""

    def user(self, user: int, trim: int = 0) -> UserSequence:
        """Returns user ``user``'s sequence without its last ``trim`` baskets."""
        first, stop = self.user_baskets[user], self.user_baskets[user + 1] - trim
        rows = slice(self.basket_rows[first], self.basket_rows[stop])
        return UserSequence(
            user=user,
            user_id=str(self.user_ids[user]),
            items=self.items[rows],
            sizes=np.diff(self.basket_rows[first : stop + 1]).astype(np.int32),
            reordered=None if self.reordered is None else self.reordered[rows],
        )

    def num_baskets(self) -> np.ndarray:
        """Returns int64 [num_users]: baskets of each user."""
        return np.diff(self.user_baskets)


def item_vocabulary(frame: pl.DataFrame) -> pl.DataFrame:
    """Returns the item map: ``item`` (Int32, 1..N) by ascending ``item_id``."""
    item_ids = frame.get_column("item_id").unique().sort()
    return pl.DataFrame(
        {
            "item": pl.int_range(1, len(item_ids) + 1, dtype=pl.Int32, eager=True),
            "item_id": item_ids,
        }
    )


def dense_items(frame: pl.DataFrame, item_map: pl.DataFrame) -> np.ndarray:
    """Returns int32 dense item indices of every row of ``frame``."""
    item_ids = frame.get_column("item_id")
    largest = int(item_map["item_id"][-1])
    if largest < LOOKUP_LIMIT:
        lookup = np.zeros(largest + 1, dtype=np.int32)
        lookup[item_map["item_id"].to_numpy()] = item_map["item"].to_numpy()
        return lookup[item_ids.to_numpy()]
    dense = item_ids.replace_strict(item_map["item_id"], item_map["item"])
    return dense.to_numpy().astype(np.int32)


def to_sequences(frame: pl.DataFrame, item_map: pl.DataFrame) -> Sequences:
    """Returns the flat arrays of a frame sorted by user_id, basket."""
    marks = frame.select(user=_new_user(), basket=_new_basket())
    basket_starts = np.flatnonzero(marks["basket"].to_numpy())
    user_starts = np.flatnonzero(marks["user"].to_numpy()[basket_starts])
    reordered = None
    if "reordered" in frame.columns:
        reordered = frame.get_column("reordered").to_numpy().astype(np.uint8)
    user_ids = frame.get_column("user_id").gather(basket_starts[user_starts])
    return Sequences(
        items=dense_items(frame, item_map),
        reordered=reordered,
        basket_rows=np.append(basket_starts, frame.height).astype(np.int64),
        user_baskets=np.append(user_starts, len(basket_starts)).astype(np.int64),
        user_ids=_id_array(user_ids),
    )


def _id_array(ids: pl.Series) -> np.ndarray:
    """Returns ids as a numpy array that saves without pickle (text as unicode)."""
    array = ids.to_numpy()
    return array.astype(str) if array.dtype == object else array


# ---------------------------------------------------------------- splits


def assign_splits(
    user_ids: np.ndarray, cfg: DataConfig, keyset: dict[str, str] | None
) -> np.ndarray:
    """Returns each user's split name (``all`` for split=last)."""
    num_users = len(user_ids)
    if cfg.split == "last":
        return np.full(num_users, "all")
    if keyset is not None:
        return np.array([keyset[str(user_id)] for user_id in user_ids])
    order = np.random.default_rng(cfg.seed).permutation(num_users)
    num_test = round(num_users * cfg.test_fraction)
    num_val = round(num_users * cfg.val_fraction)
    split = np.full(num_users, "train")
    split[order[:num_test]] = "test"
    split[order[num_test : num_test + num_val]] = "val"
    return split


@dataclass
class ShardTask:
    """One shard to write: which users, and how many last baskets to leave off."""

    split: str
    shard: int
    users: np.ndarray
    trim: int


def plan_shards(split_of: np.ndarray, cfg: DataConfig) -> dict[str, list[ShardTask]]:
    """Returns every split's shard tasks; user ``i`` of a split goes to shard i % n."""
    plan = {}
    for split in SPLITS:
        if cfg.split == "last":
            users, trim = np.arange(len(split_of)), TRIM_LAST[split]
        else:
            users, trim = np.flatnonzero(split_of == split), 0
        num_shards = num_shards_for(len(users), cfg.users_per_shard, cfg.min_shards)
        plan[split] = [
            ShardTask(split, shard, users[shard::num_shards], trim)
            for shard in range(num_shards)
        ]
    return plan


# ---------------------------------------------------------------- shard writing

_worker_sequences: Sequences | None = None


def write_shard(
    folder: Path, task: ShardTask, sequences: Sequences | None = None
) -> int:
    """Writes one shard file into ``folder``; returns its number of samples."""
    sequences = sequences or _worker_sequences
    assert sequences is not None
    part = folder / f".part-{task.split}-{task.shard}"
    part.mkdir()
    writer = ShardSetWriter(part, task.split, 1)
    for user in task.users:
        writer.write(sequences.user(int(user), task.trim))
    [entry] = writer.close()
    os.replace(part / entry["path"], folder / shard_name(task.split, task.shard))
    part.rmdir()
    return entry["samples"]


def _save_arrays(sequences: Sequences, folder: Path) -> None:
    folder.mkdir()
    for name, array in vars(sequences).items():
        if array is not None:
            np.save(folder / f"{name}.npy", array, allow_pickle=False)


def _load_arrays(folder: str) -> None:
    """Pool initializer: maps the saved arrays read-only into this worker."""
    global _worker_sequences
    arrays = {
        name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if (Path(folder) / f"{name}.npy").exists()
        else None
        for name in ("items", "reordered", "basket_rows", "user_baskets", "user_ids")
    }
    _worker_sequences = Sequences(**arrays)


def num_writers(cfg: DataConfig, num_tasks: int, num_samples: int) -> int:
    """Returns how many processes write shards (1: this process)."""
    if cfg.num_workers:
        return max(1, min(cfg.num_workers, num_tasks))
    if num_samples < AUTO_WORKERS_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(cores, num_tasks))


def write_shards(
    folder: Path,
    sequences: Sequences,
    tasks: list[ShardTask],
    cfg: DataConfig,
    bar: tqdm,
) -> list[int]:
    """Writes every task's shard into ``folder``; returns their sample counts."""
    num_samples = sum(len(task.users) for task in tasks)
    workers = num_writers(cfg, len(tasks), num_samples)
    if workers == 1:
        counts = []
        for task in tasks:
            counts.append(write_shard(folder, task, sequences))
            bar.update(counts[-1])
        return counts

    # worker processes map the flat arrays from disk instead of pickling them
    arrays = folder / ".arrays"
    _save_arrays(sequences, arrays)
    context = multiprocessing.get_context("spawn")
    largest_first = sorted(range(len(tasks)), key=lambda i: -len(tasks[i].users))
    counts = [0] * len(tasks)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_load_arrays, initargs=(str(arrays),)
    ) as pool:
        futures = {i: pool.submit(write_shard, folder, tasks[i]) for i in largest_first}
        for i, future in futures.items():
            counts[i] = future.result()
            bar.update(counts[i])
    shutil.rmtree(arrays)
    return counts


# ---------------------------------------------------------------- output


def check_output(out: Path, overwrite: bool) -> None:
    """Raises ConfigError if ``out`` exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise ConfigError(
            f"--data.shards: {out} already exists "
            "(pass --data.overwrite=true to replace it)"
        )


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a hidden sibling folder, renamed to ``out`` when the block succeeds.

    On any failure the folder is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        check_output(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(temp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_maps(
    folder: Path, item_map: pl.DataFrame, sequences: Sequences, split_of: np.ndarray
) -> None:
    """Writes items.parquet and users.parquet into ``folder``."""
    item_map.write_parquet(folder / ITEM_MAP)
    num_users = len(split_of)
    pl.DataFrame(
        {
            "user": pl.int_range(0, num_users, dtype=pl.Int32, eager=True),
            "user_id": sequences.user_ids,
            "split": split_of,
        }
    ).write_parquet(folder / USER_MAP)


def build_manifest(
    cfg: DataConfig,
    source: Source,
    tally: Tally,
    num_items: int,
    splits: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Returns the manifest.json content (see the shard contract)."""
    return {
        "format_version": FORMAT_VERSION,
        "num_items": num_items,
        "num_users": tally.sizes["users"],
        "num_baskets": tally.sizes["baskets"],
        "num_purchases": tally.sizes["rows"],
        "input_rows": source.input_rows,
        "input_baskets": tally.input_baskets,
        "dropped": tally.dropped,
        "has_reordered": source.has_reordered,
        "split": {
            "rule": cfg.split,
            "seed": cfg.seed,
            "keyset": cfg.keyset or None,
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
        },
        "min_baskets": min_baskets_for(cfg),
        "min_item_count": cfg.min_item_count,
        "max_baskets": cfg.max_baskets,
        "source": {"format": cfg.format, "input": cfg.input},
        "item_map": ITEM_MAP,
        "user_map": USER_MAP,
        "splits": splits,
    }


def check_settings(cfg: DataConfig) -> None:
    """Raises ConfigError for settings that contradict each other."""
    if cfg.keyset and cfg.split != "users":
        raise ConfigError("--data.keyset: only used with --data.split=users")
    if cfg.max_baskets and cfg.max_baskets < min_baskets_for(cfg):
        raise ConfigError(
            f"--data.max_baskets: {cfg.max_baskets} is below the minimum of "
            f"{min_baskets_for(cfg)} baskets a user needs"
        )
    if cfg.split == "last" and cfg.min_baskets < 4:
        log.warning("split=last needs 4 baskets a user: using min_baskets=4")


def prepare(cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
    """Writes shards, id maps and manifest.json to ``cfg.shards``; returns the manifest.

    Raises InputError for unusable input and ConfigError for unusable settings
    (an existing output without ``overwrite`` among them); leaves nothing behind.
    """
    out = Path(cfg.shards)
    check_settings(cfg)
    check_output(out, cfg.overwrite)
    keyset = read_keyset(Path(cfg.keyset)) if cfg.keyset else None

    source = load_source(cfg)
    log.info(
        "read %s rows from %s (%s)", f"{source.input_rows:,}", cfg.input, cfg.format
    )
    frame, tally = filter_frame(source, cfg, keyset)
    item_map = item_vocabulary(frame)
    sequences = to_sequences(frame, item_map)
    del frame
    split_of = assign_splits(sequences.user_ids, cfg, keyset)
    plan = plan_shards(split_of, cfg)

    with staging(out, cfg.overwrite) as temp:
        write_maps(temp, item_map, sequences, split_of)
        splits = _write_splits(temp, sequences, plan, cfg, progress)
        manifest = build_manifest(cfg, source, tally, item_map.height, splits)
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _log_summary(out, manifest)
    return manifest


def _write_splits(
    folder: Path,
    sequences: Sequences,
    plan: dict[str, list[ShardTask]],
    cfg: DataConfig,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Writes every shard; returns the manifest's ``splits`` entry."""
    tasks = [task for split in SPLITS for task in plan[split]]
    total = sum(len(task.users) for task in tasks)
    show = progress and sys.stderr.isatty()
    with tqdm(total=total, unit="user", desc="shards", disable=not show) as bar:
        counts = write_shards(folder, sequences, tasks, cfg, bar)
    num_baskets = sequences.num_baskets()
    splits: dict[str, dict[str, Any]] = {}
    for task, count in zip(tasks, counts, strict=True):
        entry = splits.setdefault(task.split, {"users": 0, "baskets": 0, "shards": []})
        entry["users"] += count
        entry["baskets"] += int(num_baskets[task.users].sum()) - task.trim * count
        entry["shards"].append(
            {"path": shard_name(task.split, task.shard), "samples": count}
        )
    return {
        split: splits.get(split, {"users": 0, "baskets": 0, "shards": []})
        for split in SPLITS
    }


def _log_summary(out: Path, manifest: dict[str, Any]) -> None:
    splits = manifest["splits"]
    log.info(
        "wrote %s: %s items; users train %s / val %s / test %s",
        out,
        f"{manifest['num_items']:,}",
        *(f"{splits[s]['users']:,}" for s in SPLITS),
    )


def main(argv: list[str]) -> int:
    """Entry point of ``python -m dream_dist.prepare``; returns the exit status."""
    cfg = parse_config(argv)
    setup_logging(cfg.logging.level, rank=0)
    prepare(cfg.data, progress=cfg.logging.progress)
    return 0


if __name__ == "__main__":
    run_entry_point(main, "dream_dist.prepare")
