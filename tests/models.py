"""Tiny random-weight models built from configs (no downloads): the four dense families, and
hybrid / sliding-window ones (layers of different attention types)."""

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=4096,
    initializer_range=0.08,  # sharper attention than the default 0.02, so compression errors show
)

FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, "head_dim": 64, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, **kw}),  # head_dim = 128 / 4 = 32
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 64, **kw}),  # per-head q_norm / k_norm
    "mistral": lambda **kw: MistralConfig(**{**COMMON, "head_dim": 64, "sliding_window": None, **kw}),
}


HYBRID_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=97,
    max_position_embeddings=1024,
    initializer_range=0.08,
)

# name -> (config factory taking the sliding window, reference attention implementation)
HYBRIDS = {
    "gemma2": (lambda w, **kw: Gemma2Config(**{**HYBRID_COMMON, "num_hidden_layers": 4, "sliding_window": w,
                                               "attn_logit_softcapping": None, "final_logit_softcapping": None, **kw}), "eager"),
    "gemma3": (lambda w, **kw: Gemma3TextConfig(**{**HYBRID_COMMON, "num_hidden_layers": 6, "sliding_window": w, **kw}), "sdpa"),
    "mistral": (lambda w, **kw: MistralConfig(**{**HYBRID_COMMON, "num_hidden_layers": 2, "sliding_window": w, **kw}), "sdpa"),
    "cohere2": (lambda w, **kw: Cohere2Config(**{**HYBRID_COMMON, "num_hidden_layers": 4, "sliding_window": w, **kw}), "sdpa"),
    "gpt_oss": (lambda w, **kw: GptOssConfig(**{**HYBRID_COMMON, "num_hidden_layers": 4, "sliding_window": w,
                                                "num_local_experts": 4, "num_experts_per_tok": 2, **kw}), "eager"),
}


def _pair(config, reference: str, dtype, seed: int):
    torch.manual_seed(seed)
    spark = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sparkkv", dtype=dtype).eval()
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference, dtype=dtype).eval()
    dense.load_state_dict(spark.state_dict())
    return spark, dense


def build_pair(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    """The same random weights loaded twice: with "sparkkv" attention and with "sdpa"."""
    return _pair(FAMILIES[family](**overrides), "sdpa", dtype, seed)


def build_hybrid(name: str, window: int, dtype=torch.float32, seed: int = 0, **overrides):
    """A hybrid / sliding-window model, loaded with "sparkkv" and with its reference attention
    (eager where transformers has no SDPA path: Gemma 2, GPT-OSS's sinks)."""
    factory, reference = HYBRIDS[name]
    return _pair(factory(window, **overrides), reference, dtype, seed)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
