"""The Trainer: DREAM under DDP, streamed from shards, in named phases.

Phases: ``setup`` (process group, data, model, optimizer, resume), ``train_step``
(one optimizer step), ``validate`` (BPR loss and Recall@K on validation users),
``save`` (atomic checkpoints) and ``close``; ``fit`` runs them in order.

The loss is the mean over positive pairs of every rank: each rank all-reduces its
(loss_sum, num_pairs) and backpropagates ``loss_sum * world_size / global_pairs``,
so DDP's gradient averaging gives the gradient of the global mean whatever the
number of processes. The same tiny all-reduce carries the stop flag that SIGTERM,
SIGUSR1 and Ctrl-C set, so every rank stops at the same step boundary.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dream_dist import distributed
from dream_dist.checkpoint import FORMAT_VERSION as CHECKPOINT_VERSION
from dream_dist.checkpoint import (
    check_compatible,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from dream_dist.config import Config, ConfigError, to_dict, to_toml
from dream_dist.cpu import keep_freed_blocks
from dream_dist.data.batching import Batch
from dream_dist.data.shards import UserSequence, load_manifest, shard_paths
from dream_dist.data.stream import LoaderPosition, TrainLoader, eval_batches
from dream_dist.losses import LOSSES
from dream_dist.metrics import (
    finalize,
    metric_sums,
    reduce,
    sums_from_tensor,
    sums_to_tensor,
    top_k,
)
from dream_dist.model import DreamModel
from dream_dist.tracking import Tracker, memory_gb, setup_logging

log = logging.getLogger("dream_dist.trainer")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
HOLD_ENV = "DREAM_DIST_HOLD_AT_STEP"
"""Test hook: wait after this step while ``run_dir/HOLD`` exists (see ``_hold``)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class Interval:
    """Sums over one log interval (rank 0 reports them)."""

    loss_sum: float = 0.0
    num_pairs: float = 0.0
    num_steps: int = 0
    data_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def sweep_run_dir(run_dir: str) -> str:
    """Returns ``run_dir``, or ``run_dir/<run id>`` for a run a W&B sweep agent started.

    The agent starts every run with the same fixed flags and exports WANDB_SWEEP_ID
    and WANDB_RUN_ID; one folder per run keeps a run from resuming the previous one.
    """
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        return str(Path(run_dir) / run_id)
    return run_dir


def seed_for(*parts: int) -> int:
    """Returns a 63-bit seed derived from ``parts`` (stable across versions)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) >> 1


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Returns the learning rate of optimizer step ``step`` (0-based)."""
    train = cfg.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.schedule == "cosine":
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if train.schedule == "linear":
        return train.lr * max(0.0, 1.0 - progress)
    return train.lr


def autocast_for(device: torch.device, amp: str) -> AbstractContextManager:
    """Returns the autocast context of ``train.amp`` on ``device``.

    Under CUDA bf16 the model keeps its RNN in fp32 (see ``DreamModel._run_rnn``);
    ``tests/test_gpu.py`` checks the dtypes where a GPU is present.
    """
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Returns the total gradient norm, after scaling gradients to ``max_norm`` if > 0.

    Works on dense and sparse gradients alike. Gradients are only rescaled when
    the norm exceeds ``max_norm``: a pass over a large item table saved per step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = [(g.coalesce().values() if g.is_sparse else g).norm(2) for g in grads]
    total = float(torch.stack(norms).norm(2)) if norms else 0.0
    if max_norm > 0 and not total <= max_norm:  # also scales a NaN/inf norm
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def adam_update_norm(optimizers: list[torch.optim.Optimizer]) -> float:
    """Returns ||last Adam update|| from the optimizer state, without a model copy.

    The update of Adam is lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps); only
    the rows a sparse gradient touched moved.
    """
    total = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = opt.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad is not None and p.grad.is_sparse:
                    rows = p.grad.coalesce().indices()[0]
                    m, v = m[rows], v[rows]
                t = float(state["step"])
                step_size = group["lr"] / (1 - beta1**t)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                total += float((m / denom).norm(2)) ** 2 * step_size**2
    return math.sqrt(total)


class Trainer:
    """Trains DREAM as ``cfg`` says; see the module docstring for the phases."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        cfg.train.run_dir = sweep_run_dir(cfg.train.run_dir)
        self.run_dir = Path(cfg.train.run_dir)
        self.step = 0
        self.position = LoaderPosition()
        self.best_recall = -1.0
        self.stop_signal = 0
        self.resumed_from: int | None = None
        self.steps_taken = 0
        self.stop_requested = False
        self.grad_norm = self.lr = self.update_norm = math.nan

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Joins the process group, reads the manifest, builds everything, resumes.

        Raises ConfigError for unusable settings and InputError for bad data or a
        checkpoint that does not fit.
        """
        cfg = self.cfg
        self.dist = distributed.init(cfg.train.device)
        setup_logging(cfg.logging.level, self.dist.rank)
        if self.dist.device.type == "cpu":
            keep_freed_blocks()  # see dream_dist.cpu: up to a quarter of a step
        self._check_settings()
        self._install_signal_handlers()

        self._setup_data()

        # model, optimizers, scaler; parameters start equal on every rank
        self._build_model()
        self.scaler = torch.amp.GradScaler(
            self.dist.device.type, enabled=cfg.train.amp == "fp16"
        )
        self.loss_fn = LOSSES[cfg.train.loss]
        self.generator = torch.Generator(self.dist.device)
        self.generator.manual_seed(seed_for(cfg.train.seed, self.dist.rank, 1))
        torch.manual_seed(seed_for(cfg.train.seed, self.dist.rank, 2))

        # run folder and sinks, then resume (which may replace the state above)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        ckpt = None
        if cfg.train.resume == "auto" and (self.ckpt_dir / "last.pt").exists():
            ckpt = load_checkpoint(self.ckpt_dir / "last.pt")
            check_compatible(ckpt, self.num_items, cfg.model)
        wandb_id = ckpt.get("wandb_run_id") if ckpt else None
        self.tracker = Tracker(cfg, self.run_dir, self.dist.is_main, wandb_id)
        if ckpt is not None:
            self._resume(ckpt)
        self._wrap_ddp()
        log.info(
            "%d train steps (%d an epoch, %d ranks x %d users, %d loader workers)",
            self.total_steps,
            self.loader.steps_per_epoch,
            self.dist.world_size,
            cfg.train.batch_size,
            self.loader.num_workers,
        )

    def _setup_data(self) -> None:
        """Reads the manifest: vocabulary, validation shards, the training stream."""
        cfg = self.cfg
        manifest = load_manifest(cfg.data.shards)
        self.num_items = int(manifest["num_items"])
        self.val_urls = self._split_urls(manifest, "val")
        train = manifest["splits"]["train"]
        self.loader = TrainLoader(
            shard_paths(cfg.data.shards, manifest, "train"),
            num_users=int(train["users"]),
            world_size=self.dist.world_size,
            batch_size=cfg.train.batch_size,
            bucket_buffer=cfg.train.bucket_buffer,
            num_workers=cfg.train.num_workers,
            seed=cfg.train.seed,
        )
        self.shard_sizes = {
            str(Path(cfg.data.shards) / s["path"]): s["samples"]
            for s in train["shards"]
        }
        self.total_steps = self.loader.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _check_settings(self) -> None:
        """Raises ConfigError for settings this machine or backend cannot run."""
        train, device = self.cfg.train, self.dist.device
        if train.amp == "fp16" and device.type != "cuda":
            raise ConfigError("--train.amp=fp16 needs CUDA; use bf16 or off on CPU")
        if train.sparse and device.type == "cuda" and self.dist.world_size > 1:
            raise ConfigError(
                "--train.sparse needs the gloo backend (DDP on CPU); "
                "NCCL cannot all-reduce sparse gradients"
            )

    def _split_urls(self, manifest: dict[str, Any], split: str) -> list[str]:
        """Returns the shards of ``split``, or [] (with a warning) when it has none."""
        if not manifest["splits"].get(split, {}).get("users"):
            log.warning(
                "no %s users in %s: validation is skipped", split, self.cfg.data.shards
            )
            return []
        return shard_paths(self.cfg.data.shards, manifest, split)

    def _build_model(self) -> None:
        """Builds the model (seeded, so equal on every rank) and its optimizers."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.raw_model = DreamModel(self.num_items, cfg.model, sparse=cfg.train.sparse)
        self.raw_model.to(self.dist.device)
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Adam(
                self.raw_model.dense_parameters(),
                lr=cfg.train.lr,
                weight_decay=cfg.train.weight_decay,
                fused=True,  # one kernel over all tensors: 6x faster on a large table
            )
        ]
        if self.raw_model.sparse_parameters():
            if cfg.train.weight_decay:
                log.warning(
                    "--train.weight_decay is not applied to the sparse item "
                    "table (SparseAdam has none)"
                )
            self.optimizers.append(
                torch.optim.SparseAdam(
                    self.raw_model.sparse_parameters(), lr=cfg.train.lr
                )
            )

    def _wrap_ddp(self) -> None:
        """Wraps the model in DDP when there is more than one rank."""
        self.model: nn.Module = self.raw_model
        if self.dist.world_size > 1:
            device_ids = (
                [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            )
            self.model = DistributedDataParallel(self.raw_model, device_ids=device_ids)

    def _install_signal_handlers(self) -> None:
        """Makes SIGTERM, SIGUSR1 and Ctrl-C request a checkpoint and a clean exit."""

        def request_stop(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.stop_signal = signum

        self._old_handlers = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}

    def _resume(self, ckpt: dict[str, Any]) -> None:
        """Restores model, optimizers, scaler, counters, loader and random streams."""
        self.raw_model.load_state_dict(ckpt["model"])
        for opt, state in zip(self.optimizers, ckpt["optimizer"], strict=True):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best_recall = ckpt["step"], ckpt["best_recall"]
        self.position = self._restore_position(ckpt["loader"])
        self._restore_rng(ckpt["rng"])
        self.resumed_from = self.step
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            ckpt["path"],
            self.step,
            self.position.epoch,
            self.position.step_in_epoch,
        )

    def _restore_position(self, saved: dict[str, int]) -> LoaderPosition:
        """Returns the saved loader position; warns when the stream's layout changed."""
        layout = (saved["world_size"], saved["num_workers"])
        if layout != (self.dist.world_size, self.loader.num_workers):
            log.warning(
                "checkpoint streamed with %d ranks x %d workers, now %d x %d: "
                "the rest of the epoch is a different sample of users",
                *layout,
                self.dist.world_size,
                self.loader.num_workers,
            )
        position = LoaderPosition(saved["epoch"], saved["step_in_epoch"])
        if position.step_in_epoch >= self.loader.steps_per_epoch:
            position = LoaderPosition(position.epoch + 1, 0)
        return position

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        """Restores this rank's random streams (reseeds when the world size changed)."""
        if len(states) != self.dist.world_size:
            log.warning(
                "checkpoint has random streams of %d ranks, now %d: reseeding",
                len(states),
                self.dist.world_size,
            )
            torch.manual_seed(seed_for(self.cfg.train.seed, self.dist.rank, self.step))
            return
        state = states[self.dist.rank]
        set_rng_state(state)
        self.generator.set_state(state["negatives"])

    # ----------------------------------------------------------- train_step

    def train_step(self, batch: Batch) -> tuple[float, float]:
        """Takes one optimizer step; returns the global (loss_sum, num_pairs).

        Raises TrainingDiverged, before any update, when the loss is not finite.
        """
        batch = batch.to(self.dist.device, non_blocking=True)
        with autocast_for(self.dist.device, self.cfg.train.amp):
            loss_sum, num_pairs = self.loss_fn(
                self.model, batch, self.generator, self.cfg.train.num_negatives
            )

        # one tiny all-reduce: global loss, global pairs, and the stop flag
        totals = torch.stack(
            [
                loss_sum.detach().double(),
                num_pairs.double(),
                torch.tensor(
                    float(self.stop_signal), device=loss_sum.device, dtype=torch.float64
                ),
            ]
        )
        global_loss, global_pairs, stop = distributed.all_reduce_sum(totals).tolist()
        if not math.isfinite(global_loss):
            raise TrainingDiverged(
                f"loss is {global_loss} at step {self.step + 1} (epoch "
                f"{self.position.epoch}); stopped before updating. Last good "
                f"checkpoint: {self.ckpt_dir / 'last.pt'}"
            )
        self.stop_requested = stop > 0

        # backward of the local share of the global mean; DDP averages over ranks
        scale = self.dist.world_size / max(global_pairs, 1.0)
        self.scaler.scale(loss_sum * scale).backward()
        self._update()
        return global_loss, global_pairs

    def _update(self) -> None:
        """Unscales, clips, sets the learning rate and steps every optimizer."""
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        self.grad_norm = grad_norm_and_clip(
            list(self.raw_model.parameters()), self.cfg.train.clip
        )
        self.lr = lr_at(self.step, self.cfg, self.total_steps)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr
            self.scaler.step(opt)
        self.scaler.update()
        if (self.step + 1) % self.cfg.logging.log_every == 0:
            self.update_norm = adam_update_norm(self.optimizers)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_taken += 1
        self.position.step_in_epoch += 1

    # -------------------------------------------------------------- validate

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Returns val BPR loss and Recall/NDCG@K over every rank's validation users.

        Negatives come from a generator seeded the same way at every validation,
        so validation losses compare across steps and leave training streams alone.
        """
        if not self.val_urls:
            return {}
        model, ks = self.raw_model, sorted({10, *self.cfg.eval.k})
        model.eval()
        generator = torch.Generator(self.dist.device)
        generator.manual_seed(seed_for(self.cfg.train.seed, self.dist.rank, 3))
        sums, loss = [], torch.zeros(2, dtype=torch.float64)
        batches = eval_batches(
            self.val_urls,
            self.dist.rank,
            self.dist.world_size,
            self.cfg.train.val_batch_size,
        )
        for batch, users in batches:
            batch = batch.to(self.dist.device, non_blocking=True)
            with autocast_for(self.dist.device, self.cfg.train.amp):
                loss_sum, num_pairs = self.loss_fn(
                    model, batch, generator, self.cfg.train.num_negatives
                )
                scores_BI = model.score(model.user_vectors(batch)).float()
            loss += torch.stack([loss_sum.double(), num_pairs.double()]).cpu()
            sums.append(self._metric_sums(scores_BI, users, ks))
        model.train()
        return self._reduce_validation(loss, reduce(sums), ks)

    @staticmethod
    def _metric_sums(
        scores_BI: torch.Tensor, users: list[UserSequence], ks: list[int]
    ) -> dict[str, int]:
        """Returns the metric sums of one validation batch."""
        topk_BK = top_k(scores_BI, max(ks))
        targets = [u.items[u.target_start :] for u in users]
        histories = [u.items[: u.target_start] for u in users]
        return metric_sums(topk_BK, targets, histories, ks)

    def _reduce_validation(
        self, loss: torch.Tensor, sums: dict[str, int], ks: list[int]
    ) -> dict[str, float]:
        """Returns the validation metrics summed over ranks, then divided."""
        device = self.dist.device if self.dist.device.type == "cuda" else "cpu"
        loss = distributed.all_reduce_sum(loss.to(device)).cpu()
        sums_tensor = distributed.all_reduce_sum(sums_to_tensor(sums, ks).to(device))
        metrics = finalize(sums_from_tensor(sums_tensor.cpu(), ks))
        out = {
            "val/loss": float(loss[0] / max(float(loss[1]), 1.0)),
            "val/users": float(metrics["users"]),
        }
        for k in ks:
            out[f"val/recall@{k}"] = metrics[f"recall@{k}"]
            out[f"val/ndcg@{k}"] = metrics[f"ndcg@{k}"]
        return out

    # ------------------------------------------------------------------ save

    def checkpoint_state(self) -> dict[str, Any]:
        """Returns the checkpoint dict (rng gathered from every rank; a collective)."""
        rng = rng_state()
        rng["negatives"] = self.generator.get_state()
        all_rng = distributed.all_gather_objects(rng)
        return {
            "format_version": CHECKPOINT_VERSION,
            "model": self.raw_model.state_dict(),
            "optimizer": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.position.epoch,
            "loader": self.position.state_dict(
                self.dist.world_size, self.loader.num_workers
            ),
            "rng": all_rng,
            "config": to_dict(self.cfg),
            "num_items": self.num_items,
            "best_recall": self.best_recall,
            "wandb_run_id": self.tracker.wandb_run_id,
        }

    def save(self, best: bool = False) -> None:
        """Writes checkpoints/last.pt (and best.pt) from rank 0; every rank calls it."""
        state = self.checkpoint_state()
        if self.dist.is_main:
            save_atomic(state, self.ckpt_dir / "last.pt")
            if best:
                save_atomic(state, self.ckpt_dir / "best.pt")
            log.info(
                "saved %s at step %d%s",
                self.ckpt_dir / "last.pt",
                self.step,
                " (best)" if best else "",
            )
        distributed.barrier()

    def validate_and_save(self) -> None:
        """Validates, logs, and saves last.pt (and best.pt on a better Recall@10)."""
        metrics = self.validate()
        recall = metrics.get("val/recall@10", -1.0)
        best = recall > self.best_recall
        if best:
            self.best_recall = recall
        if metrics:
            self.tracker.log(
                self.step, {**metrics, "val/best_recall@10": self.best_recall}
            )
            log.info(
                "validation at step %d: loss %.4f, recall@10 %.4f (best %.4f)",
                self.step,
                metrics["val/loss"],
                recall,
                self.best_recall,
            )
        self.save(best=best)

    # ------------------------------------------------------------------- fit

    def fit(self) -> int:
        """Runs the training loop; returns the exit status (0, also after a stop)."""
        while self.step < self.total_steps:
            if self._run_epoch():
                name = signal.Signals(self.stop_signal or signal.SIGTERM).name
                log.warning(
                    "stop requested (%s) at step %d: checkpoint saved, exiting",
                    name,
                    self.step,
                )
                return 0
            if self.position.step_in_epoch >= self.loader.steps_per_epoch:
                self.position = LoaderPosition(self.position.epoch + 1, 0)
                self.validate_and_save()
        if self.steps_taken and self.position.step_in_epoch:  # max_steps mid-epoch
            self.validate_and_save()
        return 0

    def _run_epoch(self) -> bool:
        """Trains to the epoch's end or max_steps; returns True on a stop request."""
        cfg, position = self.cfg, self.position
        if position.step_in_epoch == 0 and self.dist.is_main:
            log.info(self.loader.coverage(self.shard_sizes, 0, position.epoch))
        interval = Interval()
        batches = self.loader.epoch(position.epoch, position.step_in_epoch)
        try:
            while self.step < self.total_steps:
                wait_start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    return False
                interval.data_s += time.perf_counter() - wait_start
                self._account(interval, *self.train_step(batch))
                if self.step % cfg.logging.log_every == 0:
                    self._log_interval(interval)
                    interval = Interval()
                if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                    self.validate_and_save()
                if self.stop_requested or self._hold():
                    self.save()
                    return True
            return False
        finally:
            batches.close()  # shuts the loader workers down now, also on errors

    @staticmethod
    def _account(interval: Interval, loss_sum: float, num_pairs: float) -> None:
        """Adds one step's global sums to the log interval."""
        interval.loss_sum += loss_sum
        interval.num_pairs += num_pairs
        interval.num_steps += 1

    def _log_interval(self, interval: Interval) -> None:
        """Logs the interval's loss, gradient norm, update ratio, speed and memory."""
        if not self.dist.is_main:
            return
        elapsed = time.perf_counter() - interval.start
        num_users = (
            interval.num_steps * self.cfg.train.batch_size * self.dist.world_size
        )
        param_norm = math.sqrt(
            sum(float(p.detach().norm()) ** 2 for p in self.raw_model.parameters())
        )
        metrics = {
            "train/loss": interval.loss_sum / max(interval.num_pairs, 1.0),
            "train/grad_norm": self.grad_norm,
            "train/update_ratio": self.update_norm / max(param_norm, 1e-12),
            "train/lr": self.lr,
            "train/users_per_s": num_users / max(elapsed, 1e-9),
            "train/data_wait_share": interval.data_s / max(elapsed, 1e-9),
            "train/memory_gb": memory_gb(self.dist.device),
            "train/epoch": float(self.position.epoch),
        }
        self.tracker.log(self.step, metrics, console=True)

    def _hold(self) -> bool:
        """Test hook: at step ``$DREAM_DIST_HOLD_AT_STEP``, waits while run_dir/HOLD
        exists; returns True if a stop signal arrived meanwhile.

        Every rank polls in step (flags all-reduced), so they leave together.
        """
        if os.environ.get(HOLD_ENV) != str(self.step):
            return False
        hold_file = self.run_dir / "HOLD"
        while True:
            flags = torch.tensor(
                [float(self.stop_signal), float(hold_file.exists())],
                device=self.dist.device,
            )
            stop, holding = distributed.all_reduce_max(flags).tolist()
            if stop or not holding:
                return bool(stop)
            time.sleep(0.05)

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Writes this rank's summary, closes the sinks and leaves the process group.

        Safe after a setup that failed part-way.
        """
        for signum, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(signum, handler)
        if hasattr(self, "tracker"):
            self.tracker.close()
        if not hasattr(self, "loader"):
            distributed.close()
            return
        summary_dir = self.run_dir / "ranks"
        summary_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "steps_taken": self.steps_taken,
            "step": self.step,
            "epoch": self.position.epoch,
            "resumed_from": self.resumed_from,
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        }
        path = summary_dir / f"rank-{self.dist.rank}.json"
        path.write_text(json.dumps(summary) + "\n")
        _end_loader_workers()
        distributed.close()


def _end_loader_workers() -> None:
    """Kills loader workers an error left behind (they ignore SIGTERM, see
    ``dream_dist.data.stream``), so the process can exit."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)
