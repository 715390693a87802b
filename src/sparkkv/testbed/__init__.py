"""Offline long-context testbed: synthetic retrieval tasks and a small model trained on them.

Public API::

    from sparkkv.testbed import TASKS, generate_samples, score, load_model, evaluate

    model, tokenizer = load_model()
    samples = generate_samples("passkey", n=10, context_tokens=1024, seed=0)
    result = evaluate(model, tokenizer, "passkey", n=10, context_tokens=1024, seed=0)

See ``docs/testbed.md`` for the task formats, the model and its training recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .evaluate import evaluate
from .tasks import MAX_CONTEXT_TOKENS, MIN_CONTEXT_TOKENS, TASKS, TRAIN_SEED_START, generate_samples, score

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = [
    "TASKS",
    "MIN_CONTEXT_TOKENS",
    "MAX_CONTEXT_TOKENS",
    "TRAIN_SEED_START",
    "MODEL_DIR",
    "generate_samples",
    "score",
    "load_model",
    "evaluate",
]


def load_model(dtype: torch.dtype = torch.float32, **kwargs):
    """Load the shipped testbed model and tokenizer offline from :data:`MODEL_DIR`.

    Args:
        dtype: parameter dtype of the returned model (the weights are upcast/downcast on load).
        **kwargs: forwarded to ``LlamaForCausalLM.from_pretrained``; ``attn_implementation`` defaults to
            ``"sparkkv"`` (plain SDPA unless given a ``SparKCache``), e.g. ``attn_implementation="eager"``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and a ``PreTrainedTokenizerFast``.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no testbed model in {MODEL_DIR}; train one with `python -m sparkkv.testbed.train`")
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("attn_implementation", "sparkkv")
    model = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype, **kwargs)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR, local_files_only=True)
    return model, tokenizer
