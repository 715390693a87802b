"""Benchmarks, measured side by side in one run (never in unit tests).

    sparkkv bench bytes    bytes per token the cache really holds: dense vs SparK vs ThinK
    sparkkv bench decode   decode-step time of one attention layer, packed vs dense
    sparkkv bench methods  error vs dense of SnapKV, +ThinK, +SparK at one token budget, with bytes

Both use one attention layer of Llama-3-8B geometry by default (8 kv-heads, GQA group 4,
head_dim 128) fed random keys/values/queries, and go through the same `SparKLayer` code the
model uses. Timings are medians over repeated steps, after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops
from .packed import DenseChunk
from .cache import PrefillInputs, SparKLayer
from .config import SparKConfig
from .demo import format_table, methods_table

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class _AttentionStub(nn.Module):
    """What transformers' SDPA function reads from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _prefilled_layer(config: SparKConfig, keys, values, window_queries, scaling):
    layer = SparKLayer(config, layer_idx=0)
    layer.update(keys, values)
    layer.compress_prefill(PrefillInputs(keys, values, window_queries, None, None, scaling))
    return layer


def bytes_table(context: int, kv_heads: int, groups: int, head_dim: int, dtype, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    # channels of different scales (as real keys have), so variable-T selections have something to find
    channel_scale = torch.rand(1, kv_heads, 1, head_dim, generator=gen) * 2
    keys = (torch.randn(1, kv_heads, context, head_dim, generator=gen) * channel_scale).to(dtype)
    values = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(dtype)
    queries = torch.randn(1, kv_heads * groups, 32, head_dim, generator=gen).to(dtype)
    dense = 2 * keys.numel() * keys.element_size()
    configs = [
        SparKConfig(key_prune_ratio=0.5),
        SparKConfig(key_prune_ratio=0.8),
        SparKConfig(key_prune_ratio=0.8, recovery="zero"),
        SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8),
        SparKConfig(selection="top_p", top_p=0.9),
        SparKConfig(selection="grouped"),
        SparKConfig(method="think", key_prune_ratio=0.5),
        SparKConfig(method="think", key_prune_ratio=0.8),
    ]
    per = context * kv_heads
    rows = [{"method": "dense", "bytes": dense, "per_token_head": dense / per, "key_bytes": dense / 2 / per, "vs_dense": 1.0,
             "kept_channels": float(head_dim)}]
    for config in configs:
        layer = _prefilled_layer(config, keys, values, queries, head_dim**-0.5)
        key_bytes = sum(t.untyped_storage().nbytes() for c in layer.key_chunks for t in c.tensors())
        total = layer.nbytes
        kept = sum(int(c.keep_mask().sum()) if hasattr(c, "keep_mask") else c.vals.numel() for c in layer.key_chunks)
        rows.append({"method": config.name, "bytes": total, "per_token_head": total / per, "key_bytes": key_bytes / per,
                     "vs_dense": total / dense, "kept_channels": kept / per})
    return rows


def _median_ms(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def decode_timing(context: int, kv_heads: int, groups: int, head_dim: int, dtype, steps: int, warmup: int, seed: int = 0) -> list[dict]:
    """Median time of one decode step (append one token + attend) of one layer."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(dtype)
    values = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(dtype)
    window = torch.randn(1, kv_heads * groups, 32, head_dim, generator=gen).to(dtype)
    q = torch.randn(1, kv_heads * groups, 1, head_dim, generator=gen).to(dtype)
    k1 = torch.randn(1, kv_heads, 1, head_dim, generator=gen).to(dtype)
    v1 = torch.randn(1, kv_heads, 1, head_dim, generator=gen).to(dtype)
    scaling = head_dim**-0.5
    stub = _AttentionStub(groups)

    dense_layer = DynamicLayer()
    dense_layer.update(keys, values)

    def dense_sdpa():  # what a user gets: DynamicCache (torch.cat of all K/V per step) + SDPA
        k, v = dense_layer.update(k1, v1)
        sdpa_attention_forward(stub, q, k, v, None, scaling=scaling)
        dense_layer.crop(-1)

    def dense_bmm():  # DynamicCache append + the grouped matmul attention the packed path uses
        k, v = dense_layer.update(k1, v1)
        ops.attend(q, [(DenseChunk(k), DenseChunk(v), None)], scaling)
        dense_layer.crop(-1)

    def dense_attention_only():  # the floor: grouped matmul attention over K/V already in place
        ops.attend(q, [(DenseChunk(keys), DenseChunk(values), None)], scaling)

    rows = [
        {"path": "dense: DynamicCache append + transformers sdpa", "ms": _median_ms(dense_sdpa, steps, warmup)},
        {"path": "dense: DynamicCache append + grouped bmm", "ms": _median_ms(dense_bmm, steps, warmup)},
        {"path": "dense: attention only (grouped bmm, no append)", "ms": _median_ms(dense_attention_only, steps, warmup)},
    ]
    for config in (SparKConfig(key_prune_ratio=0.5), SparKConfig(key_prune_ratio=0.8), SparKConfig(method="think", key_prune_ratio=0.8)):
        layer = _prefilled_layer(config, keys, values, window, scaling)

        def packed():
            layer.update(k1, v1)
            layer.attend(q, None, scaling)

        rows.append({"path": f"packed {config.name}: append + attention", "ms": _median_ms(packed, steps, warmup)})
    for r in rows:
        r["vs_dense_sdpa"] = r["ms"] / rows[0]["ms"]
        r["vs_attention_only"] = r["ms"] / rows[2]["ms"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparkkv bench", description="side-by-side benchmarks (see module docstring)")
    parser.add_argument("what", choices=["bytes", "decode", "methods"], help="which benchmark")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768], help="context lengths (tokens)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4, help="GQA group size (query heads per kv-head)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--budget", type=int, default=512, help="methods: token budget (default 512)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="methods: prompt length (default 2048)")
    args = parser.parse_args(argv)
    for name in ("kv_heads", "groups", "head_dim", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(c < 64 for c in args.contexts):
        parser.error(f"--contexts must be >= 64 tokens, got {args.contexts}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.what == "methods":
        if not 64 <= args.budget <= args.prompt_tokens:
            parser.error(f"--budget must be in [64, --prompt-tokens={args.prompt_tokens}], got {args.budget}")
        print(methods_table(args.prompt_tokens, args.budget, dtype=dtype))
        return
    geometry = f"{args.kv_heads} kv-heads, GQA group {args.groups}, head_dim {args.head_dim}, {args.dtype}, {torch.get_num_threads()} threads"
    for context in args.contexts:
        if args.what == "bytes":
            rows = bytes_table(context, args.kv_heads, args.groups, args.head_dim, dtype)
            print(f"\nbytes held by one layer, {context} tokens, {geometry}\n")
            print(format_table(rows, [("method", "method", ""), ("bytes", "bytes", ",d"), ("kept_channels", "key channels kept", ".1f"),
                                      ("key_bytes", "key B/token/head", ".1f"),
                                      ("per_token_head", "K+V B/token/head", ".1f"), ("vs_dense", "vs dense", ".3f")]))
        else:
            rows = decode_timing(context, args.kv_heads, args.groups, args.head_dim, dtype, args.steps, args.warmup)
            print(f"\ndecode step of one attention layer, {context} tokens, {geometry}\n")
            print(format_table(rows, [("path", "path", ""), ("ms", "median ms", ".3f"), ("vs_dense_sdpa", "vs DynamicCache+sdpa", ".2f"),
                                      ("vs_attention_only", "vs dense attention only", ".2f")]))


if __name__ == "__main__":
    main()
