"""Baselines on hand-made users, and on TaFeng against the README's reference figures.

The TaFeng test reads ../shared/data/tafeng/*.json directly (item i becomes dense
index i + 1) and is skipped when that folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dream_dist import baselines
from dream_dist.baselines import (
    Baskets,
    TifuKnn,
    build_baselines,
    gp_topfreq,
    item_counts,
    p_topfreq,
    popularity_ranking,
    tifu_weights,
)
from dream_dist.config import EvalConfig
from dream_dist.data.shards import UserSequence
from dream_dist.metrics import finalize, metric_sums

TAFENG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tafeng"

# keyset_0 test users, K=10: (Recall, NDCG) from the table in TAFENG / README.md
REFERENCE = {
    "g_topfreq": (0.0787, 0.0824),
    "p_topfreq": (0.1013, 0.0908),
    "gp_topfreq": (0.1136, 0.0960),
    "tifu_knn": (0.1174, 0.0980),
}


def _baskets(*users: list[list[int]]) -> Baskets:
    seqs = [
        UserSequence(
            u,
            str(u),
            np.array(sum(b, []), np.int32),
            np.array([len(x) for x in b], np.int32),
        )
        for u, b in enumerate(users)
    ]
    return Baskets.from_sequences(seqs)


def test_topfreq_orders_by_count_then_first_purchase_and_fills():
    """Items 1 and 2 are bought twice (1 first), 3 and 4 once (3 first)."""
    baskets = _baskets([[3, 1], [1, 2], [2, 4]], [[5]])
    assert p_topfreq(baskets, 6).tolist() == [[1, 2, 3, 4, 0, 0], [5, 0, 0, 0, 0, 0]]

    counts_I = item_counts(baskets, num_items=7)
    assert counts_I.tolist() == [0, 2, 2, 1, 1, 1, 0, 0]
    ranking = popularity_ranking(counts_I)
    assert ranking.tolist() == [1, 2, 3, 4, 5]
    assert gp_topfreq(ranking, baskets, 6).tolist() == [
        [1, 2, 3, 4, 5, 0],
        [5, 1, 2, 3, 4, 0],
    ]


def test_tifu_weights_follow_the_grouping():
    """3 baskets (fewer than 7): one group each. 9 baskets: groups of 1,1,1,1,1,2,2."""
    baskets = _baskets([[1], [2], [3]], [[i] for i in range(1, 10)])
    weights = tifu_weights(baskets, within_decay=0.9, group_decay=0.7, group_size=7)
    short = [0.9**2 * 0.7**6 / 3, 0.9 * 0.7**5 / 3, 0.7**4 / 3]
    long = [0.9 ** (8 - t) * 0.7 ** (6 - t) / 7 for t in range(5)]
    long += [0.9**3 * 0.7 / 2 / 7, 0.9**2 * 0.7 / 2 / 7, 0.9 / 2 / 7, 1 / 2 / 7]
    assert weights.tolist() == pytest.approx(short + long)


def test_tifu_knn_mixes_the_user_with_the_nearest_neighbour():
    """Pool {1} and {2, 3}: the user {2} is nearer the second (c, not c * 2**0.5)."""
    cfg = EvalConfig(tifu_k=1, tifu_alpha=0.7)
    tifu = TifuKnn(_baskets([[1]], [[2, 3]]), num_items=4, cfg=cfg)
    user = _baskets([[2]])
    scores = tifu.scores(user)[0]
    unit = 0.7**6
    assert scores.tolist() == pytest.approx([0, 0, unit, 0.3 * unit, 0])
    assert tifu(user, 4).tolist() == [[2, 3, 0, 0]]


def test_tifu_knn_lists_do_not_depend_on_how_users_are_grouped(monkeypatch):
    """Random users scored at once, then one at a time (a tiny memory bound)."""
    rng = np.random.default_rng(0)

    def random_users(n: int) -> Baskets:
        return _baskets(
            *[
                [
                    rng.choice(np.arange(1, 31), 3, replace=False).tolist()
                    for _ in range(rng.integers(1, 10))
                ]
                for _ in range(n)
            ]
        )

    tifu = TifuKnn(random_users(40), num_items=30, cfg=EvalConfig(tifu_k=5))
    users = random_users(12)
    together = tifu(users, 8)
    monkeypatch.setattr(baselines, "MAX_POOL_ENTRIES", 40)
    assert torch.equal(tifu(users, 8), together)
    assert (together[:, 0] > 0).all()


def _tafeng_users(history: dict, users: list[str]) -> list[UserSequence]:
    seqs = []
    for user in users:
        baskets = [np.asarray(b, np.int32) + 1 for b in history[user][1:-1]]
        sizes = np.array([len(b) for b in baskets], np.int32)
        seqs.append(UserSequence(0, user, np.concatenate(baskets), sizes))
    return seqs


@pytest.mark.slow
@pytest.mark.skipif(not TAFENG.is_dir(), reason=f"TaFeng data not found at {TAFENG}")
def test_tafeng_keyset_0_matches_the_reference_figures():
    """All four baselines within 0.003 of the README's Recall@10 and NDCG@10."""
    history = json.loads((TAFENG / "tafeng_history.json").read_text())
    future = json.loads((TAFENG / "tafeng_future.json").read_text())
    keyset = json.loads((TAFENG / "keyset_0.json").read_text())
    test_users = keyset["test"]

    # popularity over every user's history, neighbours from train users
    counts_I = item_counts(
        Baskets.from_sequences(_tafeng_users(history, list(history))),
        keyset["item_num"],
    )
    pool = Baskets.from_sequences(_tafeng_users(history, keyset["train"]))
    baselines = build_baselines(list(REFERENCE), counts_I, pool, EvalConfig())

    test_seqs = _tafeng_users(history, test_users)
    inputs = Baskets.from_sequences(test_seqs)
    targets = [np.asarray(future[u][1]) + 1 for u in test_users]
    histories = [s.items for s in test_seqs]
    for name, (recall, ndcg) in REFERENCE.items():
        topk_BK = baselines[name](inputs, 10)
        metrics = finalize(metric_sums(topk_BK, targets, histories, [10]))
        assert metrics["recall@10"] == pytest.approx(recall, abs=0.003), name
        assert metrics["ndcg@10"] == pytest.approx(ndcg, abs=0.003), name
