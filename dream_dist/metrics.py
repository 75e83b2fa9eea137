"""Next-basket metrics as sums over users, divided only at the very end.

Definitions (as in the Reality Check protocol, ``../shared/data/tafeng/README.md``):

- Recall@K: hits among the top K / size of the target basket.
- NDCG@K: binary gains; the ideal DCG sums over every target item, not over
  min(K, target size).
- PHR@K: share of users with at least one hit.
- Repeat items of a user are the items anywhere in their input baskets; explore
  items are the rest of the target. Recall_rep@K (hits among repeat target items /
  number of repeat target items) and PHR_rep@K average over users whose target
  holds a repeat item; likewise ``_expl`` over users whose target holds an
  explore item.

A top-K list is an int tensor ``topk_BK`` (B users, K columns, best first); a
value <= 0 is an empty slot and never a hit, and a list may be shorter than K
(a catalog smaller than K), so K larger than the number of scored items works.

NOTE: every sum is an int64. Counts are exact; a per-user fraction (recall, gain)
is rounded once to a multiple of 2**-32 before it is added. Integer addition is
associative, so sums of any partition of the users (batches, ranks) add up to the
same figures bit for bit, and the rounding moves a mean by under 1e-9.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCALE = 2**32
"""Fixed-point unit of the fractional sums."""

_PER_K = ("recall", "ndcg", "phr", "recall_rep", "phr_rep", "recall_expl", "phr_expl")
_COUNTS = ("users", "users_rep", "users_expl")
_DENOMINATOR = {"rep": "users_rep", "expl": "users_expl"}
_FRACTIONAL = ("recall", "ndcg")

ItemSets = Sequence[np.ndarray | torch.Tensor | Sequence[int]]
"""One array of item indices per user (duplicates allowed)."""


def sum_names(ks: Sequence[int]) -> list[str]:
    """Returns the names of the sums for cut-offs ``ks``, in a fixed order."""
    return list(_COUNTS) + [f"{name}@{k}" for k in sorted(set(ks)) for name in _PER_K]


def zero_sums(ks: Sequence[int]) -> dict[str, int]:
    """Returns all-zero sums for ``ks`` (what a rank without users contributes)."""
    return dict.fromkeys(sum_names(ks), 0)


def top_k(scores_BI: torch.Tensor, k: int) -> torch.Tensor:
    """Returns the indices of the ``k`` best columns of each row, best first.

    Column 0 (padding) is never returned; with fewer than ``k`` scored items the
    result has as many columns as there are items. Columns scored -inf sort last.
    """
    num_items = scores_BI.shape[1] - 1
    _, index_BK = scores_BI[:, 1:].topk(min(k, num_items), dim=1)
    return index_BK + 1


def _cpu_int64(items: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Returns ``items`` as an int64 CPU tensor (from any device, array or list)."""
    if isinstance(items, torch.Tensor):
        return items.detach().to("cpu", torch.int64)
    return torch.as_tensor(np.asarray(items), dtype=torch.int64)


def _flatten(item_sets: ItemSets) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (items, row of each item) of ragged per-user item sets, as int64."""
    arrays = [_cpu_int64(items).reshape(-1) for items in item_sets]
    sizes = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(arrays)), sizes)
    items = torch.cat(arrays) if arrays else torch.zeros(0, dtype=torch.int64)
    return items, rows


def _keys(items: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Returns sorted distinct ``row * width + item`` keys."""
    return torch.unique(rows * width + items)


def _fixed(values_B: torch.Tensor) -> int:
    """Returns the sum of per-user fractions in units of 1 / SCALE."""
    return int(torch.round(values_B.double() * SCALE).to(torch.int64).sum())


def metric_sums(
    topk_BK: torch.Tensor,
    targets: ItemSets,
    histories: ItemSets,
    ks: Sequence[int],
) -> dict[str, int]:
    """Returns the metric sums of one batch of users (see ``sum_names``).

    ``targets[b]`` is user b's target basket, ``histories[b]`` every item of
    their input baskets. Raises ValueError on a length mismatch or an empty target.
    """
    num_users = topk_BK.shape[0]
    if not len(targets) == len(histories) == num_users:
        raise ValueError(
            f"{num_users} top-K rows, {len(targets)} targets, "
            f"{len(histories)} histories"
        )
    topk_BK = topk_BK.detach().to("cpu", torch.int64)
    hits = _Hits.of(topk_BK, targets, histories)

    sums = {
        "users": num_users,
        "users_rep": int((hits.rep_size_B > 0).sum()),
        "users_expl": int((hits.expl_size_B > 0).sum()),
    }
    for k in sorted(set(ks)):
        sums |= _sums_at(k, hits)
    return sums


@dataclass
class _Hits:
    """Which top-K slots hit the target, and the target's repeat/explore sizes."""

    hit_BK: torch.Tensor
    rep_hit_BK: torch.Tensor
    """Hits on items the user bought before."""
    size_B: torch.Tensor
    rep_size_B: torch.Tensor
    expl_size_B: torch.Tensor

    @classmethod
    def of(cls, topk_BK: torch.Tensor, targets: ItemSets, histories: ItemSets) -> _Hits:
        """Returns the hits of int64 CPU lists; raises ValueError on an empty target."""
        num_users = topk_BK.shape[0]

        # distinct (user, item) keys of targets and histories
        target_items, target_rows = _flatten(targets)
        history_items, history_rows = _flatten(histories)
        width = 1 + max(_max(t) for t in (topk_BK, target_items, history_items))
        target_keys = _keys(target_items, target_rows, width)
        history_keys = _keys(history_items, history_rows, width)

        # target sizes, split into repeat and explore items
        size_B = torch.bincount(target_keys // width, minlength=num_users)
        if num_users and int(size_B.min()) == 0:
            raise ValueError(f"user in row {int(size_B.argmin())} has an empty target")
        is_repeat = torch.isin(target_keys, history_keys)
        rep_size_B = torch.bincount(
            target_keys[is_repeat] // width, minlength=num_users
        )

        # hits of every top-K slot
        slot_keys_BK = torch.arange(num_users).unsqueeze(1) * width + topk_BK
        hit_BK = torch.isin(slot_keys_BK, target_keys) & (topk_BK > 0)
        rep_hit_BK = hit_BK & torch.isin(slot_keys_BK, history_keys)
        return cls(hit_BK, rep_hit_BK, size_B, rep_size_B, size_B - rep_size_B)


def _max(values: torch.Tensor) -> int:
    """Returns the largest value, 0 for an empty tensor."""
    return int(values.max()) if values.numel() else 0


def _ideal_dcg(size_B: torch.Tensor) -> torch.Tensor:
    """Returns the DCG of a perfect ranking of ``size_B`` target items."""
    longest = int(size_B.max()) if size_B.numel() else 0
    discount = 1.0 / torch.log2(torch.arange(longest, dtype=torch.float64) + 2.0)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), discount.cumsum(0)])
    return cumulative[size_B]


def _sums_at(k: int, hits: _Hits) -> dict[str, int]:
    """Returns the sums at cut-off ``k`` from the hits of the first k slots."""
    hit_BK, rep_hit_BK = hits.hit_BK[:, :k], hits.rep_hit_BK[:, :k]
    size_B, rep_size_B, expl_size_B = hits.size_B, hits.rep_size_B, hits.expl_size_B
    discount_K = 1.0 / torch.log2(
        torch.arange(hit_BK.shape[1], dtype=torch.float64) + 2
    )
    hits_B = hit_BK.sum(1).double()
    rep_hits_B = rep_hit_BK.sum(1).double()
    expl_hits_B = hits_B - rep_hits_B
    dcg_B = (hit_BK.double() * discount_K).sum(1)

    # a breakdown counts only users whose target holds such items
    has_rep, has_expl = rep_size_B > 0, expl_size_B > 0
    return {
        f"recall@{k}": _fixed(hits_B / size_B),
        f"ndcg@{k}": _fixed(dcg_B / _ideal_dcg(size_B)),
        f"phr@{k}": int((hits_B > 0).sum()),
        f"recall_rep@{k}": _fixed(rep_hits_B[has_rep] / rep_size_B[has_rep]),
        f"phr_rep@{k}": int((rep_hits_B > 0).sum()),
        f"recall_expl@{k}": _fixed(expl_hits_B[has_expl] / expl_size_B[has_expl]),
        f"phr_expl@{k}": int((expl_hits_B > 0).sum()),
    }


def reduce(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Returns the key-wise sum of metric sums (batches, or ranks' totals)."""
    total: dict[str, int] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return total


def sums_to_tensor(sums: dict[str, int], ks: Sequence[int]) -> torch.Tensor:
    """Returns the sums as an int64 vector in ``sum_names(ks)`` order (all_reduce)."""
    values = [sums.get(name, 0) for name in sum_names(ks)]
    return torch.tensor(values, dtype=torch.int64)


def sums_from_tensor(values: torch.Tensor, ks: Sequence[int]) -> dict[str, int]:
    """Returns the sums of a ``sums_to_tensor`` vector."""
    return dict(zip(sum_names(ks), values.tolist(), strict=True))


def finalize(sums: dict[str, int]) -> dict[str, float]:
    """Returns the metrics: each sum divided by its number of users.

    A metric over zero users (an empty breakdown, or no users at all) is NaN.
    The user counts are returned as they are.
    """
    metrics: dict[str, float] = {name: sums[name] for name in _COUNTS if name in sums}
    for name, value in sums.items():
        if name in _COUNTS:
            continue
        base = name.split("@")[0]
        users = sums[_DENOMINATOR.get(base.rpartition("_")[2], "users")]
        scale = SCALE if base.split("_")[0] in _FRACTIONAL else 1
        metrics[name] = value / scale / users if users else math.nan
    return metrics
