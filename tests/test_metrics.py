"""Metric sums against hand-computed cases and a per-user loop written from the
definitions in ../shared/data/tafeng/README.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dream_dist.metrics import (
    finalize,
    metric_sums,
    reduce,
    sums_from_tensor,
    sums_to_tensor,
    top_k,
    zero_sums,
)

LOG3 = math.log2(3)


def test_hand_computed_case_with_a_short_list():
    """User a: target {1,2,3}, history {1,5}, list [2,5,1]: hits at ranks 1 and 3.
    User b: target {4}, history {4}, list [7,8] and an empty slot: no hit."""
    topk_BK = torch.tensor([[2, 5, 1], [7, 8, 0]])
    targets = [np.array([1, 2, 3]), np.array([4])]
    histories = [np.array([1, 5, 5]), np.array([4])]
    metrics = finalize(metric_sums(topk_BK, targets, histories, [1, 3]))

    idcg_a = 1 + 1 / LOG3 + 1 / 2
    expected = {
        "users": 2,
        "users_rep": 2,
        "users_expl": 1,
        # K=3: user a recalls 2 of 3 (gains at ranks 1 and 3), user b nothing
        "recall@3": (2 / 3) / 2,
        "ndcg@3": ((1 + 1 / 2) / idcg_a) / 2,
        "phr@3": 1 / 2,
        "recall_rep@3": (1 / 1 + 0) / 2,
        "phr_rep@3": 1 / 2,
        "recall_expl@3": (1 / 2) / 1,
        "phr_expl@3": 1.0,
        # K=1: only item 2 (an explore item of a) is seen; ideal DCG still over 3
        "recall@1": (1 / 3) / 2,
        "ndcg@1": (1 / idcg_a) / 2,
        "phr@1": 1 / 2,
        "recall_rep@1": 0.0,
        "phr_rep@1": 0.0,
        "recall_expl@1": 1 / 2,
        "phr_expl@1": 1.0,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_empty_breakdowns_are_nan_with_zero_users():
    """No target item was ever bought before: the repeat breakdown has no users."""
    topk_BK = torch.tensor([[3, 1], [2, 9]])
    targets = [np.array([3]), np.array([5, 6])]
    histories = [np.array([1]), np.array([], dtype=np.int64)]
    metrics = finalize(metric_sums(topk_BK, targets, histories, [2]))

    assert metrics["users_rep"] == 0 and metrics["users_expl"] == 2
    assert math.isnan(metrics["recall_rep@2"]) and math.isnan(metrics["phr_rep@2"])
    assert metrics["recall_expl@2"] == pytest.approx((1 + 0) / 2)
    assert metrics["recall@2"] == metrics["recall_expl@2"]
    assert all(math.isnan(v) for k, v in finalize(zero_sums([10])).items() if "@" in k)


def test_k_larger_than_the_catalog():
    """Five items and K=20: the list holds every item once and never padding 0."""
    scores_BI = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2]])
    topk_BK = top_k(scores_BI, 20)
    assert topk_BK.tolist() == [[4, 2, 3, 5, 1]]

    metrics = finalize(metric_sums(topk_BK, [np.array([1, 5])], [np.array([2])], [20]))
    assert metrics["recall@20"] == 1.0 and metrics["ndcg@20"] == pytest.approx(
        (1 / math.log2(5) + 1 / math.log2(6)) / (1 + 1 / LOG3)
    )


def _reference(topk, target, history, k):
    """Returns (recall, ndcg, hit, repeat recall or None, explore recall or None)."""
    listed = [i for i in topk[:k] if i > 0]
    truth, seen = set(target), set(history)
    hits = [r for r, i in enumerate(listed) if i in truth]
    idcg = sum(1 / math.log2(r + 2) for r in range(len(truth)))
    ndcg = sum(1 / math.log2(r + 2) for r in hits) / idcg

    def part_recall(part):
        return sum(i in part for i in listed) / len(part) if part else None

    return (
        len(hits) / len(truth),
        ndcg,
        float(bool(hits)),
        part_recall(truth & seen),
        part_recall(truth - seen),
    )


def test_matches_a_per_user_loop_and_adds_up_across_batches():
    """Random lists; two batches reduced equal the whole batch bit for bit."""
    rng = np.random.default_rng(0)
    num_users, num_items, k = 200, 30, 8
    topk_BK = torch.stack(
        [torch.randperm(num_items)[:10] + 1 for _ in range(num_users)]
    )
    targets = [
        rng.choice(num_items, rng.integers(1, 6), replace=False) + 1
        for _ in range(num_users)
    ]
    histories = [
        rng.integers(1, num_items + 1, rng.integers(0, 12)) for _ in range(num_users)
    ]

    whole = metric_sums(topk_BK, targets, histories, [k])
    halves = [
        metric_sums(topk_BK[s], targets[s], histories[s], [k])
        for s in (slice(0, 77), slice(77, None))
    ]
    assert reduce(halves) == whole
    assert sums_from_tensor(sums_to_tensor(whole, [k]), [k]) == whole

    rows = [
        _reference(topk_BK[u].tolist(), targets[u], histories[u], k)
        for u in range(num_users)
    ]
    metrics = finalize(whole)
    for column, name in enumerate(["recall", "ndcg", "phr"]):
        expected = np.mean([row[column] for row in rows])
        assert metrics[f"{name}@{k}"] == pytest.approx(expected, abs=1e-8)
    for column, name in [(3, "recall_rep"), (4, "recall_expl")]:
        values = [row[column] for row in rows if row[column] is not None]
        assert metrics[f"{name}@{k}"] == pytest.approx(np.mean(values), abs=1e-8)


def test_rejects_an_empty_target():
    with pytest.raises(ValueError, match="row 1"):
        metric_sums(
            torch.tensor([[1], [2]]),
            [np.array([1]), np.array([])],
            [np.array([1]), np.array([2])],
            [1],
        )
