"""Offline long-context testbed: synthetic retrieval tasks and a small model trained on them.

Public API::

    from sparkkv.testbed import TASKS, generate_samples, score, load_model, evaluate

    model, tokenizer = load_model()
    samples = generate_samples("passkey", n=10, context_tokens=1024, seed=0)
    result = evaluate(model, tokenizer, "passkey", n=10, context_tokens=1024, seed=0)

See ``docs/testbed.md`` for the task formats, the model and its training recipe.
"""

from __future__ import annotations

from .evaluate import evaluate
from .loading import MODEL_DIR, load_model
from .tasks import MAX_CONTEXT_TOKENS, MIN_CONTEXT_TOKENS, TASKS, TRAIN_SEED_START, generate_samples, score

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
