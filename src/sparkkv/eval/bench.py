"""Benchmarks, measured side by side in one run (never in unit tests).

    sparkkv bench bytes    bytes per token the cache really holds: dense vs SparK vs ThinK
    sparkkv bench methods  error vs dense of SnapKV, +ThinK, +SparK at one token budget, with bytes
    sparkkv bench decode   decode-step time of one whole decoder layer, and the prefill overhead
                           (`sparkkv.eval.bench_decode`)
    sparkkv bench hybrid   bytes held by a Gemma-3-geometry cache (sliding + full layers):
                           DynamicCache vs SparKCache, per layer type
    sparkkv bench compress key compression: the fused CPU kernel (kernels/cpu_compress.cpp) against
                           the PyTorch pipeline of method.py, same inputs, side by side

`bytes` uses one attention layer of Llama-3-8B geometry by default (8 kv-heads, GQA group 4,
head_dim 128) fed random keys/values/queries, through the same `SparKLayer` code the model uses.
"""

from __future__ import annotations

import torch

from ..cache import PrefillInputs, SparKLayer
from ..config import SparKConfig
from .compare import compare_decode, random_model
from .report import format_table

__all__ = ["BYTES_COLUMNS", "bytes_table", "compress_table", "format_table", "methods_configs", "methods_table", "prefilled_layer"]


def prefilled_layer(config: SparKConfig, keys, values, window_queries, scaling):
    """One `SparKLayer` holding `keys`/`values` compressed per `config` with these window queries."""
    layer = SparKLayer(config, layer_idx=0)
    layer.compress_prefill(PrefillInputs(keys, values, window_queries, None, None, scaling))
    return layer


BYTES_COLUMNS = [
    ("method", "method", ""),
    ("bytes", "bytes", ",d"),
    ("kept_channels", "key channels kept", ".1f"),
    ("key_bytes", "key B/token/head", ".1f"),
    ("per_token_head", "K+V B/token/head", ".1f"),
    ("vs_dense", "vs dense", ".3f"),
]


# quantized storage (quant.py): plain quantization, then SparK stacked with it, ternary mask code
QUANT_BYTES_CONFIGS = [
    SparKConfig(method="none", key_bits=8, value_bits=8),
    SparKConfig(method="none", key_bits=4, value_bits=4),
    SparKConfig(method="none", key_bits=2, value_bits=2),
    SparKConfig(key_prune_ratio=0.8, mask_format="trits"),
    SparKConfig(key_prune_ratio=0.8, value_bits=4),  # what the vLLM backend stores (keys at 16 bits there)
    SparKConfig(key_prune_ratio=0.8, value_bits=2),
    SparKConfig(key_prune_ratio=0.8, key_bits=4, value_bits=4),
    SparKConfig(key_prune_ratio=0.8, key_bits=4, value_bits=4, mask_format="trits"),
    SparKConfig(key_prune_ratio=0.8, key_bits=4, value_bits=4, mask_format="trits", quant_group_size=128),
    SparKConfig(key_prune_ratio=0.8, key_bits=4, value_bits=2, mask_format="trits"),
    SparKConfig(key_prune_ratio=0.8, key_bits=4, value_bits=2, mask_format="trits", quant_group_size=128),
    SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8, key_bits=4, value_bits=4, mask_format="trits"),
]


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
        *QUANT_BYTES_CONFIGS,
    ]
    per = context * kv_heads
    rows = [{"method": "dense", "bytes": dense, "per_token_head": dense / per, "key_bytes": dense / 2 / per, "vs_dense": 1.0,
             "kept_channels": float(head_dim)}]
    for config in configs:
        layer = prefilled_layer(config, keys, values, queries, head_dim**-0.5)
        key_bytes = sum(c.nbytes for c in layer.key_chunks)
        total = layer.nbytes
        kept = sum(int(c.kept_per_row().sum()) for c in layer.key_chunks)
        rows.append({"method": config.name, "bytes": total, "per_token_head": total / per, "key_bytes": key_bytes / per,
                     "vs_dense": total / dense, "kept_channels": kept / per})
    return rows


METHODS_COLUMNS = [
    ("method", "method", ""),
    ("prefill_bytes", "cache bytes", ",d"),
    ("bytes_per_token", "bytes/token", ".0f"),
    ("vs_dense", "vs dense", ".3f"),
    ("attn_rel_err", "attn out rel err", ".4f"),
    ("attn_err_vs_base", "attn err vs snapkv", ".4f"),
    ("logits_rel_err", "logits rel err", ".4f"),
    ("logits_err_vs_base", "logits err vs snapkv", ".4f"),
]


def methods_configs(budget: int | float, ratios=(0.5, 0.8)) -> list[SparKConfig | None]:
    """dense, eviction only, eviction + ThinK, eviction + SparK (mean and zero recovery), one budget."""
    configs: list[SparKConfig | None] = [None, SparKConfig(method="snapkv", token_budget=budget)]
    for ratio in ratios:
        configs.append(SparKConfig(method="snapkv+think", token_budget=budget, key_prune_ratio=ratio))
    for ratio in ratios:
        for recovery in ("mean", "zero"):
            configs.append(SparKConfig(method="snapkv+spark", token_budget=budget, key_prune_ratio=ratio, recovery=recovery))
    return configs


def methods_table(prompt_tokens: int = 2048, budget: int = 512, decode_steps: int = 16, seed: int = 0, dtype=torch.bfloat16) -> str:
    """Attention-output and logit error vs the full dense cache, at one token budget, with bytes."""
    model = random_model(seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    continuation = torch.randint(0, model.config.vocab_size, (1, decode_steps), generator=gen)
    configs = methods_configs(budget)
    rows = compare_decode(model, prompt, continuation, configs, base=configs[1])
    for r in rows:
        r["vs_dense"] = r["prefill_bytes"] / rows[0]["prefill_bytes"]
    title = (
        f"Random Llama-geometry model (2 layers, 8 q-heads / 2 kv-heads, head_dim 128, {str(dtype).split('.')[-1]}), "
        f"{prompt_tokens}-token prompt, token budget {budget}, {decode_steps} teacher-forced decode steps; "
        "errors against the full dense cache, and against SnapKV alone (same tokens, all channels)."
    )
    return title + "\n\n" + format_table(rows, METHODS_COLUMNS)


# ---------------------------------------------------------------------------------------------
# hybrid (sliding-window + full attention) models
# ---------------------------------------------------------------------------------------------
HYBRID_COLUMNS = [
    ("cache", "cache", ""),
    ("sliding_attention", "sliding layers", ",d"),
    ("full_attention", "full layers", ",d"),
    ("total", "total bytes", ",d"),
    ("vs_dynamic", "vs DynamicCache", ".3f"),
]

HYBRID_CONFIGS = [
    SparKConfig(key_prune_ratio=0.5),
    SparKConfig(key_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, compress_sliding=False),
]


def gemma3_geometry():
    """Gemma-3-like: 18 layers (every 6th full attention, the others a 512-token sliding window),
    4 query heads / 1 kv-head, head_dim 256."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        num_hidden_layers=18, sliding_window=512, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_size=1152, intermediate_size=6912, vocab_size=1024,
    )


def hybrid_table(model_config, context: int, decode_steps: int = 3, dtype=torch.bfloat16, seed: int = 0) -> list[dict]:
    """Bytes held per layer type after `context` prompt tokens and `decode_steps` decode steps:
    transformers' DynamicCache(config=...) against SparKCache configurations. The layers get random
    keys, values and queries of the model's geometry through the same `SparKLayer` code a model
    uses (bytes do not depend on the values for fixed-ratio selections), so a 32k-token context
    takes seconds instead of a 32k-token prefill."""
    from transformers import DynamicCache

    from ..cache import SparKCache
    from ..packed import storage_nbytes

    gen = torch.Generator().manual_seed(seed)
    layers, h, d = model_config.num_hidden_layers, model_config.num_key_value_heads, model_config.head_dim
    hq = model_config.num_attention_heads
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    prompt = [(randn(1, h, context, d), randn(1, h, context, d)) for _ in range(layers)]
    steps = [[(randn(1, h, 1, d), randn(1, h, 1, d)) for _ in range(layers)] for _ in range(decode_steps)]
    window_q, step_q = randn(1, hq, 64, d), randn(1, hq, 1, d)
    types = list(dict.fromkeys(model_config.layer_types))
    dyn = DynamicCache(config=model_config)
    for kv in [prompt] + steps:
        for i, (k, v) in enumerate(kv):
            dyn.update(k, v, i)
    per_type = {t: storage_nbytes(*[x for i, layer in enumerate(dyn.layers) if model_config.layer_types[i] == t
                                    for x in (layer.keys, layer.values)]) for t in types}
    rows = [{"cache": "DynamicCache", "context": context, **per_type, "total": sum(per_type.values())}]
    for config in HYBRID_CONFIGS:
        cache = SparKCache(config, model_config=model_config)
        for i, (k, v) in enumerate(prompt):
            cache.compress_prefill(i, PrefillInputs(k, v, window_q, None, None, d**-0.5))
        for step in steps:
            for i, (k, v) in enumerate(step):
                handle, _ = cache.update(k, v, i)
                handle.attend(step_q, None, d**-0.5)
        by_type = cache.nbytes_by_layer_type()
        name = config.name + ("" if config.compress_sliding else " (sliding layers dense)")
        rows.append({"cache": name, "context": context, **{t: by_type.get(t, 0) for t in types}, "total": cache.nbytes})
    for row in rows:
        row["vs_dynamic"] = row["total"] / rows[0]["total"]
    return rows


# ---------------------------------------------------------------------------------------------
# key compression: fused kernel vs the PyTorch pipeline
# ---------------------------------------------------------------------------------------------
COMPRESS_COLUMNS = [
    ("tokens", "tokens", ",d"),
    ("identical", "same selection", ""),
    ("fused_ms", "fused ms", ".1f"),
    ("torch_ms", "PyTorch ms", ".1f"),
    ("speedup", "speedup", ".1f"),
]


def compress_table(contexts, kv_heads: int, groups: int, head_dim: int, dtype, ratio: float = 0.8, reps: int = 5,
                   seed: int = 0) -> list[dict]:
    """`compress_keys` through the fused kernel and through the PyTorch steps on the same random keys
    (medians of `reps`, interleaved), and whether both keep the same channels and values."""
    import time

    from ..method import compress_keys

    gen = torch.Generator().manual_seed(seed)
    config = SparKConfig(key_prune_ratio=ratio)
    rows = []
    for context in contexts:
        keys = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(dtype)
        queries = torch.randn(1, kv_heads * groups, 32, head_dim, generator=gen)
        fused, ref = (compress_keys(keys, queries, config, kernel=k) for k in ("cpu", "torch"))
        same = torch.equal(fused.keep, ref.keep) and torch.equal(fused.vals, ref.vals) and torch.equal(fused.sign, ref.sign)
        times = {"cpu": [], "torch": []}
        for _ in range(reps):
            for kernel in times:
                start = time.perf_counter()
                compress_keys(keys, queries, config, kernel=kernel)
                times[kernel].append(time.perf_counter() - start)
        fused_ms, torch_ms = (1e3 * sorted(times[k])[reps // 2] for k in ("cpu", "torch"))
        rows.append({"tokens": context, "identical": "yes" if same else "NO", "fused_ms": fused_ms, "torch_ms": torch_ms,
                     "speedup": torch_ms / fused_ms})
    return rows
