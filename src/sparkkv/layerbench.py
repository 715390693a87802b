"""Benchmarks at real model geometry, measured side by side in one run.

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

import torch
from transformers import DynamicCache, Gemma3TextConfig

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


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([head, rule] + ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparkkv.layerbench", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["hybrid"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.contexts):
        parser.error(f"--contexts must be >= 1, got {args.contexts}")
    config = gemma3_geometry()
    for context in args.contexts:
        rows = hybrid_bytes(config, context)
        print(f"\nGemma-3 geometry (18 layers: 15 sliding window 512, 3 full; 1 kv-head, head_dim 256, bf16), "
              f"{context}-token prompt + 3 decode steps: bytes held\n")
        print(_table(rows, ["cache", "sliding_attention", "full_attention", "total", "vs_dynamic"]))


if __name__ == "__main__":
    main()
