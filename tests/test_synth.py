"""Synthetic Instacart data: same seed same bytes, Instacart's schema, and structure.

The CLI runs for real (``python -m dream_dist.synth`` in a subprocess once, in process
otherwise); structure checks recompute every figure from the written CSVs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dream_dist.errors import InputError
from dream_dist.synth import CSV_FILES, SynthData, SynthParams, generate, main

NUM_USERS = 1500

COLUMNS = {
    "orders.csv": [
        "order_id",
        "user_id",
        "eval_set",
        "order_number",
        "order_dow",
        "order_hour_of_day",
        "days_since_prior_order",
    ],
    "order_products__prior.csv": [
        "order_id",
        "product_id",
        "add_to_cart_order",
        "reordered",
    ],
    "order_products__train.csv": [
        "order_id",
        "product_id",
        "add_to_cart_order",
        "reordered",
    ],
    "products.csv": ["product_id", "product_name", "aisle_id", "department_id"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a folder written by the CLI: 1,500 users, Instacart's catalogue size."""
    out = tmp_path_factory.mktemp("synth") / "instacart"
    assert main(["--out", str(out), "--users", str(NUM_USERS), "--seed", "7"]) == 0
    return out


@pytest.fixture(scope="module")
def lines(folder: Path) -> pl.DataFrame:
    """Returns every order line joined to its order: user_id, order_number, eval_set."""
    orders = pl.read_csv(folder / "orders.csv")
    both = pl.concat(
        [
            pl.read_csv(folder / "order_products__prior.csv").with_columns(
                file=pl.lit("prior")
            ),
            pl.read_csv(folder / "order_products__train.csv").with_columns(
                file=pl.lit("train")
            ),
        ]
    )
    return both.join(orders, on="order_id", how="left")


def _write(out: Path, seed: int, users: int = 300) -> dict[str, bytes]:
    """Returns the bytes of each CSV that the CLI writes for ``seed``."""
    assert main(["--out", str(out), "--users", str(users), "--seed", str(seed)]) == 0
    return {name: (out / name).read_bytes() for name in CSV_FILES}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    """The module entry point and main() agree byte for byte; another seed differs."""
    command = [sys.executable, "-m", "dream_dist.synth", "--out", str(tmp_path / "a")]
    command += ["--users", "300", "--seed", "1"]
    subprocess.run(command, check=True, capture_output=True)
    first = {name: (tmp_path / "a" / name).read_bytes() for name in CSV_FILES}

    assert _write(tmp_path / "b", seed=1) == first
    other = _write(tmp_path / "c", seed=2)
    assert other["orders.csv"] != first["orders.csv"]
    assert other["order_products__prior.csv"] != first["order_products__prior.csv"]


def test_columns_are_instacarts(folder: Path) -> None:
    """Each file's header is exactly Instacart's, and products cover the catalogue."""
    for name, columns in COLUMNS.items():
        header = (folder / name).read_text().split("\n", 1)[0]
        assert header.split(",") == columns, name
    products = pl.read_csv(folder / "products.csv")
    assert products["product_id"].to_list() == list(range(1, 49_689))
    assert products["department_id"].is_between(1, 21).all()


def test_orders_and_lines_agree(folder: Path, lines: pl.DataFrame) -> None:
    """Last order is 'train', no gap before a first order, carts numbered 1..n."""
    orders = pl.read_csv(folder / "orders.csv")
    last = pl.col("order_number") == pl.col("order_number").max().over("user_id")
    assert orders.select((pl.col("eval_set") == "train") == last).to_series().all()
    assert set(orders["eval_set"]) == {"prior", "train"}
    first = orders["order_number"] == 1
    assert (orders["days_since_prior_order"].is_null() == first).all()

    # every line's order exists, in the file of its eval_set; every order has lines
    assert lines["user_id"].null_count() == 0
    assert (lines["file"] == lines["eval_set"]).all()
    assert lines["order_id"].n_unique() == orders.height
    carts = lines.group_by("order_id").agg(
        pl.col("add_to_cart_order").sort(), pl.len(), pl.col("product_id").n_unique()
    )
    assert (carts["len"] == carts["product_id"]).all()
    assert carts["add_to_cart_order"].to_list() == [
        list(range(1, n + 1)) for n in carts["len"]
    ]


def test_shape_matches_instacart(folder: Path, lines: pl.DataFrame) -> None:
    """4..100 orders a user (mean ~16.6), ~10 items a basket, reorders ~0.6, skew."""
    orders = pl.read_csv(folder / "orders.csv")
    per_user = orders.group_by("user_id").len()["len"]
    assert per_user.min() >= 4 and per_user.max() <= 100
    assert 14.5 <= per_user.mean() <= 19.0
    assert orders["user_id"].n_unique() == NUM_USERS

    assert 9.0 <= lines.height / orders.height <= 11.5
    assert 0.5 <= lines["reordered"].mean() <= 0.7

    # the top 1% of the catalogue holds a large share of all lines
    counts = np.sort(np.bincount(lines["product_id"].to_numpy()))[::-1]
    assert counts[:497].sum() / counts.sum() > 0.3


def test_reordered_matches_history(lines: pl.DataFrame) -> None:
    """reordered == 1 exactly when the user bought the product in an earlier order."""
    first = pl.col("order_number").min().over("user_id", "product_id")
    expected = (pl.col("order_number") > first).cast(pl.Int64)
    flags = lines.select(pl.col("reordered"), expected.alias("expected"))
    assert (flags["reordered"] == flags["expected"]).all()
    assert flags["expected"].sum() > 0


def _next_basket_recalls(
    data: SynthData, num_items: int, k: int = 10
) -> tuple[float, float]:
    """Returns recall@k of (popularity, fitted transitions) on held-out users.

    Transitions P(b in basket t+1 | a in basket t), a != b, are counted on even users;
    odd users' previous basket predicts the items new to it in their last basket.
    """
    orders = data.orders.select("order_id", "user_id", "order_number")
    lines = pl.concat([data.prior, data.train]).join(orders, on="order_id")
    lines = lines.with_columns(n=pl.col("order_number").max().over("user_id"))
    fit = lines.filter(pl.col("user_id") % 2 == 0)
    held = lines.filter(pl.col("user_id") % 2 == 1)

    # transitions and popularity from the fitted users
    after = fit.select("user_id", pl.col("order_number") - 1, b=pl.col("product_id"))
    pairs = fit.rename({"product_id": "a"}).join(after, on=["user_id", "order_number"])
    pairs = pairs.group_by("a", "b").len()
    trans_II = np.zeros((num_items + 1, num_items + 1))
    trans_II[pairs["a"].to_numpy(), pairs["b"].to_numpy()] = pairs["len"].to_numpy()
    trans_II /= np.maximum(trans_II.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(trans_II, 0.0)
    pop_I = np.bincount(fit["product_id"].to_numpy(), minlength=num_items + 1)

    # held-out users: previous basket and the new items of the last basket
    users = held["user_id"].unique().sort().to_numpy()
    row = np.searchsorted(users, held["user_id"].to_numpy())
    items = held["product_id"].to_numpy()
    prev_UI = np.zeros((users.size, num_items + 1), dtype=bool)
    target_UI = np.zeros_like(prev_UI)
    is_prev = (held["order_number"] == held["n"] - 1).to_numpy()
    is_target = (held["order_number"] == held["n"]).to_numpy()
    prev_UI[row[is_prev], items[is_prev]] = True
    target_UI[row[is_target], items[is_target]] = True
    target_UI &= ~prev_UI

    def recall(scores_UI: np.ndarray) -> float:
        scores_UI = np.where(prev_UI, -np.inf, scores_UI)
        scores_UI[:, 0] = -np.inf
        top_UK = np.argpartition(-scores_UI, k, axis=1)[:, :k]
        hits_U = np.take_along_axis(target_UI, top_UK, axis=1).sum(axis=1)
        num_U = target_UI.sum(axis=1)
        return float((hits_U[num_U > 0] / num_U[num_U > 0]).mean())

    popularity = np.broadcast_to(pop_I.astype(float), prev_UI.shape)
    sequence = prev_UI.astype(float) @ trans_II + 1e-9 * pop_I / pop_I.max()
    return recall(popularity), recall(sequence)


@pytest.mark.slow
def test_previous_basket_beats_popularity_only_with_pairs() -> None:
    """Transitions fitted on some users beat popularity on others; without pairs not.

    About 5 s: two 2,000-user datasets with a 1,000-item catalogue.
    """
    base = SynthParams(num_users=2000, num_items=1000, seed=1)
    pop, seq = _next_basket_recalls(generate(base), base.num_items)
    assert seq > 1.1 * pop

    plain = SynthParams(num_users=2000, num_items=1000, seed=1, pair_prob=0.0)
    pop, seq = _next_basket_recalls(generate(plain), plain.num_items)
    assert seq < 1.05 * pop


def test_bad_sizes_and_existing_output_are_refused(tmp_path: Path) -> None:
    """--users 0 names the flag; rewriting needs --overwrite, else nothing changes."""
    with pytest.raises(InputError, match="--users"):
        main(["--out", str(tmp_path / "none"), "--users", "0"])
    assert not (tmp_path / "none").exists()

    out = tmp_path / "data"
    before = _write(out, seed=3, users=20)
    with pytest.raises(InputError, match="orders.csv: exists"):
        main(["--out", str(out), "--users", "20", "--seed", "4"])
    assert {name: (out / name).read_bytes() for name in CSV_FILES} == before
    main(["--out", str(out), "--users", "20", "--seed", "4", "--overwrite"])
    assert (out / "orders.csv").read_bytes() != before["orders.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted(CSV_FILES)
