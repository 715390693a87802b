"""Attention over stored chunks: the one attention path of a `SparKCache` after prefill.

The cache hands `attend` a list of parts `(keys, values, mask)`: a key chunk and a value chunk
(`packed.Chunk`: dense, SparK-packed, ThinK columns, packed values) over the same `S_i` tokens,
and their mask `[B, 1 or Hkv, q, S_i]` (bool, True = attend) or None. The query heads sharing a
kv-head are handled as extra query rows (`M = G * q` rows per kv-head), so keys are never
repeated. For every part, a backend computes online-softmax partials over those rows,

    m    [B, Hkv, P, M]       max logit of the part (per split P)
    l    [B, Hkv, P, M]       sum of exp(logit - m)
    acc  [B, Hkv, P, M, Dv]   sum of exp(logit - m) * value

and `merge_partials` combines all parts by log-sum-exp. Attention sinks (GPT-OSS `s_aux`, one
logit per query head that takes softmax mass but has no value) enter the merge as one more part.

Backends, chosen by `SparKConfig.attention_backend`:
    torch   the reference: each chunk is read through its own `logits` / `weighted_sum`
            (packed chunks are rebuilt densely in float32, one chunk at a time, and dropped).
    cpu     the fused C++ kernels in `kernels/cpu.py` (CPU tensors).
    triton  the Triton kernels in `kernels/triton_decode.py` (CUDA tensors; CPU tensors only under
            the Triton interpreter, `TRITON_INTERPRET=1`, which is how the tests run it).
    auto    "cpu" for CPU tensors when the C++ kernel builds, otherwise "torch".
Parts whose mask differs between query rows (a multi-token forward over a sliding window) always
take the reference path. A backend that cannot serve a part (for example, sampled recoveries
store explicit per-entry values, which no kernel reads) hands it to the reference and says why:
a warning logged once per reason, and a count per reason in `SparKLayer.backend_report`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from .kernels.reference import merge_partials
from .packed import DenseChunk

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")

Partials = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# the reference partials
# ---------------------------------------------------------------------------------------------
def reference_partials(rows: torch.Tensor, keys, values, scaling: float, mask_rows: torch.Tensor | None) -> Partials:
    """Partials of query `rows [B, H, M, D]` over one part, through the chunks' own reference
    `logits` / `weighted_sum`. `mask_rows`: None or bool broadcastable to `[B, H, M, S]`."""
    logits = keys.logits(rows).mul_(scaling)
    if mask_rows is not None:
        logits = logits.masked_fill(~mask_rows, float("-inf"))
    m = logits.amax(dim=-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # a row that sees nothing here
    p = torch.exp(logits - m_safe.unsqueeze(-1))
    acc = values.weighted_sum(p)
    return m.unsqueeze(2), p.sum(-1).unsqueeze(2), acc.unsqueeze(2)


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
class TorchBackend:
    """The reference: serves every part."""

    name = "torch"

    def cannot_serve(self, keys, values) -> str | None:
        return None

    def partials(self, rows, keys, values, scaling, bias) -> Partials:
        mask = None if bias is None else (bias > float("-inf")).unsqueeze(2)
        return reference_partials(rows, keys, values, scaling, mask)


def _operands(keys, values) -> tuple[object, object]:
    """What a kernel's `can_serve` inspects: the key and value operands (rows do not matter)."""
    return keys.kernel_keys(None)[1], values.kernel_values()


class CpuBackend:
    """The fused C++ kernels (`kernels/cpu.py`)."""

    name = "cpu"

    def __init__(self) -> None:
        from .kernels import cpu

        self.kernels = cpu
        self.unavailable = cpu.unavailable_reason()

    def cannot_serve(self, keys, values) -> str | None:
        return self.unavailable or self.kernels.can_serve(*_operands(keys, values))

    def partials(self, rows, keys, values, scaling, bias) -> Partials:
        rows, key_operand = keys.kernel_keys(rows)
        return self.kernels.decode_partials(rows, key_operand, values.kernel_values(), scaling, bias)


class TritonBackend:
    """The Triton kernels (`kernels/triton_decode.py`)."""

    name = "triton"

    def __init__(self) -> None:
        from .kernels import triton_decode

        self.kernels = triton_decode

    def cannot_serve(self, keys, values) -> str | None:
        return self.kernels.can_serve(*_operands(keys, values))

    def partials(self, rows, keys, values, scaling, bias) -> Partials:
        rows, key_operand = keys.kernel_keys(rows)
        return self.kernels.decode_partials(rows, key_operand, values.kernel_values(), scaling, bias)


_TORCH = TorchBackend()


def resolve_backend(name: str, device: torch.device):
    """The backend object for `SparKConfig.attention_backend` on `device`. An explicit request that
    cannot run here raises a `RuntimeError` saying why; "auto" picks the fastest one that runs."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}: expected one of {list(BACKENDS)}")
    if name == "torch":
        return _TORCH
    if name == "auto":
        if device.type == "cpu":
            backend = CpuBackend()
            if backend.unavailable is None:
                return backend
            _warn_once(f"attention_backend='auto': the CPU kernel is unavailable ({backend.unavailable}); using the PyTorch reference")
        return _TORCH
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"attention_backend='cpu' serves CPU tensors; the cache is on {device}")
        backend = CpuBackend()
        if backend.unavailable is not None:
            raise RuntimeError(f"attention_backend='cpu' was requested but the CPU kernel is unavailable: {backend.unavailable}")
        return backend
    # triton
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("attention_backend='triton' needs triton (pip install 'sparkkv[gpu]')") from exc
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "attention_backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (slow; for tests), or use attention_backend='cpu' / 'auto'"
        )
    return TritonBackend()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@dataclass
class BackendReport:
    """Which backend served how many parts, and why parts were handed to the reference."""

    requested: str = "auto"
    served: Counter = field(default_factory=Counter)
    not_served: Counter = field(default_factory=Counter)  # reason -> parts

    def as_dict(self) -> dict:
        return {"requested": self.requested, "served": dict(self.served), "not_served": dict(self.not_served)}


# ---------------------------------------------------------------------------------------------
# attention over parts
# ---------------------------------------------------------------------------------------------
def _rows_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hm, q, S]` -> `[B, Hm, G * q, S]`: query row `g * q + j` uses the mask of query `j`."""
    b, hm, q, s = mask.shape
    return mask.unsqueeze(2).expand(b, hm, groups, q, s).reshape(b, hm, groups * q, s)


def attend(
    query: torch.Tensor,
    parts: list,
    scaling: float,
    backend=_TORCH,
    sinks: torch.Tensor | None = None,
    report: BackendReport | None = None,
) -> torch.Tensor:
    """Attention of `query [B, Hq, q, D]` over `parts` (see the module docstring).

    `sinks`: None or `[Hq]` logits (attention sinks). Returns `[B, q, Hq, Dv]` in the query dtype.
    """
    b, hq, q, d = query.shape
    h = parts[0][0].shape[1]
    g = hq // h
    rows = query.reshape(b, h, g * q, d)
    partials = []
    for keys, values, mask in parts:
        bias = None
        per_row = False
        if mask is not None:
            if mask.dtype != torch.bool:  # an additive mask: -inf (or dtype min) = masked
                mask = mask > torch.finfo(mask.dtype).min / 2
            per_row = q > 1 and not bool((mask == mask[:, :, :1]).all())
            if not per_row:
                bias = torch.zeros(mask[:, :, 0].shape, dtype=torch.float32, device=mask.device)
                bias = bias.masked_fill_(~mask[:, :, 0], float("-inf"))
        chosen = backend
        if per_row:
            chosen = _TORCH
        elif backend is not _TORCH:
            reason = backend.cannot_serve(keys, values)
            if reason is not None:
                _warn_once(f"attention_backend={backend.name!r} cannot serve a chunk ({reason}); the PyTorch reference serves it")
                if report is not None:
                    report.not_served[reason] += 1
                chosen = _TORCH
        if report is not None:
            report.served[chosen.name] += 1
        if per_row:
            partials.append(reference_partials(rows, keys, values, scaling, _rows_mask(mask, g)))
        else:
            partials.append(chosen.partials(rows, keys, values, scaling, bias))
    if sinks is not None:
        sink = sinks.float().reshape(1, h, g, 1).expand(b, h, g, q).reshape(b, h, 1, g * q).to(rows.device)
        dv = partials[0][2].shape[-1]
        partials.append((sink, torch.ones_like(sink), torch.zeros(b, h, 1, g * q, dv, device=rows.device)))
    out = merge_partials(partials)  # [B, H, M, Dv]
    dv = out.shape[-1]
    return out.view(b, h, g, q, dv).reshape(b, hq, q, dv).transpose(1, 2).to(query.dtype)


def prefill_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    sinks: torch.Tensor | None = None,
    rows_per_step: int = 256,
) -> torch.Tensor:
    """Dense attention of the prompt over itself through the reference path, `rows_per_step`
    query positions at a time (memory bounded by `rows_per_step x S` logits per head): for what
    SDPA lacks (attention sinks). query `[B, Hq, S, D]`, keys/values `[B, Hkv, S, D]`, mask
    `[B, 1 or Hkv, S, S]` or None (causal) -> `[B, S, Hq, Dv]`."""
    b, _, s, _ = query.shape
    part_keys, part_values = DenseChunk(keys), DenseChunk(values)
    outs = []
    for i0 in range(0, s, rows_per_step):
        i1 = min(s, i0 + rows_per_step)
        if mask is None:
            rows = torch.arange(i0, i1, device=query.device).view(1, 1, -1, 1)
            part_mask = (torch.arange(s, device=query.device).view(1, 1, 1, s) <= rows).expand(b, 1, i1 - i0, s)
        else:
            part_mask = mask[:, :, i0:i1].expand(b, *mask.shape[1:2], i1 - i0, s)
        outs.append(attend(query[:, :, i0:i1], [(part_keys, part_values, part_mask)], scaling, _TORCH, sinks))
    return torch.cat(outs, dim=1)
