"""Fused CPU kernel for `q @ Khat^T` over SparK-packed keys: the kernel, its reference, its benchmark.

The C++ source (`cpu_packed_qk.cpp`) is compiled on first use with `-O3 -march=native` through
`torch.utils.cpp_extension` (needs a C++ compiler and `ninja`) and cached by torch. If that is not
possible, or `SPARKKV_CPU_KERNEL=0` is set, `packed_qk` returns None and attention falls back to
rebuilding dense keys in PyTorch (`PackedTensor.dense()`), which computes the same numbers.

    python -m sparkkv.kernels.cpu [--contexts 4096 32768]   # correctness check + timing vs dense
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from ..packed import PackedTensor

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_packed_qk.cpp")
_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled extension, or None if it cannot be built here (logged once)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("SPARKKV_CPU_KERNEL", "1") == "0":
            log.info("sparkkv CPU kernel disabled by SPARKKV_CPU_KERNEL=0")
            return None
        try:
            from torch.utils.cpp_extension import load as load_extension

            _module = load_extension(
                name="sparkkv_cpu_packed_qk",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            log.info("sparkkv CPU kernel built (AVX-512 path: %s)", _module.has_avx512_path())
        except Exception as exc:  # no compiler, no ninja, unsupported platform...
            log.warning("sparkkv CPU kernel unavailable, using the PyTorch path (%s: %s)", type(exc).__name__, exc)
            _module = None
    return _module


def unavailable_reason() -> str | None:
    """None when the extension is built and usable here, else why not."""
    if os.environ.get("SPARKKV_CPU_KERNEL", "1") == "0":
        return "disabled by SPARKKV_CPU_KERNEL=0"
    return None if load() is not None else "the C++ extension could not be built (see the warning logged)"


def can_serve(keys, values) -> str | None:
    """None when `decode_partials` handles this (keys, values) pair, else the reason."""
    if isinstance(keys, PackedTensor) and keys.fill is not None:
        return "sampled recoveries store explicit per-entry key values"
    if isinstance(values, PackedTensor) and values.fill is not None:
        return "sampled recoveries store explicit per-entry values"
    if not isinstance(keys, (PackedTensor, torch.Tensor)) or not isinstance(values, (PackedTensor, torch.Tensor)):
        return f"no kernel reads {type(keys).__name__} keys with {type(values).__name__} values"
    device = keys.vals.device if isinstance(keys, PackedTensor) else keys.device
    if device.type != "cpu":
        return "tensors are not on the CPU"
    return None


def decode_partials(query_rows, keys, values, scaling, bias=None):
    """Online-softmax partials `(m, l, acc)` of `query_rows [B, H, M, D]` over one chunk pair
    (see `sparkkv.ops`): fused logits for packed keys, then softmax and P.V in PyTorch."""
    if isinstance(keys, PackedTensor):
        logits = packed_qk(query_rows, keys)
    elif isinstance(keys, torch.Tensor):
        logits = torch.matmul(query_rows.float(), keys.float().transpose(-1, -2))
    else:
        logits = keys.logits(query_rows)
    logits = logits.mul_(scaling)
    if bias is not None:
        logits = logits + bias.unsqueeze(2)
    m = logits.amax(dim=-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(logits - m_safe.unsqueeze(-1))
    if isinstance(values, torch.Tensor):
        acc = torch.matmul(p, values.float())
    else:
        acc = values.weighted_sum(p)
    return m.unsqueeze(2), p.sum(-1).unsqueeze(2), acc.unsqueeze(2)


def supports(packed: PackedTensor) -> bool:
    """Whether the kernel handles this packed tensor (CPU, no explicit fill; fixed or variable T)."""
    return packed.vals.device.type == "cpu" and packed.fill is None


def packed_qk(query_rows: torch.Tensor, packed: PackedTensor) -> torch.Tensor | None:
    """Logits `query_rows [B, H, M, D] @ packed.dense()^T` -> float32 `[B, H, M, S]`, or None."""
    if not supports(packed):
        return None
    module = load()
    if module is None:
        return None
    empty = torch.empty(0)
    return module.packed_qk(
        query_rows.float().contiguous(),
        packed.vals,
        packed.keep,
        packed.sign if packed.sign is not None else torch.empty(0, dtype=torch.uint8),
        packed.scale.float().contiguous() if packed.scale is not None else empty,
        packed.chan if packed.chan is not None else empty,
    )


def reference_packed_qk(query_rows: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """The plain PyTorch reference: rebuild dense keys (recovered entries unrounded, as in the
    kernel), then one matmul in float32."""
    return torch.matmul(query_rows.float(), packed.dense(torch.float32).transpose(-1, -2))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    from ..config import SparKConfig
    from ..method import compress_keys

    parser = argparse.ArgumentParser(description="check and time the fused CPU kernel against dense")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if load() is None:
        raise SystemExit("the CPU kernel could not be built here (see the warning above)")
    h, g, d = 8, 4, 128
    for s in args.contexts:
        keys = torch.randn(1, h, s, d).bfloat16()
        q = torch.randn(1, h, g, d)
        packed = compress_keys(keys, torch.randn(1, h * g, 32, d), SparKConfig(key_prune_ratio=0.8))
        ref = reference_packed_qk(q, packed)
        got = packed_qk(q, packed)
        err = ((got - ref).norm() / ref.norm()).item()

        def median(fn):
            fn()
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return sorted(times)[len(times) // 2] * 1e3

        dense_ms = median(lambda: torch.matmul(q.bfloat16(), keys.transpose(-1, -2)))
        kernel_ms = median(lambda: packed_qk(q, packed))
        torch_ms = median(lambda: torch.matmul(q.bfloat16(), packed.dense().transpose(-1, -2)))
        print(f"S={s}: rel err {err:.2e} | dense bf16 matmul {dense_ms:.2f} ms | fused kernel {kernel_ms:.2f} ms "
              f"({kernel_ms / dense_ms:.2f}x) | pytorch rebuild {torch_ms:.1f} ms ({torch_ms / dense_ms:.1f}x)")


if __name__ == "__main__":
    main()
