"""Tiny random-weight models of the four supported families, built from configs (no downloads)."""

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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


def build_pair(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    """The same random weights loaded twice: with "sparkkv" attention and with "sdpa"."""
    config = FAMILIES[family](**overrides)
    torch.manual_seed(seed)
    spark = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sparkkv", dtype=dtype).eval()
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype).eval()
    dense.load_state_dict(spark.state_dict())
    return spark, dense


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
