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

``drop_last_basket=False`` feeds every basket (recommending the next unknown
basket); ``True`` keeps each user's last basket out of the input and makes it
the target (training, validation and test users). Both give the same BPR pairs;
``True`` saves the RNN step whose hidden state predicts nothing.

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


@dataclass
class _Flat:
    """Every basket of a batch's users, flat, target baskets included."""

    items: np.ndarray
    """Item of every purchase (int64)."""
    sizes: np.ndarray
    """Size of every basket."""
    basket_user: np.ndarray
    """User (0..B-1) of every basket."""
    basket_time: np.ndarray
    """Position t of every basket in its user's sequence."""
    item_basket: np.ndarray
    """Basket of every purchase."""

    @classmethod
    def of(cls, seqs: list[UserSequence], num_baskets: np.ndarray) -> _Flat:
        """Returns the flat view; raises InputError on an item index below 1."""
        items = np.concatenate([s.items for s in seqs]).astype(np.int64)
        sizes = np.concatenate([s.sizes for s in seqs]).astype(np.int64)
        basket_user = np.repeat(np.arange(len(seqs)), num_baskets)
        basket_time = np.arange(len(sizes)) - _starts(num_baskets)[basket_user]
        item_basket = np.repeat(np.arange(len(sizes)), sizes)
        flat = cls(items, sizes, basket_user, basket_time, item_basket)
        if items.size and items.min() < 1:
            user = flat.basket_user[flat.item_basket[np.argmax(items < 1)]]
            raise InputError(
                f"user {seqs[user].user_id}: item index below 1 (0 is padding)"
            )
        return flat


def _input_fields(flat: _Flat, is_input: np.ndarray, max_baskets: int) -> dict:
    """Returns the EmbeddingBag input and the grid placement of the input baskets."""
    slot = flat.basket_user * max_baskets + flat.basket_time
    return {
        "items_M": flat.items[is_input[flat.item_basket]],
        "offsets_K": _starts(flat.sizes[is_input]),
        "slot_K": slot[is_input],
    }


def _step_fields(flat: _Flat, max_baskets: int) -> dict:
    """Returns the steps (hidden state t, basket t+1) and their positives."""
    is_next = flat.basket_time >= 1
    step_of_basket = np.cumsum(is_next) - 1
    step_user = flat.basket_user[is_next]
    is_pos = is_next[flat.item_basket]
    pos_step = step_of_basket[flat.item_basket[is_pos]]
    pos_items = flat.items[is_pos]
    num_steps = int(is_next.sum())
    keys, starts, counts = _packed_rank_keys(pos_step, pos_items, num_steps)
    return {
        "step_slot_G": step_user * max_baskets + flat.basket_time[is_next] - 1,
        "step_user_G": step_user,
        "pos_items_P": pos_items,
        "pos_step_P": pos_step,
        "excl_keys_X": keys,
        "excl_start_G": starts,
        "excl_count_G": counts,
    }


def _history_fields(seqs: list[UserSequence], flat: _Flat, steps: dict) -> dict:
    """Returns each user's first-purchase history, reorder flags and repeat keys."""
    num_users = len(seqs)
    item_user = flat.basket_user[flat.item_basket]
    item_time = flat.basket_time[flat.item_basket]

    # each user's distinct items in order of first purchase
    user_item = item_user * (int(flat.items.max()) + 1) + flat.items
    _, first, inverse = np.unique(user_item, return_index=True, return_inverse=True)
    order = np.argsort(first)
    first_sorted = first[order]
    history_start = np.searchsorted(item_user[first_sorted], np.arange(num_users))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    item_position = position[inverse] - history_start[item_user]
    is_repeat = item_time[first[inverse]] < item_time

    # reordered flags: the input's where present, else bought before
    is_pos = item_time >= 1
    if all(s.reordered is not None for s in seqs):
        flags = np.concatenate([s.reordered for s in seqs]).astype(bool)
    else:
        flags = is_repeat

    # history positions of basket t+1's repeats; distinct items up to basket t
    is_rep = is_pos & is_repeat
    step_of_item = np.cumsum(flat.basket_time >= 1)[flat.item_basket] - 1
    num_steps = len(steps["step_user_G"])
    keys, starts, counts = _packed_rank_keys(
        step_of_item[is_rep], item_position[is_rep], num_steps
    )
    next_start = _starts(flat.sizes)[flat.basket_time >= 1]
    prior_count = (
        np.searchsorted(first_sorted, next_start) - history_start[steps["step_user_G"]]
    )
    return {
        "pos_reordered_P": flags[is_pos],
        "history_items_H": flat.items[first_sorted],
        "history_start_B": history_start,
        "prior_count_G": prior_count,
        "repeat_keys_R": keys,
        "repeat_start_G": starts,
        "repeat_count_G": counts,
    }


def _target_fields(flat: _Flat, is_input: np.ndarray, num_users: int) -> dict:
    """Returns the items of each user's baskets that are not input (the targets)."""
    target_sizes = np.bincount(
        flat.basket_user[~is_input], weights=flat.sizes[~is_input], minlength=num_users
    ).astype(np.int64)
    return {
        "target_items_C": flat.items[~is_input[flat.item_basket]],
        "target_offsets_B1": np.concatenate([[0], np.cumsum(target_sizes)]),
    }


def collate(seqs: list[UserSequence], drop_last_basket: bool = False) -> Batch:
    """Returns the Batch of ``seqs`` (see the module docstring for every field).

    Raises InputError if a user has no input basket or an item index below 1.
    """
    num_baskets = np.fromiter((s.num_baskets for s in seqs), np.int64, len(seqs))
    _check(seqs, num_baskets, drop_last_basket)
    flat = _Flat.of(seqs, num_baskets)

    # input baskets: all, or all but each user's last
    lengths = num_baskets - int(drop_last_basket)
    is_input = flat.basket_time < lengths[flat.basket_user]
    max_baskets = int(lengths.max())

    arrays = {
        "lengths_B": lengths,
        "users_B": np.fromiter((s.user for s in seqs), np.int64, len(seqs)),
        **_input_fields(flat, is_input, max_baskets),
        **_step_fields(flat, max_baskets),
        **_target_fields(flat, is_input, len(seqs)),
    }
    arrays.update(_history_fields(seqs, flat, arrays))
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    return Batch(**tensors, num_users=len(seqs), max_baskets=max_baskets)


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
