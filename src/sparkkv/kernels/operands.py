"""What a fused attention kernel reads from a stored chunk, and the one check of those operands.

The cache stores chunks (`packed.Chunk`: `DenseChunk`, SparK's `PackedTensor`, ThinK's
`ColumnPackedTensor`, `quant.QuantizedTensor`); the kernels read three kinds of operand: a dense
`[B, H, S, D]` tensor, a `PackedTensor` (fixed or variable T; keep + sign bits or a ternary code;
kept values raw or as `QuantizedTensor` codes, fixed T) or a `QuantizedTensor` (dense codes, groups
along the row or along tokens). This module is the only place that maps one onto the other:

    key_operand(chunk, query_rows) -> (query rows, operand)   ThinK: its kept columns (raw or codes)
                                                              as dense keys of T channels, the query
                                                              rows' matching channels
    value_operand(chunk) -> operand
    fields(operand) -> Fields | None                          the flat description both kernels read
                                                              (kernels/cpu.py, kernels/triton_decode.py)
    operand_problem(name, x, device_ok, where) -> None | reason   (shared by both kernels)

`Fields` says, per operand: where its values come from (`vals`: raw values in the model dtype,
or `codes` + `qscale` / `qzero`: `bits`-bit codes dequantized as `c * s + z`, or `(c - mid) * s`
without a zero, one scale per `group` elements of a row, per `group` tokens of an element, or per
`group` tokens of a channel, a packed row's j-th kept value taking its channel's scale), and,
for packed operands, how the row's mask is stored (`keep` + `sign` bits, or `trits`) and the
recovery fields (`scale`, `chan`). A kernel reads these fields and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..packed import ColumnPackedTensor, DenseChunk, PackedTensor
from ..quant import BITS, QuantizedTensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def key_operand(chunk, query_rows: torch.Tensor | None):
    """`(query rows, operand)` for a kernel reading `chunk` as keys; `query_rows=None` asks for the
    operand only (what `can_serve` inspects)."""
    if isinstance(chunk, ColumnPackedTensor):
        if query_rows is None:
            return None, chunk.vals
        b, h, m, _ = query_rows.shape
        index = chunk.idx.long().unsqueeze(2).expand(b, h, m, chunk.fixed_t)
        return query_rows.gather(-1, index), chunk.vals
    return query_rows, _plain(chunk)


def value_operand(chunk):
    """The operand a kernel reads for `chunk` as values."""
    if isinstance(chunk, ColumnPackedTensor):
        return chunk.dense()
    return _plain(chunk)


def _plain(chunk):
    return chunk.data if isinstance(chunk, DenseChunk) else chunk


@dataclass
class Fields:
    """One operand as a kernel reads it (module docstring). Absent fields are None."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype  # the model dtype: of raw values, and what codes stand for
    device: torch.device
    source: object  # the operand itself (a chunk's protocol methods, e.g. kept_per_row)
    vals: torch.Tensor | None = None  # raw values: dense [B, H, S, D], kept [B, H, S, T] or flat
    fixed_t: int | None = None  # values per row: D (dense), T (fixed packed), None (variable T)
    keep: torch.Tensor | None = None  # uint8 [B, H, S, D/8]
    sign: torch.Tensor | None = None  # uint8 [B, H, S, D/8]
    trits: torch.Tensor | None = None  # uint8 [B, H, S, ceil(D/5)] (keep and sign in one code)
    scale: torch.Tensor | None = None  # [B, H, S] recovery magnitude
    chan: torch.Tensor | None = None  # float32 [B, H, D]
    fill: torch.Tensor | None = None  # explicit fill values (no kernel reads them)
    codes: torch.Tensor | None = None  # uint8 [B, H, S, ceil(N * bits / 8)], N = fixed_t
    # row axis [B, H, S, ceil(N / group)], token axis [B, H, G, N], channel axis [B, H, G, D]
    qscale: torch.Tensor | None = None
    qzero: torch.Tensor | None = None  # like qscale, or None (symmetric mid-rise codes)
    bits: int = 0
    group: int = 0
    token_axis: bool = False  # groups along tokens (axes "token" and "channel")
    channel_axis: bool = False  # statistics indexed by the value's channel (packed rows; no zero)
    offset: int = 0  # token groups: the first token's place in its group

    @property
    def axis_code(self) -> int:
        """0 row, 1 token, 2 channel: the kernels' integer for the axis."""
        return 2 if self.channel_axis else int(self.token_axis)

    @property
    def packed(self) -> bool:
        return self.keep is not None or self.trits is not None

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def signs(self) -> bool:
        """Whether pruned entries carry a sign (sign bits, or the ternary code)."""
        return self.sign is not None or self.trits is not None


def _codes(q: QuantizedTensor) -> dict:
    return dict(codes=q.codes, qscale=q.scale, qzero=q.zero, bits=q.bits, group=q.group,
                token_axis=q.axis != "row", channel_axis=q.axis == "channel", offset=q.offset)


def fields(x) -> Fields | None:
    """The flat description of operand `x` (a dense tensor, `PackedTensor` or `QuantizedTensor`;
    a `Fields` is its own description: operands read in place, `vllm/records.py`), or None for
    anything else."""
    if isinstance(x, Fields):
        return x
    if isinstance(x, torch.Tensor):
        return Fields(tuple(x.shape), x.dtype, x.device, x, vals=x, fixed_t=x.shape[-1] if x.dim() == 4 else None)
    if isinstance(x, QuantizedTensor):
        return Fields(x.shape, x.dtype, x.codes.device, x, fixed_t=x.shape[-1], **_codes(x))
    if isinstance(x, PackedTensor):
        common = dict(fixed_t=x.fixed_t, keep=x.keep, sign=x.sign, trits=x.trits, scale=x.scale, chan=x.chan, fill=x.fill)
        if isinstance(x.vals, QuantizedTensor):
            return Fields(x.shape, x.dtype, x.device, x, **common, **_codes(x.vals))
        return Fields(x.shape, x.dtype, x.device, x, vals=x.vals, **common)
    return None


def operand_problem(name: str, x, device_ok: Callable[[torch.device], bool], where: str) -> str | None:
    """Why a kernel cannot read operand `x` (keys or values), or None. `device_ok` says which
    devices the kernel runs on, `where` describes them for the message."""
    f = fields(x)
    if f is None:
        return f"the kernel reads PackedTensor, QuantizedTensor or dense tensors, not {type(x).__name__} {name}"
    if f.vals is not None and f.vals is x and x.dim() != 4:
        return f"dense {name} must be [B, H, S, D], got shape {tuple(x.shape)}"
    if f.fill is not None:
        return f"{name} store explicit per-entry fill values (sampled recovery), which the kernel does not rebuild"
    if f.packed and f.shape[-1] % 8:
        return f"packed {name} have head_dim {f.shape[-1]}, not a multiple of 8"
    if f.quantized:
        if f.bits not in BITS:
            return f"{name} are {f.bits}-bit codes; the kernel reads {', '.join(map(str, BITS))}-bit codes"
        if f.fixed_t is None or f.group < 1:
            return f"quantized {name} need a fixed number of values per row and a group size >= 1"
        if f.channel_axis and (not f.packed or f.qzero is not None):
            return f"quantized {name} with per-channel scales must be packed rows with symmetric codes"
        if f.qscale.dtype not in SCALE_DTYPES or (f.qzero is not None and f.qzero.dtype != f.qscale.dtype):
            return f"quantized {name} have scales of {f.qscale.dtype}; the kernel reads float32, bfloat16 and float16"
    if not device_ok(f.device):
        return f"{name} are on {f.device}: {where}"
    if f.dtype not in DTYPES:
        return f"{name} are {f.dtype}; the kernel reads float32, bfloat16 and float16"
    return None


def pair_problem(keys, values, device_ok: Callable[[torch.device], bool], where: str) -> str | None:
    """Why a kernel cannot read this (keys, values) operand pair, or None."""
    for name, x in (("keys", keys), ("values", values)):
        problem = operand_problem(name, x, device_ok, where)
        if problem:
            return problem
    if tuple(keys.shape[:3]) != tuple(values.shape[:3]):
        return f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in batch, heads or length"
    return None
