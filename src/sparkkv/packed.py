"""Packed storage of channel-pruned rows: what the cache really holds.

A `PackedTensor` stands for a `[B, H, S, D]` tensor (keys, or values) in which every row
`(b, h, s)` keeps some of its `D` channels and replaces the others by a *fill*. It stores:

    vals   kept values, model dtype, row-major with ascending channels inside a row.
           Fixed T per row: shape [B, H, S, T]. Variable T (top-p / grouped selection): a flat
           1-D tensor of all kept values, so no row is padded; row boundaries follow from the
           keep mask (row r owns popcount(keep[r]) values). Fixed T only: or their 8/4/2-bit
           codes, a `quant.QuantizedTensor` [B, H, S, T] with one scale (and zero) per row group
           (axis "row"), or one scale per channel and group of tokens (axis "channel": a kept
           value's scale is its channel's, `kept_channels()`; SparK's kept keys).
    keep   uint8 [B, H, S, D/8]: bit (c % 8) of byte (c // 8) is set when channel c is kept.
    sign   uint8 [B, H, S, D/8] or None: bit set when the pruned entry is positive.
    trits  uint8 [B, H, S, ceil(D/5)] or None: keep and sign in one ternary code, 1.6 bits per
           channel (`pack_trits`); when stored, `keep` and `sign` are None.
    scale  [B, H, S] model dtype (bfloat16 beside quantized kept values), or None: one recovery
           magnitude per row.
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
`ColumnPackedTensor` (ThinK keys), `quant.QuantizedTensor` (quantized dense keys or values) --
implements one small protocol, `Chunk`: its shape, length and
dtype, `dense()` (what attention sees), `kept_per_row()`, `slice_seq` / `index_batch` (crop, beam
search), `to(device)` and `tensors()` / `nbytes`. The cache stores chunks and reads them through
this protocol only; what a fused kernel reads from each kind is decided in `kernels/operands.py`.

Scale dtype: `scale` is stored in the model dtype, except for float16 models, where it is float32
(a recovery magnitude or a mean can exceed float16's 65504). Beside quantized kept values
(`with_quantized_vals`) it is bfloat16 whatever the model dtype (`QUANTIZED_SCALE_DTYPE`): the
float32 range, and a relative error of at most 2^-9, far under the 4-bit codes' half step, for
2 bytes per row instead of 4 in float32 and float16 models (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .quant import QuantizedTensor
from .tensors import compact, horner_bytes, storage_nbytes

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
    return horner_bytes(grouped, 2)


def unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 `[..., dim // 8]` -> bool `[..., dim]`."""
    expanded = (bits.unsqueeze(-1) & _bit_weights(bits.device)) != 0
    return expanded.reshape(*bits.shape[:-1], dim)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount_rows(bits: torch.Tensor) -> torch.Tensor:
    """Number of set bits per row: uint8 `[..., D/8]` -> int64 `[...]`."""
    table = _POPCOUNT.to(bits.device)
    return table[bits.long()].sum(-1)


# Ternary mask code: channel c of a row is 0 (kept), 1 (pruned, negative) or 2 (pruned, positive);
# five channels share a byte, `sum_j trit[5i + j] * 3^j` (3^5 = 243 <= 256), the last byte padded with
# kept (0) trits: ceil(D / 5) bytes per row, 1.6 bits per channel instead of the 2 of keep + sign bits.
_POW3 = (1, 3, 9, 27, 81)


def pack_trits(keep: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """bool `keep [..., D]` and `positive [..., D]` -> uint8 `[..., ceil(D / 5)]` (see above)."""
    d = keep.shape[-1]
    trit = (~keep).to(torch.uint8) + (positive & ~keep).to(torch.uint8)
    if d % 5:
        trit = torch.nn.functional.pad(trit, (0, (-d) % 5))
    return horner_bytes(trit.reshape(*trit.shape[:-1], -1, 5), 3)


def unpack_trits(trits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 `[..., ceil(dim / 5)]` -> `(keep, positive)`, bool `[..., dim]` each."""
    weights = torch.tensor(_POW3, dtype=torch.int32, device=trits.device)
    digits = (trits.int().unsqueeze(-1) // weights) % 3
    digits = digits.reshape(*trits.shape[:-1], -1)[..., :dim]
    return digits == 0, digits == 2


QUANTIZED_SCALE_DTYPE = torch.bfloat16  # per-row recovery scale beside quantized kept values (module docstring)


def scale_dtype(dtype: torch.dtype, quantized: bool = False) -> torch.dtype:
    """Storage dtype of per-row scalars for a model dtype: float32 where float16 could overflow;
    `QUANTIZED_SCALE_DTYPE` beside quantized kept values (`quantized`)."""
    if quantized:
        return QUANTIZED_SCALE_DTYPE
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
    vals: torch.Tensor  # or a `quant.QuantizedTensor` [B, H, S, T] (fixed T only)
    keep: torch.Tensor | None
    sign: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    chan: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    trits: torch.Tensor | None = None  # keep and sign in one ternary code (then keep = sign = None)

    def __post_init__(self) -> None:
        self.shape = tuple(int(x) for x in self.shape)
        for name in ("keep", "sign", "scale", "chan", "fill", "trits"):
            setattr(self, name, compact(getattr(self, name)))
        if isinstance(self.vals, torch.Tensor):
            self.vals = compact(self.vals)

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

    def with_trits(self) -> "PackedTensor":
        """The same tensor with its keep mask and pruned signs in one ternary code (`pack_trits`:
        1.6 bits per channel instead of 2). Needs stored signs."""
        if self.sign is None:
            raise ValueError("a ternary mask code needs the pruned entries' signs (mean or constant recovery)")
        trits = pack_trits(self.keep_mask(), self.positive_mask())
        return replace(self, keep=None, sign=None, trits=trits)

    def with_quantized_vals(self, bits: int, group: int, symmetric: bool, axis: str = "row",
                            valid: torch.Tensor | None = None) -> "PackedTensor":
        """The same tensor with its kept values as `bits`-bit codes (`quant.QuantizedTensor`): one
        scale (and zero) per row group of `group` values (axis "row"), or one scale per channel
        and group of `group` tokens (axis "channel", symmetric; `valid` as for
        `QuantizedTensor.quantize`). Fixed T, no explicit fill."""
        if self.fixed_t is None or self.fill is not None or not isinstance(self.vals, torch.Tensor):
            raise ValueError("kept values are quantized for fixed-T packed tensors without explicit fill values")
        channels = self.kept_channels() if axis == "channel" else None
        width = self.shape[-1] if axis == "channel" else 0
        vals = QuantizedTensor.quantize(self.vals, bits, group, axis, symmetric, valid, channels, width)
        return replace(self, vals=vals, scale=None if self.scale is None else self.scale.to(scale_dtype(self.dtype, quantized=True)))

    # --- reading ---------------------------------------------------------------------------
    @property
    def fixed_t(self) -> int | None:
        """Kept channels per row when every row keeps the same number, else None."""
        return self.vals.shape[-1] if len(self.vals.shape) == 4 else None

    @property
    def seq_len(self) -> int:
        return self.shape[2]

    @property
    def device(self) -> torch.device:
        return (self.keep if self.keep is not None else self.trits).device

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds (for byte accounting)."""
        vals = self.vals.tensors() if isinstance(self.vals, QuantizedTensor) else [self.vals]
        return vals + [t for t in (self.keep, self.sign, self.scale, self.chan, self.fill, self.trits) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the packed tensors really hold."""
        return storage_nbytes(*self.tensors())

    def keep_mask(self) -> torch.Tensor:
        """bool `[B, H, S, D]`: True where a channel is kept."""
        if self.trits is not None:
            return unpack_trits(self.trits, self.shape[-1])[0]
        return unpack_bits(self.keep, self.shape[-1])

    def positive_mask(self) -> torch.Tensor | None:
        """bool `[B, H, S, D]`: True where a pruned entry is positive (None without stored signs)."""
        if self.trits is not None:
            return unpack_trits(self.trits, self.shape[-1])[1]
        return None if self.sign is None else unpack_bits(self.sign, self.shape[-1])

    def kept_per_row(self) -> torch.Tensor:
        """int64 `[B, H, S]`: kept channels of every row."""
        if self.trits is not None:
            return self.keep_mask().sum(-1)
        return popcount_rows(self.keep)

    def kept_channels(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """int64 `[B, H, S, T]` (fixed T): the channel of every kept value, ascending within a row
        (`keep`: the keep mask, when the caller has it)."""
        keep = self.keep_mask() if keep is None else keep  # nonzero lists a row's kept channels in order
        return keep.reshape(-1, self.shape[-1]).nonzero()[:, 1].reshape(*self.shape[:3], self.fixed_t)

    def kept_values(self, dtype: torch.dtype | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The kept values (`[B, H, S, T]`, or flat for variable T), dequantized if they are codes
        (`keep`: the keep mask, when the caller has it)."""
        if isinstance(self.vals, QuantizedTensor):
            channels = self.kept_channels(keep) if self.vals.axis == "channel" else None
            return self.vals.dense(dtype or self.dtype, channels)
        return self.vals if dtype is None else self.vals.to(dtype)

    def fill_values(self, keep: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The recovered entries as a dense `[B, H, S, D]` tensor (kept positions hold filler),
        computed in float32 and returned in `dtype` (default: the stored dtype)."""
        device = self.device
        dtype = dtype or self.dtype
        if keep is None:
            keep = self.keep_mask()
        if self.fill is not None:
            out = torch.zeros(self.shape, dtype=dtype, device=device)
            return out.masked_scatter_(~keep, self.fill.to(dtype))
        positive = self.positive_mask()
        if positive is None and self.scale is None and self.chan is None:
            return torch.zeros(self.shape, dtype=dtype, device=device)
        if positive is not None:
            out = positive.float().mul_(2).sub_(1)
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
        path uses them); `dtype=torch.float32` keeps them unrounded, as the fused kernels do.
        Quantized kept values are dequantized in float32."""
        keep = self.keep_mask()
        out = self.fill_values(keep, dtype)
        vals = self.kept_values(torch.float32, keep) if isinstance(self.vals, QuantizedTensor) else self.vals
        return out.masked_scatter_(keep, vals.to(out.dtype))

    def full_vals(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Kept values scattered to `[B, H, S, D]` with zeros elsewhere."""
        if keep is None:
            keep = self.keep_mask()
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device).masked_scatter_(keep, self.kept_values(keep=keep))

    # --- structural operations (crop, beam search, batch selection) -------------------------
    def index_batch(self, index: torch.Tensor) -> "PackedTensor":
        """Rows of the batch in the order of `index` (may repeat: beam search)."""
        index = index.to(self.device)
        op = lambda t: t.index_select(0, index)  # noqa: E731
        if self.fixed_t is not None and self.fill is None:
            return _map_rows(self, op, op, lambda q: q.index_batch(index))
        return _rebuild(self, op, op)

    def slice_seq(self, start: int, stop: int) -> "PackedTensor":
        """Tokens `start:stop` along the sequence axis (a compact copy)."""
        op = lambda t: t[:, :, start:stop].contiguous().clone()  # noqa: E731
        if self.fixed_t is not None and self.fill is None:
            return _map_rows(self, op, lambda c: c, lambda q: q.slice_seq(start, stop))
        return _rebuild(self, op, lambda c: c)

    def to(self, device) -> "PackedTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, vals=self.vals.to(device), keep=move(self.keep), sign=move(self.sign), scale=move(self.scale),
                       chan=move(self.chan), fill=move(self.fill), trits=move(self.trits))


# structural operations of a PackedTensor (crop, beam search, batch selection)
def _rebuild(packed: PackedTensor, row_op, chan_op) -> PackedTensor:
    """Variable T or explicit fill: apply `row_op` (a `[B, H, S, X]` tensor -> `[B', H, S', X]`)
    to the dense masks and values, and pack again."""
    keep = packed.keep_mask()
    new_keep = row_op(keep)
    vals = row_op(packed.full_vals(keep))[new_keep]
    if packed.fixed_t is not None:
        vals = vals.reshape(*new_keep.shape[:3], packed.fixed_t)
    fill = None
    if packed.fill is not None:
        full_fill = torch.zeros(packed.shape, dtype=packed.dtype, device=keep.device).masked_scatter_(~keep, packed.fill)
        fill = row_op(full_fill)[~new_keep]
    trits = None if packed.trits is None else pack_trits(new_keep, row_op(packed.positive_mask()))
    return replace(
        packed,
        shape=tuple(new_keep.shape),
        vals=vals,
        keep=None if trits is not None else pack_bits(new_keep),
        sign=None if packed.sign is None else row_op(packed.sign),
        scale=None if packed.scale is None else row_op(packed.scale.unsqueeze(-1)).squeeze(-1),
        chan=None if packed.chan is None else chan_op(packed.chan),
        fill=fill,
        trits=trits,
    )


def _map_rows(packed: PackedTensor, row_op, chan_op, vals_op) -> PackedTensor:
    """Fixed T: apply `row_op` to every per-row field directly (no rebuild); `vals_op` to
    quantized kept values."""
    opt = lambda t, op: None if t is None else op(t)  # noqa: E731
    quantized = isinstance(packed.vals, QuantizedTensor)
    vals = vals_op(packed.vals) if quantized else row_op(packed.vals)
    return replace(
        packed,
        shape=(*vals.shape[:3], packed.shape[3]),
        vals=vals,
        keep=opt(packed.keep, row_op),
        sign=opt(packed.sign, row_op),
        scale=opt(packed.scale, lambda t: row_op(t.unsqueeze(-1)).squeeze(-1)),
        chan=opt(packed.chan, chan_op),
        trits=opt(packed.trits, row_op),
    )


@dataclass
class ColumnPackedTensor:
    """Structured channel pruning (ThinK): every row of a (batch, head) keeps the same columns.

    vals  `[B, H, S, T]` model dtype, the kept columns in ascending channel order, or their
          `quant.QuantizedTensor` (groups of tokens per column, as dense keys are quantized);
    idx   `[B, H, T]` int16, which channels they are. Pruned entries are zero. No per-row mask.
    """

    shape: tuple[int, int, int, int]
    vals: torch.Tensor
    idx: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(x) for x in self.shape)
        self.idx = compact(self.idx)
        if isinstance(self.vals, torch.Tensor):
            self.vals = compact(self.vals)

    @classmethod
    def from_dense(cls, x: torch.Tensor, idx: torch.Tensor) -> "ColumnPackedTensor":
        """Keep columns `idx [B, H, T]` (ascending) of `x [B, H, S, D]`."""
        b, h, s, _ = x.shape
        vals = x.gather(-1, idx.long().unsqueeze(2).expand(b, h, s, idx.shape[-1]))
        # int16 indices; an int16 `idx` passes through as the same tensor, so blocks share it
        return cls(shape=tuple(x.shape), vals=vals, idx=idx if idx.dtype == torch.int16 else idx.to(torch.int16))

    def with_quantized_vals(self, bits: int, group: int, valid: torch.Tensor | None = None) -> "ColumnPackedTensor":
        """The kept columns as `bits`-bit codes, one scale and zero per column and group of `group`
        tokens; `valid` (`[B, S]` or `[B, H, S]` bool) keeps padding out of the statistics."""
        return replace(self, vals=QuantizedTensor.quantize(self.vals, bits, group, "token", valid=valid))

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
        vals = self.vals.tensors() if isinstance(self.vals, QuantizedTensor) else [self.vals]
        return vals + [self.idx]

    @property
    def nbytes(self) -> int:
        return storage_nbytes(*self.tensors())

    def kept_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kept columns `[B, H, S, T]`, dequantized if they are codes."""
        if isinstance(self.vals, QuantizedTensor):
            return self.vals.dense(dtype)
        return self.vals if dtype is None else self.vals.to(dtype)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        b, h, s, d = self.shape
        index = self.idx.long().unsqueeze(2).expand(b, h, s, self.idx.shape[-1])
        dtype = dtype or self.dtype
        return torch.zeros(self.shape, dtype=dtype, device=self.idx.device).scatter_(-1, index, self.kept_values(dtype))

    def kept_per_row(self) -> torch.Tensor:
        b, h, s, _ = self.shape
        return torch.full((b, h, s), self.fixed_t, dtype=torch.int64, device=self.idx.device)

    def index_batch(self, index: torch.Tensor) -> "ColumnPackedTensor":
        index = index.to(self.idx.device)
        vals = self.vals.index_batch(index) if isinstance(self.vals, QuantizedTensor) else self.vals.index_select(0, index)
        return ColumnPackedTensor((vals.shape[0], *self.shape[1:]), vals, self.idx.index_select(0, index))

    def slice_seq(self, start: int, stop: int) -> "ColumnPackedTensor":
        if isinstance(self.vals, QuantizedTensor):
            vals = self.vals.slice_seq(start, stop)
        else:
            vals = self.vals[:, :, start:stop].contiguous().clone()
        return ColumnPackedTensor((*self.shape[:2], vals.shape[2], self.shape[3]), vals, self.idx)

    def to(self, device) -> "ColumnPackedTensor":
        return ColumnPackedTensor(self.shape, self.vals.to(device), self.idx.to(device))
