"""Measure what a compression configuration does, side by side with the dense cache.

Both helpers run one model loaded with `attn_implementation="sparkkv"`: given a
`DynamicCache` it is plain SDPA (the dense reference), given a `SparKCache` it compresses.

    compare_decode(model, prompt_ids, continuation_ids, configs)
        prefill the prompt, then teacher-force the continuation one token at a time; per
        configuration: bytes the cache holds, bytes per token, relative error of every
        layer's attention output and of the logits against dense, top-1 agreement.
    perplexity(model, input_ids, config, prefill_tokens)
        NLL of the tokens after `prefill_tokens`, decoded one at a time over the cache.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from .cache import SparKCache
from .config import SparKConfig


def make_cache(model, config: SparKConfig | None):
    """`DynamicCache` for None or method "dense", else a `SparKCache`."""
    if config is None or config.channel_policy == "dense":
        return DynamicCache(config=model.config)
    return SparKCache(config)


def cache_nbytes(cache) -> int:
    """Bytes the cache's tensors hold (storages counted once)."""
    if isinstance(cache, SparKCache):
        return cache.nbytes
    from .packed import storage_nbytes

    return storage_nbytes(*[t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None])


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's self-attention modules, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


@contextmanager
def capture_attention_outputs(model):
    """Collects every attention module's output (after o_proj) into a list per forward."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].detach())) for m in attention_modules(model)]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def _run(model, cache, prompt_ids, continuation_ids, attention_mask=None):
    """Prefill + one-token-at-a-time teacher forcing. Returns (per-step logits, per-step attention outputs, bytes)."""
    logits, attn = [], []
    with capture_attention_outputs(model) as outs:
        out = model(prompt_ids, past_key_values=cache, attention_mask=attention_mask)
        prefill_bytes = cache_nbytes(cache)
        logits.append(out.logits[:, -1].float())
        outs.clear()
        for i in range(continuation_ids.shape[1]):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            out = model(continuation_ids[:, i : i + 1], past_key_values=cache, attention_mask=attention_mask)
            logits.append(out.logits[:, -1].float())
            attn.append(list(outs))
            outs.clear()
    return logits, attn, prefill_bytes


def compare_decode(
    model,
    prompt_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    configs: list[SparKConfig | None],
    base: SparKConfig | None = None,
) -> list[dict]:
    """One row per configuration (None = dense). See the module docstring.

    Errors are against the full dense cache; with `base` (e.g. the eviction-only configuration)
    every row also gets `attn_err_vs_base` / `logits_err_vs_base`, the error against that
    configuration's run, which isolates what channel pruning adds on top of eviction.
    """
    runs = {}
    prompt_len = prompt_ids.shape[1]
    ref_logits, ref_attn, _ = runs["dense"] = _run(model, make_cache(model, None), prompt_ids, continuation_ids)
    if base is not None:
        runs["base"] = _run(model, make_cache(model, base), prompt_ids, continuation_ids)

    def errors(logits, attn, against):
        ref_l, ref_a, _ = against
        attn_err = [_rel(a, r) for step, ref_step in zip(attn, ref_a) for a, r in zip(step, ref_step)]
        logit_err = [_rel(a, r) for a, r in zip(logits[1:], ref_l[1:])]
        top1 = [bool((a.argmax(-1) == r.argmax(-1)).all()) for a, r in zip(logits[1:], ref_l[1:])]
        n = max(1, len(logit_err))
        return sum(attn_err) / max(1, len(attn_err)), sum(logit_err) / n, sum(top1) / n

    rows = []
    for config in configs:
        logits, attn, prefill_bytes = _run(model, make_cache(model, config), prompt_ids, continuation_ids)
        attn_err, logit_err, top1 = errors(logits, attn, runs["dense"])
        row = {
            "method": "dense" if config is None else config.name,
            "prefill_bytes": prefill_bytes,
            "bytes_per_token": prefill_bytes / (prompt_len * prompt_ids.shape[0]),
            "attn_rel_err": attn_err,
            "logits_rel_err": logit_err,
            "top1_agreement": top1,
        }
        if base is not None:
            row["attn_err_vs_base"], row["logits_err_vs_base"], _ = errors(logits, attn, runs["base"])
        rows.append(row)
    return rows


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, config: SparKConfig | None, prefill_tokens: int) -> dict:
    """NLL of `input_ids[:, prefill_tokens:]` given everything before it, with the prompt
    `input_ids[:, :prefill_tokens]` prefilled into a fresh cache (compressed per `config`) and the
    rest decoded one token at a time. Returns `{"nll_sum", "tokens", "ppl"}` (batch 1)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"perplexity takes one sequence (batch 1), got batch {input_ids.shape[0]}")
    n = input_ids.shape[1]
    if not 1 <= prefill_tokens < n:
        raise ValueError(f"prefill_tokens must be in [1, {n - 1}] for a {n}-token sequence, got {prefill_tokens}")
    cache = make_cache(model, config)
    logits = model(input_ids[:, :prefill_tokens], past_key_values=cache).logits[:, -1]
    nll = 0.0
    for i in range(prefill_tokens, n):
        target = input_ids[0, i]
        nll -= torch.log_softmax(logits.float(), dim=-1)[0, target].item()
        if i + 1 < n:
            logits = model(input_ids[:, i : i + 1], past_key_values=cache).logits[:, -1]
    tokens = n - prefill_tokens
    return {"nll_sum": nll, "tokens": tokens, "ppl": math.exp(nll / tokens)}
