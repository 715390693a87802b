"""Teacher-forced comparison of cache configurations against the dense cache, and perplexity.

Both run one model loaded with `attn_implementation="sparkkv"`: given a dense cache it is plain
SDPA (the reference), given a `SparKCache` it compresses.

    compare_decode(model, prompt_ids, continuation_ids, configs)
        prefill the prompt, then teacher-force the continuation one token at a time; per
        configuration: bytes the cache holds, bytes per token, relative error of every
        layer's attention output and of the logits against dense, top-1 agreement.
    perplexity(model, input_ids, config, prefill_tokens)
        NLL of the tokens after `prefill_tokens`, decoded one at a time over the cache (the
        runner's implementation, `sparkkv.eval.runner`, for one sequence).
    random_model(seed, dtype, layers)
        a random-weight Llama-geometry model (head_dim 128, GQA group 4) for the benchmarks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .. import CACHE_KWARG
from ..cache import SparKCache
from ..config import SparKConfig
from .runner import run_batch
from .samples import Sample


def make_cache(config: SparKConfig | None) -> SparKCache:
    """A fresh cache: dense for None or method "dense", else compressed per `config`."""
    return SparKCache(config or SparKConfig(method="dense"))


def random_model(seed: int = 0, dtype=torch.bfloat16, layers: int = 2):
    """A small Llama-geometry model: 8 query heads, 2 kv heads (GQA 4), head_dim 128."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=1024,
        max_position_embeddings=8192,
        initializer_range=0.02,  # the transformers default
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sparkkv", dtype=dtype).eval()


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
        out = model(prompt_ids, attention_mask=attention_mask, **{CACHE_KWARG: cache})
        prefill_bytes = cache.nbytes
        logits.append(out.logits[:, -1].float())
        outs.clear()
        for i in range(continuation_ids.shape[1]):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            out = model(continuation_ids[:, i : i + 1], attention_mask=attention_mask, **{CACHE_KWARG: cache})
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
    runs["dense"] = _run(model, make_cache(None), prompt_ids, continuation_ids)
    if base is not None:
        runs["base"] = _run(model, make_cache(base), prompt_ids, continuation_ids)

    def errors(logits, attn, against):
        ref_l, ref_a, _ = against
        attn_err = [_rel(a, r) for step, ref_step in zip(attn, ref_a) for a, r in zip(step, ref_step)]
        logit_err = [_rel(a, r) for a, r in zip(logits[1:], ref_l[1:])]
        top1 = [bool((a.argmax(-1) == r.argmax(-1)).all()) for a, r in zip(logits[1:], ref_l[1:])]
        n = max(1, len(logit_err))
        return sum(attn_err) / max(1, len(attn_err)), sum(logit_err) / n, sum(top1) / n

    rows = []
    for config in configs:
        logits, attn, prefill_bytes = _run(model, make_cache(config), prompt_ids, continuation_ids)
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


def perplexity(model, input_ids: torch.Tensor, config: SparKConfig | None, prefill_tokens: int) -> dict:
    """NLL of `input_ids[:, prefill_tokens:]` given everything before it, with the prompt
    `input_ids[:, :prefill_tokens]` prefilled into a fresh cache (compressed per `config`) and the
    rest decoded one token at a time. Returns `{"nll_sum", "tokens", "ppl"}` (batch 1)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"perplexity takes one sequence (batch 1), got batch {input_ids.shape[0]}")
    n = input_ids.shape[1]
    if not 1 <= prefill_tokens < n:
        raise ValueError(f"prefill_tokens must be in [1, {n - 1}] for a {n}-token sequence, got {prefill_tokens}")
    ids = input_ids[0].tolist()
    sample = Sample("perplexity", 0, ids[:prefill_tokens], metric="perplexity", target_ids=ids[prefill_tokens:])
    results = []
    run_batch(model, None, [sample], {"config": config}, lambda _label, result: results.append(result))
    nll, tokens = results[0].nll, results[0].tokens
    return {"nll_sum": nll, "tokens": tokens, "ppl": math.exp(nll / tokens)}
