"""Packed storage of channel-pruned rows: what the cache really holds.

A `PackedTensor` stands for a `[B, H, S, D]` tensor (keys, or values) in which every row
`(b, h, s)` keeps some of its `D` channels and replaces the others by a *fill*. It stores:

    vals   kept values, model dtype, row-major with ascending channels inside a row.
           Fixed T per row: shape [B, H, S, T]. Variable T (top-p / grouped selection): a flat
           1-D tensor of all kept values, so no row is padded; row boundaries follow from the
           keep mask (row r owns popcount(keep[r]) values).
    keep   uint8 [B, H, S, D/8]: bit (c % 8) of byte (c // 8) is set when channel c is kept.
    sign   uint8 [B, H, S, D/8] or None: bit set when the pruned entry is positive.
    scale  [B, H, S] model dtype, or None: one recovery magnitude per row.
    chan   float32 [B, H, D], or None: one factor per channel, shared by all rows of a head.
    fill   1-D model dtype, or None: explicit pruned entries (sampled recoveries only).

The pruned entry (b, h, s, c) is rebuilt as
    fill[...]                                      when `fill` is stored, else
    (+-1 from sign) * scale[b,h,s] * chan[b,h,c]   over whichever of the three are stored, else 0.
SparK's mean recovery stores sign, `scale = sqrt(a_t)` and `chan = 1 / sqrt(||q_c||)`;
zero recovery stores none of them; value pruning with mean fill stores `scale` only.

`nbytes` counts the bytes the tensors' storages really hold (a view would keep its whole
base storage alive, so every field is an owning, compact tensor).

Every stored chunk -- `DenseChunk` (a plain tensor), `PackedTensor` (SparK keys, pruned values),
`ColumnPackedTensor` (ThinK keys) -- implements one small protocol, `Chunk`: its shape, length and
dtype, `dense()` (what attention sees), `kept_per_row()`, `slice_seq` / `index_batch` (crop, beam
search), `to(device)` and `tensors()` / `nbytes`. The cache stores chunks and reads them through
this protocol only; what a fused kernel reads from each kind is decided in `kernels/operands.py`.

Scale dtype: `scale` is stored in the model dtype, except for float16 models, where it is float32
(a recovery magnitude or a mean can exceed float16's 65504).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

# Bit weights of one byte: channel c of a row lives in byte c // 8 at bit c % 8.
_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool `[..., D]` -> uint8 `[..., D // 8]` (D must be a multiple of 8)."""
    d = mask.shape[-1]
    if d % 8:
        raise ValueError(f"cannot pack {d} channels into bytes: the channel count must be a multiple of 8")
    grouped = mask.reshape(*mask.shape[:-1], d // 8, 8).to(torch.uint8)
    return (grouped * _bit_weights(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 `[..., dim // 8]` -> bool `[..., dim]`."""
    expanded = (bits.unsqueeze(-1) & _bit_weights(bits.device)) != 0
    return expanded.reshape(*bits.shape[:-1], dim)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount_rows(bits: torch.Tensor) -> torch.Tensor:
    """Number of set bits per row: uint8 `[..., D/8]` -> int64 `[...]`."""
    table = _POPCOUNT.to(bits.device)
    return table[bits.long()].sum(-1)


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


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of per-row scalars for a model dtype (float32 where float16 could overflow)."""
    return torch.float32 if dtype == torch.float16 else dtype


class Chunk(Protocol):
    """What the cache stores per block of tokens (keys or values of `[B, H, S, D]`)."""

    shape: tuple[int, int, int, int]

    @property
    def seq_len(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def nbytes(self) -> int: ...

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The `[B, H, S, D]` tensor attention sees (pruned entries recovered)."""

    def kept_per_row(self) -> torch.Tensor:
        """int64 `[B, H, S]`: channels stored explicitly per row."""

    def slice_seq(self, start: int, stop: int) -> "Chunk": ...

    def index_batch(self, index: torch.Tensor) -> "Chunk": ...

    def tensors(self) -> list[torch.Tensor]: ...

    def to(self, device) -> "Chunk": ...


@dataclass
class DenseChunk:
    """A plain `[B, H, S, D]` tensor as a chunk (the dense tail; `method="dense"` or eviction only)."""

    data: torch.Tensor

    def __post_init__(self) -> None:
        self.data = compact(self.data)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)

    @property
    def seq_len(self) -> int:
        return self.data.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return storage_nbytes(self.data)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.data if dtype is None else self.data.to(dtype)

    def kept_per_row(self) -> torch.Tensor:
        b, h, s, d = self.data.shape
        return torch.full((b, h, s), d, dtype=torch.int64, device=self.data.device)

    def slice_seq(self, start: int, stop: int) -> "DenseChunk":
        return DenseChunk(self.data[:, :, start:stop])

    def index_batch(self, index: torch.Tensor) -> "DenseChunk":
        return DenseChunk(self.data.index_select(0, index.to(self.data.device)))

    def to(self, device) -> "DenseChunk":
        return DenseChunk(self.data.to(device))


@dataclass
class PackedTensor:
    """A channel-pruned `[B, H, S, D]` tensor in packed form (see the module docstring)."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    vals: torch.Tensor
    keep: torch.Tensor
    sign: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    chan: torch.Tensor | None = None
    fill: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(x) for x in self.shape)
        for name in ("vals", "keep", "sign", "scale", "chan", "fill"):
            setattr(self, name, compact(getattr(self, name)))

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        x: torch.Tensor,
        keep: torch.Tensor,
        *,
        sign: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        chan: torch.Tensor | None = None,
        fill: torch.Tensor | None = None,
    ) -> "PackedTensor":
        """Pack `x [B, H, S, D]` keeping the channels where `keep [B, H, S, D]` (bool) is True.

        `sign` (bool, positive entries), `scale [B, H, S]`, `chan [B, H, D]`: the recovery fields.
        `fill [B, H, S, D]`: explicit recovered values; only its pruned entries are stored.
        """
        if x.dim() != 4 or keep.shape != x.shape:
            raise ValueError(f"expected x and keep of the same shape [B, H, S, D], got {tuple(x.shape)} and {tuple(keep.shape)}")
        keep = keep.bool()
        counts = keep.sum(-1)
        fixed = counts.numel() == 0 or bool((counts == counts.flatten()[0]).all())
        if fixed:
            t = int(counts.flatten()[0]) if counts.numel() else x.shape[-1]
            vals = x[keep].reshape(*x.shape[:3], t)
        else:
            vals = x[keep]
        return cls(
            shape=tuple(x.shape),
            dtype=x.dtype,
            vals=vals,
            keep=pack_bits(keep),
            sign=None if sign is None else pack_bits(sign & ~keep),
            scale=None if scale is None else scale.to(scale_dtype(x.dtype)),
            chan=None if chan is None else chan.float(),
            fill=None if fill is None else fill.to(x.dtype)[~keep],
        )

    # --- reading ---------------------------------------------------------------------------
    @property
    def fixed_t(self) -> int | None:
        """Kept channels per row when every row keeps the same number, else None."""
        return self.vals.shape[-1] if self.vals.dim() == 4 else None

    @property
    def seq_len(self) -> int:
        return self.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds (for byte accounting)."""
        return [t for t in (self.vals, self.keep, self.sign, self.scale, self.chan, self.fill) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the packed tensors really hold."""
        return storage_nbytes(*self.tensors())

    def keep_mask(self) -> torch.Tensor:
        """bool `[B, H, S, D]`: True where a channel is kept."""
        return unpack_bits(self.keep, self.shape[-1])

    def kept_per_row(self) -> torch.Tensor:
        """int64 `[B, H, S]`: kept channels of every row."""
        return popcount_rows(self.keep)

    def fill_values(self, keep: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The recovered entries as a dense `[B, H, S, D]` tensor (kept positions hold filler),
        computed in float32 and returned in `dtype` (default: the stored dtype)."""
        b, h, s, d = self.shape
        device = self.keep.device
        dtype = dtype or self.dtype
        if keep is None:
            keep = self.keep_mask()
        if self.fill is not None:
            out = torch.zeros(self.shape, dtype=dtype, device=device)
            return out.masked_scatter_(~keep, self.fill.to(dtype))
        if self.sign is None and self.scale is None and self.chan is None:
            return torch.zeros(self.shape, dtype=dtype, device=device)
        if self.sign is not None:
            out = unpack_bits(self.sign, d).float().mul_(2).sub_(1)
        else:
            out = torch.ones(self.shape, dtype=torch.float32, device=device)
        if self.scale is not None:
            out = out * self.scale.float().unsqueeze(-1)
        if self.chan is not None:
            out = out * self.chan.unsqueeze(2)
        return out.to(dtype)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The `[B, H, S, D]` tensor attention sees: kept values in place, pruned entries recovered.

        In the stored dtype by default (recovered entries rounded to it, as the PyTorch attention
        path uses them); `dtype=torch.float32` keeps them unrounded, as the fused kernels do."""
        keep = self.keep_mask()
        out = self.fill_values(keep, dtype)
        return out.masked_scatter_(keep, self.vals.to(out.dtype))

    def full_vals(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Kept values scattered to `[B, H, S, D]` with zeros elsewhere."""
        if keep is None:
            keep = self.keep_mask()
        return torch.zeros(self.shape, dtype=self.dtype, device=self.keep.device).masked_scatter_(keep, self.vals)

    # --- structural operations (crop, beam search, batch selection) -------------------------
    def _rebuild(self, row_op, chan_op) -> "PackedTensor":
        """Apply `row_op` to every per-row field (a `[B, H, S, X]` tensor -> `[B', H, S', X]`)."""
        keep = self.keep_mask()
        new_keep = row_op(keep)
        vals = row_op(self.full_vals(keep))[new_keep]
        if self.fixed_t is not None:
            vals = vals.reshape(*new_keep.shape[:3], self.fixed_t)
        fill = None
        if self.fill is not None:
            full_fill = torch.zeros(self.shape, dtype=self.dtype, device=keep.device).masked_scatter_(~keep, self.fill)
            fill = row_op(full_fill)[~new_keep]
        return replace(
            self,
            shape=tuple(new_keep.shape),
            vals=vals,
            keep=pack_bits(new_keep),
            sign=None if self.sign is None else row_op(self.sign),
            scale=None if self.scale is None else row_op(self.scale.unsqueeze(-1)).squeeze(-1),
            chan=None if self.chan is None else chan_op(self.chan),
            fill=fill,
        )

    def _map_rows(self, row_op, chan_op) -> "PackedTensor":
        """Fixed T: apply `row_op` to every per-row field directly (no rebuild)."""
        opt = lambda t, op: None if t is None else op(t)  # noqa: E731
        keep = row_op(self.keep)
        return replace(
            self,
            shape=(*keep.shape[:3], self.shape[3]),
            vals=row_op(self.vals),
            keep=keep,
            sign=opt(self.sign, row_op),
            scale=opt(self.scale, lambda t: row_op(t.unsqueeze(-1)).squeeze(-1)),
            chan=opt(self.chan, chan_op),
        )

    def index_batch(self, index: torch.Tensor) -> "PackedTensor":
        """Rows of the batch in the order of `index` (may repeat: beam search)."""
        index = index.to(self.keep.device)
        op = lambda t: t.index_select(0, index)  # noqa: E731
        if self.fixed_t is not None and self.fill is None:
            return self._map_rows(op, op)
        return self._rebuild(op, op)

    def slice_seq(self, start: int, stop: int) -> "PackedTensor":
        """Tokens `start:stop` along the sequence axis (a compact copy)."""
        op = lambda t: t[:, :, start:stop].contiguous().clone()  # noqa: E731
        if self.fixed_t is not None and self.fill is None:
            return self._map_rows(op, lambda c: c)
        return self._rebuild(op, lambda c: c)

    def to(self, device) -> "PackedTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            vals=move(self.vals),
            keep=move(self.keep),
            sign=move(self.sign),
            scale=move(self.scale),
            chan=move(self.chan),
            fill=move(self.fill),
        )


@dataclass
class ColumnPackedTensor:
    """Structured channel pruning (ThinK): every row of a (batch, head) keeps the same columns.

    vals  `[B, H, S, T]` model dtype, the kept columns in ascending channel order;
    idx   `[B, H, T]` int16, which channels they are. Pruned entries are zero. No per-row mask.
    """

    shape: tuple[int, int, int, int]
    vals: torch.Tensor
    idx: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(x) for x in self.shape)
        self.vals, self.idx = compact(self.vals), compact(self.idx)

    @classmethod
    def from_dense(cls, x: torch.Tensor, idx: torch.Tensor) -> "ColumnPackedTensor":
        """Keep columns `idx [B, H, T]` (ascending) of `x [B, H, S, D]`."""
        b, h, s, _ = x.shape
        vals = x.gather(-1, idx.long().unsqueeze(2).expand(b, h, s, idx.shape[-1]))
        # int16 indices; an int16 `idx` passes through as the same tensor, so blocks share it
        return cls(shape=tuple(x.shape), vals=vals, idx=idx if idx.dtype == torch.int16 else idx.to(torch.int16))

    @property
    def dtype(self) -> torch.dtype:
        return self.vals.dtype

    @property
    def seq_len(self) -> int:
        return self.shape[2]

    @property
    def fixed_t(self) -> int:
        return self.idx.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.vals, self.idx]

    @property
    def nbytes(self) -> int:
        return storage_nbytes(self.vals, self.idx)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        b, h, s, d = self.shape
        index = self.idx.long().unsqueeze(2).expand(b, h, s, self.idx.shape[-1])
        dtype = dtype or self.vals.dtype
        return torch.zeros(self.shape, dtype=dtype, device=self.vals.device).scatter_(-1, index, self.vals.to(dtype))

    def kept_per_row(self) -> torch.Tensor:
        b, h, s, _ = self.shape
        return torch.full((b, h, s), self.fixed_t, dtype=torch.int64, device=self.vals.device)

    def index_batch(self, index: torch.Tensor) -> "ColumnPackedTensor":
        index = index.to(self.vals.device)
        vals = self.vals.index_select(0, index)
        return ColumnPackedTensor((vals.shape[0], *self.shape[1:]), vals, self.idx.index_select(0, index))

    def slice_seq(self, start: int, stop: int) -> "ColumnPackedTensor":
        vals = self.vals[:, :, start:stop].contiguous().clone()
        return ColumnPackedTensor((*self.shape[:2], vals.shape[2], self.shape[3]), vals, self.idx)

    def to(self, device) -> "ColumnPackedTensor":
        return ColumnPackedTensor(self.shape, self.vals.to(device), self.idx.to(device))
