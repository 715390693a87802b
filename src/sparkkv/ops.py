"""Attention over stored chunks: the one attention path after prefill, usable without any cache.

    out = attend(query, parts, scaling, backend("auto", query.device))

`query [B, Hq, q, D]` (the new tokens' queries); `parts`: a list of `(keys, values, mask)`, a key
chunk and a value chunk (`packed.Chunk`: dense, SparK-packed, ThinK columns, packed values) over
the same `S_i` tokens, and their mask `[B, 1 or Hkv, q, S_i]` (bool, True = attend) or None
(`sparkkv.masks` builds them). The query heads sharing a kv-head are handled as extra query rows
(`M = G * q` rows per kv-head), so keys are never repeated. For every part, a backend computes
online-softmax partials over those rows,

    m    [B, Hkv, P, M]       max logit of the part (per split P)
    l    [B, Hkv, P, M]       sum of exp(logit - m)
    acc  [B, Hkv, P, M, Dv]   sum of exp(logit - m) * value

and `merge_partials` combines all parts by log-sum-exp. Attention sinks (GPT-OSS `s_aux`, one
logit per query head that takes softmax mass but has no value) enter the merge as one more part.
Returns `[B, q, Hq, Dv]` in the query dtype.

Backends, by `SparKConfig.attention_backend` (`backend(name, device)`):
    torch   the reference (`kernels/reference.py` in float32: chunks rebuilt densely, one at a time).
    cpu     the fused C++ kernels in `kernels/cpu.py` (CPU tensors).
    triton  the Triton kernels in `kernels/triton_decode.py` (CUDA tensors; CPU tensors only under
            the Triton interpreter, `TRITON_INTERPRET=1`, which is how the tests run it).
    auto    "cpu" for CPU tensors when the C++ kernel builds, otherwise "torch".
Parts whose mask differs between query rows (a multi-token forward over a sliding window) always
take the reference path. A backend that cannot serve a part (for example, sampled recoveries
store explicit per-entry values, which no kernel reads) hands it to the reference and says why:
a warning logged once per reason, and a count per reason in a `BackendReport`.
Backends hold no state, so a cache that names one can be copied and pickled.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import masks
from .config import ATTENTION_BACKENDS
from .kernels.operands import key_operand, value_operand
from .kernels.reference import merge_partials, reference_partials
from .packed import DenseChunk

log = logging.getLogger(__name__)

BACKENDS = ATTENTION_BACKENDS

Partials = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TorchBackend:
    """The reference: serves every part (float32, `kernels.reference.reference_partials`)."""

    name = "torch"

    def cannot_serve(self, keys, values) -> str | None:
        return None

    def partials(self, rows, keys, values, scaling, bias, mask=None) -> Partials:
        return reference_partials(rows, keys, values, scaling, bias, torch.float32, mask)


class KernelBackend:
    """A fused kernel module (`kernels.cpu`, `kernels.triton_decode`): it offers
    `can_serve(key_operand, value_operand)` and `decode_partials(rows, keys, values, scaling, bias)`."""

    def __init__(self, name: str, module_name: str) -> None:
        self.name = name
        self.module_name = module_name

    @property
    def kernels(self):
        return importlib.import_module(f"{__package__}.kernels.{self.module_name}")

    def cannot_serve(self, keys, values) -> str | None:
        return self.kernels.can_serve(key_operand(keys, None)[1], value_operand(values))

    def partials(self, rows, keys, values, scaling, bias, mask=None) -> Partials:
        rows, key = key_operand(keys, rows)
        return self.kernels.decode_partials(rows, key, value_operand(values), scaling, bias)


_TORCH = TorchBackend()
_CPU = KernelBackend("cpu", "cpu")
_TRITON = KernelBackend("triton", "triton_decode")


def backend(name: str, device: torch.device):
    """The backend for `SparKConfig.attention_backend` on `device`. An explicit request that cannot
    run here raises a `RuntimeError` saying why; "auto" picks the fastest one that runs."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}: expected one of {list(BACKENDS)}")
    if name == "torch":
        return _TORCH
    if name == "auto":
        if device.type == "cpu":
            reason = _CPU.kernels.unavailable_reason()
            if reason is None:
                return _CPU
            _warn_once(f"attention_backend='auto': the CPU kernel is unavailable ({reason}); using the PyTorch reference")
        return _TORCH
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"attention_backend='cpu' serves CPU tensors; the cache is on {device}")
        reason = _CPU.kernels.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"attention_backend='cpu' was requested but the CPU kernel is unavailable: {reason}")
        return _CPU
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("attention_backend='triton' needs triton (pip install 'sparkkv[gpu]')") from exc
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "attention_backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (slow; for tests), or use attention_backend='cpu' / 'auto'"
        )
    return _TRITON


resolve_backend = backend  # the name of earlier releases


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
        mask = None if mask is None else masks.to_bool(mask)
        bias, per_row = masks.row_bias(mask)
        chosen = _TORCH if per_row else backend
        if chosen is not _TORCH:
            reason = chosen.cannot_serve(keys, values)
            if reason is not None:
                _warn_once(f"attention_backend={chosen.name!r} cannot serve a chunk ({reason}); the PyTorch reference serves it")
                if report is not None:
                    report.not_served[reason] += 1
                chosen = _TORCH
        if report is not None:
            report.served[chosen.name] += 1
        row_mask = masks.group_rows(mask, g) if per_row else None
        partials.append(chosen.partials(rows, keys, values, scaling, bias, row_mask))
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
