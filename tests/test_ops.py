"""The attention ops layer: attention over parts (dense, SparK-packed, ThinK, packed values) with
masks and sinks, through every backend available here, against a float64 reference."""

import logging

import pytest
import torch

from sparkkv import SparKConfig, compress_keys, compress_values, ops
from sparkkv.packed import ColumnPackedTensor, DenseChunk
from sparkkv.method import think_keep_mask

BACKENDS = ["torch", "cpu", "triton"]


def backend_or_skip(name):
    try:
        return ops.resolve_backend(name, torch.device("cpu"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


def ref_attend(query, keys, values, mask, scaling, sinks=None):
    """float64: query [B, Hq, q, D], keys/values dense [B, Hkv, S, D], mask bool [B, 1|H, q, S]."""
    b, hq, q, d = query.shape
    g = hq // keys.shape[1]
    k = keys.double().repeat_interleave(g, 1)
    v = values.double().repeat_interleave(g, 1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat_interleave(g, 1) if mask.shape[1] > 1 else ~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, hq, 1, 1).expand(b, hq, q, 1)
        probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    else:
        probs = logits.softmax(-1)
    return (probs @ v).transpose(1, 2)


def make_parts(kind, b, h, g, sizes, d, seed_queries):
    """Random parts of the given kind and their dense equivalents (as attention sees them)."""
    parts, dense_k, dense_v = [], [], []
    for s in sizes:
        k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
        if kind == "dense":
            kc, vc = DenseChunk(k), DenseChunk(v)
        elif kind == "think":
            idx = think_keep_mask(k, seed_queries.pow(2), 0.5)
            kc, vc = ColumnPackedTensor.from_dense(k, idx), DenseChunk(v)
        else:
            selection = "top_p" if kind == "spark_top_p" else "ratio"
            kc = compress_keys(k, torch.randn(b, h * g, 8, d), SparKConfig(key_prune_ratio=0.8, selection=selection))
            vc = compress_values(v, 0.5) if kind == "spark_kv" else DenseChunk(v)
        parts.append([kc, vc, None])
        dense_k.append(kc.dense(torch.float32))
        dense_v.append(vc.dense(torch.float32))
    return parts, torch.cat(dense_k, 2), torch.cat(dense_v, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "spark", "spark_top_p", "spark_kv", "think"])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_attend_matches_reference(seed, backend, kind, g):
    be = backend_or_skip(backend)
    b, h, d = 2, 2, 64
    sizes = (33, 1, 50)
    parts, keys, values = make_parts(kind, b, h, g, sizes, d, torch.rand(b, h, d))
    q_len = 1
    query = torch.randn(b, h * g, q_len, d)
    # a padding-style mask: batch row 1 cannot see its first 7 tokens
    full = torch.ones(b, 1, q_len, sum(sizes), dtype=torch.bool)
    full[1, :, :, :7] = False
    start = 0
    for part, s in zip(parts, sizes):
        part[2] = full[..., start : start + s]
        start += s
    sinks = torch.randn(h * g)
    for with_sinks in (False, True):
        got = ops.attend(query, [tuple(p) for p in parts], 0.125, be, sinks if with_sinks else None)
        want = ref_attend(query, keys, values, full, 0.125, sinks if with_sinks else None)
        assert got.shape == (b, q_len, h * g, d)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (backend, kind, err)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_multi_token_queries_with_per_row_masks(seed, backend):
    """q > 1 with a causal mask inside the part: the rows see different tokens."""
    be = backend_or_skip(backend)
    b, h, g, d, s, q = 2, 2, 4, 32, 19, 5
    keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    packed = compress_keys(keys, torch.randn(b, h * g, 8, d), SparKConfig(key_prune_ratio=0.5))
    query = torch.randn(b, h * g, q, d)
    mask = (torch.arange(s).view(1, 1, 1, s) <= torch.arange(s - q, s).view(1, 1, q, 1)).expand(b, 1, q, s)
    got = ops.attend(query, [(packed, DenseChunk(values), mask)], 0.2, be)
    want = ref_attend(query, packed.dense(torch.float32), values, mask, 0.2)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_unservable_chunk_is_reported_not_silent(seed, caplog):
    be = backend_or_skip("cpu")
    b, h, d = 1, 2, 32
    keys, values = torch.randn(b, h, 12, d), torch.randn(b, h, 12, d)
    sampled = compress_keys(keys, torch.randn(b, h, 4, d), SparKConfig(key_prune_ratio=0.5, recovery="normal"))
    report = ops.BackendReport("cpu")
    with caplog.at_level(logging.WARNING, logger="sparkkv.ops"):
        for _ in range(3):
            ops.attend(torch.randn(b, h, 1, d), [(sampled, DenseChunk(values), None)], 0.1, be, report=report)
    assert report.served == {"torch": 3}
    assert sum(report.not_served.values()) == 3 and "explicit" in next(iter(report.not_served))
    assert sum("cannot serve" in r.message for r in caplog.records) <= 1  # logged once


def test_backend_resolution_errors(monkeypatch):
    with pytest.raises(ValueError, match="attention_backend"):
        SparKConfig(attention_backend="cuda")
    with pytest.raises(ValueError, match="unknown attention_backend"):
        ops.resolve_backend("fast", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert ops.resolve_backend("torch", torch.device("cpu")).name == "torch"
