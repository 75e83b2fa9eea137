"""DreamModel and the BPR losses against direct per-user computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dream_dist.config import ModelConfig
from dream_dist.data.batching import collate
from dream_dist.data.shards import UserSequence
from dream_dist.losses import (
    bpr_loss,
    reorder_bpr_loss,
    sample_catalog_pairs,
    sample_reorder_pairs,
)
from dream_dist.model import DreamModel, dropout


def _random_users(
    rng: np.random.Generator,
    num_users: int,
    num_items: int,
    max_baskets: int = 6,
    max_size: int = 5,
) -> list[UserSequence]:
    users = []
    for u in range(num_users):
        sizes = rng.integers(1, max_size + 1, size=rng.integers(2, max_baskets + 1))
        baskets = [
            rng.choice(np.arange(1, num_items + 1), n, replace=False) for n in sizes
        ]
        items = np.concatenate(baskets).astype(np.int32)
        users.append(UserSequence(u, str(u), items, sizes.astype(np.int32)))
    return users


def _model(num_items: int, sparse: bool = False, **overrides) -> DreamModel:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 8, "num_layers": 2, "dropout": 0.0, **overrides})
    return DreamModel(num_items, cfg, sparse=sparse)


USERS = _random_users(np.random.default_rng(0), 5, 20)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core machine, two threads slow tiny ops 30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("sparse", [False, True])
def test_padding_row_gets_no_gradient(sparse):
    model = _model(20, sparse=sparse)
    batch = collate(USERS)
    loss_sum, _ = bpr_loss(model, batch, torch.Generator().manual_seed(0), 3)
    scores = model.score(model.user_vectors(batch))
    (loss_sum + scores[:, 1:].sum()).backward()

    grad = model.item_embedding.weight.grad.to_dense()
    assert torch.all(grad[0] == 0)
    assert grad[1:].abs().sum() > 0
    assert torch.all(model.item_embedding.weight[0] == 0)


def test_scores_use_the_input_embedding_table():
    model = _model(20)
    h_BD = torch.randn(3, 8)
    scores = model.score(h_BD)
    weight = model.item_embedding.weight
    torch.testing.assert_close(scores[:, 1:], h_BD @ weight[1:].T)
    assert torch.all(scores[:, 0] == -torch.inf)
    # one item table: the embedding and the RNN are all the parameters there are
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in names if not n.startswith("rnn.")} == {"item_embedding.weight"}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pooling_equals_each_basket_pooled_on_its_own(pooling, sparse):
    model = _model(20, sparse=sparse, pooling=pooling)
    weight = model.item_embedding.weight
    expected = [
        weight[torch.from_numpy(b.astype(np.int64))]
        for seq in USERS
        for b in seq.baskets()
    ]
    reduce = (lambda e: e.max(0).values) if pooling == "max" else (lambda e: e.mean(0))
    expected = torch.stack([reduce(e) for e in expected])
    batch = collate(USERS)
    basket_KD = model.pool_baskets(batch, *model.item_rows(batch.items_M))
    torch.testing.assert_close(basket_KD, expected)


def _per_user_hidden(model: DreamModel, seq: UserSequence) -> torch.Tensor:
    """Returns the hidden states of one user, one basket embedded at a time."""
    weight = model.item_embedding.weight
    pool = (
        (lambda e: e.max(0).values)
        if model.cfg.pooling == "max"
        else (lambda e: e.mean(0))
    )
    baskets = [
        pool(weight[torch.from_numpy(b.astype(np.int64))]) for b in seq.baskets()
    ]
    out, _ = model.rnn(torch.stack(baskets)[None])
    return out[0]


@pytest.mark.parametrize("rnn_type", ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"])
def test_hidden_equals_a_per_user_loop(rnn_type):
    model = _model(20, rnn_type=rnn_type).eval()
    batch = collate(USERS, drop_last_basket=True)
    hidden_BTD = model(batch)
    h_BD = model.user_vectors(batch)
    for b, seq in enumerate(USERS):
        held = UserSequence(
            seq.user, seq.user_id, seq.items[: -seq.sizes[-1]], seq.sizes[:-1]
        )
        expected = _per_user_hidden(model, held)
        torch.testing.assert_close(hidden_BTD[b, : len(expected)], expected)
        torch.testing.assert_close(h_BD[b], expected[-1])


def _next_baskets(users: list[UserSequence]) -> list[tuple[set, set]]:
    """Returns (items of basket t+1, distinct items of baskets 0..t) for every step."""
    steps = []
    for seq in users:
        baskets = seq.baskets()
        for t in range(len(baskets) - 1):
            steps.append(
                (
                    set(baskets[t + 1].tolist()),
                    set(np.concatenate(baskets[: t + 1]).tolist()),
                )
            )
    return steps


def test_catalog_negatives_are_never_positives_of_their_basket():
    num_items = 9
    users = _random_users(np.random.default_rng(1), 40, num_items, max_size=6)
    batch = collate(users)
    steps = _next_baskets(users)
    pairs = sample_catalog_pairs(batch, num_items, 50, torch.Generator().manual_seed(1))
    assert pairs.num_dropped == 0

    step_P = batch.pos_step_P.tolist()
    for g, negatives in zip(step_P, pairs.index.neg_items_PQ.tolist(), strict=True):
        basket, _ = steps[g]
        assert not basket & set(negatives)
        assert set(negatives) <= set(range(1, num_items + 1))
    # every allowed item turns up: the draw covers the whole allowed set
    allowed = set(range(1, num_items + 1)) - steps[0][0]
    first = pairs.index.neg_items_PQ[batch.pos_step_P == 0].flatten().tolist()
    assert set(first) == allowed


def test_reorder_negatives_come_from_earlier_items_not_in_the_basket():
    users = _random_users(np.random.default_rng(2), 40, 12, max_baskets=8)
    batch = collate(users)
    steps = _next_baskets(users)
    pairs = sample_reorder_pairs(batch, 30, torch.Generator().manual_seed(2))

    step_P = batch.pos_step_P[batch.pos_reordered_P].tolist()
    kept, dropped = [], 0
    for g in step_P:
        basket, earlier = steps[g]
        if earlier - basket:
            kept.append(g)
        else:
            dropped += 1
    assert pairs.num_dropped == dropped * 30
    assert len(kept) == len(pairs.index.pos_items_P) > 0

    seen_all = 0
    for g, negatives in zip(kept, pairs.index.neg_items_PQ.tolist(), strict=True):
        basket, earlier = steps[g]
        assert set(negatives) <= earlier - basket
        seen_all += set(negatives) == earlier - basket
    assert seen_all > len(kept) // 2


def _cyclic_users(num_users: int, num_items: int) -> list[UserSequence]:
    """Users who buy item groups in a fixed cycle: basket t+1 follows from basket t.

    Sequences are longer than the cycle, so later baskets are reorders.
    """
    rng = np.random.default_rng(3)
    groups = np.arange(1, num_items + 1).reshape(-1, 3)
    users = []
    for u in range(num_users):
        start, length = rng.integers(len(groups)), rng.integers(5, 12)
        baskets = [groups[(start + t) % len(groups)] for t in range(length)]
        users.append(
            UserSequence(
                u,
                str(u),
                np.concatenate(baskets).astype(np.int32),
                np.full(length, 3, np.int32),
            )
        )
    return users


@pytest.mark.slow
@pytest.mark.parametrize("loss_fn", [bpr_loss, reorder_bpr_loss])
def test_loss_falls_on_a_learnable_pattern(loss_fn):
    """300 Adam steps on cyclic baskets: the mean loss drops far below log 2."""
    users = _cyclic_users(64, 18)
    batch = collate(users)
    model = _model(18, dim=16, num_layers=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        loss_sum, num_pairs = loss_fn(model, batch, generator, 4)
        loss = loss_sum / num_pairs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[:5]) > 0.6
    assert np.mean(losses[-20:]) < 0.25


@pytest.mark.parametrize("rnn_type", ["RNN_RELU", "LSTM", "GRU"])
def test_bf16_autocast_on_cpu_runs_forward_and_backward(rnn_type):
    model = _model(20, rnn_type=rnn_type, sparse=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, num_pairs = bpr_loss(model, collate(USERS), torch.Generator(), 2)
    loss_sum.backward()
    assert loss_sum.dtype == torch.float32 and torch.isfinite(loss_sum)
    assert num_pairs.item() == 2 * collate(USERS).num_positives
    grads = [p.grad.to_dense() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("sparse", [False, True])
def test_ddp_gradients_equal_the_plain_model(tmp_path, sparse):
    """A one-rank gloo group: DDP(model)(batch, pairs) gives the plain gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
    )
    try:
        plain = _model(20, sparse=sparse)
        wrapped = DistributedDataParallel(_model(20, sparse=sparse))
        batch = collate(USERS)
        for model in (plain, wrapped):
            loss_sum, _ = bpr_loss(model, batch, torch.Generator().manual_seed(4), 2)
            loss_sum.backward()
        for p, q in zip(plain.parameters(), wrapped.module.parameters(), strict=True):
            torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense())
    finally:
        dist.destroy_process_group()


def test_sparse_and_dense_gradients_agree():
    grads = []
    for sparse in (False, True):
        model = _model(20, sparse=sparse)
        loss_sum, _ = bpr_loss(
            model, collate(USERS), torch.Generator().manual_seed(5), 2
        )
        loss_sum.backward()
        grads.append([p.grad.to_dense() for p in model.parameters()])
    for dense, sparse in zip(*grads, strict=True):
        torch.testing.assert_close(dense, sparse)


def test_pair_margins_are_inner_product_differences():
    model = _model(20).eval()
    batch = collate(USERS)
    pairs = sample_catalog_pairs(batch, 20, 3, torch.Generator().manual_seed(6)).index
    margin_PQ = model(batch, pairs)
    hidden_PD = model(batch).reshape(-1, 8)[pairs.slot_P]
    weight = model.item_embedding.weight
    pos_P = (hidden_PD * weight[pairs.pos_items_P]).sum(-1)
    neg_PQ = torch.einsum("pd,pqd->pq", hidden_PD, weight[pairs.neg_items_PQ])
    torch.testing.assert_close(margin_PQ, pos_P[:, None] - neg_PQ)
    loss = -F.logsigmoid(pos_P[:, None] - neg_PQ).sum()
    torch.testing.assert_close(
        bpr_loss(model, batch, torch.Generator().manual_seed(6), 3)[0], loss
    )


def test_cpu_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(7)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows through kept only
    assert dropout(x, 0.3, training=False) is x
