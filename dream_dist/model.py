"""DREAM: pooled basket embeddings, an RNN over baskets, tied item scores.

Shape legend (used in names across the project):

- B users in the batch, T = most input baskets of any user (time steps),
- D = ``cfg.dim`` (embedding and hidden size), I = num_items + 1 (column 0 is padding),
- K input baskets, M items of the input baskets (flat), U distinct items looked up,
- P positive items, Q negatives per positive.

API (see ``dream_dist.data.batching`` for the Batch fields):

- ``DreamModel(num_items, cfg, sparse=False)``: ``sparse=True`` gives the item
  table sparse gradients (pair it with ``torch.optim.SparseAdam`` for
  ``model.sparse_parameters()`` and Adam for ``model.dense_parameters()``).
- ``model(batch) -> hidden_BTD``: hidden state after basket t of every user; rows
  past a user's ``lengths_B`` are padding and never read.
- ``model(batch, pairs) -> margin_PQ``: score margins s_pos - s_neg of sampled
  training pairs (``PairIndex``), with s_i = h_t . e_i, computed inside
  ``forward`` so that DDP sees every use of the tied item table (see
  ``dream_dist.losses``).
- ``model.user_vectors(batch) -> h_BD``: hidden state after each user's last input
  basket. ``model.score(h_BD) -> scores_BI``: every item, column 0 is ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dream_dist.config import ModelConfig
from dream_dist.data.batching import Batch

_RNNS = {
    "RNN_TANH": (nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, {"nonlinearity": "relu"}),
    "GRU": (nn.GRU, {}),
    "LSTM": (nn.LSTM, {}),
}


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Returns ``F.dropout(x, p, training)`` for 0 <= p < 1 (``--model.dropout``);
    on CPU with a mask from ``torch.rand``.

    NOTE: CPU ``bernoulli_`` with a float probability takes about three times as
    long as drawing uniforms and comparing them.
    """
    if not training or p == 0.0 or x.is_cuda:
        return F.dropout(x, p, training)
    keep = torch.rand_like(x).ge_(p).div_(1.0 - p)
    return x * keep


@dataclass
class PairIndex:
    """Training pairs: hidden state ``slot_P`` should rank ``pos_items_P`` first."""

    slot_P: torch.Tensor
    """Row ``user * T + t`` of the flattened hidden grid for each positive."""
    pos_items_P: torch.Tensor
    """Positive item of each pair."""
    neg_items_PQ: torch.Tensor
    """Q negative items for each positive."""


class DreamModel(nn.Module):
    """The Dynamic REcurrent bAsket Model with tied input and output item embeddings."""

    def __init__(self, num_items: int, cfg: ModelConfig, sparse: bool = False) -> None:
        super().__init__()
        if cfg.rnn_type not in _RNNS:
            raise ValueError(f"--model.rnn_type: unknown {cfg.rnn_type!r}")
        self.num_items, self.cfg, self.sparse = num_items, cfg, sparse
        # NOTE: DDP reads the module's ``sparse`` flag to expect sparse gradients
        self.item_embedding = nn.Embedding(
            num_items + 1, cfg.dim, padding_idx=0, sparse=sparse
        )
        rnn_class, kwargs = _RNNS[cfg.rnn_type]
        self.rnn = rnn_class(
            cfg.dim,
            cfg.dim,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
            **kwargs,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws every weight uniform in [-init_range, init_range]; row 0 stays zero."""
        for param in self.parameters():
            nn.init.uniform_(param, -self.cfg.init_range, self.cfg.init_range)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Returns the parameters with sparse gradients (empty unless ``sparse``)."""
        return [self.item_embedding.weight] if self.sparse else []

    def dense_parameters(self) -> list[nn.Parameter]:
        """Returns every parameter not in ``sparse_parameters()``."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def item_rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (rows_UD, local): the distinct items' embeddings and each item's row.

        One lookup serves pooling and scoring, so the item table gets one gradient
        (sparse when ``self.sparse``), touching only the rows the batch used.
        """
        items_U, local = torch.unique(items, return_inverse=True)
        rows_UD = F.embedding(items_U, self.item_embedding.weight, sparse=self.sparse)
        return rows_UD, local

    def pool_baskets(
        self, batch: Batch, rows_UD: torch.Tensor, local_M: torch.Tensor
    ) -> torch.Tensor:
        """Returns basket_KD: each input basket's pooled item embeddings."""
        mode = "max" if self.cfg.pooling == "max" else "mean"
        return F.embedding_bag(local_M, rows_UD, batch.offsets_K, mode=mode)

    def forward(self, batch: Batch, pairs: PairIndex | None = None) -> torch.Tensor:
        """Returns hidden_BTD, or the margins ``margin_PQ`` when ``pairs`` is given."""
        if pairs is None:
            rows_UD, local_M = self.item_rows(batch.items_M)
            return self.hidden(batch, self.pool_baskets(batch, rows_UD, local_M))

        # one lookup for basket items, positives and negatives
        num_pos, num_neg = pairs.neg_items_PQ.shape
        num_basket_items = batch.items_M.numel()
        lookup = [batch.items_M, pairs.pos_items_P, pairs.neg_items_PQ.flatten()]
        rows_UD, local = self.item_rows(torch.cat(lookup))
        local_M, local_P, local_PQ = local.split(
            [num_basket_items, num_pos, num_pos * num_neg]
        )
        hidden_BTD = self.hidden(batch, self.pool_baskets(batch, rows_UD, local_M))

        # s_pos - s_neg = h_t . (e_pos - e_neg); index_select, whose backward is
        # an index_add, is several times faster on CPU than advanced indexing
        hidden_PD = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        hidden_PD = hidden_PD.index_select(0, pairs.slot_P).to(rows_UD.dtype)
        pos_PD = rows_UD.index_select(0, local_P)
        neg_PQD = rows_UD.index_select(0, local_PQ).view(num_pos, num_neg, -1)
        diff_PQD = pos_PD[:, None, :] - neg_PQD
        return (diff_PQD * hidden_PD[:, None, :]).sum(-1)

    def hidden(self, batch: Batch, basket_KD: torch.Tensor) -> torch.Tensor:
        """Returns hidden_BTD: the RNN's state after each basket of the B x T grid."""
        basket_KD = dropout(basket_KD, self.cfg.dropout, self.training)

        # place baskets in the B x T grid; padding is only along the basket axis
        num_rows = batch.num_users * batch.max_baskets
        grid = basket_KD.new_zeros(num_rows, basket_KD.shape[1])
        grid_BTD = grid.index_copy(0, batch.slot_K, basket_KD).view(
            batch.num_users, batch.max_baskets, -1
        )

        # NOTE: padding follows each user's last basket, so the causal RNN gives
        # the same valid states as a packed sequence, and stays autocast-friendly.
        hidden_BTD, _ = self._run_rnn(grid_BTD)
        return hidden_BTD

    def _run_rnn(self, grid_BTD: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Returns the RNN's output; under CUDA bf16 autocast the RNN runs in fp32.

        NOTE: cuDNN's RNN autocast path casts to fp16 even when bf16 is asked for,
        and fp16 without a gradient scaler can overflow; fp32 is the safe choice.
        """
        if (
            grid_BTD.is_cuda
            and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.bfloat16
        ):
            with torch.autocast("cuda", enabled=False):
                return self.rnn(grid_BTD.float())
        return self.rnn(grid_BTD)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """Returns h_BD: the hidden state after each user's last input basket."""
        hidden_BTD = self(batch)
        users = torch.arange(batch.num_users, device=hidden_BTD.device)
        return hidden_BTD[users, batch.lengths_B - 1]

    def score(
        self, h_BD: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns scores_BI = h . e_i for every item; column 0 (padding) is -inf.

        ``out`` (B x I, h's dtype) receives the scores when given: reusing one buffer
        saves a fresh large allocation per batch.
        """
        weight_DI = self.item_embedding.weight.t().to(h_BD.dtype)
        scores_BI = torch.matmul(h_BD, weight_DI, out=out)
        # in place: a copy of B x I scores costs a third of full-catalog scoring
        scores_BI[:, 0] = -torch.inf
        return scores_BI
