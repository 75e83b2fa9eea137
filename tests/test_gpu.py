"""Checks that need CUDA; skipped on machines without a GPU (CI has none).

Run them on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py -s``: the
first prints the dtype a bare cuDNN RNN gives under bf16 autocast, for the record.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_shards import write_shards

from dream_dist.config import ModelConfig
from dream_dist.data.batching import collate
from dream_dist.data.shards import UserSequence
from dream_dist.losses import bpr_loss
from dream_dist.model import DreamModel

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _users(num_users: int = 16, num_items: int = 50) -> list[UserSequence]:
    rng = np.random.default_rng(0)
    users = []
    for user in range(num_users):
        sizes = rng.integers(1, 5, size=rng.integers(2, 8)).astype(np.int32)
        items = rng.integers(1, num_items + 1, size=int(sizes.sum())).astype(np.int32)
        users.append(UserSequence(user, str(user), items, sizes))
    return users


@pytest.mark.parametrize("rnn_type", ["RNN_RELU", "GRU", "LSTM"])
def test_bf16_autocast_never_leaves_the_rnn_in_fp16(rnn_type):
    device = torch.device("cuda")
    cell = {"RNN_RELU": torch.nn.RNN, "GRU": torch.nn.GRU, "LSTM": torch.nn.LSTM}
    bare = cell[rnn_type](8, 8, batch_first=True).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bare_dtype = bare(torch.randn(2, 3, 8, device=device))[0].dtype
    print(f"bare {rnn_type} under bf16 autocast on CUDA: {bare_dtype}")

    model_cfg = ModelConfig(dim=16, rnn_type=rnn_type, num_layers=2)
    model = DreamModel(50, model_cfg).to(device)
    batch = collate(_users()).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden_BTD = model(batch)
        loss_sum, num_pairs = bpr_loss(model, batch, torch.Generator(), 4)
    assert hidden_BTD.dtype == torch.float32
    (loss_sum / num_pairs).backward()
    assert torch.isfinite(model.item_embedding.weight.grad.to_dense()).all()


@pytest.mark.slow
def test_nccl_two_ranks_train(tmp_path):
    """Runs ``torchrun --nproc_per_node=2`` on two GPUs (NCCL picked automatically)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    shards = write_shards(tmp_path / "shards")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node=2", "-m", "dream_dist.train",
        "--config", "configs/debug.toml", f"--data.shards={shards}",
        f"--train.run_dir={tmp_path / 'run'}", "--train.amp=bf16",
        "--logging.wandb=disabled",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
