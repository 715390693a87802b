"""PrefillCapture: one dense prefill forks into any configuration, exactly."""

import pytest
import torch

from models import build_pair, rel
from sparkkv import CACHE_KWARG, PrefillCapture, SparKCache, SparKConfig

CONFIGS = [
    None,
    SparKConfig(key_prune_ratio=0.8, window_size=8, block_size=4),
    SparKConfig(method="think", key_prune_ratio=0.5),
    SparKConfig(method="snapkv+spark", key_prune_ratio=0.5, token_budget=40, eviction_window=16),
    SparKConfig(method="pyramidkv", token_budget=0.5, eviction_window=16),
    SparKConfig(method="streamingllm+spark", token_budget=30, value_prune_ratio=0.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "dense" if c is None else c.name)
def test_capture_fork_equals_direct_prefill(seed, config):
    spark, _ = build_pair("qwen3", seed=seed)
    ids = torch.randint(1, 211, (2, 57))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding on one row
    capture = PrefillCapture()
    with torch.no_grad():
        first = spark(ids, attention_mask=mask, **{CACHE_KWARG: capture}).logits[:, -1]
        forked = capture.compress(config)
        direct = SparKCache(config or SparKConfig(method="dense"))
        want_first = spark(ids, attention_mask=mask, **{CACHE_KWARG: direct}).logits[:, -1]
        assert rel(first, want_first) < 1e-6
        assert forked.nbytes == direct.nbytes
        tok = first.argmax(-1, keepdim=True)
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            a = spark(tok, attention_mask=mask, **{CACHE_KWARG: forked}).logits[:, -1]
            b = spark(tok, attention_mask=mask, **{CACHE_KWARG: direct}).logits[:, -1]
            assert torch.equal(a, b)
            tok = b.argmax(-1, keepdim=True)
    # the capture itself is untouched and can fork again
    again = capture.compress(config)
    assert again.get_seq_length() == 57


def test_capture_errors():
    capture = PrefillCapture(max_queries=8)
    with pytest.raises(RuntimeError, match="needs a prefill"):
        capture.compress(SparKConfig())
    spark, _ = build_pair("llama")
    with torch.no_grad():
        spark(torch.randint(0, 211, (1, 30)), **{CACHE_KWARG: capture})
    with pytest.raises(ValueError, match="window_size=32"):
        capture.compress(SparKConfig(window_size=32))
    with pytest.raises(TypeError, match="SparKConfig"):
        capture.compress({"key_prune_ratio": 0.5})
    with pytest.raises(ValueError, match="max_queries"):
        PrefillCapture(max_queries=0)
