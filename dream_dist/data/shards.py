"""The shard contract: one WebDataset sample per user, and the manifest beside it.

A sample holds ``items.npy`` (int32 dense item indices of every basket, oldest
first, flat), ``sizes.npy`` (int32 basket sizes), optionally ``reordered.npy``
(uint8 flags aligned with items) and ``meta.json`` (``{"user_id": original id}``).
Its key is ``u`` + the zero-padded dense user index. Nothing is pickled.
In every split the last basket of a sample is its target.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from dream_dist.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEM_MAP = "items.parquet"
USER_MAP = "users.parquet"
SPLITS = ("train", "val", "test")


@dataclass
class UserSequence:
    """One user's baskets, flat: ``items[offsets[t]:offsets[t] + sizes[t]]`` is basket t."""

    user: int
    """Dense user index (the shard key without its ``u``)."""
    user_id: str
    """The user's original id."""
    items: np.ndarray
    """int32 dense item indices, 1..num_items, all baskets oldest first."""
    sizes: np.ndarray
    """int32 number of items in each basket."""
    reordered: np.ndarray | None = None
    """uint8 reordered flags aligned with items, when the input has them."""

    @property
    def num_baskets(self) -> int:
        return len(self.sizes)

    def baskets(self) -> list[np.ndarray]:
        """Returns the baskets as separate arrays (for tests and small tools)."""
        return np.split(self.items, np.cumsum(self.sizes)[:-1])


def user_key(user: int) -> str:
    """Returns the sample key of a dense user index (no dots, fixed width)."""
    return f"u{user:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def num_shards_for(num_users: int, users_per_shard: int, min_shards: int) -> int:
    """Returns how many shards a split of ``num_users`` is cut into (never an empty one)."""
    if num_users == 0:
        return 0
    wanted = max(min_shards, -(-num_users // users_per_shard))
    return min(wanted, num_users)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(seq: UserSequence) -> dict[str, Any]:
    """Returns the WebDataset sample dict (bytes values) of one user."""
    sample = {
        "__key__": user_key(seq.user),
        "items.npy": _npy_bytes(np.asarray(seq.items, dtype=np.int32)),
        "sizes.npy": _npy_bytes(np.asarray(seq.sizes, dtype=np.int32)),
        "meta.json": json.dumps({"user_id": str(seq.user_id)}).encode(),
    }
    if seq.reordered is not None:
        sample["reordered.npy"] = _npy_bytes(np.asarray(seq.reordered, dtype=np.uint8))
    return sample


def decode_sample(sample: dict[str, Any]) -> UserSequence:
    """Returns the UserSequence of a raw sample; raises InputError if it is malformed."""
    key = sample.get("__key__", "?")
    try:
        reordered = sample.get("reordered.npy")
        return UserSequence(
            user=int(key.rsplit("/", 1)[-1][1:]),
            user_id=json.loads(sample["meta.json"])["user_id"],
            items=_npy_array(sample["items.npy"]),
            sizes=_npy_array(sample["sizes.npy"]),
            reordered=None if reordered is None else _npy_array(reordered),
        )
    except (KeyError, ValueError) as err:
        url = sample.get("__url__", "?")
        raise InputError(f"{url}: sample {key} is malformed ({err})") from None


class ShardSetWriter:
    """Writes one split's shards; users go to shard ``position % num_shards``.

    Callers pass users in any order; each shard file is opened once and kept open,
    so memory holds one sample at a time, not the split.
    """

    def __init__(self, folder: Path, split: str, num_shards: int) -> None:
        self.folder, self.split, self.num_shards = folder, split, num_shards
        self.counts = [0] * num_shards
        self._writers = [
            wds.TarWriter(str(folder / shard_name(split, i)), mtime=0)
            for i in range(num_shards)
        ]
        self._position = 0

    def write(self, seq: UserSequence) -> None:
        shard = self._position % self.num_shards
        self._writers[shard].write(encode_sample(seq))
        self.counts[shard] += 1
        self._position += 1

    def close(self) -> list[dict[str, Any]]:
        """Closes every shard; returns the manifest entries ``[{path, samples}]``."""
        for writer in self._writers:
            writer.close()
        return [
            {"path": shard_name(self.split, i), "samples": n}
            for i, n in enumerate(self.counts)
        ]


def read_tar(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields raw samples of one shard in file order, without WebDataset's splitting."""
    sample: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            file = tar.extractfile(member)
            assert file is not None
            sample.setdefault("__key__", key)
            sample["__url__"] = str(path)
            sample[ext] = file.read()
    if sample:
        yield sample


def iter_users(paths: Iterable[str | os.PathLike]) -> Iterator[UserSequence]:
    """Yields every user of the given shards, in shard then file order."""
    for path in paths:
        for sample in read_tar(path):
            yield decode_sample(sample)


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Returns the manifest of a shard folder; raises InputError naming what is wrong."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest; run `python -m dream_dist.prepare`") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format_version {manifest.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    return manifest


def shard_paths(folder: str | os.PathLike, manifest: dict[str, Any], split: str) -> list[str]:
    """Returns the shard paths of a split; raises InputError if a shard is missing."""
    if split not in manifest["splits"]:
        raise InputError(f"{Path(folder) / MANIFEST}: no split {split!r}")
    paths = [str(Path(folder) / s["path"]) for s in manifest["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: shard listed in the manifest is missing "
                         f"({len(missing)} missing in all)")
    return paths
