"""A SparKCache copies, pickles and `torch.save`s at any point, on every attention backend, and the
copy continues exactly as the original would (prefix reuse: one prefill, several continuations)."""

import copy
import io
import pickle

import pytest
import torch

from models import build_hybrid, build_pair
from sparkkv import PrefillCapture, SparKCache, SparKConfig
from sparkkv.kernels import triton_decode


def _copy(cache, how: str):
    if how == "deepcopy":
        return copy.deepcopy(cache)
    if how == "pickle":
        return pickle.loads(pickle.dumps(cache))
    buf = io.BytesIO()
    torch.save(cache, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a cache holds Python objects, not only tensors


def _step(model, cache, tokens):
    with torch.no_grad():
        return model(tokens, past_key_values=cache).logits[:, -1]


CASES = [(backend, how) for backend in ("auto", "torch") for how in ("deepcopy", "pickle", "torch.save")]
if triton_decode.triton is not None:  # the interpreter is slow on CPU: one way of copying
    CASES.append(("triton", "pickle"))


@pytest.mark.parametrize("backend,how", CASES)
def test_copy_at_any_point_continues_exactly(seed, backend, how):
    spark, _ = build_pair("llama", seed=seed)
    config = SparKConfig(key_prune_ratio=0.5, value_prune_ratio=0.5, block_size=4, attention_backend=backend)
    prompt = torch.randint(0, 211, (2, 37))
    steps = torch.randint(0, 211, (2, 9))
    cache = SparKCache(config)
    _step(spark, cache, prompt)
    copies = [(0, _copy(cache, how))]  # right after prefill
    for i in range(steps.shape[1]):
        _step(spark, cache, steps[:, i : i + 1])
        if i in (0, 3, 4):  # after one decode step, just before and just after a tail block is packed
            copies.append((i + 1, _copy(cache, how)))
    want = _step(spark, cache, steps[:, :1])
    for start, twin in copies:
        for i in range(start, steps.shape[1]):
            _step(spark, twin, steps[:, i : i + 1])
        assert torch.equal(_step(spark, twin, steps[:, :1]), want), f"copy made after {start} decode steps"
        assert twin.nbytes == cache.nbytes and twin.get_seq_length() == cache.get_seq_length()


def test_prefix_reuse_one_prefill_several_continuations(seed, tmp_path):
    """Save a compressed prefix once, reload it per continuation: each equals a fresh prefill."""
    spark, _ = build_pair("qwen3", seed=seed)
    config = SparKConfig(method="snapkv+spark", token_budget=48, eviction_window=16, key_prune_ratio=0.8, block_size=8)
    prefix = torch.randint(0, 211, (1, 90))
    cache = SparKCache(config)
    _step(spark, cache, prefix)
    torch.save(cache, tmp_path / "prefix.pt")
    for _ in range(3):
        continuation = torch.randint(0, 211, (1, 12))
        reloaded = torch.load(tmp_path / "prefix.pt", weights_only=False)
        fresh = SparKCache(config)
        _step(spark, fresh, prefix)
        for i in range(continuation.shape[1]):
            tok = continuation[:, i : i + 1]
            assert torch.equal(_step(spark, reloaded, tok), _step(spark, fresh, tok))
    assert torch.load(tmp_path / "prefix.pt", weights_only=False).nbytes == cache.nbytes


def test_sliding_layers_and_capture_copy(seed):
    """Hybrid models (sliding layers that expire blocks) and PrefillCapture forks copy too."""
    spark, _ = build_hybrid("gemma3", window=16, seed=seed)
    capture = PrefillCapture(max_queries=32)
    with torch.no_grad():
        spark(torch.randint(0, 97, (1, 40)), past_key_values=capture)
    cache = capture.compress(SparKConfig(key_prune_ratio=0.8, block_size=4))
    twin = pickle.loads(pickle.dumps(cache))
    fork = copy.deepcopy(capture).compress(SparKConfig(key_prune_ratio=0.8, block_size=4))
    for _ in range(10):
        tok = torch.randint(0, 97, (1, 1))
        want = _step(spark, cache, tok)
        assert torch.equal(_step(spark, twin, tok), want) and torch.equal(_step(spark, fork, tok), want)
