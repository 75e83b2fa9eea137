"""The process group and the few collectives the trainer uses.

Rank, local rank and world size come from the environment torchrun sets
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); without it the program is one process
and every helper here is a no-op, so the same code runs with and without torchrun.

NOTE: with ``torchrun --max-restarts=N`` export ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
for torchrun. Otherwise the restarted workers share the rendezvous store of the
failed attempt, and gloo may read a dead worker's address from it and fail
("connectFullMesh failed ... Connection refused"); ``init`` warns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes checkpoints."""
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """Returns (rank, local_rank, world_size) from the environment, else (0, 0, 1)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world_size


def pick_device(choice: str, local_rank: int) -> torch.device:
    """Returns the device for ``train.device`` (auto, cpu, cuda).

    Raises ValueError when cuda is asked for and none is available.
    """
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--train.device=cuda: no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device_choice: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Returns this process's DistInfo, joining the process group when world_size > 1.

    The backend is NCCL on CUDA and gloo on CPU.
    """
    rank, local_rank, world_size = env_ranks()
    device = pick_device(device_choice, local_rank)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts and rank == 0 and os.environ.get(SHARED_STORE_ENV) != "1":
        log.warning(
            "torchrun --max-restarts=%d without %s=1: restarted workers may "
            "fail to connect (see dream_dist.distributed)",
            restarts,
            SHARED_STORE_ENV,
        )
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=_device_id(device)
        )
    return DistInfo(rank, local_rank, world_size, device)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Returns ``values`` summed over ranks (in place; unchanged on one process)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Returns the element-wise maximum over ranks (in place)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_objects(obj: object) -> list[object]:
    """Returns every rank's ``obj`` in rank order (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object) -> object:
    """Returns rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Waits for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def close() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
