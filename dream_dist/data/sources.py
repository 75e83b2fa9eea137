"""Raw purchase logs -> one canonical Polars frame.

Three formats are read: Instacart's CSV files, the Reality Check JSON files and a
generic long table (CSV or Parquet). Each becomes the same canonical frame, one row
per purchased item in a basket:

- ``user_id``: the user's original id (Int64, or String for Reality Check users);
- ``basket``: Int64; sorting a user's rows by it gives their baskets oldest first,
  and (``user_id``, ``basket``) identifies one basket;
- ``item_id``: the item's original id (Int64, never negative);
- ``reordered``: UInt8 0/1, only when the input has the flag.

Every id is checked here: a missing file or column, a non-integer, null or negative
id, or an empty input raises ``InputError`` naming the file, and the line and column
when they are known. Rows the reader cannot use but which are not errors (lines of
an unknown order, empty baskets) are counted in ``Source.dropped``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dream_dist.config import ConfigError, DataConfig
from dream_dist.errors import InputError

CANONICAL = ("user_id", "basket", "item_id")
"""Columns every canonical frame has; ``reordered`` is optional."""
LOOKUP_LIMIT = 1 << 27
"""Largest id mapped through a dense lookup table rather than a hash join."""
SENTINEL = [-1]
"""Reality Check marks both ends of a user's basket list with this basket."""


@dataclass
class Source:
    """A canonical frame and what reading it left out."""

    frame: pl.DataFrame
    """Canonical rows (see the module docstring) in input order, which is kept
    for the items inside a basket."""
    input_rows: int
    """Item rows read from the input files."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows or baskets read but not in ``frame``, by reason (``<reason>_<unit>``)."""
    empty_baskets: int = 0
    """Baskets in the input without any item (counted in ``dropped`` too)."""

    @property
    def has_reordered(self) -> bool:
        return "reordered" in self.frame.columns


def load_source(cfg: DataConfig) -> Source:
    """Returns the canonical frame of ``cfg.input`` read as ``cfg.format``.

    Raises InputError for unusable input and ConfigError for a missing setting.
    """
    if not cfg.input:
        raise ConfigError("--data.input: no input given")
    path = Path(cfg.input)
    if cfg.format == "instacart":
        return read_instacart(path)
    if cfg.format == "realitycheck":
        return read_realitycheck(path, cfg.name)
    return read_table(path, cfg.order_column)


# ---------------------------------------------------------------- shared checks


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found")


def _check_columns(path: Path, schema: pl.Schema, wanted: list[str]) -> None:
    """Raises InputError naming the first wanted column the file does not have."""
    for name in wanted:
        if name not in schema:
            found = ", ".join(schema.names()) or "none"
            raise InputError(f"{path}: missing column {name!r} (columns: {found})")


def _first_row(frame: pl.DataFrame, mask: pl.Expr) -> int:
    """Returns the 0-based index of the first row where ``mask`` holds."""
    return int(frame.select(mask.arg_true().first()).item())


def csv_line(row: int) -> str:
    """Returns where a 0-based data row of a CSV with a header is, for messages."""
    return f"line {row + 2}"


def table_row(row: int) -> str:
    """Returns where a 0-based row of a Parquet file is, for messages."""
    return f"row {row + 1}"


def _check_ids(
    path: Path,
    frame: pl.DataFrame,
    columns: list[str],
    where: Callable[[int], str],
    ids: int | None = None,
) -> None:
    """Raises InputError at the first null of ``columns`` or negative id.

    The first ``ids`` columns (all by default) hold ids, which may not be negative.
    """
    ids = len(columns) if ids is None else ids
    stats = frame.select(
        *[pl.col(c).null_count().alias(f"{c}:null") for c in columns],
        *[pl.col(c).min().alias(f"{c}:min") for c in columns[:ids]],
    ).row(0, named=True)
    for position, name in enumerate(columns):
        if stats[f"{name}:null"]:
            row = _first_row(frame, pl.col(name).is_null())
            raise InputError(f"{path}: {where(row)}, column {name!r}: missing value")
        smallest = stats.get(f"{name}:min") if position < ids else None
        if smallest is not None and smallest < 0:
            row = _first_row(frame, pl.col(name) < 0)
            value = frame.item(row, name)
            raise InputError(
                f"{path}: {where(row)}, column {name!r}: negative id {value}"
            )


def _check_flags(
    path: Path, frame: pl.DataFrame, flags: list[str], where: Callable[[int], str]
) -> pl.DataFrame:
    """Returns ``frame`` with 0/1 ``flags`` as UInt8; raises InputError otherwise."""
    for name in flags:
        bad = (pl.col(name) < 0) | (pl.col(name) > 1)
        if frame.select(bad.any()).item():
            row = _first_row(frame, bad)
            raise InputError(
                f"{path}: {where(row)}, column {name!r}: expected 0 or 1, "
                f"got {frame.item(row, name)}"
            )
    return frame.with_columns(pl.col(name).cast(pl.UInt8) for name in flags)


def _require_rows(path: Path, frame: pl.DataFrame) -> None:
    if frame.height == 0:
        raise InputError(f"{path}: no rows")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _diagnose_csv(path: Path, columns: list[str], err: Exception) -> InputError:
    """Returns the InputError for a CSV whose integer columns failed to parse."""
    not_int = [
        pl.col(c).is_not_null() & pl.col(c).str.to_integer(strict=False).is_null()
        for c in columns
    ]
    bad = (
        pl.scan_csv(path, infer_schema=False, truncate_ragged_lines=True)
        .select(columns)
        .with_row_index("row")
        .filter(pl.any_horizontal(not_int))
        .head(1)
        .collect()
    )
    if bad.height == 0:
        first = str(err).strip().splitlines()[0]
        return InputError(f"{path}: cannot be read as CSV ({first})")
    row = bad.row(0, named=True)
    name = next(c for c in columns if row[c] is not None and not _is_int(row[c]))
    return InputError(
        f"{path}: {csv_line(row['row'])}, column {name!r}: "
        f"{row[name]!r} is not an integer id"
    )


def read_csv(
    path: Path, ids: list[str], flags: Sequence[str] = (), extra: Sequence[str] = ()
) -> pl.DataFrame:
    """Returns a CSV's ``ids`` (Int64), 0/1 ``flags`` (UInt8) and ``extra`` columns.

    ``extra`` columns keep the type Polars infers. Raises InputError naming the
    file, and the line and column of a bad value.
    """
    _require_file(path)
    try:
        schema = pl.scan_csv(path).collect_schema()
    except pl.exceptions.NoDataError:
        raise InputError(f"{path}: empty file") from None
    except pl.exceptions.PolarsError as err:
        raise InputError(f"{path}: cannot be read as CSV ({err})") from None
    columns = [*ids, *flags, *extra]
    _check_columns(path, schema, columns)

    # eager: the ids are checked once here, then every later step reuses them
    dtypes = dict.fromkeys([*ids, *flags], pl.Int64)
    scan = pl.scan_csv(path, schema_overrides=dtypes).select(columns)
    try:
        frame = scan.collect()
    except pl.exceptions.PolarsError as err:
        raise _diagnose_csv(path, [*ids, *flags], err) from None
    _check_ids(path, frame, [*ids, *flags, *extra], csv_line, len(ids) + len(flags))
    return _check_flags(path, frame, list(flags), csv_line)


def _to_int64(path: Path, frame: pl.DataFrame, name: str) -> pl.DataFrame:
    """Returns ``frame`` with ``name`` as Int64; raises InputError if it is not."""
    dtype = frame.schema[name]
    if dtype.is_integer() or dtype == pl.Boolean:
        return frame.with_columns(pl.col(name).cast(pl.Int64))
    if dtype != pl.String:
        raise InputError(
            f"{path}: column {name!r} has type {dtype}, expected integer ids"
        )
    parsed = pl.col(name).str.to_integer(strict=False)
    bad = pl.col(name).is_not_null() & parsed.is_null()
    if frame.select(bad.any()).item():
        row = _first_row(frame, bad)
        raise InputError(
            f"{path}: {table_row(row)}, column {name!r}: "
            f"{frame.item(row, name)!r} is not an integer id"
        )
    return frame.with_columns(parsed)


def read_parquet(
    path: Path, ids: list[str], flags: Sequence[str] = (), extra: Sequence[str] = ()
) -> pl.DataFrame:
    """Returns the ``ids`` (Int64), 0/1 ``flags`` (UInt8) and ``extra`` columns.

    Raises InputError naming the file, and the row and column of a bad value.
    """
    _require_file(path)
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except (pl.exceptions.PolarsError, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path}: cannot be read as Parquet ({first})") from None
    columns = [*ids, *flags, *extra]
    _check_columns(path, schema, columns)

    # eager: the ids are checked once here, then every later step reuses them
    frame = pl.scan_parquet(path).select(columns).collect()
    for name in [*ids, *flags]:
        frame = _to_int64(path, frame, name)
    _check_ids(path, frame, columns, table_row, len(ids) + len(flags))
    return _check_flags(path, frame, list(flags), table_row)


# ---------------------------------------------------------------- instacart

INSTACART_LINES = ("order_products__prior.csv", "order_products__train.csv")


def read_instacart(folder: Path) -> Source:
    """Returns Instacart's order lines as baskets in ``order_number`` order.

    Lines of orders missing from orders.csv, and of products missing from
    products.csv, are dropped and counted. Raises InputError for unusable files.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    orders_path = folder / "orders.csv"
    orders = read_csv(orders_path, ["order_id", "user_id", "order_number"])
    _require_rows(orders_path, orders)
    _require_unique(orders_path, orders, ["order_id"])
    _require_unique(orders_path, orders, ["user_id", "order_number"])
    products = read_csv(folder / "products.csv", ["product_id"])
    _require_rows(folder / "products.csv", products)
    parts = [
        read_csv(folder / name, ["order_id", "product_id"], ["reordered"])
        for name in INSTACART_LINES
    ]
    lines = pl.concat(parts)
    _require_rows(folder / INSTACART_LINES[0], lines)

    # eager: each step's row count is reported as dropped
    known = attach_orders(lines, orders)
    on_sale = known.filter(pl.col("product_id").is_in(products["product_id"].implode()))
    if on_sale.height == 0:
        raise InputError(f"{folder}: no order line has a known order and product")
    frame = on_sale.select(
        "user_id",
        pl.col("order_number").alias("basket"),
        pl.col("product_id").alias("item_id"),
        "reordered",
    )
    dropped = {
        "unknown_order_rows": lines.height - known.height,
        "unknown_product_rows": known.height - on_sale.height,
    }
    return Source(frame=frame, input_rows=lines.height, dropped=dropped)


def attach_orders(lines: pl.DataFrame, orders: pl.DataFrame) -> pl.DataFrame:
    """Returns ``lines`` of known orders with their ``user_id`` and ``order_number``.

    Order ids below ``LOOKUP_LIMIT`` go through a dense lookup table (a gather,
    several times faster than a hash join at Instacart's scale); others join.
    """
    largest = int(orders["order_id"].max())
    if largest >= LOOKUP_LIMIT:
        return lines.join(orders, on="order_id", how="inner", maintain_order="left")

    # position[order_id] = row in orders, -1 when absent (the last slot: too large)
    position = np.full(largest + 2, -1, dtype=np.int64)
    position[orders["order_id"].to_numpy()] = np.arange(orders.height)
    capped = lines["order_id"].clip(upper_bound=largest + 1)
    found = pl.Series(position).gather(capped)
    keep = found >= 0
    rows = orders.select("user_id", "order_number").gather(found.filter(keep))
    return lines.filter(keep).hstack(rows)


def _require_unique(path: Path, frame: pl.DataFrame, key: list[str]) -> None:
    """Raises InputError at the first row whose ``key`` repeats another row's."""
    repeated = pl.struct(key).is_duplicated()
    if frame.select(repeated.any()).item():
        row = _first_row(frame, repeated)
        raise InputError(f"{path}: {csv_line(row)}: {', '.join(key)} is not unique")


# ---------------------------------------------------------------- long table


def read_table(path: Path, order_column: str) -> Source:
    """Returns a long table (CSV or Parquet) as baskets.

    Baskets are ``(user_id, basket_id)`` pairs, ordered by ``order_column`` (the
    basket's smallest value, ties by basket_id), or by basket_id when it is empty.
    An optional ``reordered`` column is kept. Raises InputError for unusable files.
    """
    read = _table_reader(path)
    schema = _table_schema(path)
    flags = ["reordered"] if "reordered" in schema else []
    extra = [order_column] if order_column else []
    frame = read(path, ["user_id", "basket_id", "item_id"], flags, extra)
    _require_rows(path, frame)
    if order_column:
        frame = _order_baskets(frame.lazy(), order_column).collect()
    else:
        frame = frame.rename({"basket_id": "basket"})
    columns = [*CANONICAL, *flags]
    return Source(frame=frame.select(columns), input_rows=frame.height)


def _table_reader(path: Path) -> Callable[..., pl.DataFrame]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv
    if suffix in (".parquet", ".pq"):
        return read_parquet
    raise InputError(f"{path}: expected a .csv or .parquet file")


def _table_schema(path: Path) -> pl.Schema:
    """Returns the file's columns (errors are raised by the reader afterwards)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".csv":
            return pl.scan_csv(path).collect_schema()
        return pl.scan_parquet(path).collect_schema()
    except (pl.exceptions.PolarsError, OSError):
        return pl.Schema()


def _order_baskets(lines: pl.LazyFrame, order_column: str) -> pl.LazyFrame:
    """Returns ``lines`` with ``basket``: a global ordinal of (order, basket_id)."""
    baskets = (
        lines.group_by("user_id", "basket_id")
        .agg(pl.col(order_column).min())
        .sort("user_id", order_column, "basket_id")
        .with_row_index("basket")
        .select("user_id", "basket_id", pl.col("basket").cast(pl.Int64))
    )
    return lines.join(
        baskets, on=["user_id", "basket_id"], how="inner", maintain_order="left"
    )


# ---------------------------------------------------------------- reality check


def read_realitycheck(folder: Path, name: str) -> Source:
    """Returns ``<name>_history.json`` followed by ``<name>_future.json`` as baskets.

    A user's sequence is their history baskets then their future basket(s);
    empty baskets are dropped and counted. Raises InputError for unusable files.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    name = name or _find_name(folder)
    parts = [folder / f"{name}_history.json", folder / f"{name}_future.json"]
    trees = [_load_user_lists(path) for path in parts]
    user_ids = list(dict.fromkeys([*trees[0], *trees[1]]))

    # python: the JSON is already objects; this builds flat numpy columns from it
    user_of, basket_of, items, num_empty = [], [], [], 0
    for user, user_id in enumerate(user_ids):
        baskets = []
        for path, tree in zip(parts, trees, strict=True):
            if user_id in tree:
                baskets += _user_baskets(path, user_id, tree[user_id])
        for basket, basket_items in enumerate(baskets):
            num_empty += len(basket_items) == 0
            user_of.append(np.full(len(basket_items), user, np.int64))
            basket_of.append(np.full(len(basket_items), basket, np.int64))
            items.append(basket_items)
    if not items or sum(len(x) for x in items) == 0:
        raise InputError(f"{parts[0]}: no baskets")

    frame = pl.DataFrame(
        {
            "user_id": pl.Series(user_ids, dtype=pl.String).gather(
                np.concatenate(user_of)
            ),
            "basket": np.concatenate(basket_of),
            "item_id": np.concatenate(items).astype(np.int64),
        }
    )
    dropped = {"empty_baskets": num_empty} if num_empty else {}
    return Source(frame, frame.height, dropped, empty_baskets=num_empty)


def _find_name(folder: Path) -> str:
    """Returns the one dataset name in ``folder``; raises InputError if not one."""
    names = sorted(
        p.name.removesuffix("_history.json") for p in folder.glob("*_history.json")
    )
    if not names:
        raise InputError(f"{folder}: no *_history.json file")
    if len(names) > 1:
        raise InputError(
            f"{folder}: several datasets ({', '.join(names)}); set --data.name"
        )
    return names[0]


def load_json(path: Path) -> Any:
    """Returns the parsed JSON of ``path``; raises InputError if unreadable."""
    _require_file(path)
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from None


def _load_user_lists(path: Path) -> dict[str, Any]:
    tree = load_json(path)
    if not isinstance(tree, dict):
        raise InputError(
            f"{path}: expected an object {{user: [[-1], basket, ..., [-1]]}}, "
            f"got a JSON {type(tree).__name__}"
        )
    return tree


def _user_baskets(path: Path, user_id: str, value: Any) -> list[np.ndarray]:
    """Returns the baskets inside the sentinels; raises InputError if malformed."""
    where = f"{path}: user {user_id!r}"
    if (
        not isinstance(value, list)
        or len(value) < 2
        or value[0] != SENTINEL
        or value[-1] != SENTINEL
    ):
        raise InputError(f"{where}: expected [[-1], basket, ..., [-1]]")
    baskets = []
    for basket in value[1:-1]:
        if not isinstance(basket, list):
            raise InputError(
                f"{where}: a basket is {basket!r}, expected a list of items"
            )
        array = np.asarray(basket)
        if array.size and array.dtype.kind not in "iu":
            bad = next(x for x in basket if type(x) is not int)
            raise InputError(f"{where}: item {bad!r} is not an integer id")
        if array.size and array.min() < 0:
            raise InputError(f"{where}: negative item id {int(array.min())}")
        baskets.append(array.astype(np.int64))
    return baskets


def read_keyset(path: Path) -> dict[str, str]:
    """Returns {user id as text: split} from a keyset JSON with train/val/test lists.

    Raises InputError for a file of the wrong shape or a user in two splits.
    """
    tree = load_json(path)
    splits = ("train", "val", "test")
    if not isinstance(tree, dict) or not all(
        isinstance(tree.get(s), list) for s in splits
    ):
        raise InputError(
            f"{path}: expected an object with lists 'train', 'val', 'test'"
        )
    assignment: dict[str, str] = {}
    for split in splits:
        for user_id in tree[split]:
            if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
                raise InputError(f"{path}: {split}: user {user_id!r} is not an id")
            if str(user_id) in assignment:
                raise InputError(f"{path}: user {str(user_id)!r} is in two splits")
            assignment[str(user_id)] = split
    return assignment
