"""Fused CPU attention kernels over SparK-packed and quantized keys and values (C++, `cpu_decode.cpp`).

    decode_partials(query_rows, keys, values, scaling, bias=None, splits=None) -> (m, l, acc)
        logits, online softmax and P.V in one pass over packed, quantized (or dense) keys and
        values, all query rows of a GQA group at once, parallel over (batch, kv-head, split); the
        caller merges the per-split partials with other chunks by log-sum-exp
        (`reference.merge_partials`). Operands: what `operands.fields` describes (dense tensors,
        `PackedTensor` with keep + sign bits or a ternary code and raw or quantized kept values,
        `QuantizedTensor` with groups along rows or tokens); codes are dequantized in registers.
    packed_qk(query_rows, packed) -> logits   (multi-token forwards whose mask differs per row)
    can_serve(keys, values) -> None | reason

The extension is compiled on first use with `-O3 -march=native -fopenmp` through
`torch.utils.cpp_extension` (needs a C++ compiler and `ninja`; about a minute) and cached by torch
(`TORCH_EXTENSIONS_DIR`). Work is split with `at::parallel_for`, so `torch.set_num_threads` applies.
The kernels hold no state: concurrent calls are safe.

Numerics (docs/kernels.md): float32 accumulation everywhere. On CPUs with AVX512_BF16 the logits
use bf16 dot products when the query rows and the keys are bfloat16 (products exact, pruned key
entries rounded to bfloat16), and P.V uses them when the values are bfloat16 (P rounded to
bfloat16, as PyTorch's bf16 attention does): about 1e-3 relative error against the float64
reference. `path="float32"` keeps every entry and probability in float32 (about 1e-6), `path="avx2"` skips
the AVX-512 paths (the AVX2 path, which also serves ternary codes and quantized operands on
AVX-512 machines), and `path="portable"` runs the scalar build compiled without AVX-512 or AVX2.

    python -m sparkkv.kernels.cpu [--contexts 4096 32768] [--threads 2]   # check + time vs dense
"""

from __future__ import annotations

import logging
import math

import torch

from ..packed import PackedTensor
from . import build, operands
from .reference import merge_partials, reference_attention

log = logging.getLogger(__name__)
_NAME, _SOURCE = "sparkkv_cpu_decode", "cpu_decode.cpp"
PATHS = ("auto", "float32", "avx2", "portable")


def load(portable: bool = False):
    """The compiled extension (the portable scalar build when `portable`), or None if it cannot
    be built here (the reason is logged once and returned by `unavailable_reason`)."""
    return build.load(_NAME, _SOURCE, portable)


def unavailable_reason(portable: bool = False) -> str | None:
    """None when the extension is built and usable here, else why not."""
    return build.unavailable_reason(_NAME, _SOURCE, portable)


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def _pair_problem(keys, values) -> str | None:
    """Why the kernel cannot read this (keys, values) operand pair, whether or not it is built."""
    return operands.pair_problem(keys, values, _on_cpu, "the CPU kernel reads CPU tensors")


def can_serve(keys, values) -> str | None:
    """None when `decode_partials` handles this (keys, values) operand pair, else the reason (one sentence)."""
    return _pair_problem(keys, values) or unavailable_reason()


def default_splits(batch_heads: int, seq_len: int, threads: int | None = None) -> int:
    """Splits of the sequence per (batch, kv-head): enough work items for every thread to get two,
    but no split shorter than 256 tokens."""
    threads = threads or torch.get_num_threads()
    return max(1, min(math.ceil(2 * threads / max(batch_heads, 1)), seq_len // 256))


def _fields(x) -> tuple[list[torch.Tensor], list[int]]:
    """An operand as the extension takes it (`operands.Fields`): tensors vals, keep, sign, scale,
    chan, trits, codes, qscale, qzero (empty ones for absent fields) and ints bits, group,
    axis (0 row, 1 token, 2 channel), offset, codes per row."""
    f = operands.fields(x)
    empty, empty8 = torch.empty(0), torch.empty(0, dtype=torch.uint8)
    pick = lambda t, e: e if t is None else t.contiguous()  # noqa: E731
    tensors = [pick(f.vals, empty), pick(f.keep, empty8), pick(f.sign, empty8), pick(f.scale, empty), pick(f.chan, empty),
               pick(f.trits, empty8), pick(f.codes, empty8), pick(f.qscale, empty), pick(f.qzero, empty)]
    return tensors, [f.bits, f.group, f.axis_code, f.offset, f.fixed_t if f.quantized else 0]


_EMPTY8, _EMPTY64 = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


def _query(query_rows: torch.Tensor) -> torch.Tensor:
    """bf16 query rows stay bf16 (the bf16 dot-product path), anything else becomes float32."""
    q = query_rows if query_rows.dtype == torch.bfloat16 else query_rows.float()
    return q.contiguous()


def _flags(path: str) -> tuple[bool, bool, bool]:
    """portable, bf16_dot, avx512 for the extension."""
    return path == "portable", path == "auto", path in ("auto", "float32")


def _module_for(path: str):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    portable = path == "portable"
    module = load(portable)
    if module is None:
        raise RuntimeError(f"the sparkkv CPU kernel is unavailable: {unavailable_reason(portable)}")
    return module


def decode_partials(query_rows, keys, values, scaling: float, bias=None, splits: int | None = None, *, path: str = "auto",
                    pages: torch.Tensor | None = None, block_ids: torch.Tensor | None = None):
    """Online-softmax partials of `query_rows [B, H, M, D]` over one (keys, values) chunk.

    keys: `PackedTensor` (fixed or variable T, no explicit fill; keep + sign bits or a ternary
    code; kept values raw or a `QuantizedTensor`), `QuantizedTensor` or dense `[B, H, S, D]`;
    values: the same kinds, `[B, H, S, Dv]`; any of float32 / bfloat16 / float16 (scales of
    quantized ones: float32 / bfloat16 / float16). bias: None or additive float32 `[B, H, S]` / `[B, 1, S]` (-inf = masked), the same for
    all M rows. splits: pieces of the sequence per (batch, kv-head) (default `default_splits`).
    path: "auto" (fastest), "float32" (no bf16 rounding), "avx2" (no AVX-512) or "portable"
    (scalar build).
    pages, block_ids: read the operands in place from KV pages (the vLLM backend's records): `pages`
    uint8 `[P, page bytes]` (rows may lie further apart, vLLM's page stride), `block_ids` int64 `[B]`;
    keys and values (`operands.Fields` or operands) then describe page 0 (`[1, H, S, ...]` views of
    `pages[0]`), except `chan`, `[B, H, D]`, and batch item b reads the same bytes of page
    `block_ids[b]`. Their values per row must be fixed.

    Returns float32 `m [B, H, P, M]`, `l [B, H, P, M]`, `acc [B, H, P, M, Dv]`; a split that saw only
    masked tokens has m = -inf, l = 0, acc = 0. `merge_partials([...])` -> `[B, H, M, Dv]`.
    Raises ValueError for inputs the kernel cannot read (see `can_serve`), RuntimeError when the
    extension cannot be built here.
    """
    problem = _pair_problem(keys, values)
    if problem:
        raise ValueError(problem)
    module = _module_for(path)
    if query_rows.dim() != 4:
        raise ValueError(f"query_rows must be [B, H, M, D], got shape {tuple(query_rows.shape)}")
    b, h, m, d = query_rows.shape
    if (pages is None) != (block_ids is None):
        raise ValueError("pages and block_ids go together: give both or neither")
    if tuple(keys.shape[:2]) != (1 if pages is not None else b, h) or keys.shape[3] != d:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query rows {tuple(query_rows.shape)} in batch, heads or head_dim")
    s, dv = keys.shape[2], values.shape[3]
    if bias is not None:
        if bias.dim() != 3 or bias.shape[0] != b or bias.shape[1] not in (1, h) or bias.shape[2] != s:
            raise ValueError(f"bias must be [{b}, 1 or {h}, {s}], got shape {tuple(bias.shape)}")
        bias = bias.float().contiguous()
    if splits is None:
        splits = default_splits(b * h, s)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if s == 0:  # an empty chunk contributes nothing
        return (torch.full((b, h, 1, m), float("-inf")), torch.zeros(b, h, 1, m), torch.zeros(b, h, 1, m, dv))
    splits = min(splits, s)
    return module.decode_partials(
        _query(query_rows), *_fields(keys), *_fields(values), bias if bias is not None else torch.empty(0),
        s, dv, float(scaling), splits, *_flags(path),
        *((pages, block_ids.long().contiguous()) if pages is not None else (_EMPTY8, _EMPTY64)),
    )


def packed_qk(query_rows: torch.Tensor, packed, *, path: str = "auto") -> torch.Tensor | None:
    """Logits `query_rows [B, H, M, D] @ keys^T` -> float32 `[B, H, M, S]` for packed, quantized (or
    dense) keys, or None when the kernel cannot serve them (then rebuild with `packed.dense()`)."""
    if operands.operand_problem("keys", packed, _on_cpu, "") is not None or load(path == "portable") is None:
        return None
    module = _module_for(path)
    if packed.shape[2] == 0:
        return torch.zeros(*query_rows.shape[:3], 0)
    return module.packed_qk(_query(query_rows), *_fields(packed), packed.shape[2], *_flags(path))


# -------------------------------------------------------------------------------------------------
# benchmark
# -------------------------------------------------------------------------------------------------
def _bench(contexts, threads: int, reps: int) -> list[dict]:
    """Llama-3-8B geometry (8 kv-heads, GQA 4, head_dim 128, bf16, batch 1, one query token):
    dense attention over K/V in place vs the fused kernel over packed chunks, interleaved."""
    import time

    from ..config import SparKConfig
    from ..method import compress_keys, compress_values
    from ..packed import storage_nbytes

    torch.set_num_threads(threads)
    h, g, d = 8, 4, 128
    scaling = d**-0.5
    rows = []
    for s in contexts:
        keys = torch.randn(1, h, s, d).bfloat16()
        values = torch.randn(1, h, s, d).bfloat16()
        q = torch.randn(1, h * g, 1, d).bfloat16()
        qg = q.view(1, h, g, d)
        window = torch.randn(1, h * g, 32, d)
        k50 = compress_keys(keys, window, SparKConfig(key_prune_ratio=0.5))
        k80 = compress_keys(keys, window, SparKConfig(key_prune_ratio=0.8))
        v80 = compress_values(values, 0.8)

        def dense_bmm():
            logits = torch.matmul(qg, keys.transpose(-1, -2)).float().mul_(scaling)
            return torch.matmul(logits.softmax(-1).to(values.dtype), values)

        def dense_sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=True)

        def fused(k, v):
            return lambda: merge_partials([decode_partials(qg, k, v, scaling)])

        cases = [
            ("dense bmm (grouped)", dense_bmm, (keys, values), None),
            ("dense sdpa (enable_gqa)", dense_sdpa, (keys, values), None),
            ("fused, dense K + V", fused(keys, values), (keys, values), (keys, values)),
            ("fused, K50 + dense V", fused(k50, values), (k50, values), (k50, values)),
            ("fused, K80 + dense V", fused(k80, values), (k80, values), (k80, values)),
            ("fused, K80 + V80", fused(k80, v80), (k80, v80), (k80, v80)),
        ]
        errors = {}
        for name, fn, _, pair in cases:
            if pair is not None:
                ref = reference_attention(qg, pair[0], pair[1], scaling)
                errors[name] = ((fn().double() - ref).norm() / ref.norm()).item()
        times = {name: [] for name, *_ in cases}
        for name, fn, *_ in cases:  # warm up
            fn()
        for _ in range(reps):  # interleaved, so that load from other processes hits every row alike
            for name, fn, *_ in cases:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        median = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        for name, _, operands, _ in cases:
            nbytes = sum(storage_nbytes(*(t.tensors() if isinstance(t, PackedTensor) else [t])) for t in operands)
            rows.append(dict(context=s, path=name, ms=median[name], best_ms=min(times[name]) * 1e3, mbytes=nbytes / 1e6,
                             gbps=nbytes / median[name] / 1e6, vs_bmm=median[name] / median[cases[0][0]],
                             vs_sdpa=median[name] / median[cases[1][0]], vs_fused_dense=median[name] / median[cases[2][0]],
                             rel_err=errors.get(name)))
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="check and time the fused CPU decode kernel against dense attention")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    if load() is None:
        raise SystemExit(f"the CPU kernel could not be built here: {unavailable_reason()}")
    module = load()
    print(f"threads {args.threads}, AVX-512 {module.has_avx512_path()}, bf16 dot {module.has_bf16_dot()}; "
          "Llama-3-8B geometry: 8 kv-heads, GQA 4, head_dim 128, bf16, batch 1, one query token")
    print(f"{'context':>8} {'path':<24} {'median ms':>9} {'best ms':>8} {'K+V MB':>7} {'GB/s':>5} {'vs bmm':>7} "
          f"{'vs sdpa':>7} {'vs fused dense':>14} {'rel err':>8}")
    for r in _bench(args.contexts, args.threads, args.reps):
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"{r['context']:>8} {r['path']:<24} {r['ms']:>9.2f} {r['best_ms']:>8.2f} {r['mbytes']:>7.1f} {r['gbps']:>5.1f} "
              f"{r['vs_bmm']:>6.2f}x {r['vs_sdpa']:>6.2f}x {r['vs_fused_dense']:>13.2f}x {err:>8}")


if __name__ == "__main__":
    main()
