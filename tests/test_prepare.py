"""The prepare stage: raw tables -> shards, id maps and manifest.

The round trip reads the written tars back with the shard contract's own reader;
the bad-input cases start the real CLI (``python -m dream_dist.prepare``) in a
subprocess and check its exit status, its one stderr line and what it left on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from dream_dist.config import Config, ConfigError, parse_config
from dream_dist.data.shards import iter_users, load_manifest, shard_paths
from dream_dist.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
TAFENG = REPO.parent / "shared" / "data" / "tafeng"

# user 7: three baskets ordered by day (item 3 twice in basket 101); user 2: two
# baskets whose ids run against their days; user 9: one basket (too few)
TABLE = """user_id,basket_id,item_id,reordered,day
7,100,5,0,1
7,100,3,0,1
7,101,3,0,2
7,101,9,0,2
7,101,3,1,2
7,102,5,1,3
2,200,9,1,5
2,201,7,0,1
2,201,5,0,1
9,300,3,0,4
"""
KEYSET = {"item_num": 4, "train": ["7", "9"], "val": [], "test": ["2"]}


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """Writes the tiny table and its keyset; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    table, keyset = folder / "table.csv", folder / "keyset.json"
    table.write_text(TABLE)
    keyset.write_text(json.dumps(KEYSET))
    return table, keyset


def data_config(tmp_path: Path, **overrides: object) -> Config:
    """Returns a config preparing the tiny table into tmp_path/shards."""
    table, keyset = write_inputs(tmp_path / "in")
    cfg = Config()
    cfg.data.format, cfg.data.input, cfg.data.order_column = "table", str(table), "day"
    cfg.data.keyset, cfg.data.shards = str(keyset), str(tmp_path / "shards")
    for key, value in overrides.items():
        setattr(cfg.data, key, value)
    return cfg


def read_back(folder: Path) -> pl.DataFrame:
    """Returns every shard's purchases as rows, in shard order."""
    manifest = load_manifest(folder)
    rows = []
    for split in ("train", "val", "test"):
        for seq in iter_users(shard_paths(folder, manifest, split)):
            for basket, items in enumerate(seq.baskets()):
                start = int(seq.sizes[:basket].sum())
                for offset, item in enumerate(items):
                    flag = (
                        -1 if seq.reordered is None else seq.reordered[start + offset]
                    )
                    rows.append(
                        (split, seq.user, seq.user_id, basket, int(item), int(flag))
                    )
    schema = ["split", "user", "user_id", "basket", "item", "reordered"]
    return pl.DataFrame(rows, schema=schema, orient="row")


def expected_rows(rows: list[tuple[str, int, str, int, int, int]]) -> pl.DataFrame:
    schema = ["split", "user", "user_id", "basket", "item", "reordered"]
    return pl.DataFrame(rows, schema=schema, orient="row")


def test_round_trip_holds_exactly_the_expected_sequences(tmp_path: Path) -> None:
    cfg = data_config(tmp_path)
    manifest = prepare(cfg.data)
    folder = Path(cfg.data.shards)

    # items 3, 5, 7, 9 -> 1..4; users 2, 7 -> 0, 1; user 9 dropped (one basket);
    # items keep their input order inside a basket, a repeat the place of its first
    expected = expected_rows(
        [
            ("train", 1, "7", 0, 2, 0), ("train", 1, "7", 0, 1, 0),
            ("train", 1, "7", 1, 1, 1), ("train", 1, "7", 1, 4, 0),
            ("train", 1, "7", 2, 2, 1),
            ("test", 0, "2", 0, 3, 0), ("test", 0, "2", 0, 2, 0),
            ("test", 0, "2", 1, 4, 1),
        ]
    )  # fmt: skip
    assert_frame_equal(read_back(folder), expected)
    items = pl.read_parquet(folder / "items.parquet")
    assert_frame_equal(
        items, pl.DataFrame({"item": [1, 2, 3, 4], "item_id": [3, 5, 7, 9]},
                            schema={"item": pl.Int32, "item_id": pl.Int64}),
    )  # fmt: skip
    users = pl.read_parquet(folder / "users.parquet")
    expected_users = pl.DataFrame(
        {"user": [0, 1], "user_id": [2, 7], "split": ["test", "train"]},
        schema={"user": pl.Int32, "user_id": pl.Int64, "split": pl.String},
    )
    assert_frame_equal(users, expected_users)
    # the id maps are plain Parquet that other tools read too
    assert pq.read_table(folder / "items.parquet").column("item_id").to_pylist() == [
        3,
        5,
        7,
        9,
    ]

    # counts: every input row and basket is kept or dropped for a reason
    assert manifest["num_items"] == 4 and manifest["input_rows"] == 10
    assert manifest["dropped"]["duplicate_rows"] == 1
    assert manifest["dropped"]["few_baskets_users"] == 1
    assert manifest["num_baskets"] + _dropped(manifest, "baskets") == 6
    assert manifest["num_purchases"] + _dropped(manifest, "rows") == 10
    assert [manifest["splits"][s]["users"] for s in ("train", "val", "test")] == [
        1,
        0,
        1,
    ]
    assert manifest["splits"]["val"]["shards"] == []

    # members: keys without dots, only .npy and .json, nothing pickled
    for tar_path in folder.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                key, _, ext = name.partition(".")
                assert key.startswith("u") and key[1:].isdigit(), name
                assert ext in {"items.npy", "sizes.npy", "reordered.npy", "meta.json"}
    assert not list(tmp_path.glob(".shards*")), "temporary folder left behind"


def _dropped(manifest: dict, unit: str) -> int:
    return sum(n for key, n in manifest["dropped"].items() if key.endswith(f"_{unit}"))


# the same two users in each format: user 1 buys [10, 20], [20], [30, 10]; user 2
# buys [20], [10, 40]; Instacart's order ids run against order_number, and one line
# names an order that orders.csv lacks
SAME_BASKETS = {
    "instacart": {
        "orders.csv": "order_id,user_id,eval_set,order_number\n"
        "13,1,prior,1\n11,1,prior,2\n12,1,train,3\n21,2,prior,1\n22,2,train,2\n"
        "23,2,test,3\n",
        "order_products__prior.csv": "order_id,product_id,add_to_cart_order,reordered\n"
        "13,10,1,0\n13,20,2,0\n11,20,1,1\n21,20,1,0\n99,10,1,0\n",
        "order_products__train.csv": "order_id,product_id,add_to_cart_order,reordered\n"
        "12,30,1,0\n12,10,2,1\n22,10,1,0\n22,40,2,0\n",
        "products.csv": "product_id,product_name\n10,a\n20,b\n30,c\n40,d\n",
    },
    "realitycheck": {
        "x_history.json": json.dumps({"1": [[-1], [10, 20], [20], [-1]],
                                      "2": [[-1], [20], [-1]]}),
        "x_future.json": json.dumps({"1": [[-1], [30, 10], [-1]],
                                     "2": [[-1], [10, 40], [-1]]}),
    },
    "table": {
        "t.parquet": pl.DataFrame({"user_id": [1, 1, 1, 1, 1, 2, 2, 2],
                                   "basket_id": [1, 1, 2, 3, 3, 1, 2, 2],
                                   "item_id": [10, 20, 20, 30, 10, 20, 10, 40]}),
    },
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(SAME_BASKETS))
def test_every_format_gives_the_same_sequences(tmp_path: Path, fmt: str) -> None:
    for name, content in SAME_BASKETS[fmt].items():
        if isinstance(content, pl.DataFrame):
            content.write_parquet(tmp_path / name)
        else:
            (tmp_path / name).write_text(content)
    cfg = Config()
    cfg.data.format, cfg.data.shards = fmt, str(tmp_path / "out")
    cfg.data.input = str(tmp_path / "t.parquet" if fmt == "table" else tmp_path)
    manifest = prepare(cfg.data)

    rows = read_back(Path(cfg.data.shards)).drop("reordered")
    expected = expected_rows(
        [
            ("train", 0, "1", 0, 1, 0), ("train", 0, "1", 0, 2, 0),
            ("train", 0, "1", 1, 2, 0), ("train", 0, "1", 2, 3, 0),
            ("train", 0, "1", 2, 1, 0),
            ("train", 1, "2", 0, 2, 0), ("train", 1, "2", 1, 1, 0),
            ("train", 1, "2", 1, 4, 0),
        ]
    ).drop("reordered")  # fmt: skip
    assert_frame_equal(rows, expected)
    assert manifest["has_reordered"] == (fmt == "instacart")
    assert manifest["input_rows"] == (9 if fmt == "instacart" else 8)
    if fmt == "instacart":
        assert manifest["dropped"]["unknown_order_rows"] == 1
        flags = read_back(Path(cfg.data.shards))["reordered"].to_list()
        assert flags == [0, 0, 1, 0, 1, 0, 0, 0]


def test_split_last_layout(tmp_path: Path) -> None:
    """split=last: train = baskets[:-2], val = baskets[:-1], test = all, every user."""
    long_table = "user_id,basket_id,item_id\n" + "".join(
        f"{user},{basket},{item}\n"
        for user, num_baskets in ((1, 4), (2, 5), (3, 3))
        for basket in range(num_baskets)
        for item in (basket, 10 + user)
    )
    (tmp_path / "t.csv").write_text(long_table)
    cfg = Config()
    cfg.data.format, cfg.data.input, cfg.data.split = (
        "table",
        str(tmp_path / "t.csv"),
        "last",
    )
    cfg.data.shards = str(tmp_path / "out")
    manifest = prepare(cfg.data)

    folder = Path(cfg.data.shards)
    baskets = (
        read_back(folder).group_by("split", "user_id").agg(pl.col("basket").n_unique())
    )
    expected = pl.DataFrame(
        {"split": ["test", "test", "train", "train", "val", "val"],
         "user_id": ["1", "2", "1", "2", "1", "2"], "basket": [4, 5, 2, 3, 3, 4]},
        schema_overrides={"basket": pl.UInt32},
    )  # fmt: skip
    assert_frame_equal(baskets.sort("split", "user_id"), expected)
    assert manifest["dropped"]["few_baskets_users"] == 1  # user 3: 3 < 4 baskets
    assert manifest["splits"]["train"]["baskets"] == 5
    users = pl.read_parquet(folder / "users.parquet")
    assert users["split"].to_list() == ["all", "all"]


def test_max_baskets_keeps_the_most_recent(tmp_path: Path) -> None:
    cfg = data_config(tmp_path, max_baskets=2)
    manifest = prepare(cfg.data)
    rows = read_back(Path(cfg.data.shards)).filter(pl.col("user_id") == "7")
    # user 7's baskets 101 (items 3, 9) and 102 (item 5) remain
    assert rows["item"].to_list() == [1, 4, 2]
    assert rows["basket"].to_list() == [0, 0, 1]
    assert manifest["dropped"]["over_max_baskets"] == 1
    assert manifest["dropped"]["over_max_rows"] == 2


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    cfg = data_config(tmp_path)
    out = Path(cfg.data.shards)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        prepare(cfg.data)
    assert (out / "keep.txt").read_text() == "mine"

    cfg.data.overwrite = True
    prepare(cfg.data)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "shards"]


@pytest.mark.slow
def test_parallel_writers_write_the_same_bytes(tmp_path: Path) -> None:
    """Two spawned writer processes produce the shards one process does."""
    serial = data_config(tmp_path / "a", num_workers=1, min_shards=2)
    parallel = data_config(tmp_path / "b", num_workers=2, min_shards=2)
    prepare(serial.data)
    prepare(parallel.data)
    for path in sorted(Path(serial.data.shards).glob("*.tar")):
        assert (
            path.read_bytes() == (Path(parallel.data.shards) / path.name).read_bytes()
        )


@pytest.mark.slow
@pytest.mark.skipif(not TAFENG.is_dir(), reason=f"TaFeng data not found at {TAFENG}")
def test_tafeng_keyset_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepares the real TaFeng files with the shipped config, two writer processes."""
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository
    cfg = parse_config(
        ["--config", "configs/tafeng.toml", f"--data.shards={tmp_path / 'tafeng'}",
         "--data.num_workers=2"]
    )  # fmt: skip
    manifest = prepare(cfg.data)

    splits = manifest["splits"]
    assert [splits[s]["users"] for s in ("train", "val", "test")] == [9977, 1109, 2772]
    assert manifest["num_items"] == 11997
    assert manifest["num_baskets"] + _dropped(manifest, "baskets") == 91227
    assert manifest["input_baskets"] == 91227
    assert (
        manifest["num_purchases"] + _dropped(manifest, "rows") == manifest["input_rows"]
    )
    assert sum(splits[s]["baskets"] for s in splits) == manifest["num_baskets"]
    users = pl.read_parquet(Path(cfg.data.shards) / "users.parquet")
    assert users["user_id"].dtype == pl.String and users["user_id"].n_unique() == 13858


# ---------------------------------------------------------------- bad input


def _table(text: str) -> dict[str, str]:
    return {"t.csv": text}


GOOD_HISTORY = {"1": [[-1], [1, 2], [3], [-1]], "2": [[-1], [2], [1], [-1]]}
GOOD_FUTURE = {"1": [[-1], [2], [-1]], "2": [[-1], [3], [-1]]}

BAD_INPUTS = {
    # case: (files, flags, words the error line must hold)
    "missing_file": ({}, ["--data.input={d}/absent.csv"], ["absent.csv", "not found"]),
    "missing_column": (
        _table("user_id,basket,item_id\n1,1,1\n"),
        [],
        ["t.csv", "'basket_id'"],
    ),
    "misnamed_instacart_column": (
        {
            "ic/orders.csv": "orderid,user_id,order_number\n1,1,1\n",
            "ic/products.csv": "product_id\n1\n",
            "ic/order_products__prior.csv": "order_id,product_id,reordered\n1,1,0\n",
            "ic/order_products__train.csv": "order_id,product_id,reordered\n",
        },
        ["--data.format=instacart", "--data.input={d}/ic"],
        ["orders.csv", "'order_id'"],
    ),
    "non_integer_id": (
        _table("user_id,basket_id,item_id\n1,1,1\n1,2,abc\n"),
        [],
        ["t.csv", "line 3", "'item_id'", "abc"],
    ),
    "null_id": (
        _table("user_id,basket_id,item_id\n1,1,1\n,2,3\n"),
        [],
        ["t.csv", "line 3", "'user_id'", "missing"],
    ),
    "negative_id": (
        _table("user_id,basket_id,item_id\n1,1,1\n1,2,-4\n"),
        [],
        ["t.csv", "line 3", "'item_id'", "negative"],
    ),
    "empty_file": (_table(""), [], ["t.csv", "empty"]),
    "header_only": (_table("user_id,basket_id,item_id\n"), [], ["t.csv", "no rows"]),
    "truncated_csv": (
        _table("user_id,basket_id,item_id\n1,1,1\n1,2,2\n1,3"),
        [],
        ["t.csv", "line 4", "'item_id'"],
    ),
    "keyset_unknown_users": (
        {
            "t.csv": "user_id,basket_id,item_id\n1,1,1\n1,2,2\n",
            "k.json": json.dumps({"train": ["1"], "val": [], "test": ["77"]}),
        },
        ["--data.keyset={d}/k.json"],
        ["k.json", "'77'"],
    ),
    "json_wrong_shape": (
        {
            "rc/x_history.json": json.dumps([[1, 2]]),
            "rc/x_future.json": json.dumps(GOOD_FUTURE),
        },
        ["--data.format=realitycheck", "--data.input={d}/rc"],
        ["x_history.json", "expected"],
    ),
    "json_missing_sentinel": (
        {
            "rc/x_history.json": json.dumps({"1": [[1, 2], [3], [-1]]}),
            "rc/x_future.json": json.dumps(GOOD_FUTURE),
        },
        ["--data.format=realitycheck", "--data.input={d}/rc"],
        ["x_history.json", "user '1'"],
    ),
    "json_truncated": (
        {
            "rc/x_history.json": json.dumps(GOOD_HISTORY)[:-9],
            "rc/x_future.json": json.dumps(GOOD_FUTURE),
        },
        ["--data.format=realitycheck", "--data.input={d}/rc"],
        ["x_history.json", "not valid JSON", "line 1"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    """Starts ``python -m dream_dist.prepare`` for real on each bad input."""
    files, flags, words = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [
        f"--data.input={tmp_path}/t.csv",
        "--data.format=table",
        f"--data.shards={tmp_path}/out",
        "--logging.level=ERROR",
        *(flag.format(d=tmp_path) for flag in flags),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "dream_dist.prepare", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dream_dist.prepare: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
