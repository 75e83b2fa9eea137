"""The shard writer's hand-built .npy and tar bytes against numpy's, tarfile's and
WebDataset's own readers."""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dream_dist.data import shards
from dream_dist.data.shards import (
    ShardSetWriter,
    UserSequence,
    _npy_bytes,
    encode_sample,
    iter_users,
    read_tar,
    tar_member,
)
from dream_dist.errors import InputError


def _users(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        UserSequence(
            user=u,
            user_id=f"id-{u}",
            items=rng.integers(1, 50, size=3 * (u + 1)).astype(np.int32),
            sizes=np.full(u + 1, 3, dtype=np.int32),
            reordered=rng.integers(0, 2, size=3 * (u + 1)).astype(np.uint8),
        )
        for u in range(count)
    ]


def _assert_same_users(back, users):
    assert [seq.user for seq in back] == [seq.user for seq in users]
    for got, seq in zip(back, users, strict=True):
        np.testing.assert_array_equal(got.items, seq.items)
        np.testing.assert_array_equal(got.sizes, seq.sizes)
        np.testing.assert_array_equal(got.reordered, seq.reordered)
        assert got.user_id == seq.user_id


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64])
@pytest.mark.parametrize("length", [0, 1, 7, 4097])
def test_npy_bytes_equal_numpy_save(dtype, length):
    array = np.arange(length).astype(dtype)
    expected = io.BytesIO()
    np.save(expected, array, allow_pickle=False)
    assert _npy_bytes(array) == expected.getvalue()


def test_writer_output_reads_back_through_tarfile_and_webdataset(tmp_path):
    users = _users(5)
    writer = ShardSetWriter(tmp_path, "train", num_shards=2)
    for seq in users:
        writer.write(seq)
    entries = writer.close()
    assert [e["samples"] for e in entries] == [3, 2]

    paths = [tmp_path / e["path"] for e in entries]
    with tarfile.open(paths[1]) as tar:
        assert tar.getnames()[:2] == ["u000000001.items.npy", "u000000001.sizes.npy"]
    back = {seq.user: seq for seq in iter_users(paths)}
    for seq in users:
        np.testing.assert_array_equal(back[seq.user].items, seq.items)
        np.testing.assert_array_equal(back[seq.user].reordered, seq.reordered)
        assert back[seq.user].user_id == seq.user_id

    keys = [s["__key__"] for s in wds.WebDataset(str(paths[0]), shardshuffle=False)]
    assert keys == ["u000000000", "u000000002", "u000000004"]


def test_reader_completes_members_across_chunk_boundaries(tmp_path, monkeypatch):
    users = _users(40)
    writer = ShardSetWriter(tmp_path, "train", num_shards=1)
    for seq in users:
        writer.write(seq)
    path = tmp_path / writer.close()[0]["path"]
    for chunk in (700, 1 << 22):  # a chunk smaller than a header plus a payload
        monkeypatch.setattr(shards, "_READ_CHUNK", chunk)
        _assert_same_users(list(iter_users([path])), users)


def test_reader_hands_pax_members_to_tarfile(tmp_path):
    users = _users(4)
    plain = b""
    for sample in map(encode_sample, users[:2]):
        key = sample.pop("__key__")
        plain += b"".join(tar_member(f"{key}.{e}", d) for e, d in sample.items())
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in map(encode_sample, users[2:]):
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.pax_headers = len(data), {"comment": "pax"}
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "mixed.tar"
    path.write_bytes(plain + pax.getvalue())
    _assert_same_users(list(iter_users([path])), users)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # the last member (reordered flags) cut 50 bytes into its payload
        (
            lambda data: data[: -1024 - 512 + 50],
            "u000000005.reordered.npy is truncated",
        ),
        (lambda data: data[:-1024], "ends without its end-of-archive blocks"),
        # one byte of the third member's name, inside its header
        (
            lambda data: data[:2058] + b"X" + data[2059:],
            "bad header checksum at byte 2048",
        ),
    ],
)
def test_reader_names_a_damaged_shard(tmp_path, damage, message):
    writer = ShardSetWriter(tmp_path, "train", num_shards=1)
    for seq in _users(6):
        writer.write(seq)
    path = tmp_path / writer.close()[0]["path"]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(
        InputError, match=f"{path}: not a readable tar shard .*{message}"
    ):
        list(read_tar(path))
