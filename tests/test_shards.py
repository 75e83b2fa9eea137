"""The shard writer's hand-built .npy and tar bytes against numpy's, tarfile's and
WebDataset's own readers."""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dream_dist.data.shards import ShardSetWriter, UserSequence, _npy_bytes, iter_users


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64])
@pytest.mark.parametrize("length", [0, 1, 7, 4097])
def test_npy_bytes_equal_numpy_save(dtype, length):
    array = np.arange(length).astype(dtype)
    expected = io.BytesIO()
    np.save(expected, array, allow_pickle=False)
    assert _npy_bytes(array) == expected.getvalue()


def test_writer_output_reads_back_through_tarfile_and_webdataset(tmp_path):
    rng = np.random.default_rng(0)
    users = [
        UserSequence(
            user=u,
            user_id=f"id-{u}",
            items=rng.integers(1, 50, size=3 * (u + 1)).astype(np.int32),
            sizes=np.full(u + 1, 3, dtype=np.int32),
            reordered=rng.integers(0, 2, size=3 * (u + 1)).astype(np.uint8),
        )
        for u in range(5)
    ]
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
