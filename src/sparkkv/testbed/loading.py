"""The shipped testbed model: where it lives and how it loads (offline)."""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parent / "model"


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
