"""BPR at every time step: plain (catalog negatives) and reorder (earlier items).

Hidden state t of a user ranks each item of basket t+1 (a positive) above Q
sampled negatives; the loss of one pair is ``-log sigmoid(s_pos - s_neg)`` with
``s = h_t . e_i``, gathered for the sampled items only (never a full-catalog
product during training).

Usage (the trainer)::

    loss_sum, num_pairs = bpr_loss(ddp_model, batch, generator, num_negatives)
    total = num_pairs.clone(); dist.all_reduce(total)   # pairs on every rank
    (loss_sum * world_size / total).backward()           # DDP averages gradients

Both functions return a 0-dim float32 ``loss_sum`` (summed over pairs) and a
0-dim int64 ``num_pairs`` on the batch's device, so dividing the all-reduced sums
gives the mean over every pair of every rank, whatever the number of processes.

Why the scores come from ``model(batch, pairs)``: the item table is used twice,
to pool baskets and to score pairs (tied weights). DDP supports parameters used
inside ``forward``; a second use outside it (scoring with
``model.module.item_embedding``) is invisible to its bookkeeping and breaks under
``find_unused_parameters`` (traversal from forward's outputs) or ``static_graph``.
So sampling happens here (indices only, no parameters), and one
``model(batch, pairs)`` call looks up basket items, positives and negatives
together and returns the pair margins. The layered API, for callers that want
the counts of dropped pairs: ``sample_catalog_pairs`` or ``sample_reorder_pairs``,
then ``model(batch, pairs.index)`` (the margins s_pos - s_neg), then ``pair_loss``.

Sampling is exact and vectorised: a negative is drawn uniformly from the allowed
set by drawing its rank j among allowed values and skipping the excluded values
below it (a ``searchsorted`` over packed per-step keys, see
``dream_dist.data.batching``), so a negative is never a positive of its basket
and no rejection rounds are needed.

- Plain: negatives uniform over items 1..N minus the items of basket t+1.
- Reorder: positives are the reordered items of basket t+1; negatives uniform
  over the distinct items the user bought in baskets 0..t minus the items of
  basket t+1. Positives whose step has no such item are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dream_dist.data.batching import KEY_SHIFT, Batch
from dream_dist.model import PairIndex


@dataclass
class SampledPairs:
    """Sampled pair indices and how many pairs had no allowed negative."""

    index: PairIndex
    """What ``model(batch, pairs)`` scores."""
    num_dropped: int
    """Positive x negative pairs dropped because no negative was allowed."""


def _uniform_ranks(
    num_allowed_P: torch.Tensor, num_negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """Returns j_PQ, uniform integers in [0, num_allowed_P) (num_allowed >= 1)."""
    u = torch.rand(
        (len(num_allowed_P), num_negatives),
        generator=generator,
        device=generator.device,
        dtype=torch.float64,
    ).to(num_allowed_P.device)
    bound = num_allowed_P[:, None]
    return torch.minimum((u * bound).long(), bound - 1)


def _skip_excluded(
    j_PQ: torch.Tensor, step_P: torch.Tensor, keys: torch.Tensor, start_G: torch.Tensor
) -> torch.Tensor:
    """Returns the j-th value (0-based) not excluded in its step.

    ``keys`` hold ``step << 32 | (excluded value - its rank)``; the answer is
    ``j + #{excluded with value - rank <= j}``.
    """
    query = (step_P[:, None] << KEY_SHIFT) | j_PQ
    below = torch.searchsorted(keys, query, right=True) - start_G[step_P][:, None]
    return j_PQ + below


def sample_catalog_pairs(
    batch: Batch, num_items: int, num_negatives: int, generator: torch.Generator
) -> SampledPairs:
    """Returns each positive with uniform negatives: the catalog minus its basket."""
    step_P = batch.pos_step_P
    num_allowed = num_items - batch.excl_count_G[step_P]
    keep = num_allowed > 0
    step_P, num_allowed = step_P[keep], num_allowed[keep]

    # ranks 0.. over items 1..N map to rank + 1 in the keys' shifted space
    j_PQ = _uniform_ranks(num_allowed, num_negatives, generator)
    items_PQ = _skip_excluded(j_PQ + 1, step_P, batch.excl_keys_X, batch.excl_start_G)
    index = PairIndex(batch.step_slot_G[step_P], batch.pos_items_P[keep], items_PQ)
    return SampledPairs(index, int((~keep).sum()) * num_negatives)


def sample_reorder_pairs(
    batch: Batch, num_negatives: int, generator: torch.Generator
) -> SampledPairs:
    """Returns reordered positives with negatives from the user's earlier items."""
    reordered = batch.pos_reordered_P
    step_P = batch.pos_step_P[reordered]
    num_allowed = batch.prior_count_G[step_P] - batch.repeat_count_G[step_P]
    keep = num_allowed > 0
    step_P, num_allowed = step_P[keep], num_allowed[keep]

    # a rank among allowed history positions, then the item at that position
    j_PQ = _uniform_ranks(num_allowed, num_negatives, generator)
    keys, start_G = batch.repeat_keys_R, batch.repeat_start_G
    position_PQ = _skip_excluded(j_PQ, step_P, keys, start_G)
    start_P = batch.history_start_B[batch.step_user_G[step_P]]
    items_PQ = batch.history_items_H[start_P[:, None] + position_PQ]
    pos_items = batch.pos_items_P[reordered][keep]
    index = PairIndex(batch.step_slot_G[step_P], pos_items, items_PQ)
    return SampledPairs(index, int((~keep).sum()) * num_negatives)


def pair_loss(margin_PQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss_sum, num_pairs): summed ``-log sigmoid(margin)`` in float32."""
    num_pairs = torch.tensor(margin_PQ.numel(), device=margin_PQ.device)
    return -F.logsigmoid(margin_PQ.float()).sum(), num_pairs


def _unwrap(model: nn.Module) -> nn.Module:
    """Returns the DreamModel inside a DDP (or compiled) wrapper."""
    return getattr(model, "module", model)


def bpr_loss(
    model: nn.Module, batch: Batch, generator: torch.Generator, num_negatives: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss_sum, num_pairs) of plain BPR over every step of the batch.

    ``model`` is the DreamModel or its DDP wrapper; it is called once.
    """
    num_items = _unwrap(model).num_items
    pairs = sample_catalog_pairs(batch, num_items, num_negatives, generator)
    return pair_loss(model(batch, pairs.index))


def reorder_bpr_loss(
    model: nn.Module, batch: Batch, generator: torch.Generator, num_negatives: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss_sum, num_pairs) of reorder BPR over every step of the batch.

    Pairs without an allowed negative are left out of both sums
    (``sample_reorder_pairs`` counts them).
    """
    pairs = sample_reorder_pairs(batch, num_negatives, generator)
    return pair_loss(model(batch, pairs.index))


LOSSES = {"bpr": bpr_loss, "reorder": reorder_bpr_loss}
"""``cfg.train.loss`` -> loss function."""
