"""Every causal-LM architecture of the installed transformers, built tiny, run with a SparKCache.

`run_architecture(model_type)` builds a tiny random model of that architecture from its config (no
downloads), runs a prompt and a few decode steps with `SparKCache(key_prune_ratio=0, block_size=4)`
and compares the logits with eager attention over transformers' own cache, and returns an `Outcome`:

    supported   the logits match eager at every step (relative error < TOLERANCE, float32);
    refused     sparkkv refused the model with `UnsupportedModelError` (its message is kept);
    untestable  the architecture cannot be built tiny here (UNTESTABLE says why);
    failed      anything else: wrong numbers, a traceback, or a refusal that does not match
                `sparkkv.compat.unsupported_reason` (tests/test_architectures.py fails on these).

    PYTHONPATH=src python tests/architectures.py --markdown docs/architectures.md   # rewrite the table
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import sys
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import sparkkv
from sparkkv.compat import LOAD_FAILURES, UnsupportedModelError, unsupported_reason

TOLERANCE = 1e-4
PROMPT, STEPS, BATCH = 11, 6, 2

# Set on every config that has the attribute (read-only properties are skipped): a tiny model with
# head_dim 16, GQA 2, small MoE and MLA dims, and windows shorter than the prompt so that sliding
# and chunked layers really slide during the test.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.08,  # sharper attention than the default 0.02
    sliding_window=6,
    attention_chunk_size=6,
    rotary_dim=8,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    n_shared_experts=1,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
    is_decoder=True,  # BERT-style models are causal LMs only as decoders
    # encoder-decoder families (their *ForCausalLM is the decoder alone)
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    decoder_layers=2,
    encoder_layers=1,
    decoder_ffn_dim=128,
    encoder_ffn_dim=128,
)

REMOVE = object()  # an OVERRIDES value: leave the key out

# Per-architecture corrections where the generic values above do not make a valid config.
OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dots3_note_text": dict(num_key_value_heads=4),
    # 4 layers, the last two reading the first two's keys/values (KV sharing)
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=6),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=8),
    "plbart": dict(decoder_attention_heads=4, encoder_attention_heads=4),
    "prophetnet": dict(
        num_hidden_layers=REMOVE, num_encoder_layers=1, num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4
    ),
    "reformer": dict(is_decoder=True, axial_pos_embds=False),
    "xlnet": dict(max_position_embeddings=REMOVE, d_head=16),
    "zaya": dict(num_experts_per_tok=1),
}

# model_types whose causal-LM class takes a config class other than `AutoConfig.for_model`'s.
USE_CLASS_CONFIG = ("musicgen", "musicgen_melody")

# Architectures not built here, and why.
UNTESTABLE: dict[str, str] = {
    "dbrx": "transformers 5.24 cannot build it from a config (DbrxAttention reads a missing attn_config.rope_theta)",
    "dots3_note": "a multimodal wrapper whose tiny config fails validation; its decoder is tested as dots3_note_text",
    "blt": "transformers' own forward fails on a tiny BltConfig (DynamicCache(config=...) reads a missing num_hidden_layers)",
    "gemma3n": "its vision tower needs the `timm` package; its decoder is tested as gemma3n_text",
    "gemma4_assistant": "a drafter: its forward needs the main model's shared keys/values",
    "gemma4_unified_assistant": "a drafter: its forward needs the main model's shared keys/values",
}

# Models whose input rows are batch x codebooks.
CODEBOOK_INPUTS = ("musicgen", "musicgen_melody")

# Calls a model needs before it can run.
PREPARE = {"xmod": lambda model: model.set_default_language("en_XX")}


@dataclasses.dataclass
class Outcome:
    model_type: str
    model_class: str
    status: str  # "supported" | "refused" | "untestable" | "failed"
    detail: str  # supported: the error; refused: the reason; untestable/failed: why
    runtime: str = ""  # refused: what a forward with a SparKCache does
    seconds: float = 0.0


def causal_lm_types() -> list[str]:
    """Every model_type transformers maps to a causal-LM class, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _settable(config, key: str) -> bool:
    prop = getattr(type(config), key, None)
    if isinstance(prop, property) and prop.fset is None:
        return False
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - per-layer attributes raise on the global read, yet can be set
        return True


def _get(config, key: str):
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - per-layer attributes raise on the global read
        return None


def _tiny_kwargs(default) -> dict:
    """TINY where `default` (a config) has the attribute, one layer of each layer kind it has (at
    least two layers), and the same for its sub-configs (vision/audio towers of multimodal models)."""
    kwargs = {k: v for k, v in TINY.items() if _settable(default, k)}
    if _get(default, "kv_lora_rank") is not None:  # MLA expands keys/values to every query head
        kwargs["num_key_value_heads"] = TINY["num_attention_heads"]
    kinds = list(dict.fromkeys(_get(default, "layer_types") or []))
    if kinds and _settable(default, "layer_types"):
        kinds = (kinds * 2)[: max(2, len(kinds))]
        kwargs.update(num_hidden_layers=len(kinds), layer_types=kinds)
    elif _settable(default, "num_hidden_layers"):
        kwargs["num_hidden_layers"] = 2
    for key in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, key, None)
        if isinstance(sub, PretrainedConfig):
            kwargs[key] = type(sub)(**_tiny_kwargs(sub))
    return kwargs


def tiny_config(model_type: str):
    """A small config of `model_type`: `_tiny_kwargs` of its default config, then OVERRIDES. Where
    the generic layer kinds make an invalid config (hybrid models derive them), they are left out."""
    if model_type in USE_CLASS_CONFIG:
        import transformers

        config_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]).config_class
        build = config_class
    else:
        config_class = type(AutoConfig.for_model(model_type))
        build = lambda **kw: AutoConfig.for_model(model_type, **kw)  # noqa: E731
    kwargs = _tiny_kwargs(config_class())
    for key, value in OVERRIDES.get(model_type, {}).items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), PretrainedConfig):  # a sub-config's corrections
            sub = kwargs[key]
            value = type(sub)(**{**_tiny_kwargs(type(sub)()), **value})
        kwargs[key] = value
    kwargs = {k: v for k, v in kwargs.items() if v is not REMOVE}
    try:
        return build(**kwargs)
    except Exception:  # noqa: BLE001
        if "layer_types" not in kwargs or "layer_types" in OVERRIDES.get(model_type, {}):
            raise
        kwargs.pop("layer_types")
        return build(**kwargs)


def _build(model_type: str, config, attn_implementation: str):
    """A fresh model of `config` (the causal-LM class itself where the auto mapping has no entry
    for its config class)."""
    if model_type in USE_CLASS_CONFIG:
        import transformers

        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        config = copy.deepcopy(config)
        config._attn_implementation = attn_implementation
        return model_class(config).eval()
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation).eval()


def _logits(model, ids, steps, cache=None):
    """Last-position logits `[B, V]` of a prefill and of each decode step (`steps` tokens `[B, 1]`)."""
    out = []
    kw = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        res = model(ids, use_cache=True, **kw)
        out.append(res.logits[:, -1].float())
        for tok in steps:
            res = model(tok, use_cache=True, past_key_values=cache if cache is not None else res.past_key_values)
            out.append(res.logits[:, -1].float())
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_architecture(model_type: str, seed: int = 0) -> Outcome:
    """Build `model_type` tiny, run it with a SparKCache at ratio 0 and with eager attention."""
    start = time.perf_counter()
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]

    def done(status: str, detail: str, runtime: str = "") -> Outcome:
        return Outcome(model_type, name, status, detail, runtime, time.perf_counter() - start)

    if model_type in UNTESTABLE:
        return done("untestable", UNTESTABLE[model_type])
    try:
        config = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001 - reported as the outcome
        return done("failed", f"tiny config: {type(e).__name__}: {e}")
    expected = unsupported_reason(config)
    torch.manual_seed(seed)
    try:
        spark = _build(model_type, config, "sparkkv")
        PREPARE.get(model_type, lambda m: None)(spark)
    except Exception as e:  # noqa: BLE001
        if expected is None:
            return done("failed", f"load: {type(e).__name__}: {e}")
        if model_type in LOAD_FAILURES:
            return done("refused", expected, f"loading fails inside transformers ({type(e).__name__}: {e}): call check_model_class first")
        return done("refused", expected, f"not run here (the tiny model cannot be built: {type(e).__name__})")
    text = config.get_text_config(decoder=True)
    vocab = min(int(getattr(text, "vocab_size", 128) or 128), 128)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = BATCH * (text.num_codebooks if model_type in CODEBOOK_INPUTS else 1)
    ids = torch.randint(3, vocab, (rows, PROMPT), generator=gen)
    steps = [torch.randint(3, vocab, (rows, 1), generator=gen) for _ in range(STEPS)]
    cache = sparkkv.SparKCache(sparkkv.SparKConfig(key_prune_ratio=0.0, block_size=4))
    try:
        got = _logits(spark, ids, steps, cache)
    except UnsupportedModelError as e:
        named = e.model.split(" (")[0] in {name, *MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()}
        if not named or (expected is not None and e.reason != expected):
            return done("failed", f"refused as {e.model!r} with {e.reason!r}; unsupported_reason says {expected!r}")
        return done("refused", e.reason, "refused at the first forward")
    except Exception as e:  # noqa: BLE001
        if expected is None:
            return done("failed", f"SparKCache run: {type(e).__name__}: {str(e)[:300]}")
        # the model fails before any sparkkv hook runs (it builds no mask): check_model_class is the message
        return done("refused", expected, f"the first forward fails inside the model ({type(e).__name__}: {str(e)[:60]}...)")
    if expected is not None:
        if cache.layers:
            return done("failed", f"unsupported_reason says {expected!r}, but the model ran with the SparKCache")
        return done("refused", expected, "runs, but never uses the SparKCache (nothing is compressed)")
    if not cache.layers:
        return done("failed", "the model ran without storing anything in the SparKCache")
    eager = _build(model_type, config, "eager")
    eager.load_state_dict(spark.state_dict())
    PREPARE.get(model_type, lambda m: None)(eager)
    try:
        want = _logits(eager, ids, steps)
    except Exception as e:  # noqa: BLE001
        return done("failed", f"eager reference: {type(e).__name__}: {str(e)[:300]}")
    errors = [_rel(a, b) for a, b in zip(got, want)]
    if not all(e < TOLERANCE for e in errors):  # also catches NaN
        return done("failed", f"logits differ from eager: relative errors {['%.1e' % e for e in errors]}")
    return done("supported", f"max relative error {max(errors):.1e} over prefill + {STEPS} decode steps")


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: all")
    parser.add_argument("--markdown", help="write the outcome table to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    outcomes = []
    for model_type in args.model_types or causal_lm_types():
        outcome = run_architecture(model_type)
        gc.collect()
        outcomes.append(outcome)
        print(f"{model_type:26s} {outcome.status:10s} {outcome.seconds:5.1f}s {outcome.detail[:150]} {outcome.runtime[:80]}", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(outcomes))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: list[Outcome]) -> str:
    """docs/architectures.md: the outcome of every architecture, grouped by status."""
    import transformers

    groups = {status: [o for o in outcomes if o.status == status] for status in ("supported", "refused", "untestable", "failed")}
    lines = [
        "# Architectures",
        "",
        f"Every causal-LM architecture of transformers {transformers.__version__} (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), "
        "built tiny from its config (2-4 layers, head_dim 16, GQA 2, sliding windows of 6 tokens, no downloads) and run "
        "with `SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4))`: an 11-token prompt (batch 2) and 6 decode "
        "steps, logits compared with eager attention over transformers' own cache (float32). Generated by",
        "",
        "    PYTHONPATH=src python tests/architectures.py --markdown docs/architectures.md",
        "",
        "from `tests/architectures.py`; `tests/test_architectures.py` checks that every architecture still has the status "
        "listed here.",
        "",
        "- **supported**: the logits match eager attention to < 1e-4 relative error at every step;",
        "- **refused**: `sparkkv.check_model_class` (before loading) or the first forward with a SparKCache raises "
        "`sparkkv.UnsupportedModelError` naming the model and the reason; the last column says what a forward with a "
        "SparKCache does where no sparkkv hook runs before the model fails;",
        "- **untestable**: the architecture cannot be built tiny here (the reason is given).",
        "",
        f"Totals: {len(groups['supported'])} supported, {len(groups['refused'])} refused, {len(groups['untestable'])} untestable"
        + (f", {len(groups['failed'])} FAILED" if groups["failed"] else "")
        + f" ({len(outcomes)} model types).",
        "",
        f"## Supported ({len(groups['supported'])})",
        "",
        "| model_type | class |",
        "|---|---|",
    ]
    lines += [f"| `{o.model_type}` | `{o.model_class}` |" for o in groups["supported"]]
    for status in ("refused", "untestable", "failed"):
        if not groups[status]:
            continue
        lines += ["", f"## {status.capitalize()} ({len(groups[status])})", ""]
        if status == "refused":
            lines += ["| model_type | class | why | with a SparKCache |", "|---|---|---|---|"]
            lines += [f"| `{o.model_type}` | `{o.model_class}` | {_cell(o.detail)} | {_cell(o.runtime)} |" for o in groups[status]]
        else:
            lines += ["| model_type | class | why |", "|---|---|---|"]
            lines += [f"| `{o.model_type}` | `{o.model_class}` | {_cell(o.detail)} |" for o in groups[status]]
    return "\n".join(lines) + "\n"


def documented_status(path) -> dict[str, str]:
    """model_type -> status, read back from docs/architectures.md."""
    status, table = {}, None
    for line in open(path):
        if line.startswith("## "):
            table = line[3:].split(" (")[0].strip().lower()
        elif line.startswith("| `") and table:
            status[line.split("`")[1]] = table
    return status


if __name__ == "__main__":
    main(sys.argv[1:])
