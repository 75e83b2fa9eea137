"""Synthetic purchase logs in Instacart's four-CSV layout, with structure to learn.

``python -m dream_dist.synth --out DIR --users N --seed S`` writes ``orders.csv``,
``order_products__prior.csv``, ``order_products__train.csv`` and ``products.csv`` with
Instacart's columns. Every user's last order is their ``train`` order, the rest are
``prior``. The same arguments give the same bytes.

How a user's orders are made (all vectorised; one seeded random stream):

- items: Zipf-Mandelbrot popularity over a shuffled catalogue (aisles, departments).
- users: 4 to 100 orders (skewed, mean near Instacart's 16.6), a personal basket scale.
- favourites: a few items per user, each bought every P orders (P in 1..8) from a
  start order on, skipped now and then.
- personal catalogue: items the user rebuys irregularly, a few of them often.
- exploration: items drawn from global popularity.
- item pairs: a share of items ``a`` have a successor ``b`` (the same for every user);
  ``a`` in basket t puts ``b`` in basket t+1 with probability ``pair_prob``.
- ``reordered`` is 1 exactly when the user bought the item in an earlier order.

At Instacart's scale (``--users 206209``: ~3.4M orders, ~35M lines, reorder share
0.60, ~10.2 items a basket) it takes about 25 s and 2 GB on two cores.

Array suffixes: ``_U`` one value per user, ``_F`` per favourite, ``_C`` per
personal catalogue entry; ``order_*`` arrays hold one value per order.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dream_dist.errors import InputError, run_entry_point

log = logging.getLogger("dream_dist.synth")

INSTACART_USERS = 206_209
"""Users in the Instacart Online Grocery Shopping dataset (2017)."""
INSTACART_ITEMS = 49_688
"""Products in Instacart's catalogue."""
CSV_FILES = (
    "orders.csv",
    "order_products__prior.csv",
    "order_products__train.csv",
    "products.csv",
)
"""The files ``write`` produces, in Instacart's names."""

MAX_USERS = 5_000_000
"""Most users one run generates (line indices are int32; memory grows ~9 GB/M users)."""
_MIN_ORDERS = 4
_MAX_ORDERS = 100
_ORDER_BITS = _MAX_ORDERS.bit_length()
_NUM_AISLES = 134
_NUM_DEPARTMENTS = 21
_PERIODS = np.array([1, 2, 3, 4, 6, 8])
_PERIOD_SHARES = np.array([0.15, 0.25, 0.2, 0.15, 0.15, 0.1])


@dataclass(frozen=True)
class SynthParams:
    """What to generate; the defaults match Instacart's shape."""

    num_users: int = 1000
    """Users to generate (Instacart has 206,209)."""
    num_items: int = INSTACART_ITEMS
    """Products in the catalogue."""
    seed: int = 0
    """Seed of the one random stream everything is drawn from."""
    zipf_exponent: float = 1.0
    """Exponent of item popularity, weight 1 / (rank + zipf_shift) ** exponent."""
    zipf_shift: float = 10.0
    """Shift of item popularity ranks; flattens the very top of the curve."""
    mean_favourites: float = 12.0
    """Mean number of periodic favourites of a user of average basket scale."""
    favourite_keep: float = 0.85
    """Chance that a favourite due in an order is bought."""
    mean_catalogue: float = 15.0
    """Mean size of a user's personal catalogue of irregular rebuys."""
    catalogue_per_basket: float = 3.6
    """Mean personal catalogue items in a basket."""
    explore_per_basket: float = 2.1
    """Mean items drawn from global popularity in a basket."""
    pair_share: float = 0.3
    """Share of items that have a successor item."""
    pair_prob: float = 0.5
    """Chance that an item with a successor puts it in the next basket."""


@dataclass(frozen=True)
class SynthData:
    """The four tables, as written to CSV."""

    orders: pl.DataFrame
    """orders.csv: one row per order, sorted by user_id then order_number."""
    prior: pl.DataFrame
    """order_products__prior.csv: lines of every order but each user's last."""
    train: pl.DataFrame
    """order_products__train.csv: lines of each user's last order."""
    products: pl.DataFrame
    """products.csv: product_id, product_name, aisle_id, department_id."""


@dataclass(frozen=True)
class _Lines:
    """Order lines: the global order index of each line and its product id."""

    order: np.ndarray
    item: np.ndarray


@dataclass(frozen=True)
class _Users:
    """Per-user and per-order draws; orders are numbered user by user, oldest first."""

    num_orders_U: np.ndarray
    scale_U: np.ndarray
    """Basket scale of each user, mean 1."""
    order_start_U: np.ndarray
    """Global index of each user's first order."""
    order_user: np.ndarray
    order_t: np.ndarray
    """Position of each order in its user's history, from 0."""
    last_order: np.ndarray
    order_boost: np.ndarray
    """Per-order multiplier of basket size, mean 1."""


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (owner, within) for ``counts[i]`` slots per owner i: who, and which."""
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    owner = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    within = np.arange(owner.size, dtype=np.int32)
    within -= np.repeat(starts, counts)
    return owner, within


def _popularity_cdf(params: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """Returns the cumulative popularity of ids 1..num_items (index = id - 1)."""
    rank = rng.permutation(params.num_items)
    weight = 1.0 / (rank + 1.0 + params.zipf_shift) ** params.zipf_exponent
    cdf = np.cumsum(weight)
    return cdf / cdf[-1]


def _draw_items(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Returns ``n`` int32 product ids drawn from the popularity ``cdf``."""
    ids = np.searchsorted(cdf, rng.random(n), side="right").astype(np.int32)
    ids += 1
    return ids


def _num_orders(num_users: int, rng: np.random.Generator) -> np.ndarray:
    """Returns each user's order count: 4..100, skewed, mean near 16.6."""
    extra = np.floor(rng.lognormal(mean=2.1, sigma=1.0, size=num_users))
    return np.clip(_MIN_ORDERS + extra, _MIN_ORDERS, _MAX_ORDERS).astype(np.int64)


def _favourite_lines(
    params: SynthParams, users: _Users, cdf: np.ndarray, rng: np.random.Generator
) -> _Lines:
    """Returns the lines of periodic favourites: each bought every P orders from t0."""
    num_fav_U = 1 + rng.poisson(params.mean_favourites * users.scale_U)
    user_F, _ = _expand(num_fav_U)
    item_F = _draw_items(cdf, user_F.size, rng)
    period_F = rng.choice(_PERIODS, size=user_F.size, p=_PERIOD_SHARES)

    # a favourite starts at a skewed point of the history, then a random phase
    length_F = users.num_orders_U[user_F]
    delay_F = np.floor(rng.random(user_F.size) ** 3 * length_F * 0.7).astype(np.int64)
    first_F = delay_F + rng.integers(0, period_F)
    count_F = np.maximum(0, (length_F - first_F + period_F - 1) // period_F)

    # one line per due order, some skipped
    fav, k = _expand(count_F)
    keep = rng.random(fav.size, dtype=np.float32) < params.favourite_keep
    fav, k = fav[keep], k[keep]
    order = period_F.astype(np.int32)[fav]
    order *= k
    order += (users.order_start_U[user_F] + first_F).astype(np.int32)[fav]
    return _Lines(order, item_F[fav])


def _catalogue_lines(
    params: SynthParams, users: _Users, cdf: np.ndarray, rng: np.random.Generator
) -> _Lines:
    """Returns lines rebought irregularly from each user's personal catalogue."""
    scale_U = users.scale_U
    size_U = (3 + rng.poisson(params.mean_catalogue * scale_U)).astype(np.int32)
    start_U = np.cumsum(size_U, dtype=np.int32) - size_U
    item_C = _draw_items(cdf, int(size_U.sum()), rng)

    # per order a boosted Poisson count; within the catalogue, early items are favoured
    lam = params.catalogue_per_basket * scale_U[users.order_user] * users.order_boost
    order, _ = _expand(rng.poisson(lam))
    user = users.order_user[order]
    pick = rng.random(order.size, dtype=np.float32)
    pick *= pick
    pick *= size_U[user]
    index = np.minimum(pick.astype(np.int32), size_U[user] - 1)
    index += start_U[user]
    return _Lines(order, item_C[index])


def _pair_lines(
    params: SynthParams,
    base: _Lines,
    last_order: np.ndarray,
    cdf: np.ndarray,
    rng: np.random.Generator,
) -> _Lines:
    """Returns successor lines: item a in order g puts succ[a] in order g + 1."""
    has_succ = rng.random(params.num_items + 1) < params.pair_share
    succ = np.zeros(params.num_items + 1, dtype=np.int32)
    succ[1:] = _draw_items(cdf, params.num_items, rng)
    fire = has_succ[base.item]
    fire &= rng.random(base.item.size, dtype=np.float32) < params.pair_prob
    fire &= ~last_order[base.order]
    return _Lines(base.order[fire] + 1, succ[base.item[fire]])


def _next_prime(n: int) -> int:
    """Returns the smallest prime above ``n``."""
    candidate = n + 1
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def _cart_rank(
    lines: _Lines, num_orders: int, prime: int, rng: np.random.Generator
) -> np.ndarray:
    """Returns int64 (a * item + b) mod prime, with a and b drawn per order.

    Within one order this is a bijection of the items (prime > every id), so
    equal items stay equal and distinct items fall in a random-looking order.
    """
    a = rng.integers(1, prime, num_orders)
    b = rng.integers(0, prime, num_orders)
    rank = a[lines.order]
    rank *= lines.item
    rank += b[lines.order]
    rank %= prime
    return rank


def _finish_lines(
    lines: _Lines, num_orders: int, num_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (order, item) without duplicates, in a random cart order per order.

    Raises InputError when orders and items do not fit one 64-bit sort key.
    """
    # key (order, cart, item): one sort groups repeats and shuffles each cart
    prime = _next_prime(num_items)
    cart_bits, item_bits = prime.bit_length(), num_items.bit_length()
    if num_orders.bit_length() + cart_bits + item_bits > 63:
        raise InputError("--users/--items: too many orders and items to generate")
    key = _cart_rank(lines, num_orders, prime, rng)
    key |= lines.order.astype(np.int64) << cart_bits
    key <<= item_bits
    key |= lines.item
    key.sort()

    # drop repeats of an item within an order, then unpack
    keep = np.ones(key.size, dtype=bool)
    np.not_equal(key[1:], key[:-1], out=keep[1:])
    key = key[keep]
    item = (key & ((1 << item_bits) - 1)).astype(np.int32)
    return (key >> (cart_bits + item_bits)).astype(np.int32), item


def _reordered(
    user: np.ndarray, t: np.ndarray, item: np.ndarray, num_items: int
) -> np.ndarray:
    """Returns uint8 flags: 1 where the user bought the item in an earlier order."""
    # sort lines by (user, item, t): within a (user, item) run, all but the first repeat
    key = user.astype(np.int64)
    key <<= num_items.bit_length()
    key |= item
    key <<= _ORDER_BITS
    key |= t
    perm = np.argsort(key)
    key = key.take(perm)
    key >>= _ORDER_BITS
    flags = np.zeros(key.size, dtype=np.uint8)
    flags[perm[1:]] = key[1:] == key[:-1]
    return flags


def _order_times(
    users: _Users, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns each order's weekday, hour, and days since the prior order (NaN first).

    Each user keeps a usual weekday and hour, and a typical gap between orders.
    """
    num_users, order_user, order_t = users.scale_U.size, users.order_user, users.order_t
    dow_U = rng.integers(0, 7, num_users)
    hour_U = rng.normal(13.5, 3.0, num_users)
    gap_U = rng.uniform(3.0, 30.0, num_users)
    usual = rng.random(order_t.size) < 0.6
    dow = np.where(usual, dow_U[order_user], rng.integers(0, 7, order_t.size))
    hour = hour_U[order_user] + rng.normal(0, 2.5, order_t.size)
    hour = np.clip(np.rint(hour), 0, 23)
    gap = gap_U[order_user] * rng.gamma(3.0, 1.0 / 3.0, order_t.size)
    days = np.where(order_t == 0, np.nan, np.clip(np.rint(gap), 0, 30))
    return dow, hour, days


def _orders_frame(
    users: _Users, order_id: np.ndarray, rng: np.random.Generator
) -> pl.DataFrame:
    """Returns orders.csv: ids, eval_set, weekday, hour, days since the prior order."""
    order_user, order_t = users.order_user, users.order_t
    dow, hour, days = _order_times(users, rng)
    return pl.DataFrame(
        {
            "order_id": order_id.astype(np.int64),
            "user_id": (order_user + 1).astype(np.int64),
            "eval_set": np.where(users.last_order, "train", "prior"),
            "order_number": (order_t + 1).astype(np.int64),
            "order_dow": dow.astype(np.int64),
            "order_hour_of_day": hour.astype(np.int64),
            "days_since_prior_order": days,
        }
    ).with_columns(pl.col("days_since_prior_order").fill_nan(None))


def _products_frame(num_items: int, rng: np.random.Generator) -> pl.DataFrame:
    """Returns products.csv: every product with a name, an aisle and its department."""
    department_A = rng.permutation(_NUM_AISLES) % _NUM_DEPARTMENTS + 1
    aisle = rng.integers(1, _NUM_AISLES + 1, num_items)
    frame = pl.DataFrame(
        {
            "product_id": np.arange(1, num_items + 1, dtype=np.int64),
            "aisle_id": aisle.astype(np.int64),
            "department_id": department_A[aisle - 1].astype(np.int64),
        }
    )
    name = pl.format("Product {}", pl.col("product_id")).alias("product_name")
    return frame.select("product_id", name, "aisle_id", "department_id")


def _line_frames(
    order: np.ndarray,
    item: np.ndarray,
    reordered: np.ndarray,
    order_id: np.ndarray,
    last_order: np.ndarray,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Returns (prior, train) order-line frames sorted by order_id, then cart order."""
    counts = np.bincount(order, minlength=order_id.size)
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    by_id = np.argsort(order_id)

    # visit orders by order_id; lines of one order stay together, in cart order
    frames = []
    for is_train in (False, True):
        chosen = by_id[last_order[by_id] == is_train]
        owner, within = _expand(counts[chosen])
        line = starts[chosen][owner]
        line += within
        within += 1
        frame = {
            "order_id": order_id[chosen].astype(np.int32)[owner],
            "product_id": item[line],
            "add_to_cart_order": within,
            "reordered": reordered[line],
        }
        frames.append(pl.DataFrame(frame))
    return frames[0], frames[1]


def _draw_users(params: SynthParams, rng: np.random.Generator) -> _Users:
    """Returns every user's order count and basket scale, and each order's boost."""
    num_orders_U = _num_orders(params.num_users, rng)
    scale_U = rng.lognormal(-0.125, 0.5, params.num_users)
    order_user, order_t = _expand(num_orders_U)
    return _Users(
        num_orders_U=num_orders_U,
        scale_U=scale_U,
        order_start_U=np.cumsum(num_orders_U) - num_orders_U,
        order_user=order_user,
        order_t=order_t,
        last_order=order_t == num_orders_U[order_user] - 1,
        order_boost=rng.gamma(2.0, 0.5, order_user.size),
    )


def _concat(*parts: _Lines) -> _Lines:
    """Returns the lines of all ``parts``, in turn."""
    return _Lines(
        np.concatenate([part.order for part in parts]),
        np.concatenate([part.item for part in parts]),
    )


def _all_lines(
    params: SynthParams, users: _Users, cdf: np.ndarray, rng: np.random.Generator
) -> _Lines:
    """Returns favourite, catalogue, exploration and successor lines (with repeats)."""
    fav = _favourite_lines(params, users, cdf, rng)
    cat = _catalogue_lines(params, users, cdf, rng)
    lam = params.explore_per_basket * users.scale_U[users.order_user]
    explore_order, _ = _expand(rng.poisson(lam * users.order_boost))
    explore = _Lines(explore_order, _draw_items(cdf, explore_order.size, rng))
    base = _concat(fav, cat, explore)
    del fav, cat, explore
    pairs = _pair_lines(params, base, users.last_order, cdf, rng)

    # every order holds at least one item
    sizes = np.bincount(base.order, minlength=users.order_user.size)
    sizes += np.bincount(pairs.order, minlength=users.order_user.size)
    empty = np.flatnonzero(sizes == 0).astype(np.int32)
    return _concat(base, pairs, _Lines(empty, _draw_items(cdf, empty.size, rng)))


def generate(params: SynthParams) -> SynthData:
    """Returns the four Instacart tables; raises InputError on too few users/items."""
    if not 1 <= params.num_users <= MAX_USERS:
        raise InputError(f"--users: must be 1..{MAX_USERS:,}, got {params.num_users}")
    if params.num_items < 10:
        raise InputError(f"--items: need at least 10 items, got {params.num_items}")
    rng = np.random.default_rng(params.seed)
    cdf = _popularity_cdf(params, rng)
    users = _draw_users(params, rng)
    num_orders = users.order_user.size

    # one line per (order, item), in cart order, flagged against the user's history
    order, item = _finish_lines(
        _all_lines(params, users, cdf, rng), num_orders, params.num_items, rng
    )
    reordered = _reordered(
        users.order_user[order], users.order_t[order], item, params.num_items
    )

    # order ids are a shuffle of 1..num_orders, as Instacart's do not follow time
    order_id = rng.permutation(num_orders) + 1
    prior, train = _line_frames(order, item, reordered, order_id, users.last_order)
    return SynthData(
        orders=_orders_frame(users, order_id, rng),
        prior=prior,
        train=train,
        products=_products_frame(params.num_items, rng),
    )


def write(data: SynthData, out: Path, overwrite: bool = False) -> None:
    """Writes the four CSVs into ``out``; raises InputError if they exist already.

    A new folder appears complete or not at all; with ``overwrite`` each file is
    replaced whole.
    """
    existing = [name for name in CSV_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise InputError(f"{out / existing[0]}: exists (pass --overwrite to replace)")
    fresh = not out.exists()
    tmp = out.parent / f".{out.name}.tmp" if fresh else out / ".synth.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tables = (data.orders, data.prior, data.train, data.products)
        for name, table in zip(CSV_FILES, tables, strict=True):
            table.write_csv(tmp / name)
        if fresh:
            tmp.rename(out)
            return
        for name in CSV_FILES:
            (tmp / name).replace(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """Returns the parsed command line; argparse exits 2 on a bad flag."""
    parser = argparse.ArgumentParser(
        prog="python -m dream_dist.synth",
        description="Write synthetic purchase logs as Instacart's four CSV files.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--users", type=int, default=SynthParams.num_users)
    parser.add_argument("--items", type=int, default=INSTACART_ITEMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pair-prob",
        type=float,
        default=SynthParams.pair_prob,
        help="chance an item puts its successor in the next basket (0 turns pairs off)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the CSVs")
    return parser.parse_args(argv)


def _log_summary(data: SynthData, out: Path, generate_s: float, write_s: float) -> None:
    """Logs one line: what was written where, and how long it took."""
    num_lines = data.prior.height + data.train.height
    num_reordered = data.prior["reordered"].sum() + data.train["reordered"].sum()
    log.info(
        "%d users, %d orders, %d lines (%.2f reordered) in %s; "
        "generate %.1f s, write %.1f s",
        data.orders["user_id"].n_unique(),
        data.orders.height,
        num_lines,
        num_reordered / num_lines,
        out,
        generate_s,
        write_s,
    )


def main(argv: list[str]) -> int:
    """Generates and writes the data; returns 0. Raises InputError on bad sizes."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = _parse_args(argv)
    if not 0.0 <= args.pair_prob <= 1.0:
        raise InputError(f"--pair-prob: must be in [0, 1], got {args.pair_prob}")
    params = SynthParams(
        num_users=args.users,
        num_items=args.items,
        seed=args.seed,
        pair_prob=args.pair_prob,
    )
    started = time.perf_counter()
    data = generate(params)
    generated = time.perf_counter()
    write(data, args.out, overwrite=args.overwrite)

    _log_summary(data, args.out, generated - started, time.perf_counter() - generated)
    return 0


if __name__ == "__main__":
    run_entry_point(main, "dream_dist.synth")
