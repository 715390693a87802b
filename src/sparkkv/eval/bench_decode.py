"""`sparkkv bench decode`: decode-step time of one attention layer, packed vs dense.

Moved unchanged (apart from imports) from the former `sparkkv/bench.py`; issue 10 rewrites it.
Timings are medians over repeated steps, after warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import ops
from ..config import SparKConfig
from ..packed import DenseChunk
from .bench import AttentionStub as _AttentionStub
from .bench import prefilled_layer as _prefilled_layer

COLUMNS = [("path", "path", ""), ("ms", "median ms", ".3f"), ("vs_dense_sdpa", "vs DynamicCache+sdpa", ".2f"),
           ("vs_attention_only", "vs dense attention only", ".2f")]


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
