"""Streaming shards into batches: split by rank, then by loader worker, bucketed.

One training epoch on each rank is ``steps_per_epoch`` batches, computed from the
manifest alone (train users // (world_size * batch_size)), so every rank takes the
same number of steps and DDP never waits on a rank that ran dry.

How an epoch's stream is built (``TrainLoader.epoch``):

1. every rank shuffles the shard list with the same seed (``seed``, ``epoch``);
2. ``wds.split_by_node`` keeps shards ``rank::world_size``, then each loader
   worker keeps ``worker::num_workers`` of those (``wds.split_by_worker``, with
   the workers rotated when an epoch restarts mid-way, see ``stream_worker``);
3. each worker reads its shards once (in the first pass, every train user is read
   by exactly one worker of one rank), then again in a fresh order, forever, so
   no worker runs dry whatever the split;
4. a buffer of ``bucket_buffer`` users is sorted by length, cut into batches of
   ``batch_size`` and the batch order shuffled (``batching.length_buckets``);
5. the DataLoader takes batches from its workers in turn, and the epoch stops
   after ``steps_per_epoch`` batches.

NOTE: every worker gives the same number of batches, so when shards do not divide
evenly over ranks x workers, a worker with fewer users repeats some of them in an
epoch while one with more leaves some unread until a later epoch (shards move
between ranks every epoch). Rank 0 logs its share against the users an epoch takes.

The stream is a pure function of (seed, epoch, rank, world_size, num_workers), so
a loader position (epoch, step within the epoch) is restored exactly by
regenerating the epoch and skipping its first batches before they are collated.
"""

from __future__ import annotations

import functools
import itertools
import logging
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from dream_dist.data.batching import Batch, collate, length_buckets
from dream_dist.data.shards import UserSequence, decode_sample, iter_users, read_tar
from dream_dist.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class LoaderPosition:
    """Where the training stream stands: the next batch is ``step_in_epoch``."""

    epoch: int = 0
    step_in_epoch: int = 0

    def state_dict(self, world_size: int, num_workers: int) -> dict[str, int]:
        """Returns the position and the layout it depends on (for checkpoints)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": world_size,
            "num_workers": num_workers,
        }


def steps_per_epoch(num_users: int, world_size: int, batch_size: int) -> int:
    """Returns the steps every rank takes per epoch; raises InputError if none."""
    steps = num_users // (world_size * batch_size)
    if steps < 1:
        raise InputError(
            f"{num_users} train users cannot fill one batch of {batch_size} on each "
            f"of {world_size} ranks; lower --train.batch_size"
        )
    return steps


def usable_workers(num_shards: int, world_size: int, num_workers: int) -> int:
    """Returns how many loader workers every rank can keep busy (0 means in-process).

    Each worker needs a shard of its own: at most num_shards // world_size workers.
    Raises InputError when there are fewer shards than ranks.
    """
    if num_shards < world_size:
        raise InputError(
            f"{num_shards} train shards for {world_size} ranks: every rank needs a "
            "shard; prepare the data with --data.min_shards >= the number of ranks"
        )
    usable = min(num_workers, num_shards // world_size)
    if usable < num_workers:
        log.warning(
            "--train.num_workers=%d reduced to %d: %d shards over %d ranks",
            num_workers,
            usable,
            num_shards,
            world_size,
        )
    return usable


def shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """Returns the epoch's shard order, the same on every rank."""
    rng = np.random.default_rng([seed, epoch])
    return [urls[i] for i in rng.permutation(len(urls))]


def worker_skip(num_skipped: int, worker: int, num_workers: int) -> int:
    """Returns how many of the first ``num_skipped`` batches come from ``worker``.

    The DataLoader takes batches from its workers in turn (worker k % num_workers
    gives batch k) because no worker's stream ever ends.
    """
    return len(range(worker, num_skipped, num_workers))


def stream_worker(start: int) -> tuple[int, int, int]:
    """Returns (rank, stream worker, num_workers) of this loader worker.

    A loader restarted at batch ``start`` gets its first batch from worker 0, which
    must then play the part of worker ``start % num_workers`` of the full epoch.
    """
    rank, _, worker, num_workers = pytorch_worker_info()
    return rank, (worker + start) % num_workers, num_workers


# NOTE: the stages below run inside loader workers; they are top-level functions
# (bound with functools.partial) so the pipeline pickles under any start method.


def _epoch_shards(urls: list[str], seed: int, epoch: int) -> Iterator[dict[str, str]]:
    """Yields the epoch's shards in the order every rank agrees on."""
    for url in shard_order(urls, seed, epoch):
        yield {"url": url}


def _shard_samples(shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Yields the raw samples of each shard (``{"url": path}``) in file order."""
    for shard in shards:
        yield from read_tar(shard["url"])


def _split_by_worker(
    src: Iterable[dict[str, str]], start: int
) -> Iterator[dict[str, str]]:
    """Yields this stream worker's share of the rank's shards (``wds.split_by_worker``
    with the workers rotated for a restart at batch ``start``)."""
    _, worker, num_workers = stream_worker(start)
    yield from itertools.islice(src, worker, None, num_workers)


def _repeat_shards(
    src: Iterable[dict[str, str]], seed: int, epoch: int, start: int
) -> Iterator[dict[str, str]]:
    """Yields this worker's shards once in order, then again reshuffled, forever."""
    shards = list(src)
    rank, worker, _ = stream_worker(start)
    if not shards:
        raise InputError(f"rank {rank} worker {worker}: no shard to read")
    yield from shards
    for cycle in itertools.count(1):
        rng = np.random.default_rng([seed, epoch, rank, worker, cycle])
        yield from (shards[i] for i in rng.permutation(len(shards)))


def _bucket(
    src: Iterable[UserSequence],
    batch_size: int,
    buffer_size: int,
    seed: int,
    epoch: int,
    num_skipped: int,
) -> Iterator[list[UserSequence]]:
    """Yields length-bucketed batches of users, after dropping this worker's skip."""
    rank, worker, num_workers = stream_worker(num_skipped)
    rng = np.random.default_rng([seed, epoch, rank, worker, 0xB0C7])
    skip = worker_skip(num_skipped, worker, num_workers)
    src = iter(src)
    while True:
        buffer = list(itertools.islice(src, buffer_size))
        if not buffer:
            return
        for batch in length_buckets(buffer, batch_size, rng):
            if skip:
                skip -= 1
                continue
            yield batch


class TrainLoader:
    """The training stream of one rank: ``epoch(e, start)`` yields its batches."""

    def __init__(
        self,
        urls: list[str],
        num_users: int,
        world_size: int,
        batch_size: int,
        bucket_buffer: int,
        num_workers: int,
        seed: int,
    ) -> None:
        self.urls, self.batch_size, self.seed = urls, batch_size, seed
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch(num_users, world_size, batch_size)
        self.num_workers = usable_workers(len(urls), world_size, num_workers)
        # a buffer of whole batches keeps every batch full
        self.buffer_size = -(-bucket_buffer // batch_size) * batch_size
        _check_worker_info(world_size)

    def _user_stages(self, epoch: int, start: int, repeat: bool) -> list[Any]:
        """Returns the stages from the shard list to decoded users."""
        stages: list[Any] = [
            functools.partial(_epoch_shards, self.urls, self.seed, epoch),
            wds.split_by_node,
            functools.partial(_split_by_worker, start=start),
        ]
        if repeat:
            stages.append(
                functools.partial(
                    _repeat_shards, seed=self.seed, epoch=epoch, start=start
                )
            )
        return [*stages, _shard_samples, wds.map(decode_sample)]

    def first_pass(self, epoch: int) -> wds.DataPipeline:
        """Returns this rank and worker's users of ``epoch``, each shard read once."""
        return wds.DataPipeline(*self._user_stages(epoch, 0, repeat=False))

    def pipeline(self, epoch: int, start: int = 0) -> wds.DataPipeline:
        """Returns the epoch's endless batch pipeline, without its first ``start``."""
        bucket = functools.partial(
            _bucket,
            batch_size=self.batch_size,
            buffer_size=self.buffer_size,
            seed=self.seed,
            epoch=epoch,
            num_skipped=start,
        )
        return wds.DataPipeline(
            *self._user_stages(epoch, start, repeat=True),
            bucket,
            # the last basket's hidden state predicts nothing: no RNN step for it
            wds.map(functools.partial(collate, drop_last_basket=True)),
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yields batches ``start`` .. ``steps_per_epoch - 1`` of ``epoch``."""
        if start >= self.steps_per_epoch:
            return
        # NOTE: an own generator keeps the DataLoader from drawing its base seed
        # from the global torch stream, which dropout uses (exact resume needs it)
        loader = wds.WebLoader(
            self.pipeline(epoch, start),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_ignore_stop_signals,
        )
        yield from loader.with_epoch(self.steps_per_epoch - start)

    def coverage(self, shard_sizes: dict[str, int], rank: int, epoch: int) -> str:
        """Returns a line comparing the users of this rank's shards with the epoch's."""
        share = shard_order(self.urls, self.seed, epoch)[rank :: self.world_size]
        num_read = sum(shard_sizes[url] for url in share)
        num_taken = self.steps_per_epoch * self.batch_size
        return (
            f"rank {rank} epoch {epoch}: {num_read} users in its shards, "
            f"{num_taken} taken ({self.steps_per_epoch} steps x {self.batch_size})"
        )


def _ignore_stop_signals(worker: int) -> None:
    """Leaves SIGTERM, SIGUSR1 and Ctrl-C to the trainer: a cluster signals every
    process of the job, and a loader worker that died of it would fail the step
    the trainer is about to checkpoint."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _check_worker_info(world_size: int) -> None:
    """Raises RuntimeError when WebDataset's view of the job differs from ours."""
    _, wds_world_size, _, _ = pytorch_worker_info()
    if wds_world_size != world_size:
        raise RuntimeError(
            f"WebDataset sees world size {wds_world_size}, the trainer {world_size}: "
            "set RANK and WORLD_SIZE (torchrun does)"
        )


def rank_share(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Returns the shards rank ``rank`` reads of a split read once (validation)."""
    return urls[rank::world_size]


def eval_batches(
    urls: list[str], rank: int, world_size: int, batch_size: int
) -> Iterator[tuple[Batch, list[UserSequence]]]:
    """Yields this rank's share of a val/test split once, as (batch, its users).

    Batches hold the last basket as target (``drop_last_basket=True``).
    """
    users = iter_users(rank_share(urls, rank, world_size))
    while chunk := list(itertools.islice(users, batch_size)):
        yield collate(chunk, drop_last_basket=True), chunk
