"""Benchmarks at real model geometry, measured side by side in one run.

    python -m sparkkv.layerbench decode [--contexts 8192 32768 131072] [--threads 2] [--json F]
        decode-step time of one whole decoder layer of Llama-3-8B geometry (32 query / 8 kv heads,
        head_dim 128, hidden 4096, bf16) through `model(...)`, for StaticCache+sdpa,
        DynamicCache+sdpa and SparKCache configurations, with the backend each row used, the
        bytes its cache holds and the ratio to StaticCache+sdpa; then the prefill overhead of
        SparK at SmolLM2-135M geometry (4k tokens) against dense.
    python -m sparkkv.layerbench hybrid [--contexts 4096 32768]
        bytes held by a Gemma-3-geometry cache (18 layers, 15 sliding with a 512-token window,
        3 full; 1 kv-head, head_dim 256, bf16) after a prompt and 3 decode steps:
        transformers' DynamicCache against SparKCache configurations, per layer type.

The layers are fed random keys, values and queries of the model's geometry through the same
`SparKLayer` code a model uses (bytes do not depend on the values for fixed-ratio selections),
so 32k-token contexts take seconds instead of a 32k-token prefill through a model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig, StaticCache

from . import CACHE_KWARG

from .cache import PrefillInputs, SparKCache
from .config import SparKConfig
from .packed import storage_nbytes


def gemma3_geometry() -> Gemma3TextConfig:
    """18 layers (every 6th full attention), window 512, 4 query heads / 1 kv-head, head_dim 256."""
    return Gemma3TextConfig(
        num_hidden_layers=18, sliding_window=512, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_size=1152, intermediate_size=6912, vocab_size=1024,
    )


HYBRID_CONFIGS = [
    SparKConfig(key_prune_ratio=0.5),
    SparKConfig(key_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, compress_sliding=False),
]


def _name(config: SparKConfig | None) -> str:
    if config is None:
        return "DynamicCache"
    return config.name + ("" if config.compress_sliding else " (sliding dense)")


def hybrid_bytes(model_config, context: int, decode_steps: int = 3, dtype=torch.bfloat16, seed: int = 0) -> list[dict]:
    """One row per cache: bytes held per layer type and in total after `context` prompt tokens and
    `decode_steps` decode steps."""
    gen = torch.Generator().manual_seed(seed)
    layers = model_config.num_hidden_layers
    h, d = model_config.num_key_value_heads, model_config.head_dim
    hq = model_config.num_attention_heads
    prompt = [(torch.randn(1, h, context, d, generator=gen).to(dtype), torch.randn(1, h, context, d, generator=gen).to(dtype)) for _ in range(layers)]
    window_q = torch.randn(1, hq, 64, d, generator=gen).to(dtype)
    steps = [[(torch.randn(1, h, 1, d, generator=gen).to(dtype), torch.randn(1, h, 1, d, generator=gen).to(dtype)) for _ in range(layers)]
             for _ in range(decode_steps)]
    step_q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
    rows = []
    dyn = DynamicCache(config=model_config)
    for i, (k, v) in enumerate(prompt):
        dyn.update(k, v, i)
    for step in steps:
        for i, (k, v) in enumerate(step):
            dyn.update(k, v, i)
    types = list(dict.fromkeys(model_config.layer_types))
    per_type = {t: storage_nbytes(*[x for i, layer in enumerate(dyn.layers) if model_config.layer_types[i] == t
                                    for x in (layer.keys, layer.values)]) for t in types}
    rows.append({"cache": "DynamicCache", "context": context, **per_type, "total": sum(per_type.values())})
    for config in HYBRID_CONFIGS:
        cache = SparKCache(config.replace(attention_backend="torch"), model_config=model_config)
        for i, (k, v) in enumerate(prompt):
            cache.update(k, v, i)
            cache.layers[i].compress_prefill(PrefillInputs(k, v, window_q, None, None, d**-0.5))
        for step in steps:
            for i, (k, v) in enumerate(step):
                cache.update(k, v, i)
                cache.layers[i].attend(step_q, None, d**-0.5)
        by_type = cache.nbytes_by_layer_type()
        rows.append({"cache": _name(config), "context": context, **{t: by_type.get(t, 0) for t in types}, "total": cache.nbytes})
    for row in rows:
        row["vs_dynamic"] = row["total"] / rows[0]["total"]
    return rows


# ---------------------------------------------------------------------------------------------
# decode timing through one whole decoder layer
# ---------------------------------------------------------------------------------------------
def llama3_layer_config() -> LlamaConfig:
    """One decoder layer of Llama-3-8B's attention geometry. The MLP is narrowed (intermediate
    1024 instead of 14336) and the vocabulary tiny, so the step is the attention layer's work:
    projections (84 MB of bf16 weights) plus reading the cache."""
    return LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=1024,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=262144, rope_theta=500000.0,
    )


DECODE_CONFIGS = [
    SparKConfig(key_prune_ratio=0.5),
    SparKConfig(key_prune_ratio=0.8),
    SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.8),
    SparKConfig(method="think", key_prune_ratio=0.8),
]


def _median_ms(step, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _filled_caches(model, context: int, configs, reps: int, seed: int):
    """(name, cache) pairs holding `context` random tokens of the model's geometry."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    h, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    keys = torch.randn(1, h, context, d, generator=gen).bfloat16()
    values = torch.randn(1, h, context, d, generator=gen).bfloat16()
    window = torch.randn(1, hq, 64, d, generator=gen).bfloat16()
    static = StaticCache(config=cfg, max_cache_len=context + reps + 16)
    static.update(keys, values, 0)
    dynamic = DynamicCache(config=cfg)
    dynamic.update(keys, values, 0)
    out = [("StaticCache + sdpa", static, "sdpa"), ("DynamicCache + sdpa", dynamic, "sdpa")]
    for config in configs:
        cache = SparKCache(config, model_config=cfg)
        cache.update(keys, values, 0)
        cache.layers[0].compress_prefill(PrefillInputs(keys, values, window, None, None, d**-0.5))
        out.append((f"SparKCache {config.name}", cache, config.attention_backend))
    return out


def decode_timing(context: int, reps: int = 20, warmup: int = 3, configs=None, seed: int = 0) -> list[dict]:
    """Median time of one decode step of the whole layer for each cache (see the module docstring)."""
    configs = DECODE_CONFIGS if configs is None else configs
    cfg = llama3_layer_config()
    torch.manual_seed(seed)
    rows = []
    models = {
        impl: AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16).eval()
        for impl in ("sdpa", "sparkkv")
    }
    models["sparkkv"].load_state_dict(models["sdpa"].state_dict())
    weight_bytes = sum(p.numel() * p.element_size() for n, p in models["sdpa"].named_parameters() if "layers." in n)
    for name, cache, backend in _filled_caches(models["sdpa"], context, configs, reps + warmup, seed):
        model = models["sdpa"] if backend == "sdpa" else models["sparkkv"]
        token = torch.zeros(1, 1, dtype=torch.long)

        def step():
            with torch.no_grad():
                model(token, **{CACHE_KWARG: cache}, logits_to_keep=1)

        ms = _median_ms(step, reps, warmup)
        if isinstance(cache, SparKCache):
            held = cache.nbytes
            served = cache.layers[0].backend_report.served
            backend = "+".join(sorted(served)) or backend
        else:
            layer = cache.layers[0]
            held = storage_nbytes(layer.keys, layer.values)
            held = held if not isinstance(cache, StaticCache) else held * (context / layer.keys.shape[2])
        rows.append({"path": name, "backend": backend, "context": context, "ms": ms, "cache_bytes": int(held)})
    dense_bytes = rows[0]["cache_bytes"]
    for row in rows:
        row["vs_static"] = row["ms"] / rows[0]["ms"]
        row["vs_dynamic"] = row["ms"] / rows[1]["ms"]
        # what the step must read at least, relative to StaticCache: layer weights + the cache
        row["byte_bound"] = (weight_bytes + row["cache_bytes"]) / (weight_bytes + dense_bytes)
    return rows


def smollm2_geometry() -> LlamaConfig:
    """SmolLM2-135M's architecture (30 layers, 9 query / 3 kv heads, head_dim 64), random weights."""
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    )


def prefill_overhead(tokens: int = 4096, reps: int = 3, config: SparKConfig | None = None, seed: int = 0) -> dict:
    """Prefill time with a SparKCache against the same model with a DynamicCache (interleaved,
    medians): the cost of saliency, selection and packing."""
    config = config or SparKConfig(key_prune_ratio=0.8)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(smollm2_geometry(), attn_implementation="sparkkv").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))

    def run(cache) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, **{CACHE_KWARG: cache}, logits_to_keep=1)
        return time.perf_counter() - start

    run(DynamicCache())  # warm-up
    dense, spark = [], []
    for _ in range(reps):
        dense.append(run(DynamicCache()))
        spark.append(run(SparKCache(config)))
    d, s = statistics.median(dense), statistics.median(spark)
    return {"tokens": tokens, "config": config.name, "dense_s": d, "spark_s": s, "ratio": s / d}


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([head, rule] + ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparkkv.layerbench", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["decode", "hybrid"])
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (tokens)")
    parser.add_argument("--reps", type=int, default=20, help="decode: timed steps per row (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--backend", default="auto", help="decode: attention_backend of the SparK rows")
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="decode: prompt of the prefill-overhead row (0: skip)")
    parser.add_argument("--json", default=None, help="decode: also write the rows to this JSON file")
    args = parser.parse_args(argv)
    contexts = args.contexts or ([8192, 32768, 131072] if args.what == "decode" else [4096, 32768])
    if any(c < 1 for c in contexts):
        parser.error(f"--contexts must be >= 1, got {contexts}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "hybrid":
        config = gemma3_geometry()
        for context in contexts:
            rows = hybrid_bytes(config, context)
            print(f"\nGemma-3 geometry (18 layers: 15 sliding window 512, 3 full; 1 kv-head, head_dim 256, bf16), "
                  f"{context}-token prompt + 3 decode steps: bytes held\n")
            print(_table(rows, ["cache", "sliding_attention", "full_attention", "total", "vs_dynamic"]))
        return
    configs = [c.replace(attention_backend=args.backend) for c in DECODE_CONFIGS]
    all_rows = []
    for context in contexts:
        rows = decode_timing(context, reps=args.reps, configs=configs)
        all_rows += rows
        print(f"\ndecode step of one Llama-3-8B-geometry layer (32 q / 8 kv heads, head_dim 128, bf16, MLP narrowed), "
              f"{context} tokens, {torch.get_num_threads()} threads, median of {args.reps}\n")
        print(_table(rows, ["path", "backend", "ms", "vs_static", "vs_dynamic", "cache_bytes", "byte_bound"]))
    prefill = None
    if args.prefill_tokens:
        prefill = prefill_overhead(args.prefill_tokens)
        print(f"\nprefill, SmolLM2-135M geometry, {prefill['tokens']} tokens: dense {prefill['dense_s']:.2f} s, "
              f"{prefill['config']} {prefill['spark_s']:.2f} s ({prefill['ratio']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"decode": all_rows, "prefill": prefill, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
