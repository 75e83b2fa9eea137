"""collate and length_buckets, checked against hand-worked tiny users."""

from __future__ import annotations

import numpy as np
import pytest

from dream_dist.data.batching import KEY_SHIFT, collate, length_buckets
from dream_dist.data.shards import UserSequence
from dream_dist.errors import InputError


def _user(user: int, baskets: list[list[int]], reordered=None) -> UserSequence:
    flat = np.array([i for b in baskets for i in b], np.int32)
    sizes = np.array([len(b) for b in baskets], np.int32)
    flags = None if reordered is None else np.array(reordered, np.uint8)
    return UserSequence(user, f"id{user}", flat, sizes, flags)


# a: [1 2] [3 2] [4 1]      b: [5 6] [5]      c: [7] [8 7 9] [7] [2]
USERS = [
    _user(0, [[1, 2], [3, 2], [4, 1]]),
    _user(1, [[5, 6], [5]]),
    _user(2, [[7], [8, 7, 9], [7], [2]]),
]


def _list(tensor) -> list:
    return tensor.tolist()


def test_collate_feeds_every_basket_and_places_it_in_the_grid():
    batch = collate(USERS)
    assert (batch.num_users, batch.max_baskets) == (3, 4)
    assert _list(batch.lengths_B) == [3, 2, 4]
    assert _list(batch.items_M) == [1, 2, 3, 2, 4, 1, 5, 6, 5, 7, 8, 7, 9, 7, 2]
    assert _list(batch.offsets_K) == [0, 2, 4, 6, 8, 9, 10, 13, 14]
    # user * T + t with T = 4
    assert _list(batch.slot_K) == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    assert _list(batch.users_B) == [0, 1, 2]
    assert _list(batch.target_items_C) == []


def test_collate_places_positives_of_basket_t_plus_1_at_hidden_state_t():
    batch = collate(USERS)
    # steps: a t=0,1; b t=0; c t=0,1,2
    assert _list(batch.step_slot_G) == [0, 1, 4, 8, 9, 10]
    assert _list(batch.step_user_G) == [0, 0, 1, 2, 2, 2]
    assert _list(batch.pos_items_P) == [3, 2, 4, 1, 5, 8, 7, 9, 7, 2]
    assert _list(batch.pos_step_P) == [0, 0, 1, 1, 2, 3, 3, 3, 4, 5]
    # without input flags, reordered means bought in an earlier basket
    assert _list(batch.pos_reordered_P) == [0, 1, 0, 1, 1, 0, 1, 0, 1, 0]


def test_collate_exclusion_keys_hold_unique_positives_minus_rank():
    batch = collate(USERS)
    keys = batch.excl_keys_X.numpy()
    step, value = keys >> KEY_SHIFT, keys & ((1 << KEY_SHIFT) - 1)
    # step 0 positives {2, 3} -> {2 - 0, 3 - 1}; step 3 {7, 8, 9} -> {7, 7, 7}
    assert step.tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 4, 5]
    assert value.tolist() == [2, 2, 1, 3, 5, 7, 7, 7, 7, 2]
    assert _list(batch.excl_count_G) == [2, 2, 1, 3, 1, 1]
    assert _list(batch.excl_start_G) == [0, 2, 4, 5, 8, 9]


def test_collate_history_and_repeats_for_reorder_negatives():
    batch = collate(USERS)
    assert _list(batch.history_items_H) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 2]
    assert _list(batch.history_start_B) == [0, 4, 6]
    # distinct items bought up to basket t of each step
    assert _list(batch.prior_count_G) == [2, 3, 2, 1, 3, 3]
    # history positions of basket t+1's repeats: a:{2}->1, {1}->0; b:{5}->0;
    # c: {7}->0 at steps 3 and 4; step 5 basket [2] is new for c
    assert _list(batch.repeat_count_G) == [1, 1, 1, 1, 1, 0]
    keys = batch.repeat_keys_R.numpy()
    assert (keys >> KEY_SHIFT).tolist() == [0, 1, 2, 3, 4]
    assert (keys & ((1 << KEY_SHIFT) - 1)).tolist() == [1, 0, 0, 0, 0]


def test_collate_drop_last_basket_makes_it_the_target_and_not_input():
    full, held = collate(USERS), collate(USERS, drop_last_basket=True)
    assert _list(held.lengths_B) == [2, 1, 3]
    assert held.max_baskets == 3
    assert _list(held.items_M) == [1, 2, 3, 2, 5, 6, 7, 8, 7, 9, 7]
    assert _list(held.offsets_K) == [0, 2, 4, 6, 7, 10]
    assert _list(held.slot_K) == [0, 1, 3, 6, 7, 8]
    assert _list(held.target_items_C) == [4, 1, 5, 2]
    assert _list(held.target_offsets_B1) == [0, 2, 3, 4]
    # the same positives, each at the same (user, t) of a T = 3 grid
    assert _list(held.pos_items_P) == _list(full.pos_items_P)
    assert _list(held.step_slot_G) == [0, 1, 3, 6, 7, 8]


def test_collate_uses_input_reordered_flags_when_present():
    users = [_user(0, [[1, 2], [2, 3]], [0, 0, 0, 1])]
    assert _list(collate(users).pos_reordered_P) == [0, 1]


def test_collate_refuses_users_without_an_input_basket():
    with pytest.raises(InputError, match="user id1 .*1 baskets, needs at least 2"):
        collate([USERS[0], _user(1, [[5]])], drop_last_basket=True)
    with pytest.raises(InputError, match="item index below 1"):
        collate([_user(3, [[1], [0, 2]])])


def test_length_buckets_groups_similar_lengths_in_seeded_shuffled_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=103)
    users = [_user(i, [[1]] * int(n)) for i, n in enumerate(lengths)]
    batches = length_buckets(users, 10, np.random.default_rng(5))

    # every user exactly once; full batches except one of 3
    seen = sorted(s.user for b in batches for s in b)
    assert seen == list(range(103))
    assert sorted(len(b) for b in batches) == [3] + [10] * 10

    # batches cover disjoint ranges of length (sorted, then cut)
    ranges = sorted(
        (min(s.num_baskets for s in b), max(s.num_baskets for s in b)) for b in batches
    )
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))

    # the batch order is shuffled, and the same seed gives the same batches
    firsts = [min(s.num_baskets for s in b) for b in batches]
    assert firsts != sorted(firsts)
    again = length_buckets(users, 10, np.random.default_rng(5))
    assert [[s.user for s in b] for b in again] == [
        [s.user for s in b] for b in batches
    ]


def test_batch_pickles_as_arrays_and_round_trips():
    """Loader workers pickle batches: they come back equal, not in shared memory."""
    import pickle
    from dataclasses import fields
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    batch = collate(USERS, drop_last_basket=True)
    again = pickle.loads(ForkingPickler.dumps(batch))
    for f in fields(batch):
        value, back = getattr(batch, f.name), getattr(again, f.name)
        if isinstance(value, torch.Tensor):
            assert back.dtype == value.dtype and torch.equal(back, value), f.name
            assert not back.is_shared()
        else:
            assert back == value
