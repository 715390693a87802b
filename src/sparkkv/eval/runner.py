"""Run samples through many cache configurations with one shared prefill per batch.

Prefill attention is dense for every configuration (compression happens at the end of each layer's
prefill), so a batch of equally long prompts is prefilled once into a `sparkkv.PrefillCapture` and
every configuration is forked from it with `capture.compress(config)`: exactly the cache
`SparKCache(config)` would hold after prefilling the same prompts. The quantized baselines
(transformers' `QuantizedCache`, `baselines.py`) are forked from the same capture: its prompt keys and
values are fed to the cache layer by layer, which is what their own (dense) prefill stores. Each fork
is then decoded on its own: greedy generation (scored by the sample's metric), or teacher-forced scoring of the sample's
`target_ids` (perplexity).

Greedy generation stops for a row at its EOS token, after `max_new_tokens`, or as soon as the
score cannot change any more: for RULER's string matches once every reference is in the text (more
text cannot remove a substring), for first-line tasks once a newline is generated. The scores are
those of the full-length generation; only the time differs.

Rows of a batch never interact: the prompts have the same length (no padding) and every cache
policy works per row.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .. import CACHE_KWARG, PrefillCapture
from ..config import SparKConfig
from . import baselines, metrics
from .samples import Sample

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    """One (sample, configuration) outcome."""

    index: int
    score: float | None  # metric value; None for perplexity samples (see nll / tokens)
    prediction: str | None
    nll: float | None  # summed negative log-likelihood of target_ids (perplexity)
    tokens: int  # generated or scored tokens
    kv_bytes: int  # bytes the cache holds right after the prompt, divided by rows below
    prompt_tokens: int
    seconds: float  # this configuration's own time (compress + decode), per row

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes / self.prompt_tokens


def dense_bytes_per_token(model) -> int:
    """Bytes a dense K+V cache holds per token: 2 * layers * kv_heads * head_dim * element size."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * element


def _capture_rows(configs: Iterable) -> int:
    """How many last prompt queries the capture must keep: the largest observation window any
    configuration reads (`window_size`, and `eviction_window` when it evicts)."""
    rows = 1
    for config in configs:
        if isinstance(config, SparKConfig):
            rows = max(rows, config.window_size, config.eviction_window if config.eviction else 1)
    return rows


def batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Consecutive samples grouped by equal prompt (and target) length, at most `batch_size` each."""
    out: list[list[Sample]] = []
    for sample in samples:
        last = out[-1] if out else None
        if (
            last
            and len(last) < batch_size
            and len(last[0].input_ids) == len(sample.input_ids)
            and len(last[0].target_ids or ()) == len(sample.target_ids or ())
        ):
            last.append(sample)
        else:
            out.append([sample])
    return out


@torch.no_grad()
def run_batch(
    model,
    tokenizer,
    batch: list[Sample],
    configs: dict[str, SparKConfig | baselines.QuantizedCacheConfig | None],
    on_result: Callable[[str, SampleResult], None],
) -> float:
    """Prefill `batch` once, then run every configuration of `configs` (label -> config; None = dense;
    a `baselines.QuantizedCacheConfig` is a transformers `QuantizedCache` fed the same prefill).

    Calls `on_result(label, result)` for every (configuration, sample). Returns the prefill seconds.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([s.input_ids for s in batch], device=device)
    b, prompt_len = ids.shape
    start = time.perf_counter()
    capture = PrefillCapture(max_queries=_capture_rows(configs.values()))
    # logits of the last prompt position only: the full [B, S, vocab] tensor would cost more memory
    # (and lm_head time) than the rest of the prefill
    first_logits = model(ids, logits_to_keep=1, **{CACHE_KWARG: capture}).logits[:, -1].float()
    prefill_seconds = time.perf_counter() - start
    for label, config in configs.items():
        start = time.perf_counter()
        cache, kv_bytes = fork(capture, config, model)
        if batch[0].target_ids is not None:
            rows = _score_targets(model, cache, first_logits, batch)
        else:
            rows = _generate(model, tokenizer, cache, first_logits, batch)
        seconds = (time.perf_counter() - start) / b
        for sample, (score, prediction, nll, tokens) in zip(batch, rows):
            on_result(label, SampleResult(sample.index, score, prediction, nll, tokens, kv_bytes // b, prompt_len, seconds))
        del cache
    return prefill_seconds


def fork(capture, config, model) -> tuple:
    """`(cache, bytes it holds)` for `config`, prefilled from `capture`: a `SparKCache`
    (`capture.compress`), or a transformers `QuantizedCache` for a baseline (`baselines`)."""
    if baselines.is_baseline(config):
        cache = baselines.prefill_cache(capture, config, model.config)
        return cache, baselines.cache_nbytes(cache)
    cache = capture.compress(config)
    return cache, cache.nbytes


def _step(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, None], **{CACHE_KWARG: cache}).logits[:, -1].float()


def _score_targets(model, cache, logits: torch.Tensor, batch: list[Sample]):
    targets = torch.tensor([s.target_ids for s in batch], device=logits.device)
    nll = torch.zeros(len(batch), dtype=torch.float64)
    for i in range(targets.shape[1]):
        nll -= torch.log_softmax(logits, dim=-1).gather(1, targets[:, i : i + 1]).squeeze(1).double().cpu()
        if i + 1 < targets.shape[1]:
            logits = _step(model, cache, targets[:, i])
    return [(None, None, nll[r].item(), targets.shape[1]) for r in range(len(batch))]


def _finished(sample: Sample, text: str) -> bool:
    """True once more generated text cannot change the sample's score."""
    if sample.first_line and "\n" in text.lstrip("\n"):
        return True
    if sample.metric in ("string_match_all", "string_match_part"):
        return metrics.score(sample.metric, text, sample.references) == 1.0
    return False


def _generate(model, tokenizer, cache, logits: torch.Tensor, batch: list[Sample]):
    eos = tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    limit = max(s.max_new_tokens for s in batch)
    generated: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    for step in range(limit):
        tokens = logits.argmax(-1)
        for r, sample in enumerate(batch):
            if done[r]:
                continue
            token = int(tokens[r])
            if token in eos:
                done[r] = True
                continue
            generated[r].append(token)
            if len(generated[r]) >= sample.max_new_tokens or _finished(sample, tokenizer.decode(generated[r], skip_special_tokens=True)):
                done[r] = True
        if all(done) or step + 1 == limit:
            break
        logits = _step(model, cache, tokens)
    rows = []
    for sample, ids in zip(batch, generated):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        scored = text.lstrip("\n").split("\n")[0] if sample.first_line else text
        score = metrics.score(sample.metric, scored, sample.references, **sample.extra.get("metric_args", {}))
        rows.append((score, text, None, len(ids)))
    return rows


def aggregate(results: list[SampleResult]) -> dict:
    """Cell summary: score (mean metric, or perplexity), bytes per token, seconds."""
    n = len(results)
    summary = {
        "n": n,
        "kv_bytes_per_token": sum(r.kv_bytes_per_token for r in results) / n,
        "seconds": sum(r.seconds for r in results),
    }
    if results[0].nll is not None:
        tokens = sum(r.tokens for r in results)
        nll = sum(r.nll for r in results)
        summary.update(score=math.exp(nll / tokens), nll=nll, scored_tokens=tokens)
    else:
        summary.update(score=sum(r.score for r in results) / n)
    return summary
