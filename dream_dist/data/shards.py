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
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dream_dist.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEM_MAP = "items.parquet"
USER_MAP = "users.parquet"
SPLITS = ("train", "val", "test")


@dataclass
class UserSequence:
    """One user's baskets, flat: basket t is the next ``sizes[t]`` items."""

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

    @property
    def target_start(self) -> int:
        """Index in ``items`` where the last basket (the target) begins."""
        return len(self.items) - int(self.sizes[-1])

    def baskets(self) -> list[np.ndarray]:
        """Returns the baskets as separate arrays (for tests and small tools)."""
        return np.split(self.items, np.cumsum(self.sizes)[:-1])


def user_key(user: int) -> str:
    """Returns the sample key of a dense user index (no dots, fixed width)."""
    return f"u{user:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def num_shards_for(num_users: int, users_per_shard: int, min_shards: int) -> int:
    """Returns the number of shards for ``num_users`` users (never an empty one)."""
    if num_users == 0:
        return 0
    wanted = max(min_shards, -(-num_users // users_per_shard))
    return min(wanted, num_users)


def _npy_bytes(array: np.ndarray) -> bytes:
    """Returns ``np.save``'s bytes; 1-D arrays skip its slow header code."""
    if array.ndim != 1 or array.dtype.hasobject:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    header = (
        f"{{'descr': '{array.dtype.str}', 'fortran_order': False, "
        f"'shape': ({len(array)},), }}"
    ).encode()
    # NOTE: numpy aligns the payload to 64 bytes; the header ends in spaces and \n
    width = -(-(10 + len(header) + 1) // 64) * 64 - 10
    header = header.ljust(width - 1) + b"\n"
    return (
        b"\x93NUMPY\x01\x00"
        + len(header).to_bytes(2, "little")
        + header
        + (np.ascontiguousarray(array).tobytes())
    )


_NPY_1D = re.compile(
    rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}"
)
"""The .npy 1.0 header of what ``encode_sample`` writes: one 1-D integer array."""


def _npy_array(data: bytes) -> np.ndarray:
    """Returns the array of a .npy payload; raises ValueError if it is malformed.

    The 1-D integer arrays of our own shards are read straight from the buffer
    (``np.load`` parses each header with a Python evaluator, 10x slower); any
    other header goes through ``np.load`` without pickle.
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_1D.match(data, 10, end)
        if match:
            dtype = np.dtype(match[1].decode())
            return np.frombuffer(data, dtype, int(match[2]), end).copy()
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
    """Returns a raw sample's UserSequence; raises InputError if malformed."""
    key = sample.get("__key__", "?")
    try:
        reordered = sample.get("reordered.npy")
        return UserSequence(
            user=int(key.rsplit("/", 1)[-1][1:]),
            user_id=json.loads(bytes(sample["meta.json"]))["user_id"],
            items=_npy_array(sample["items.npy"]),
            sizes=_npy_array(sample["sizes.npy"]),
            reordered=None if reordered is None else _npy_array(reordered),
        )
    except (KeyError, ValueError) as err:
        url = sample.get("__url__", "?")
        raise InputError(f"{url}: sample {key} is malformed ({err})") from None


def _ustar_template() -> bytearray:
    header = bytearray(512)
    header[100:108] = b"0000444\x00"  # mode
    header[108:124] = b"0000000\x000000000\x00"  # uid, gid
    header[136:148] = b"00000000000\x00"  # mtime 0: byte-identical shards
    header[156:157] = b"0"  # a regular file
    header[257:265] = b"ustar\x0000"
    return header


_USTAR = _ustar_template()


def tar_member(name: str, payload: bytes) -> bytes:
    """Returns one ustar member (header, payload, padding) for a name under 100 bytes.

    Built directly rather than through ``tarfile``, whose per-member overhead
    dominates writing millions of small samples.
    """
    header = bytearray(_USTAR)
    encoded = name.encode()
    if len(encoded) >= 100:
        raise ValueError(f"tar member name too long: {name}")
    header[: len(encoded)] = encoded
    header[124:136] = b"%011o\x00" % len(payload)
    header[148:156] = b"        "
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + payload + bytes(-len(payload) % 512)


class ShardSetWriter:
    """Writes one split's shards; users go to shard ``position % num_shards``.

    Callers pass users in any order; each shard file is opened once and kept open,
    so memory holds one sample at a time, not the split. The tars are plain ustar,
    readable by ``tarfile``, WebDataset and GNU tar.
    """

    def __init__(self, folder: Path, split: str, num_shards: int) -> None:
        self.folder, self.split, self.num_shards = Path(folder), split, num_shards
        self.counts = [0] * num_shards
        self._files = [
            open(self.folder / shard_name(split, i), "wb", buffering=1 << 20)
            for i in range(num_shards)
        ]
        self._position = 0

    def write(self, seq: UserSequence) -> None:
        shard = self._position % self.num_shards
        sample = encode_sample(seq)
        key = sample.pop("__key__")
        self._files[shard].write(
            b"".join(tar_member(f"{key}.{ext}", data) for ext, data in sample.items())
        )
        self.counts[shard] += 1
        self._position += 1

    def close(self) -> list[dict[str, Any]]:
        """Closes every shard; returns the manifest entries ``[{path, samples}]``."""
        for file in self._files:
            file.write(bytes(1024))  # two zero blocks end a tar archive
            file.close()
        return [
            {"path": shard_name(self.split, i), "samples": n}
            for i, n in enumerate(self.counts)
        ]


_READ_CHUNK = 1 << 22
"""Bytes read from a shard at a time: memory stays flat whatever the shard's size."""


def read_tar(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields raw samples of one shard in file order, without WebDataset's splitting.

    Plain ustar members (what ``ShardSetWriter`` writes) are parsed straight from
    4 MB chunks of the file, several times faster than ``tarfile``; from the first
    member of any other type (pax or GNU headers) on, ``tarfile`` reads the rest.
    Raises InputError for a truncated or corrupt shard, after the samples before
    the damage.
    """
    with open(path, "rb") as file:
        try:
            yield from _group_members(_members(file, str(path)), str(path))
        except ValueError as err:
            raise InputError(f"{path}: not a readable tar shard ({err})") from None


def _members(file: BinaryIO, path: str) -> Iterator[tuple[str, memoryview | bytes]]:
    """Yields (name, payload) of every regular member of an open shard."""
    try:
        yield from _ustar_members(file)
    except _NotPlainUstar:
        yield from _tarfile_members(file, path)


class _NotPlainUstar(Exception):
    """A member that only ``tarfile`` understands; the file is left at its header."""


def _ustar_members(file: BinaryIO) -> Iterator[tuple[str, memoryview]]:
    """Yields (name, payload) of every regular member; raises ValueError if corrupt.

    Works a chunk at a time: ``_scan_chunk`` finds the members that lie wholly in
    ``data``, their header checksums are verified together, then they are yielded;
    the unparsed tail starts the next chunk. ``base`` is the file offset of
    ``data[0]``, always a multiple of 512 like every header.
    """
    data, base, need = b"", file.tell(), 512
    while True:
        more = file.read(max(_READ_CHUNK, need))
        if not more:
            if len(data) < 512:
                raise ValueError("archive ends without its end-of-archive blocks")
            name = data[:100].split(b"\0", 1)[0].decode(errors="replace")
            raise ValueError(f"member {name} is truncated")
        data += more
        members, position, stop = _scan_chunk(data)
        _check_header_sums(data, [m[0] for m in members], base)
        view = memoryview(data)
        for _, name, start, size in members:
            yield name, view[start : start + size]
        if stop == "end":
            return
        if stop == "other":
            file.seek(base + position)
            raise _NotPlainUstar
        data, base, need = data[position:], base + position, stop


def _scan_chunk(
    data: bytes,
) -> tuple[list[tuple[int, str, int, int]], int, str | int]:
    """Returns (members, position, stop) for the members wholly inside ``data``.

    Members are ``(header offset, name, payload offset, size)``; ``position`` is
    where parsing stopped and ``stop`` says why: "end" (the zero blocks that end
    the archive), "other" (a member only ``tarfile`` reads), or the bytes needed
    from ``position`` on to complete the next member.
    """
    members, position = [], 0
    while position + 512 <= len(data):
        header = data[position : position + 512]
        if header[0] == 0:
            return members, position, "end"
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar":
            return members, position, "other"
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        padded = -(-size // 512) * 512
        if position + 512 + padded > len(data):
            return members, position, 512 + padded
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        full = (prefix + b"/" + name if prefix else name).decode()
        members.append((position, full, position + 512, size))
        position += 512 + padded
    return members, position, 512


def _check_header_sums(data: bytes, offsets: list[int], base: int) -> None:
    """Raises ValueError unless every header at ``offsets`` has a valid checksum.

    The sum of a header's bytes, its checksum field counted as spaces, for all
    the chunk's headers at once (a Python byte sum per header would take half
    the parsing time).
    """
    if not offsets:
        return
    blocks = np.frombuffer(data, np.uint8, len(data) // 512 * 512).reshape(-1, 512)
    headers = blocks[np.asarray(offsets) // 512]
    sums = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(
        axis=1, dtype=np.int64
    )
    stored = [int(data[o + 148 : o + 156].rstrip(b"\0 ") or b"0", 8) for o in offsets]
    bad = np.flatnonzero(sums + 256 != np.asarray(stored))
    if bad.size:
        raise ValueError(f"bad header checksum at byte {base + offsets[bad[0]]}")


def _tarfile_members(file: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """Yields (name, payload) of every regular member from the file's position on."""
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                payload = tar.extractfile(member) if member.isfile() else None
                if payload is not None:
                    yield member.name, payload.read()
    except (tarfile.TarError, EOFError) as err:
        raise InputError(f"{path}: not a readable tar shard ({err})") from None


def _group_members(
    members: Iterable[tuple[str, bytes]], url: str
) -> Iterator[dict[str, Any]]:
    """Yields samples: consecutive members sharing the key before the first dot."""
    sample: dict[str, Any] = {}
    for name, payload in members:
        key, _, ext = name.partition(".")
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": url}
        sample[ext] = payload
    if sample:
        yield sample


def iter_users(paths: Iterable[str | os.PathLike]) -> Iterator[UserSequence]:
    """Yields every user of the given shards, in shard then file order."""
    for path in paths:
        for sample in read_tar(path):
            yield decode_sample(sample)


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Returns a shard folder's manifest; raises InputError naming the fault."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{path}: no manifest; run `python -m dream_dist.prepare`"
        ) from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    return manifest


def shard_paths(
    folder: str | os.PathLike, manifest: dict[str, Any], split: str
) -> list[str]:
    """Returns the shard paths of a split; raises InputError if a shard is missing."""
    if split not in manifest["splits"]:
        raise InputError(f"{Path(folder) / MANIFEST}: no split {split!r}")
    paths = [str(Path(folder) / s["path"]) for s in manifest["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise InputError(
            f"{missing[0]}: shard listed in the manifest is missing "
            f"({len(missing)} missing in all)"
        )
    return paths
