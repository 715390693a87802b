"""Fused CPU key compression for the fixed-ratio selection (the C++ kernel in cpu_compress.cpp):
saliency, top-T selection and packing in one pass per (token, kv-head) row. Its reference is the
PyTorch pipeline in sparkkv/method.py (same selection and tie rule: lower channel first), which
calls this module; the check and the timing against that reference are `tests/test_compress_kernel.py`
and `sparkkv bench compress` (this module imports nothing of the method, so the import graph
has no circle).
"""

from __future__ import annotations

import torch

from .build import load, unavailable_reason

NAME, SOURCE = "sparkkv_cpu_compress", "cpu_compress.cpp"


def unavailable() -> str | None:
    """None when the kernel is built and usable here, else why not."""
    return unavailable_reason(NAME, SOURCE)


def available() -> bool:
    return unavailable() is None


def compress_fixed(keys: torch.Tensor, qn: torch.Tensor, t: int, squared: bool, want_sign: bool):
    """keys `[B, H, S, D]` (CPU), qn float32 `[B, H, D]` -> `(vals [B, H, S, T], keep, sign or
    None, mean pruned saliency float32 [B, H, S])`; see cpu_compress.cpp."""
    module = load(NAME, SOURCE)
    vals, keep, sign, mean = module.compress_fixed(keys.contiguous(), qn.float().contiguous(), int(t), bool(squared), bool(want_sign))
    return vals, keep, (sign if want_sign else None), mean
