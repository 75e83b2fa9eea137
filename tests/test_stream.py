"""The training stream: rank and worker split, equal steps per rank, exact restarts.

Rank and loader worker are given through the environment variables WebDataset
reads (RANK, WORLD_SIZE, WORKER, NUM_WORKERS), so two ranks x two workers are
checked in one process; the step-count tests start real DataLoader workers.
"""

from __future__ import annotations

import collections
import logging

import pytest
import torch
from _tiny_shards import write_shards

from dream_dist.data.shards import load_manifest, shard_paths
from dream_dist.data.stream import TrainLoader, eval_batches, usable_workers
from dream_dist.errors import InputError


def _urls(folder, split="train"):
    return shard_paths(folder, load_manifest(folder), split)


def _loader(urls, num_users, world_size=2, batch_size=16, num_workers=2, seed=7):
    return TrainLoader(
        urls,
        num_users,
        world_size,
        batch_size,
        bucket_buffer=48,
        num_workers=num_workers,
        seed=seed,
    )


def _as_rank(monkeypatch, rank, world_size, worker=None, num_workers=None):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    if worker is not None:
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", str(num_workers))


def test_first_pass_reads_every_user_once_across_ranks_and_workers(
    tmp_path, monkeypatch
):
    folder = write_shards(
        tmp_path, {"train": 200, "val": 8, "test": 8}, {"train": 8, "val": 1, "test": 1}
    )
    urls = _urls(folder)
    layouts = []
    for epoch in (0, 1):
        seen, layout = collections.Counter(), {}
        for rank in (0, 1):
            for worker in (0, 1):
                _as_rank(monkeypatch, rank, 2, worker, 2)
                users = [s.user for s in _loader(urls, 200).first_pass(epoch)]
                seen.update(users)
                layout[rank, worker] = users
        assert sorted(seen) == list(range(200))
        assert set(seen.values()) == {1}
        assert all(layout.values())
        layouts.append(layout)
    assert layouts[0] != layouts[1]  # shards move between ranks each epoch


def test_ranks_take_equal_steps_with_uneven_shards_and_restart_exactly(
    tmp_path, monkeypatch
):
    # 5 shards over 2 ranks: rank 0 reads 3 shards (150 users), rank 1 reads 2 (100)
    folder = write_shards(
        tmp_path, {"train": 250, "val": 8, "test": 8}, {"train": 5, "val": 1, "test": 1}
    )
    urls = _urls(folder)
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        batches = [b.users_B for b in _loader(urls, 250).epoch(3)]
        assert len(batches) == 250 // (2 * 16)
        assert all(len(users) == 16 for users in batches)

        # the same seed gives the same stream; a restart at batch k its suffix
        again = [b.users_B for b in _loader(urls, 250).epoch(3)]
        resumed = [b.users_B for b in _loader(urls, 250).epoch(3, start=3)]
        assert all(map(torch.equal, batches, again))
        assert len(resumed) == len(batches) - 3
        assert all(map(torch.equal, batches[3:], resumed))
        other_seed = [b.users_B for b in _loader(urls, 250, seed=8).epoch(3)]
        assert not all(map(torch.equal, batches, other_seed))


def test_workers_are_reduced_to_the_shards_each_rank_has(caplog):
    with caplog.at_level(logging.WARNING):
        assert usable_workers(num_shards=5, world_size=2, num_workers=4) == 2
    assert "reduced to 2" in caplog.text
    with pytest.raises(InputError, match="3 train shards for 4 ranks"):
        usable_workers(num_shards=3, world_size=4, num_workers=1)


def test_too_few_users_for_one_step_is_an_input_error(tmp_path, monkeypatch):
    folder = write_shards(
        tmp_path, {"train": 20, "val": 4, "test": 4}, {"train": 2, "val": 1, "test": 1}
    )
    _as_rank(monkeypatch, 0, 2)
    with pytest.raises(InputError, match="20 train users cannot fill"):
        _loader(_urls(folder), 20)


def test_eval_batches_split_users_by_rank_with_last_basket_as_target(tmp_path):
    folder = write_shards(
        tmp_path, {"train": 8, "val": 30, "test": 4}, {"train": 1, "val": 3, "test": 1}
    )
    urls = _urls(folder, "val")
    seen = []
    for rank in (0, 1):
        for batch, users in eval_batches(urls, rank, 2, batch_size=4):
            assert batch.num_users == len(users) <= 4
            for b, user in enumerate(users):
                lo, hi = batch.target_offsets_B1[b], batch.target_offsets_B1[b + 1]
                assert (
                    batch.target_items_C[lo:hi].tolist() == user.baskets()[-1].tolist()
                )
                assert batch.lengths_B[b] == user.num_baskets - 1
            seen += [u.user for u in users]
    assert sorted(seen) == list(range(8, 38))
