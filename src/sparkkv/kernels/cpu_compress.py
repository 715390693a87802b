"""Fused CPU key compression for the fixed-ratio selection (the C++ kernel in cpu_compress.cpp):
saliency, top-T selection and packing in one pass per (token, kv-head) row. Its reference is the
PyTorch pipeline in sparkkv/method.py (same selection and tie rule: lower channel first).

    python -m sparkkv.kernels.cpu_compress     # check against the reference and time both
"""

from __future__ import annotations

import torch

from .build import load, unavailable_reason

NAME, SOURCE = "sparkkv_cpu_compress", "cpu_compress.cpp"


def available() -> bool:
    return unavailable_reason(NAME, SOURCE) is None


def compress_fixed(keys: torch.Tensor, qn: torch.Tensor, t: int, squared: bool, want_sign: bool):
    """keys `[B, H, S, D]` (CPU), qn float32 `[B, H, D]` -> `(vals [B, H, S, T], keep, sign or
    None, mean pruned saliency float32 [B, H, S])`; see cpu_compress.cpp."""
    module = load(NAME, SOURCE)
    vals, keep, sign, mean = module.compress_fixed(keys.contiguous(), qn.float().contiguous(), int(t), bool(squared), bool(want_sign))
    return vals, keep, (sign if want_sign else None), mean


def main() -> None:
    import time

    from ..config import SparKConfig
    from ..method import compress_keys

    if not available():
        raise SystemExit(f"the kernel cannot be built here: {unavailable_reason(NAME, SOURCE)}")
    for shape in [(1, 3, 4096, 64), (1, 8, 32768, 128)]:
        b, h, s, d = shape
        keys = torch.randn(shape).bfloat16()
        queries = torch.randn(b, 4 * h, 32, d)
        fused_cfg = SparKConfig(key_prune_ratio=0.8, attention_backend="cpu")
        ref_cfg = fused_cfg.replace(attention_backend="torch")
        got, want = compress_keys(keys, queries, fused_cfg), compress_keys(keys, queries, ref_cfg)
        same = torch.equal(got.keep, want.keep) and torch.equal(got.vals, want.vals) and torch.equal(got.sign, want.sign)
        times = {}
        for name, cfg in (("fused", fused_cfg), ("reference", ref_cfg)):
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                compress_keys(keys, queries, cfg)
                runs.append(time.perf_counter() - start)
            times[name] = sorted(runs)[2] * 1e3
        print(f"{shape}: identical selection {same} | fused {times['fused']:.1f} ms | reference {times['reference']:.1f} ms "
              f"({times['reference'] / times['fused']:.1f}x)")


if __name__ == "__main__":
    main()
