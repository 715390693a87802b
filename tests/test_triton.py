"""The Triton decode kernel under the interpreter (TRITON_INTERPRET=1, CPU) against the float64 reference."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'sparkkv[gpu]')")


@pytest.fixture(scope="module")
def kernel():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it before triton is imported)")
    from sparkkv.kernels import triton_decode

    return triton_decode


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_chunk(shape, keys_kind, values_kind, dtype, dv=None):
    from sparkkv import SparKConfig, compress_keys
    from sparkkv.method import compress_values

    b, h, g, s, d = shape
    keys = (torch.randn(b, h, s, d) * torch.rand(d) * 3).to(dtype)
    values = torch.randn(b, h, s, dv or d).to(dtype)
    window = torch.randn(b, h * g, 6, d)
    if keys_kind in ("top_p", "grouped"):
        keys = compress_keys(keys, window, SparKConfig(selection=keys_kind, top_p=0.8))
    elif keys_kind != "dense":
        keys = compress_keys(keys, window, SparKConfig(key_prune_ratio=0.8, recovery=keys_kind))
    if values_kind != "dense":
        values = compress_values(values, float(values_kind))
    return keys, values, torch.randn(b, h, g, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values_kind", ["dense", "0.8"])
@pytest.mark.parametrize("keys_kind", ["mean", "zero", "constant", "top_p", "dense"])
def test_decode_matches_float64(kernel, seed, dtype, values_kind, keys_kind):
    from sparkkv.kernels.reference import merge_partials, reference_attention

    shape = (2, 2, 4, 61, 64)
    keys, values, q = make_chunk(shape, keys_kind, values_kind, dtype)
    for splits in (1, 3):
        m, l, acc = kernel.decode_partials(q, keys, values, 0.125, splits=splits, block_n=16)
        assert m.shape == l.shape == (2, 2, splits, 4) and acc.shape == (2, 2, splits, 4, 64)
        assert rel(merge_partials([(m, l, acc)]), reference_attention(q, keys, values, 0.125)) < 2e-5


@pytest.mark.parametrize("shape, dv", [((1, 1, 1, 37, 64), 64), ((1, 2, 8, 130, 128), 128), ((2, 1, 2, 45, 40), 24)],
                         ids=["gqa1", "gqa8-d128", "d40-dv24"])
def test_decode_shapes(kernel, seed, shape, dv):
    """GQA 1 and 8, head_dim 128, a head_dim that is not a power of two (padded tiles), Dv != D."""
    from sparkkv.kernels.reference import merge_partials, reference_attention

    keys, values, q = make_chunk(shape, "mean", "0.5", torch.bfloat16, dv)
    got = merge_partials([kernel.decode_partials(q, keys, values, 0.1, splits=2, block_n=16)])
    assert rel(got, reference_attention(q, keys, values, 0.1)) < 2e-5


@pytest.mark.parametrize("bias_heads", [1, 2])
def test_decode_bias_and_masked_split(kernel, seed, bias_heads):
    from sparkkv.kernels.reference import merge_partials, reference_attention

    keys, values, q = make_chunk((2, 2, 4, 96, 64), "mean", "0.8", torch.float32)
    bias = torch.randn(2, bias_heads, 96)
    bias[torch.rand(2, bias_heads, 96) < 0.3] = float("-inf")
    bias[0, :, :32] = float("-inf")  # 3 splits of 32 tokens: batch 0's first split sees only masked tokens
    m, l, acc = kernel.decode_partials(q, keys, values, 0.125, bias, splits=3, block_n=16)
    assert torch.isinf(m[0, :, 0]).all() and (l[0, :, 0] == 0).all() and (acc[0, :, 0] == 0).all()
    assert rel(merge_partials([(m, l, acc)]), reference_attention(q, keys, values, 0.125, bias)) < 2e-5


def test_can_serve(kernel, seed):
    from sparkkv import SparKConfig, compress_keys

    keys, values = torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    sampled = compress_keys(keys, torch.randn(1, 4, 3, 64), SparKConfig(recovery="normal"))
    assert "fill" in kernel.can_serve(sampled, values)
    assert kernel.can_serve(keys, values) is None  # CPU tensors are served under the interpreter
    assert "differ" in kernel.can_serve(keys, values[:, :, :4])
    with pytest.raises(ValueError, match="bias must be"):
        kernel.decode_partials(torch.randn(1, 2, 4, 64), keys, values, 0.1, torch.zeros(1, 3, 9))


def test_model_decode_through_triton(kernel, seed):
    from models import build_pair
    from sparkkv import SparKCache, SparKConfig

    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: the decode mask reaches the kernel as a bias
    config = SparKConfig(key_prune_ratio=0.8, block_size=4)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, attention_mask=mask)
    plain = spark.generate(ids, past_key_values=SparKCache(config.replace(attention_backend="torch")), **kw)
    cache = SparKCache(config.replace(attention_backend="triton"))
    fused = spark.generate(ids, past_key_values=cache, **kw)
    assert rel(torch.stack(fused.logits), torch.stack(plain.logits)) < 1e-5
    report = cache.layer_stats()[0]["backend"]
    assert report["served"].get("triton", 0) > 0 and not report["not_served"]
