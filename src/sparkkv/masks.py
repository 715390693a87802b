"""Attention masks, in one place: what every stored block of tokens may see, per query row.

Conventions: a mask is bool, True = attend (transformers' additive float masks, 0 / -inf or the
dtype's minimum, are read as `to_bool` says). transformers' mask for a forward is
`[B or 1, 1 or H, q, L]` over *logical* positions; its last column is the newest token (position
`seen - 1`). Stored blocks know the logical positions of their tokens (a start, or an int32
`[B, Hkv, S]` tensor after eviction, -1 for filler slots), so their columns are looked up by
position (`block_mask`); sliding and chunked layers also hide what lies outside each query's
window (`window_mask`). `ops.attend` turns a part's mask into an additive bias shared by all query
rows when it can (`row_bias`).
"""

from __future__ import annotations

import torch


def to_bool(mask: torch.Tensor) -> torch.Tensor:
    """A bool or additive mask as bool (True = attend; an additive entry at or near the dtype's
    minimum, or -inf, is masked)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def first_columns(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The first `length` columns of a mask wider than the keys.

    The legacy `_update_causal_mask` of some models in older releases of the supported range
    (transformers 5.0: Persimmon) builds masks over absolute positions with one spare column, and
    their eager attention reads the first key-length columns; SDPA would reject the width.
    """
    return mask[..., :length] if mask is not None and mask.shape[-1] > length else mask


def query_valid(mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """bool `[B, q]`: which query rows are real tokens. A query attends to itself iff it is not
    padding, so this is the diagonal of the (prefill) mask. None when there is no mask."""
    if mask is None:
        return None
    diag = mask[:, 0, torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)]
    return to_bool(diag).expand(batch, q_len)


def causal_rows(mask_rows: torch.Tensor | None, q_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool mask of query rows at logical `q_positions [n]` over the first `kv_len` keys: the given
    rows of a prefill mask (`[B, 1, n, S]`), or plain causal `[n, S]` when there is none."""
    if mask_rows is not None:
        return to_bool(mask_rows)
    return torch.arange(kv_len, device=q_positions.device).view(1, kv_len) <= q_positions.view(-1, 1)


def _positions(block, device) -> torch.Tensor:
    """int64 `[B or 1, H or 1, S]` logical positions of a block's tokens."""
    if block.positions is not None:
        return block.positions.long()
    return torch.arange(block.start, block.start + block.seq_len, device=device).view(1, 1, -1)


def block_mask(block, mask: torch.Tensor | None, seen: int, q_len: int, batch: int, device) -> torch.Tensor | None:
    """A stored block's columns of the forward's mask: bool `[B, 1 or H, q, S]`, or None (see all).

    `block` has `start`, `seq_len` and `positions` (None, or int `[B, H, S]`, -1 = filler).
    `mask` is transformers' mask for this forward (module docstring), or None: plain causal.
    """
    s = block.seq_len
    if mask is None:
        if q_len == 1 and block.positions is None:
            return None
        q_pos = torch.arange(seen - q_len, seen, device=device).view(1, 1, q_len, 1)
        pos = _positions(block, device).unsqueeze(2)
        visible = (pos <= q_pos) & (pos >= 0)  # filler slots (position -1) are never visible
        return visible.expand(batch, visible.shape[1], q_len, s)
    mask = to_bool(mask)
    mask = mask.expand(batch, *mask.shape[1:])
    offset = seen - mask.shape[-1]  # logical position of the mask's first column
    if block.positions is None:
        lo, hi = block.start - offset, block.start + s - offset
        if lo >= 0:
            return mask[..., lo:hi]
        visible = mask[..., max(lo, 0) : max(hi, 0)]  # columns before the mask's first are invisible
        hidden = torch.zeros(*mask.shape[:-1], min(-lo, s), dtype=torch.bool, device=mask.device)
        return torch.cat([hidden, visible], dim=-1)
    h = block.positions.shape[1]
    cols = block.positions.long() - offset
    inside = cols >= 0
    picked = mask.expand(batch, h, q_len, mask.shape[-1]).gather(-1, cols.clamp_min(0).unsqueeze(2).expand(batch, h, q_len, s))
    return picked & inside.unsqueeze(2)


def window_mask(block, mask: torch.Tensor | None, lowest: list[int], batch: int, device) -> torch.Tensor | None:
    """`mask` (a `block_mask`) narrowed to each query's window: query row j sees positions
    `>= lowest[j]` (a sliding or chunked layer's `first_needed`). Unchanged when every query sees
    the whole block."""
    if block.positions is None and block.start >= max(lowest):
        return mask
    bound = torch.tensor(lowest, device=device).view(1, 1, len(lowest), 1)
    visible = (_positions(block, device).unsqueeze(2) >= bound).expand(batch, -1, len(lowest), block.seq_len)
    return visible if mask is None else mask & visible


def row_bias(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """`(bias, per_row)` for a part's bool mask `[B, 1 or H, q, S]`: an additive float32 bias
    `[B, 1 or H, S]` (0 / -inf) when every query row has the same mask (what the kernels take),
    else `(None, True)`: the rows differ and the part needs the per-row reference."""
    if mask is None:
        return None, False
    if mask.shape[2] > 1 and not bool((mask == mask[:, :, :1]).all()):
        return None, True
    bias = torch.zeros(mask[:, :, 0].shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask[:, :, 0], float("-inf")), False


def group_rows(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hm, q, S]` -> `[B, Hm, G * q, S]`: query row `g * q + j` uses the mask of query `j`."""
    b, hm, q, s = mask.shape
    return mask.unsqueeze(2).expand(b, hm, groups, q, s).reshape(b, hm, groups * q, s)


def block_parts(blocks, mask: torch.Tensor | None, seen: int, q_len: int, batch: int, spec) -> list[tuple]:
    """`(keys, values, mask)` parts for `ops.attend`: every block with its `block_mask`, narrowed to
    each query's window on sliding / chunked layers (`spec`: the layer's `LayerSpec`; a block may
    still hold expired tokens, and some models, Moshi, give a full causal mask and let the cache's
    storage make the window). The queries are the last `q_len` of `seen` tokens."""
    windowed = spec.attention_type != "full_attention"
    lowest = [spec.first_needed(p) for p in range(seen - q_len, seen)] if windowed else None
    parts = []
    for block in blocks:
        part_mask = block_mask(block, mask, seen, q_len, batch, block.device)
        if lowest is not None:
            part_mask = window_mask(block, part_mask, lowest, batch, block.device)
        parts.append((block.keys, block.values, part_mask))
    return parts
