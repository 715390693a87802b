"""What a fused attention kernel reads from a stored chunk, and the one check of those operands.

The cache stores chunks (`packed.Chunk`: `DenseChunk`, SparK's `PackedTensor`, ThinK's
`ColumnPackedTensor`); the kernels read two kinds of operand: a dense `[B, H, S, D]` tensor or a
`PackedTensor` (fixed or variable T). This module is the only place that maps one onto the other:

    key_operand(chunk, query_rows) -> (query rows, operand)   ThinK: dense keys over the T kept
                                                              columns, the query rows' matching channels
    value_operand(chunk) -> operand
    operand_problem(name, x, device_ok, where) -> None | reason   (shared by kernels/cpu.py and
                                                              kernels/triton_decode.py)
"""

from __future__ import annotations

from typing import Callable

import torch

from ..packed import ColumnPackedTensor, DenseChunk, PackedTensor
from ..quant import QuantizedTensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def device_of(x) -> torch.device:
    return x.device


def dtype_of(x) -> torch.dtype:
    return x.dtype


def operand_problem(name: str, x, device_ok: Callable[[torch.device], bool], where: str) -> str | None:
    """Why a kernel cannot read operand `x` (keys or values), or None. `device_ok` says which
    devices the kernel runs on, `where` describes them for the message."""
    if isinstance(x, PackedTensor):
        if x.fill is not None:
            return f"{name} store explicit per-entry fill values (sampled recovery), which the kernel does not rebuild"
        if x.trits is not None:
            return f"packed {name} store a ternary mask code, which the kernel does not read"
        if not isinstance(x.vals, torch.Tensor):
            return f"packed {name} store quantized kept values, which the kernel does not read"
        if x.shape[-1] % 8:
            return f"packed {name} have head_dim {x.shape[-1]}, not a multiple of 8"
    elif isinstance(x, QuantizedTensor):
        return f"{name} are {x.bits}-bit codes, which the kernel does not read"
    elif not isinstance(x, torch.Tensor):
        return f"the kernel reads PackedTensor or dense tensors, not {type(x).__name__} {name}"
    elif x.dim() != 4:
        return f"dense {name} must be [B, H, S, D], got shape {tuple(x.shape)}"
    if not device_ok(device_of(x)):
        return f"{name} are on {device_of(x)}: {where}"
    if dtype_of(x) not in DTYPES:
        return f"{name} are {dtype_of(x)}; the kernel reads float32, bfloat16 and float16"
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
