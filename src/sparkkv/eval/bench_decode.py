"""`sparkkv bench decode`: decode-step time of one whole decoder layer, and the prefill overhead.

Decode: one decoder layer of Llama-3-8B's attention geometry by default (32 query / 8 kv heads,
head_dim 128, hidden 4096, bf16; the MLP narrowed to 1024 and the vocabulary tiny, so the step is
the attention layer's work: q/k/v/o projections plus reading the cache), run through `model(...)`
with a cache holding `context` random tokens: StaticCache+sdpa (the fastest dense path),
DynamicCache+sdpa (what users get by default; its append copies the whole cache) and SparKCache
configurations. Each row reports its backend, the bytes its cache holds, the ratio to both dense
rows, for quantized configurations the ratio to the same configuration without quantization
(`key_bits = value_bits = 16`, when that row is in the run), and the byte bound: (layer weights +
cache bytes) / (layer weights + dense cache bytes), the best ratio a step that only moves bytes
could reach. Caches are filled directly (no 128k-token prefill through a model); timings are
medians after warm-up, all rows in one run, interleaved: every round times one step of every
row, so load from other processes hits all rows alike.

Prefill overhead: SmolLM2-135M's architecture (random weights), a prompt prefilled with a
DynamicCache and with a SparKCache, interleaved, medians: the cost of saliency, selection and
packing (`PREFILL_CONFIGS`: SparK k0.8, and the same stacked on 4-bit kept keys and values).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

from .. import CACHE_KWARG
from ..cache import PrefillInputs, SparKCache
from ..config import SparKConfig
from ..packed import storage_nbytes

COLUMNS = [
    ("path", "path", ""),
    ("backend", "backend", ""),
    ("ms", "median ms", ".2f"),
    ("vs_static", "vs StaticCache+sdpa", ".3f"),
    ("vs_dynamic", "vs DynamicCache+sdpa", ".3f"),
    ("vs_unquantized", "vs unquantized", ".3f"),
    ("cache_bytes", "cache bytes", ",d"),
    ("byte_bound", "byte bound", ".3f"),
]

CONFIGS = [
    SparKConfig(key_prune_ratio=0.5),
    SparKConfig(key_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8),
    SparKConfig(method="think", key_prune_ratio=0.8),
    # quantized storage (issue 18) and what it is compared with: the same without quantization
    SparKConfig(key_prune_ratio=0.8, mask_format="trits"),
    SparKConfig(key_prune_ratio=0.8, mask_format="trits", key_bits=4, value_bits=4),
    SparKConfig(method="none"),  # no channel policy: dense storage read by the fused kernel
    SparKConfig(method="none", key_bits=4, value_bits=4),
    SparKConfig(method="none", key_bits=2, value_bits=2),
]

# the prefill-overhead rows: SparK, and SparK stacked on quantized storage (issue 18's prefill target)
PREFILL_CONFIGS = [
    SparKConfig(key_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, mask_format="trits", key_bits=4, value_bits=4),
]


def layer_config(kv_heads: int = 8, groups: int = 4, head_dim: int = 128) -> LlamaConfig:
    """One decoder layer: `kv_heads * groups` query heads of `head_dim`, hidden = heads * head_dim."""
    heads = kv_heads * groups
    return LlamaConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=1024, num_hidden_layers=1, vocab_size=256, max_position_embeddings=1 << 20, rope_theta=500000.0,
    )


def _median_ms(steps: list, reps: int, warmup: int) -> list[float]:
    """Median ms of each of `steps`, timed round-robin (one call of each per round) after warm-up."""
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for _ in range(reps):
        for step, t in zip(steps, times):
            start = time.perf_counter()
            step()
            t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def _filled_caches(cfg, context: int, configs, capacity: int, dtype, seed: int):
    """(name, cache, attention implementation) triples, each holding `context` random tokens."""
    gen = torch.Generator().manual_seed(seed)
    h, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    keys = torch.randn(1, h, context, d, generator=gen).to(dtype)
    values = torch.randn(1, h, context, d, generator=gen).to(dtype)
    window = torch.randn(1, hq, 64, d, generator=gen).to(dtype)
    static = StaticCache(config=cfg, max_cache_len=capacity)
    static.update(keys, values, 0)
    dynamic = DynamicCache(config=cfg)
    dynamic.update(keys, values, 0)
    out = [("StaticCache + sdpa", static, "sdpa"), ("DynamicCache + sdpa", dynamic, "sdpa")]
    for config in configs:
        cache = SparKCache(config, model_config=cfg)
        cache.compress_prefill(0, PrefillInputs(keys, values, window, None, None, d**-0.5))
        out.append((f"SparKCache {config.name}", cache, "sparkkv"))
    return out


def decode_timing(context: int, kv_heads: int = 8, groups: int = 4, head_dim: int = 128, dtype=torch.bfloat16,
                  steps: int = 20, warmup: int = 3, configs=None, seed: int = 0) -> list[dict]:
    """One row per cache: median ms of a decode step of the whole layer (see the module docstring)."""
    configs = CONFIGS if configs is None else configs
    cfg = layer_config(kv_heads, groups, head_dim)
    torch.manual_seed(seed)
    models = {impl: AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype).eval() for impl in ("sdpa", "sparkkv")}
    models["sparkkv"].load_state_dict(models["sdpa"].state_dict())
    weight_bytes = sum(p.numel() * p.element_size() for n, p in models["sdpa"].named_parameters() if "layers." in n)
    rows = []
    caches = _filled_caches(cfg, context, configs, context + steps + warmup + 8, dtype, seed)
    token = torch.zeros(1, 1, dtype=torch.long)

    def stepper(model, cache):
        def step():
            with torch.no_grad():
                model(token, **{CACHE_KWARG: cache}, logits_to_keep=1)

        return step

    medians = _median_ms([stepper(models[impl], cache) for _, cache, impl in caches], steps, warmup)
    for (name, cache, _), ms in zip(caches, medians):
        if isinstance(cache, SparKCache):
            held, backend = cache.nbytes, "+".join(sorted(cache.layers[0].backend_report.served))
        else:  # the dense rows: the bytes of `context` tokens (StaticCache allocates its capacity)
            held, backend = 2 * kv_heads * context * head_dim * torch.empty((), dtype=dtype).element_size(), "sdpa"
        rows.append({"path": name, "backend": backend, "context": context, "ms": ms, "cache_bytes": int(held)})
    ms_of = {row["path"]: row["ms"] for row in rows}
    for row in rows:
        row["vs_static"] = row["ms"] / rows[0]["ms"]
        row["vs_dynamic"] = row["ms"] / rows[1]["ms"]
        row["vs_unquantized"] = None
        row["byte_bound"] = (weight_bytes + row["cache_bytes"]) / (weight_bytes + rows[0]["cache_bytes"])
    for row, config in zip(rows[2:], configs):  # the SparK rows, in the order of `configs`
        base = ms_of.get(f"SparKCache {config.replace(key_bits=16, value_bits=16).name}")
        if config.quantized and base:
            row["vs_unquantized"] = row["ms"] / base
    return rows


def smollm2_geometry() -> LlamaConfig:
    """SmolLM2-135M's architecture (30 layers, 9 query / 3 kv heads, head_dim 64), random weights."""
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    )


def prefill_overhead(tokens: int = 4096, reps: int = 5, config: SparKConfig | None = None, seed: int = 0) -> dict:
    """Prefill with a SparKCache against the same model with a DynamicCache (interleaved, medians)."""
    config = config or SparKConfig(key_prune_ratio=0.8)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(smollm2_geometry(), attn_implementation="sparkkv").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))

    def run(cache) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, **{CACHE_KWARG: cache}, logits_to_keep=1)
        return time.perf_counter() - start

    run(DynamicCache())  # warm-up of both paths (the first SparK prefill also loads the compiled kernel)
    run(SparKCache(config))
    dense, spark = [], []
    for _ in range(reps):
        dense.append(run(DynamicCache()))
        spark.append(run(SparKCache(config)))
    d, s = statistics.median(dense), statistics.median(spark)
    return {"tokens": tokens, "config": config.name, "dense_s": d, "spark_s": s, "ratio": s / d}
