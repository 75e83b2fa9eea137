"""A straightforward DREAM, as common public implementations write it (for comparison).

Every user is run on their own and every basket is embedded and pooled in its own
call; the hidden state of each step is scored against the whole catalogue and the
BPR pairs are read from those scores, with negatives drawn per basket in Python.
Same model (pooling, RNN, tied weights, init) and the same loss (mean over pairs of
-log sigmoid(s_pos - s_neg), negatives uniform over the catalogue minus the basket)
as ``dream_dist.model`` / ``dream_dist.losses``; only the way it is computed differs.
``benchmarks/train.py`` times it against the batched model.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dream_dist.config import ModelConfig
from dream_dist.data.shards import UserSequence

_RNNS = {
    "RNN_TANH": lambda d, n, p: nn.RNN(d, d, n, nonlinearity="tanh", dropout=p),
    "RNN_RELU": lambda d, n, p: nn.RNN(d, d, n, nonlinearity="relu", dropout=p),
    "GRU": lambda d, n, p: nn.GRU(d, d, n, dropout=p),
    "LSTM": lambda d, n, p: nn.LSTM(d, d, n, dropout=p),
}


class ReferenceDream(nn.Module):
    """DREAM computed one user and one basket at a time."""

    def __init__(self, num_items: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_items, self.cfg = num_items, cfg
        self.encode = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.rnn = _RNNS[cfg.rnn_type](cfg.dim, cfg.num_layers, dropout)
        for param in self.parameters():
            nn.init.uniform_(param, -cfg.init_range, cfg.init_range)
        with torch.no_grad():
            self.encode.weight[0].zero_()

    def forward(self, baskets: list[torch.Tensor]) -> torch.Tensor:
        """Returns hidden_TD of one user: the state after each of ``baskets``."""
        pooled = []
        for basket in baskets:
            embedded = self.encode(basket)
            if self.cfg.pooling == "max":
                pooled.append(embedded.max(dim=0).values)
            else:
                pooled.append(embedded.mean(dim=0))
        inputs = F.dropout(torch.stack(pooled), self.cfg.dropout, self.training)
        hidden, _ = self.rnn(inputs.unsqueeze(1))
        return hidden.squeeze(1)


def user_bpr(
    model: ReferenceDream, seq: UserSequence, rng: random.Random
) -> tuple[torch.Tensor, int]:
    """Returns (loss_sum, num_pairs) of one user, a catalogue negative per positive."""
    baskets = [torch.from_numpy(b.astype(np.int64)) for b in seq.baskets()]
    hidden = model(baskets[:-1])
    scores = hidden @ model.encode.weight.t()
    loss_sum, num_pairs = scores.new_zeros(()), 0
    for t in range(len(baskets) - 1):
        positives = baskets[t + 1].tolist()
        excluded = set(positives)
        negatives = []
        for _ in positives:
            item = rng.randint(1, model.num_items)
            while item in excluded:
                item = rng.randint(1, model.num_items)
            negatives.append(item)
        diff = scores[t, positives] - scores[t, negatives]
        loss_sum = loss_sum - F.logsigmoid(diff).sum()
        num_pairs += len(positives)
    return loss_sum, num_pairs


def reference_step(
    model: ReferenceDream,
    optimizer: torch.optim.Optimizer,
    users: list[UserSequence],
    rng: random.Random,
    clip: float,
) -> float:
    """Takes one optimizer step on ``users``, one at a time; returns the mean loss."""
    loss_sum, num_pairs = 0.0, 0
    for seq in users:
        user_loss, user_pairs = user_bpr(model, seq, rng)
        loss_sum, num_pairs = loss_sum + user_loss, num_pairs + user_pairs
    loss = loss_sum / max(num_pairs, 1)
    optimizer.zero_grad()
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()
