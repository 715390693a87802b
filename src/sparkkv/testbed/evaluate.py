"""Greedy-generation evaluation of a model on the testbed tasks.

Command line (the numbers in ``docs/testbed.md`` come from this)::

    python -m sparkkv.testbed --n 200 --context-tokens 1024 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Callable

import torch

from .. import CACHE_KWARG

from .tasks import TASKS, check_task, generate_samples, score

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: str,
    n: int,
    context_tokens: int,
    seed: int,
    generate_kwargs: dict | None = None,
    cache_factory: Callable[[], object] | None = None,
) -> dict:
    """Generate greedily (batch 1) on ``n`` fresh samples of ``task`` and score the continuations.

    Args:
        model: a causal LM (e.g. from :func:`sparkkv.testbed.load_model`).
        tokenizer: its tokenizer (prepends ``<bos>``).
        task, n, context_tokens, seed: forwarded to :func:`sparkkv.testbed.generate_samples`.
        generate_kwargs: extra keyword arguments for ``model.generate``; they override the defaults
            (``do_sample=False``, ``max_new_tokens`` = the answer's token count).
        cache_factory: called once per sample; its result is passed as the model's cache (``cache=`` or
            ``past_key_values=``, see ``sparkkv.CACHE_KWARG``) so every
            sample starts from a fresh cache object (e.g. a compressed KV cache).

    Returns:
        ``{"task", "accuracy", "n", "context_tokens", "seed", "scores", "predictions", "seconds"}``
        where ``accuracy`` is the mean of the per-sample scores in ``[0, 1]``.
    """
    check_task(task)
    samples = generate_samples(task, n, context_tokens, seed)
    device = next(model.parameters()).device
    scores, predictions = [], []
    start = time.time()
    for sample in samples:
        enc = tokenizer(sample["prompt"], return_tensors="pt").to(device)
        kwargs = {
            "do_sample": False,
            "max_new_tokens": sample["answer_tokens"],
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        kwargs.update(generate_kwargs or {})
        if cache_factory is not None:
            kwargs[CACHE_KWARG] = cache_factory()
        out = model.generate(**enc, **kwargs)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        predictions.append(text)
        scores.append(score(task, text, sample["answer"]))
    accuracy = sum(scores) / len(scores)
    seconds = time.time() - start
    logger.info("%s @ %d tokens: accuracy %.3f on %d samples (%.1fs)", task, context_tokens, accuracy, n, seconds)
    return {
        "task": task,
        "accuracy": accuracy,
        "n": n,
        "context_tokens": context_tokens,
        "seed": seed,
        "scores": scores,
        "predictions": predictions,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    """Evaluate the shipped model on every task and print one JSON line per task."""
    from .loading import load_model

    p = argparse.ArgumentParser(prog="python -m sparkkv.testbed", description=main.__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    for task in args.tasks.split(","):
        result = evaluate(model, tokenizer, task, args.n, args.context_tokens, args.seed)
        summary = {k: result[k] for k in ("task", "accuracy", "n", "context_tokens", "seed")}
        summary["seconds"] = round(result["seconds"], 1)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
