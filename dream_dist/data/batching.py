"""Batches of users: flat baskets with offsets, and what the losses need.

``collate(seqs, drop_last_basket)`` turns a list of ``UserSequence`` into one
``Batch`` of tensors with no Python loop over baskets. Shape letters:

- B users in the batch, T = most input baskets of any user (the time axis),
- K input baskets, M items of the input baskets (flat, never padded per item),
- G steps that have a next basket (hidden state t of a user whose basket t+1 exists),
- P positive items (the items of basket t+1, one per item, with their step),
- X unique positives per step (for excluding them from catalog negatives),
- H distinct items of each user, ordered by first purchase,
- R distinct items of basket t+1 that the user bought before (for reorder negatives),
- C target items (the last basket of each user, with ``drop_last_basket=True``).

The model embeds ``items_M`` with ``offsets_K`` (``nn.EmbeddingBag``) and places
basket k at row ``slot_K[k] = user * T + t`` of a B x T grid, so padding exists
only along the basket axis. Hidden state t of user b predicts basket t+1: every
step g has ``step_slot_G[g]`` (the grid row of its hidden state), and its
positives are the ``pos_items_P`` with ``pos_step_P == g``.

``drop_last_basket=False`` feeds every basket (training, recommending the next
unknown basket); ``True`` keeps each user's last basket out of the input and
makes it the target (validation and test users). Both give the same BPR pairs,
so training with ``True`` is the same loss with one fewer RNN step.

Keys of sorted exclusion lists pack ``step << 32 | value`` into int64, so one
``searchsorted`` answers per-step questions for the whole batch (see losses.py).

``length_buckets(seqs, batch_size, rng)`` sorts a buffer of users by number of
baskets, cuts it into batches and shuffles the batch order (length bucketing).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from dream_dist.data.shards import UserSequence
from dream_dist.errors import InputError

KEY_SHIFT = 32
"""Bits of a packed key ``step << KEY_SHIFT | value`` that hold the value."""


@dataclass
class Batch:
    """One batch of users as tensors; every tensor is int64 unless noted."""

    items_M: torch.Tensor
    """Item indices of all input baskets, flat, oldest basket first per user."""
    offsets_K: torch.Tensor
    """Start of each input basket in ``items_M`` (EmbeddingBag offsets)."""
    slot_K: torch.Tensor
    """Row of each input basket in the flattened B x T grid: ``user * T + t``."""
    lengths_B: torch.Tensor
    """Number of input baskets of each user."""
    users_B: torch.Tensor
    """Dense user index of each user (the shard key)."""
    step_slot_G: torch.Tensor
    """Grid row ``user * T + t`` of each step whose basket t+1 exists."""
    step_user_G: torch.Tensor
    """User (0..B-1) of each step."""
    pos_items_P: torch.Tensor
    """Items of basket t+1 of each step: the positives of hidden state t."""
    pos_step_P: torch.Tensor
    """Step (0..G-1) of each positive."""
    pos_reordered_P: torch.Tensor
    """bool: the positive is a reorder (the input's flag, or bought before)."""
    excl_keys_X: torch.Tensor
    """Sorted ``step << 32 | (item - rank)`` over each step's unique positives."""
    excl_start_G: torch.Tensor
    """Start of each step's entries in ``excl_keys_X``."""
    excl_count_G: torch.Tensor
    """Number of unique positives of each step."""
    history_items_H: torch.Tensor
    """Each user's distinct items in order of first purchase, users concatenated."""
    history_start_B: torch.Tensor
    """Start of each user's entries in ``history_items_H``."""
    prior_count_G: torch.Tensor
    """Distinct items the user bought up to basket t (a prefix of their history)."""
    repeat_keys_R: torch.Tensor
    """Sorted ``step << 32 | (position - rank)``: history positions in basket t+1."""
    repeat_start_G: torch.Tensor
    """Start of each step's entries in ``repeat_keys_R``."""
    repeat_count_G: torch.Tensor
    """Number of distinct items of basket t+1 that the user bought before."""
    target_items_C: torch.Tensor
    """Items of each user's target (last) basket; empty unless drop_last_basket."""
    target_offsets_B1: torch.Tensor
    """CSR offsets (B + 1) of each user's target items in ``target_items_C``."""
    num_users: int
    """B."""
    max_baskets: int
    """T."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Returns a copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Returns a copy in pinned memory (used by DataLoader(pin_memory=True))."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.pin_memory()
            pinned[f.name] = value
        return Batch(**pinned)

    @property
    def num_positives(self) -> int:
        return int(self.pos_items_P.numel())

    def __reduce__(self) -> tuple:
        """Pickles the tensors as plain arrays.

        NOTE: loader workers hand batches over by pickling; as tensors, every field
        would get its own shared-memory segment (tens of ms a batch), as arrays the
        whole batch is one small message.
        """
        values = {
            f.name: getattr(self, f.name).cpu().numpy()
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return (_batch_from_arrays, (values,))


def _batch_from_arrays(values: dict) -> Batch:
    """Returns the Batch that ``Batch.__reduce__`` pickled."""
    return Batch(
        **{
            name: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            for name, v in values.items()
        }
    )


def _starts(counts: np.ndarray) -> np.ndarray:
    """Returns the exclusive prefix sum of ``counts`` (segment starts)."""
    return np.cumsum(counts) - counts


def _packed_rank_keys(step: np.ndarray, value: np.ndarray, num_steps: int) -> tuple:
    """Returns (sorted keys ``step << 32 | (value - rank)``, starts, counts) per step.

    Duplicates of (step, value) are dropped first; rank is the position of the
    value among its step's sorted unique values.
    """
    keys = np.unique((step << KEY_SHIFT) | value)
    key_step = keys >> KEY_SHIFT
    counts = np.bincount(key_step, minlength=num_steps)
    starts = _starts(counts)
    rank = np.arange(len(keys)) - starts[key_step]
    return keys - rank, starts, counts


def _check(seqs: list[UserSequence], num_baskets: np.ndarray, drop: bool) -> None:
    """Raises InputError naming the first user that cannot be batched."""
    if not seqs:
        raise InputError("collate: empty list of users")
    need = 2 if drop else 1
    short = np.flatnonzero(num_baskets < need)
    if len(short):
        seq = seqs[short[0]]
        raise InputError(
            f"user {seq.user_id} (index {seq.user}): {seq.num_baskets} baskets, "
            f"needs at least {need} ({len(short)} such users in the batch)"
        )


def collate(seqs: list[UserSequence], drop_last_basket: bool = False) -> Batch:
    """Returns the Batch of ``seqs`` (see the module docstring for every field).

    Raises InputError if a user has no input basket or an item index below 1.
    """
    num_baskets = np.fromiter((s.num_baskets for s in seqs), np.int64, len(seqs))
    _check(seqs, num_baskets, drop_last_basket)
    num_users = len(seqs)

    # flat items and baskets of every user, target baskets included
    items = np.concatenate([s.items for s in seqs]).astype(np.int64)
    sizes = np.concatenate([s.sizes for s in seqs]).astype(np.int64)
    if items.size and items.min() < 1:
        bad = int(
            np.repeat(np.arange(num_users), num_baskets)[
                np.repeat(np.arange(len(sizes)), sizes)[np.argmax(items < 1)]
            ]
        )
        raise InputError(f"user {seqs[bad].user_id}: item index below 1 (0 is padding)")
    basket_user = np.repeat(np.arange(num_users), num_baskets)
    basket_time = np.arange(len(sizes)) - np.repeat(_starts(num_baskets), num_baskets)
    basket_start = _starts(sizes)
    item_basket = np.repeat(np.arange(len(sizes)), sizes)

    # input baskets and their place in the B x T grid
    lengths = num_baskets - int(drop_last_basket)
    is_input = basket_time < lengths[basket_user]
    max_baskets = int(lengths.max())
    input_sizes = sizes[is_input]
    items_M = items[is_input[item_basket]]
    slot_K = (basket_user * max_baskets + basket_time)[is_input]

    # steps: hidden state t of a user predicts basket t+1
    is_next = basket_time >= 1
    num_steps = int(is_next.sum())
    step_of_basket = np.cumsum(is_next) - 1
    step_user = basket_user[is_next]
    step_slot = step_user * max_baskets + basket_time[is_next] - 1
    is_pos = is_next[item_basket]
    pos_items = items[is_pos]
    pos_step = step_of_basket[item_basket[is_pos]]

    # each user's distinct items in order of first purchase
    item_user = basket_user[item_basket]
    item_time = basket_time[item_basket]
    user_item = item_user * (int(items.max()) + 1) + items
    _, first, inverse = np.unique(user_item, return_index=True, return_inverse=True)
    order = np.argsort(first)
    first_sorted = first[order]
    history_items = items[first_sorted]
    history_start = np.searchsorted(item_user[first_sorted], np.arange(num_users))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    item_position = position[inverse] - history_start[item_user]
    is_repeat = item_time[first[inverse]] < item_time

    # reordered flags: the input's where present, else bought before
    if all(s.reordered is not None for s in seqs):
        flags = np.concatenate([s.reordered for s in seqs]).astype(bool)
        pos_reordered = flags[is_pos]
    else:
        pos_reordered = is_repeat[is_pos]

    # what negatives must avoid: positives (plain), repeated items (reorder)
    excl_keys, excl_start, excl_count = _packed_rank_keys(
        pos_step, pos_items, num_steps
    )
    is_rep = is_pos & is_repeat
    repeat_keys, repeat_start, repeat_count = _packed_rank_keys(
        step_of_basket[item_basket[is_rep]], item_position[is_rep], num_steps
    )
    first_before_next = np.searchsorted(first_sorted, basket_start[is_next])
    prior_count = first_before_next - history_start[step_user]

    # targets: the last basket, when it is not input
    if drop_last_basket:
        is_target = ~is_input[item_basket]
        target_items = items[is_target]
        target_sizes = sizes[~is_input]
    else:
        target_items = np.zeros(0, np.int64)
        target_sizes = np.zeros(num_users, np.int64)
    target_offsets = np.concatenate([[0], np.cumsum(target_sizes)])

    t = torch.from_numpy
    return Batch(
        items_M=t(items_M),
        offsets_K=t(_starts(input_sizes)),
        slot_K=t(slot_K),
        lengths_B=t(lengths),
        users_B=t(np.fromiter((s.user for s in seqs), np.int64, num_users)),
        step_slot_G=t(step_slot),
        step_user_G=t(step_user),
        pos_items_P=t(pos_items),
        pos_step_P=t(pos_step),
        pos_reordered_P=t(pos_reordered),
        excl_keys_X=t(excl_keys),
        excl_start_G=t(excl_start),
        excl_count_G=t(excl_count),
        history_items_H=t(history_items),
        history_start_B=t(history_start),
        prior_count_G=t(prior_count),
        repeat_keys_R=t(repeat_keys),
        repeat_start_G=t(repeat_start),
        repeat_count_G=t(repeat_count),
        target_items_C=t(target_items),
        target_offsets_B1=t(target_offsets),
        num_users=num_users,
        max_baskets=max_baskets,
    )


def length_buckets(
    seqs: list[UserSequence], batch_size: int, rng: np.random.Generator
) -> list[list[UserSequence]]:
    """Returns ``seqs`` cut into batches of similar length, in a shuffled order.

    Users are shuffled, then stably sorted by number of baskets (so equal lengths
    mix differently each time), cut into batches of ``batch_size`` (the last may
    be smaller), and the batch order is shuffled with ``rng``.
    """
    shuffled = rng.permutation(len(seqs))
    lengths = np.fromiter((seqs[i].num_baskets for i in shuffled), np.int64, len(seqs))
    ordered = shuffled[np.argsort(lengths, kind="stable")]
    batches = [
        [seqs[i] for i in ordered[start : start + batch_size]]
        for start in range(0, len(ordered), batch_size)
    ]
    return [batches[i] for i in rng.permutation(len(batches))]
