"""Checkpoints: atomic save on rank 0, safe load, and the state a resume needs.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so loading one never runs code. Keys:

- ``model``: DreamModel state_dict (no DDP ``module.`` prefix)
- ``optimizer``, ``scaler``: their state_dicts (``scaler`` is None without fp16)
- ``step``, ``epoch``: optimizer steps taken; the epoch the next step belongs to
- ``loader``: the loader position, ``{"epoch", "step_in_epoch", "world_size",
  "num_workers"}`` (see ``dream_dist.data.stream``)
- ``rng``: one entry per rank, ``{"python", "numpy", "torch", "cuda"}``
- ``config``: the resolved config (``to_dict``); ``num_items``: vocabulary size
- ``best_recall``: best validation Recall@10 so far (-1.0 before any validation)
- ``wandb_run_id``: the W&B run a resume continues (None without W&B; absent in
  checkpoints written before it existed)
- ``format_version``
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dream_dist.config import ModelConfig, from_dict
from dream_dist.errors import InputError

FORMAT_VERSION = 1
SHAPE_FIELDS = ("dim", "rnn_type", "num_layers", "pooling")
"""Model settings that a checkpoint's weights are tied to."""


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes ``state`` to ``path`` through a temporary file and a rename.

    A reader sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Returns the checkpoint dict at ``path`` (plus ``"path"``), weights_only.

    Raises InputError naming the file when it is missing or not a checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint does not exist") from None
    except Exception as err:  # a truncated file, or not a torch file at all
        raise InputError(f"{path}: not a readable checkpoint ({err})") from None
    keys = ckpt.keys() if isinstance(ckpt, dict) else ()
    missing = [k for k in ("model", "config", "num_items") if k not in keys]
    if missing:
        raise InputError(f"{path}: not a dream_dist checkpoint (missing {missing})")
    ckpt["path"] = str(path)
    return ckpt


def check_compatible(
    ckpt: dict[str, Any], num_items: int, model_cfg: ModelConfig
) -> None:
    """Raises InputError, naming the file, when ``ckpt`` cannot be used here.

    A checkpoint fits when its vocabulary size and model shape match.
    """
    path = ckpt.get("path", "checkpoint")
    if ckpt["num_items"] != num_items:
        raise InputError(
            f"{path}: trained on a vocabulary of {ckpt['num_items']} items, "
            f"but the shards have {num_items}; use the shards it was trained on"
        )
    saved = ckpt["config"]["model"]
    for name in SHAPE_FIELDS:
        if saved[name] != getattr(model_cfg, name):
            raise InputError(
                f"{path}: model.{name} is {saved[name]!r} in the checkpoint but "
                f"{getattr(model_cfg, name)!r} here; the model shape must match"
            )


def build_model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Returns the DreamModel of ``ckpt`` with its weights, in eval mode, on CPU.

    Raises InputError naming the file when the weights do not fit the model.
    """
    from dream_dist.model import DreamModel

    cfg = from_dict(ckpt["config"])
    model = DreamModel(ckpt["num_items"], cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(
            f"{ckpt.get('path', 'checkpoint')}: weights do not fit the model ({err})"
        ) from None
    return model.eval()


def rng_state() -> dict[str, Any]:
    """Returns this process's random streams in a weights_only-loadable form."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the random streams saved by ``rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
