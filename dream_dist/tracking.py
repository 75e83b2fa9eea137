"""Where metrics go: one logger setup, the rank-0 console line, metrics.jsonl and W&B.

Only rank 0 talks: it prints one fixed-width line per log interval, appends every
record to ``run_dir/metrics.jsonl`` and, unless disabled, logs to Weights & Biases.
Other ranks only warn or fail. Metric keys are grouped by a slash (``train/loss``,
``train/users_per_s``, ``val/recall@10``).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from dream_dist.config import Config, to_dict

log = logging.getLogger("dream_dist")


def setup_logging(level: str, rank: int) -> None:
    """Configures the one console logger: ``level`` on rank 0, warnings elsewhere."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)-7s {prefix}%(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger("dream_dist")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else "WARNING")


def memory_gb(device: torch.device) -> float:
    """Returns the peak CUDA memory allocated on ``device``, or this process's RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as file:
            pages = int(file.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return math.nan


def console_line(step: int, metrics: dict[str, float]) -> str:
    """Returns the fixed-width console line of one training log interval."""
    get = metrics.get
    return (
        f"step {step:>8d} | epoch {int(get('train/epoch', 0)):>3d} | "
        f"loss {get('train/loss', math.nan):8.4f} | "
        f"grad {get('train/grad_norm', math.nan):9.3e} | "
        f"upd {get('train/update_ratio', math.nan):9.3e} | "
        f"lr {get('train/lr', math.nan):9.3e} | "
        f"users/s {get('train/users_per_s', math.nan):9.1f} | "
        f"wait {100 * get('train/data_wait_share', math.nan):5.1f}% | "
        f"mem {get('train/memory_gb', math.nan):6.2f} GB"
    )


def has_wandb_key() -> bool:
    """True when W&B credentials are configured (WANDB_API_KEY or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb

    host = urlparse(wandb.Settings().base_url).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(wanted: str) -> str:
    """Returns the W&B mode to use: WANDB_MODE wins, and online needs a key.

    Online without credentials falls back to offline with a warning.
    """
    mode = os.environ.get("WANDB_MODE", wanted)
    if mode == "dryrun":
        mode = "offline"
    if mode == "online" and not has_wandb_key():
        log.warning(
            "logging.wandb=online but no W&B API key is configured; "
            "logging offline (sync later with `wandb sync`)"
        )
        mode = "offline"
    return mode


class Tracker:
    """Rank 0's metric sinks; every method is a no-op on other ranks."""

    def __init__(
        self, cfg: Config, run_dir: Path, is_main: bool, wandb_id: str | None = None
    ) -> None:
        """Opens the sinks on rank 0; ``wandb_id`` names the W&B run to continue."""
        self.is_main = is_main
        self._wandb_run: Any = None
        self._jsonl = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        mode = resolve_wandb_mode(cfg.logging.wandb)
        if mode != "disabled":
            self._wandb_run = _init_wandb(cfg, run_dir, mode, wandb_id)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (rank 0 with W&B on), else None."""
        return None if self._wandb_run is None else str(self._wandb_run.id)

    def log(self, step: int, metrics: dict[str, float], console: bool = False) -> None:
        """Records ``metrics`` at optimizer step ``step``; prints the line if asked."""
        if not self.is_main:
            return
        record = {"step": step, **metrics}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        if console:
            log.info(console_line(step, metrics))

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _init_wandb(cfg: Config, run_dir: Path, mode: str, run_id: str | None) -> Any:
    """Returns a started W&B run in ``run_dir/wandb`` (the sweep agent's run if any).

    A resumed training run passes the id its checkpoint saved and continues that
    W&B run (``resume="allow"``; offline, the new folder carries the same id and
    ``wandb sync`` joins them). Steps logged after the checkpoint by the stopped
    attempt are not rewritten: W&B keeps the first value of a step.
    """
    import wandb

    resume: dict[str, Any] = {}
    if run_id and not os.environ.get("WANDB_RUN_ID"):  # a sweep agent sets its own
        resume = {"id": run_id, "resume": "allow"}
        log.info("continuing W&B run %s", run_id)
    return wandb.init(
        dir=str(run_dir),
        project=cfg.logging.project,
        entity=cfg.logging.entity or None,
        name=cfg.logging.run_name or None,
        config=to_dict(cfg),
        mode=mode,
        **resume,
    )
