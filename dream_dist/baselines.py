"""Baselines every DREAM figure stands beside: the TopFreq family and TIFU-KNN.

Each baseline maps a batch of users' input baskets to top-K lists (``topk_BK``,
dense item indices, best first, 0 for an empty slot), which the metric code in
``dream_dist.metrics`` scores like the model's. Legend: B = users in the batch,
K = list length, I = catalog size + 1 (column 0 is padding), N = neighbour pool.

- G-TopFreq: the items bought most often over all users' input baskets.
- P-TopFreq: the user's own items by purchase count; ties go to the item bought
  first (earliest basket, then position in the basket), as in the Reality Check
  reference code. A user with fewer than K distinct items gets empty slots.
- GP-TopFreq: P-TopFreq, then filled with G-TopFreq's items not already listed.
- TIFU-KNN (Hu et al., SIGIR 2020), as the authors' implementation computes it:
  a basket's vector is its items, weighted ``within_decay ** (baskets after it)``;
  the baskets are cut into ``group_size`` groups in time order (the later groups
  one basket longer when the count does not divide; one group per basket when a
  user has fewer baskets than ``group_size``); a group's vector is the mean of its
  baskets'; the user vector is ``sum_g group_decay ** (group_size - 1 - g) * group_g``
  over the number of groups. Neighbours are the ``k`` train users nearest in
  Euclidean distance; the prediction is ``alpha * user + (1 - alpha) * mean of
  the neighbours``. Items scored 0 are left out.

NOTE: on TaFeng keyset_0 this reading of TIFU-KNN gives the reference figures of
``../shared/data/tafeng/README.md`` (Recall@10 0.1168 against 0.1174); readings
of the paper's prose (decay within each group, groups of ``group_size`` baskets,
or cosine neighbours) land 0.004 to 0.011 higher, outside the 0.003 tolerance.

Nothing here reads files or knows about ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dream_dist.config import EvalConfig
from dream_dist.data.shards import UserSequence

Recommender = Callable[["Baskets", int], torch.Tensor]
"""Maps users' input baskets and K to ``topk_BK``."""

MAX_POOL_ENTRIES = 2**25
"""TIFU-KNN scores users in groups of at most this / pool size (memory bound)."""


@dataclass
class Baskets:
    """Input baskets of a batch of users, one entry per purchase, oldest first."""

    items: torch.Tensor
    """int64 dense item index of each purchase."""
    rows: torch.Tensor
    """int64 row (0..B-1) of the user who made each purchase."""
    basket: torch.Tensor
    """int64 index of each purchase's basket within its user, 0 = oldest."""
    num_baskets_B: torch.Tensor
    """int64 number of input baskets of each user."""

    @property
    def num_users(self) -> int:
        return len(self.num_baskets_B)

    @classmethod
    def from_sequences(cls, seqs: Sequence[UserSequence]) -> Baskets:
        """Returns the baskets of ``seqs`` (every basket of each is taken as input)."""
        sizes = [torch.as_tensor(s.sizes, dtype=torch.int64) for s in seqs]
        num_baskets_B = torch.tensor([len(s) for s in sizes], dtype=torch.int64)
        if not seqs:
            empty = torch.zeros(0, dtype=torch.int64)
            return cls(empty, empty, empty, num_baskets_B)
        sizes_all = torch.cat(sizes)
        basket_rows = torch.repeat_interleave(torch.arange(len(seqs)), num_baskets_B)
        basket_index = torch.cat([torch.arange(len(s)) for s in sizes])
        items = torch.cat([torch.as_tensor(s.items, dtype=torch.int64) for s in seqs])
        return cls(
            items=items,
            rows=torch.repeat_interleave(basket_rows, sizes_all),
            basket=torch.repeat_interleave(basket_index, sizes_all),
            num_baskets_B=num_baskets_B,
        )


def slice_users(baskets: Baskets, start: int, stop: int) -> Baskets:
    """Returns the baskets of users ``start`` to ``stop`` (rows renumbered from 0)."""
    lo, hi = torch.searchsorted(baskets.rows, torch.tensor([start, stop])).tolist()
    return Baskets(
        items=baskets.items[lo:hi],
        rows=baskets.rows[lo:hi] - start,
        basket=baskets.basket[lo:hi],
        num_baskets_B=baskets.num_baskets_B[start:stop],
    )


def _max(values: torch.Tensor) -> int:
    """Returns the largest value of a tensor, 0 when it is empty."""
    return int(values.max()) if values.numel() else 0


def item_counts(baskets: Baskets, num_items: int) -> torch.Tensor:
    """Returns int64 purchase counts of items 0..num_items (index 0 stays 0)."""
    counts_I = torch.bincount(baskets.items, minlength=num_items + 1)
    counts_I[0] = 0
    return counts_I


def popularity_ranking(counts_I: torch.Tensor) -> torch.Tensor:
    """Returns the items bought at least once, most bought first (ties: lower index)."""
    order = torch.sort(-counts_I, stable=True).indices
    return order[counts_I[order] > 0]


def _fill_rows(
    rows: torch.Tensor, values: torch.Tensor, num_users: int, k: int
) -> torch.Tensor:
    """Returns ``topk_BK``: each row's values in the given order, cut at k, 0-padded.

    ``rows`` must be sorted (each row's values contiguous and in rank order).
    """
    counts_B = torch.bincount(rows, minlength=num_users)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    rank = torch.arange(len(rows)) - starts_B[rows]
    keep = rank < k
    topk_BK = torch.zeros(num_users, k, dtype=torch.int64)
    topk_BK[rows[keep], rank[keep]] = values[keep]
    return topk_BK


def g_topfreq(ranking: torch.Tensor, baskets: Baskets, k: int) -> torch.Tensor:
    """Returns the same top-K popular items for every user of ``baskets``."""
    top_K = torch.zeros(k, dtype=torch.int64)
    top_K[: min(k, len(ranking))] = ranking[:k]
    return top_K.expand(baskets.num_users, k).clone()


def p_topfreq(baskets: Baskets, k: int) -> torch.Tensor:
    """Returns each user's own items by purchase count (ties: bought first)."""
    if not len(baskets.items):
        return torch.zeros(baskets.num_users, k, dtype=torch.int64)

    # distinct (user, item) pairs, their counts and first purchase position
    width = int(baskets.items.max()) + 1
    pairs, inverse, counts = torch.unique(
        baskets.rows * width + baskets.items, return_inverse=True, return_counts=True
    )
    position = torch.arange(len(baskets.items))
    first = torch.full_like(pairs, len(position)).scatter_reduce(
        0, inverse, position, reduce="amin"
    )

    # order by user, then count (descending), then first purchase
    rows = pairs // width
    num_positions = len(position) + 1
    most = int(counts.max())
    key = (rows * (most + 1) + (most - counts)) * num_positions + first
    order = torch.argsort(key)
    return _fill_rows(rows[order], (pairs % width)[order], baskets.num_users, k)


def gp_topfreq(ranking: torch.Tensor, baskets: Baskets, k: int) -> torch.Tensor:
    """Returns P-TopFreq's lists with empty slots filled by G-TopFreq's items."""
    personal_BK = p_topfreq(baskets, k)
    popular_BG = g_topfreq(ranking[: 2 * k], baskets, 2 * k)

    # popular items the user's list already holds go last, then empty slots
    width = max(_max(personal_BK), _max(popular_BG)) + 1
    row_keys_B1 = torch.arange(baskets.num_users).unsqueeze(1) * width
    listed = torch.isin(row_keys_B1 + popular_BG, row_keys_B1 + personal_BK)
    merged = torch.cat([personal_BK, popular_BG.masked_fill(listed, 0)], dim=1)
    order = torch.sort((merged == 0).to(torch.int8), dim=1, stable=True).indices
    return merged.gather(1, order)[:, :k]


def tifu_weights(
    baskets: Baskets, within_decay: float, group_decay: float, group_size: int
) -> torch.Tensor:
    """Returns each purchase's float64 weight in its user's TIFU-KNN vector."""
    n = baskets.num_baskets_B[baskets.rows]
    t, m = baskets.basket, group_size

    # groups in time order; the last (n % m) groups hold one basket more
    few = n < m
    base = torch.clamp(n // m, min=1)
    cut = (m - n % m) * base
    late = t >= cut
    group = torch.where(late, (m - n % m) + (t - cut) // (base + 1), t // base)
    group_len = base + late.to(torch.int64)
    group = torch.where(few, t, group)
    group_len = torch.where(few, 1, group_len)
    num_groups = torch.where(few, n, m)

    within = torch.pow(within_decay, (n - 1 - t).double())
    across = torch.pow(group_decay, (m - 1 - group).double())
    return within * across / group_len / num_groups


def tifu_vectors(
    baskets: Baskets,
    num_items: int,
    within_decay: float,
    group_decay: float,
    group_size: int,
) -> torch.Tensor:
    """Returns the float32 sparse COO user vectors (B, num_items + 1) of TIFU-KNN."""
    weights = tifu_weights(baskets, within_decay, group_decay, group_size)

    # an item listed twice in one basket counts once
    width = num_items + 1
    max_baskets = _max(baskets.num_baskets_B) + 1
    key = (baskets.rows * max_baskets + baskets.basket) * width + baskets.items
    distinct, inverse = torch.unique(key, return_inverse=True)
    first = torch.full_like(distinct, len(key)).scatter_reduce(
        0, inverse, torch.arange(len(key)), reduce="amin"
    )

    index = torch.stack([baskets.rows[first], baskets.items[first]])
    size = (baskets.num_users, width)
    vectors = torch.sparse_coo_tensor(
        index, weights[first].float(), size, check_invariants=False
    )
    return vectors.coalesce()


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    """Returns a sparse COO matrix as CSR (fast products), without the beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        return matrix.to_sparse_csr()


class TifuKnn:
    """TIFU-KNN with its neighbour pool fixed at construction (train users)."""

    def __init__(self, pool: Baskets, num_items: int, cfg: EvalConfig) -> None:
        self.num_items, self.cfg = num_items, cfg
        pool_NI = self._vectors(pool)
        self.pool_NI = _csr(pool_NI)
        self.pool_IN = _csr(pool_NI.t().coalesce())
        self.norms_N = torch.sparse.sum(pool_NI * pool_NI, dim=1).to_dense()

    def _vectors(self, baskets: Baskets) -> torch.Tensor:
        cfg = self.cfg
        return tifu_vectors(
            baskets,
            self.num_items,
            cfg.tifu_within_decay,
            cfg.tifu_group_decay,
            cfg.tifu_group_size,
        )

    def scores(self, baskets: Baskets) -> torch.Tensor:
        """Returns float32 ``scores_BI`` of the users of ``baskets``."""
        user_BI = self._vectors(baskets).to_dense()
        num_neighbours = min(self.cfg.tifu_k, len(self.norms_N))
        if num_neighbours == 0:
            return user_BI

        # nearest by Euclidean distance: largest 2 u.v - |v|^2
        dots_NB = self.pool_NI @ user_BI.t()
        closeness_NB = 2 * dots_NB - self.norms_N.unsqueeze(1)
        neighbours_KB = closeness_NB.topk(num_neighbours, dim=0).indices

        # mean of the neighbours' vectors
        weights_NB = torch.zeros_like(closeness_NB)
        weights_NB.scatter_(0, neighbours_KB, 1.0 / num_neighbours)
        mean_IB = self.pool_IN @ weights_NB
        alpha = self.cfg.tifu_alpha
        return alpha * user_BI + (1 - alpha) * mean_IB.t()

    def __call__(self, baskets: Baskets, k: int) -> torch.Tensor:
        """Returns ``topk_BK`` of the users of ``baskets``; unscored items left out.

        Users go through in groups small enough that a neighbour pool x group
        matrix stays near 2**25 entries.
        """
        group = max(1, MAX_POOL_ENTRIES // max(1, len(self.norms_N)))
        return torch.cat(
            [
                self._top_k(slice_users(baskets, start, start + group), k)
                for start in range(0, baskets.num_users, group)
            ]
            or [torch.zeros(0, k, dtype=torch.int64)]
        )

    def _top_k(self, baskets: Baskets, k: int) -> torch.Tensor:
        scores_BI = self.scores(baskets)
        scores_BI[:, 0] = 0
        values_BK, index_BK = scores_BI.topk(min(k, self.num_items), dim=1)
        topk_BK = torch.zeros(baskets.num_users, k, dtype=torch.int64)
        topk_BK[:, : index_BK.shape[1]] = index_BK.masked_fill(values_BK <= 0, 0)
        return topk_BK


def build_baselines(
    names: Sequence[str],
    counts_I: torch.Tensor,
    pool: Baskets,
    cfg: EvalConfig,
) -> dict[str, Recommender]:
    """Returns the named baselines, from popularity counts and the neighbour pool.

    Raises ValueError for an unknown name.
    """
    ranking = popularity_ranking(counts_I)
    makers: dict[str, Callable[[], Recommender]] = {
        "g_topfreq": lambda: lambda b, k: g_topfreq(ranking, b, k),
        "p_topfreq": lambda: p_topfreq,
        "gp_topfreq": lambda: lambda b, k: gp_topfreq(ranking, b, k),
        "tifu_knn": lambda: TifuKnn(pool, len(counts_I) - 1, cfg),
    }
    unknown = [name for name in names if name not in makers]
    if unknown:
        raise ValueError(f"unknown baselines {unknown} (known: {list(makers)})")
    return {name: makers[name]() for name in names}


def input_baskets(seqs: Sequence[UserSequence]) -> Baskets:
    """Returns the input baskets of ``seqs``: every basket but the last (the target)."""
    return Baskets.from_sequences([drop_target(s) for s in seqs])


def drop_target(seq: UserSequence) -> UserSequence:
    """Returns ``seq`` without its last basket."""
    num_input = int(np.sum(seq.sizes[:-1]))
    reordered = None if seq.reordered is None else seq.reordered[:num_input]
    return UserSequence(
        seq.user, seq.user_id, seq.items[:num_input], seq.sizes[:-1], reordered
    )
