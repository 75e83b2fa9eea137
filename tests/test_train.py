"""The trainer, run for real: torchrun on CPU (gloo), signals, restarts, W&B offline.

Multi-process tests start ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m dream_dist.train`` as a subprocess over tiny shards whose
users cycle through a few items (a pattern a model can learn). Stopping at an
exact step uses the trainer's hold hook: with ``DREAM_DIST_HOLD_AT_STEP=k`` and a
``run_dir/HOLD`` file, every rank waits after step k until the file goes or a
stop signal arrives; the test then sends the real signal (SIGTERM to torchrun,
SIGKILL to one rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny_shards import write_shards

from dream_dist.checkpoint import load_checkpoint
from dream_dist.config import parse_config
from dream_dist.errors import InputError
from dream_dist.tracking import resolve_wandb_mode
from dream_dist.trainer import Trainer, TrainingDiverged, adam_update_norm, lr_at

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 256 // (2 * 8)
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
HOLD_STEP = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def _flags(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "debug.toml"),
        f"--data.shards={shards}",
        f"--train.run_dir={run_dir}",
        f"--train.epochs={EPOCHS}",
        "--train.num_workers=2",
        "--logging.wandb=disabled",
        *extra,
    ]


def _torchrun(flags: list[str], *, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "-m",
        "dream_dist.train",
        *flags,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=240
    )


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


def _ranks(run_dir: Path) -> list[dict]:
    return [
        json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)
    ]


def _saved_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.pt"
    return load_checkpoint(path)["step"] if path.exists() else -1


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Waits until checkpoints/last.pt holds ``step`` (written atomically)."""
    deadline = time.monotonic() + 120
    while _saved_step(run_dir) != step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "run never reached the hold step"
        time.sleep(0.2)


def _child_with_rank(parent: int, rank: int) -> int:
    """Returns the pid of the torchrun worker (a child of ``parent``) with RANK=rank."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def _errors(stderr: str) -> str:
    """Returns the lines of a torchrun log that say what failed."""
    return "\n".join(
        line
        for line in stderr.splitlines()
        if "Error" in line or "error" in line or "resumed" in line
    )


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with W&B offline; returns its run folder."""
    cwd = tmp_path_factory.mktemp("full")
    run_dir = cwd / "run"
    proc = _run(_torchrun(_flags(shards, run_dir, "--logging.wandb=offline")), cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_torchrun_two_ranks_train_equal_steps_and_write_checkpoints(full_run):
    # both ranks took every step of every epoch
    for summary in _ranks(full_run):
        assert summary["world_size"] == 2
        assert summary["steps_taken"] == summary["step"] == TOTAL_STEPS

    # the loss falls on the learnable pattern, and validation ran every epoch
    train = [r for r in _records(full_run) if "train/loss" in r]
    first, last = train[0]["train/loss"], train[-1]["train/loss"]
    assert first > 0.68 and last < 0.6 * first, (first, last)
    val = [r for r in _records(full_run) if "val/recall@10" in r]
    assert [r["step"] for r in val] == [
        STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)
    ]
    assert all(0 < r["val/recall@10"] <= 1 for r in val)

    # checkpoints and the resolved config
    last_ckpt = load_checkpoint(full_run / "checkpoints" / "last.pt")
    assert last_ckpt["step"] == TOTAL_STEPS and len(last_ckpt["rng"]) == 2
    best = load_checkpoint(full_run / "checkpoints" / "best.pt")
    assert best["best_recall"] == max(r["val/recall@10"] for r in val)
    assert (
        parse_config(["--config", str(full_run / "config.toml")]).train.epochs == EPOCHS
    )


@pytest.mark.slow
def test_wandb_offline_run_folder_comes_from_rank_0_only(full_run):
    runs = list((full_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 1 would have added a second run folder
    assert list(runs[0].glob("run-*.wandb"))
    assert not (full_run.parent / "wandb").exists()


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(shards, full_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "HOLD").touch()
    flags = _flags(shards, run_dir, "--train.val_every=10", "--logging.wandb=offline")
    proc = subprocess.Popen(
        _torchrun(flags),
        cwd=tmp_path,
        text=True,
        env=_env(DREAM_DIST_HOLD_AT_STEP=str(HOLD_STEP)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for_checkpoint(proc, run_dir, HOLD_STEP)
    proc.send_signal(signal.SIGTERM)  # what a cluster sends before a time limit
    _, stderr = proc.communicate(timeout=60)
    assert "stop requested (SIGTERM) at step 20" in stderr, stderr[-3000:]
    assert _saved_step(run_dir) == HOLD_STEP

    # resume; val_every only adds validations, which leave training untouched
    proc = _run(_torchrun(flags), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(s["resumed_from"] == HOLD_STEP for s in _ranks(run_dir))

    # the resumed attempt continues the first attempt's W&B run
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert len({next(r.glob("run-*.wandb")).stem for r in runs}) == 1, runs
    assert "continuing W&B run" in proc.stderr

    resumed = _params(run_dir / "checkpoints" / "last.pt")
    reference = _params(full_run / "checkpoints" / "last.pt")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_killed_rank_restarts_and_finishes_from_the_last_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "HOLD").touch()
    flags = _flags(shards, run_dir, "--train.val_every=10")
    # restarted workers need a fresh rendezvous store (see dream_dist.distributed)
    env = _env(
        DREAM_DIST_HOLD_AT_STEP=str(HOLD_STEP), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"
    )
    proc = subprocess.Popen(
        _torchrun(flags, restarts=1),
        cwd=tmp_path,
        text=True,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for_checkpoint(proc, run_dir, HOLD_STEP)
    os.kill(_child_with_rank(proc.pid, 1), signal.SIGKILL)
    (run_dir / "HOLD").unlink()
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, _errors(stderr)

    # the restarted workers resumed from the step-20 checkpoint and finished
    for summary in _ranks(run_dir):
        assert summary["restart"] == 1
        assert summary["resumed_from"] == HOLD_STEP
        assert summary["step"] == TOTAL_STEPS
    assert _saved_step(run_dir) == TOTAL_STEPS


def _in_process(shards: Path, run_dir: Path, *extra: str) -> Trainer:
    """Returns a set-up single-process Trainer (no loader workers)."""
    cfg = parse_config(_flags(shards, run_dir, "--train.num_workers=0", *extra))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
    except BaseException:
        trainer.close()
        raise
    return trainer


@pytest.fixture(scope="module")
def bf16_run(shards, tmp_path_factory) -> Path:
    """A single-process run under CPU bf16 autocast; returns its run folder."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    trainer = _in_process(shards, run_dir, "--train.amp=bf16", "--train.epochs=4")
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    return run_dir


def test_bf16_autocast_on_cpu_trains(bf16_run):
    train = [r["train/loss"] for r in _records(bf16_run) if "train/loss" in r]
    assert all(math.isfinite(loss) for loss in train)
    assert train[-1] < 0.7 * train[0], train


def test_checkpoint_of_other_vocabulary_or_shape_is_refused(shards, bf16_run, tmp_path):
    other = write_shards(tmp_path / "other", num_items=40)
    with pytest.raises(
        InputError,
        match=r"last\.pt: trained on a vocabulary of 24 "
        r"items, but the shards have 40",
    ):
        _in_process(other, bf16_run)
    with pytest.raises(InputError, match=r"last\.pt: model\.dim is 16 .* but 32 here"):
        _in_process(shards, bf16_run, "--model.dim=32")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    shards, bf16_run, tmp_path
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = bf16_run / "checkpoints" / "last.pt"
    (run_dir / "checkpoints" / "last.pt").write_bytes(last.read_bytes())
    trainer = _in_process(shards, run_dir, "--train.epochs=5")
    real_loss = trainer.loss_fn

    def nan_loss(*args, **kwargs):
        loss_sum, num_pairs = real_loss(*args, **kwargs)
        return loss_sum * math.nan, num_pairs

    trainer.loss_fn = nan_loss
    try:
        with pytest.raises(TrainingDiverged, match="loss is nan at step 129"):
            trainer.fit()
    finally:
        trainer.close()
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last.read_bytes()


def test_shipped_configs_load_with_the_documented_settings():
    paper = parse_config(["--config", str(REPO / "configs" / "dream_paper.toml")])
    assert (paper.model.pooling, paper.model.rnn_type) == ("max", "RNN_RELU")
    model, train = paper.model, paper.train
    assert (model.num_layers, model.dim, model.dropout) == (2, 128, 0.5)
    assert (train.batch_size, train.lr, train.clip) == (32, 0.001, 200.0)
    debug = parse_config(["--config", str(REPO / "configs" / "debug.toml")])
    assert debug.model.dim < paper.model.dim and debug.logging.wandb == "disabled"


def test_update_norm_from_adam_state_equals_the_parameter_change():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = list(model.parameters())
        moved = [
            (p.detach() - b).norm() ** 2 for p, b in zip(after, before, strict=True)
        ]
        assert adam_update_norm([optimizer]) == pytest.approx(
            float(sum(moved)) ** 0.5, rel=1e-4
        )


def test_learning_rate_warms_up_then_follows_the_schedule():
    cfg = parse_config(
        ["--train.lr=0.1", "--train.warmup_steps=4", "--train.schedule=cosine"]
    )
    assert lr_at(0, cfg, 20) == pytest.approx(0.025)
    assert lr_at(3, cfg, 20) == pytest.approx(0.1)
    assert lr_at(12, cfg, 20) == pytest.approx(0.05)
    assert lr_at(20, cfg, 20) == pytest.approx(0.0)


def test_wandb_online_without_a_key_falls_back_to_offline(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="dream_dist"):
        assert resolve_wandb_mode("online") == "offline"
    assert "no W&B API key" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"
