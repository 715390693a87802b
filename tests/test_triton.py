"""The Triton decode kernel under the interpreter (TRITON_INTERPRET=1, CPU), against PyTorch references."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 37, 64), (2, 2, 4, 61, 64), (1, 2, 8, 130, 128)])
def test_decode_kernel_matches_reference(kernel, seed, dtype, recovery, shape):
    from sparkkv import SparKConfig, compress_keys

    b, h, g, s, d = shape
    keys = torch.randn(b, h, s, d).to(dtype)
    values = torch.randn(b, h, s, d).to(dtype)
    packed = compress_keys(keys, torch.randn(b, h * g, 6, d), SparKConfig(key_prune_ratio=0.8, recovery=recovery))
    q = torch.randn(b, h, g, d)
    bias = torch.where(torch.rand(b, h, s) < 0.2, float("-inf"), 0.0)  # some masked tokens
    for splits in (1, 3):
        got = kernel.merge_partials([kernel.packed_decode_partials(q, packed, values, d**-0.5, bias, splits=splits, block_n=16)])
        assert rel(got, kernel.reference_decode(q, packed, values, d**-0.5, bias)) < 2e-6


def test_model_decode_through_triton(kernel, seed, monkeypatch):
    from models import build_pair
    from sparkkv import SparKCache, SparKConfig

    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: the decode mask reaches the kernel as a bias
    config = SparKConfig(key_prune_ratio=0.8, block_size=4)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, attention_mask=mask)
    plain = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    monkeypatch.setenv("SPARKKV_TRITON", "1")
    fused = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    assert rel(torch.stack(fused.logits), torch.stack(plain.logits)) < 1e-5
