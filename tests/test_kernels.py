"""The fused CPU kernel against a float64 reference built from the packed fields."""

import pytest
import torch

from models import build_pair, rel
from sparkkv import SparKCache, SparKConfig, compress_keys
from sparkkv.kernels import cpu
from sparkkv.packed import unpack_bits

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="the CPU kernel cannot be built here (no compiler/ninja)")


def ref_logits(q, packed):
    """float64: kept values in place, pruned entries = sign * scale * chan from the stored fields."""
    b, h, s, d = packed.shape
    keep = unpack_bits(packed.keep, d)
    vals = torch.zeros(packed.shape, dtype=torch.float64).masked_scatter_(keep, packed.vals.double())
    fill = torch.zeros(packed.shape, dtype=torch.float64)
    if packed.sign is not None:
        fill = unpack_bits(packed.sign, d).double() * 2 - 1
        if packed.scale is not None:
            fill = fill * packed.scale.double()[..., None]
        if packed.chan is not None:
            fill = fill * packed.chan.double()[:, :, None, :]
    return q.double() @ torch.where(keep, vals, fill).transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [8, 16, 64, 128])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
def test_kernel_matches_float64(seed, dtype, d, recovery):
    b, h, g, s = 2, 3, 4, 37
    keys = (torch.randn(b, h, s, d) * 2).to(dtype)
    packed = compress_keys(keys, torch.randn(b, h * g, 5, d), SparKConfig(key_prune_ratio=0.75, recovery=recovery))
    for m in (1, 4, 20):  # 20 > 16 query rows exercises the kernel's row blocking
        q = torch.randn(b, h, m, d)
        got = cpu.packed_qk(q, packed)
        assert got.dtype == torch.float32 and got.shape == (b, h, m, s)
        assert rel(got, ref_logits(q, packed)) < 1e-5


@pytest.mark.parametrize("selection", ["top_p", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [5, 300, 777])  # within one row block, across several blocks
def test_kernel_variable_t(seed, selection, dtype, s):
    b, h, d = 2, 3, 64
    keys = (torch.randn(b, h, s, d) * torch.rand(d) * 3).to(dtype)
    packed = compress_keys(keys, torch.randn(b, h * 2, 5, d), SparKConfig(selection=selection, top_p=0.8))
    assert packed.fixed_t is None
    q = torch.randn(b, h, 4, d)
    assert rel(cpu.packed_qk(q, packed), ref_logits(q, packed)) < 1e-5


def test_kernel_skips_what_it_does_not_handle(seed):
    keys, queries = torch.randn(1, 2, 9, 64), torch.randn(1, 2, 4, 64)
    sampled = compress_keys(keys, queries, SparKConfig(recovery="normal"))
    assert cpu.packed_qk(torch.randn(1, 2, 1, 64), sampled) is None


@pytest.mark.parametrize("config", [SparKConfig(key_prune_ratio=0.8, block_size=4), SparKConfig(selection="top_p", block_size=4)],
                         ids=["ratio", "top_p"])
def test_model_same_with_and_without_kernel(seed, monkeypatch, config):
    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 90))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fast = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    monkeypatch.setattr(cpu, "_module", None)  # force the PyTorch rebuild path
    slow = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    assert rel(torch.stack(fast.logits), torch.stack(slow.logits)) < 1e-5
