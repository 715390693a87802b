"""Byte accounting for stored tensors: every stored field owns exactly its storage, and bytes are
what those storages hold (`untyped_storage().nbytes()`), each storage counted once."""

from __future__ import annotations

import torch


def storage_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the storages behind `tensors` (each storage counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(seen.values())


def compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` itself if it owns exactly its storage, else a compact copy (a view, even a zero-length
    slice, keeps its whole base storage alive)."""
    if t is None:
        return None
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone() if t.is_contiguous() else t.contiguous()


def horner_bytes(digits: torch.Tensor, base: int) -> torch.Tensor:
    """uint8 `[..., n, k]` digits -> uint8 `[..., n]`: `sum_j digits[..., j] * base^j` by Horner's rule
    (the caller keeps the result under 256). Bit masks, ternary codes and 4/2-bit codes are packed
    this way: a `sum` over a last axis of 2 to 8 elements is slow in torch."""
    out = digits[..., -1]
    for j in range(digits.shape[-1] - 2, -1, -1):
        out = out * base + digits[..., j]
    return out.contiguous()
