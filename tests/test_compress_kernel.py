"""The fused CPU compression kernel (kernels/cpu_compress.cpp) against the PyTorch pipeline of
method.py (its reference), and both against the float64 reference."""

import pytest
import torch

from reference import ref_recovered_keys
from sparkkv import SparKConfig, compress_keys
from sparkkv.kernels import cpu_compress

pytestmark = pytest.mark.skipif(not cpu_compress.available(), reason="the C++ kernel cannot be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [8, 40, 64, 128])
@pytest.mark.parametrize("saliency", ["squared", "paper"])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
def test_fused_equals_reference(seed, dtype, d, saliency, recovery):
    b, h, g, s = 2, 2, 3, 77
    keys = (torch.randn(b, h, s, d) * torch.rand(1, h, 1, d) * 3).to(dtype)
    queries = torch.randn(b, h * g, 9, d).to(dtype)
    queries[:, :g, :, 1] = 0  # a channel no window query uses: qn = 0 -> ties at saliency 0
    for ratio in (0.0, 0.5, 0.8):
        cfg = SparKConfig(key_prune_ratio=ratio, saliency=saliency, recovery=recovery, window_size=9)
        fused = compress_keys(keys, queries, cfg, kernel="cpu")
        ref = compress_keys(keys, queries, cfg, kernel="torch")
        assert torch.equal(fused.keep, ref.keep) and torch.equal(fused.vals, ref.vals)
        assert (fused.sign is None) == (ref.sign is None) and (fused.sign is None or torch.equal(fused.sign, ref.sign))
        for a, r in ((fused.scale, ref.scale), (fused.chan, ref.chan)):
            assert (a is None) == (r is None)
            if a is not None:
                # both sum in float32 in different orders, then round to the stored dtype: a sum near a
                # rounding boundary may land one ulp apart (bf16: up to 2^-7 relative; seed 1830530134)
                rtol = max(2e-3, torch.finfo(a.dtype).eps)
                assert a.dtype == r.dtype and torch.allclose(a.float(), r.float(), rtol=rtol, atol=1e-6)
        if d == 40 and ratio == 0.8:  # the float64 loop reference is slow: one shape per case
            want, _ = ref_recovered_keys(keys[:, :, :20], queries, ratio=ratio, form=saliency, recovery=recovery)
            got = fused.dense(torch.float32).double()[:, :, :20]
            assert ((got - want).norm() / want.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_fused_tie_rule_equals_reference(seed, dtype, d):
    """Keys drawn from a few values and a flat qn: many channels tie at the threshold, so the rule
    "ties go to the lower channel" decides most rows (the kernel's slow tie path), and rows where
    every tied channel fits (its fast path) occur too; row counts not a multiple of the kernel's
    block of 8 rows."""
    b, h, s = 2, 3, 29
    keys = torch.randint(-3, 4, (b, h, s, d)).to(dtype)
    keys[0, 0, 0] = 0  # a row of equal saliencies only
    qn = torch.ones(b, h, d)
    qn[:, 1, ::3] = 0.5
    for ratio in (0.3, 0.5, 0.8, 0.9):
        cfg = SparKConfig(key_prune_ratio=ratio)
        fused = compress_keys(keys, None, cfg, qn=qn, kernel="cpu")
        ref = compress_keys(keys, None, cfg, qn=qn, kernel="torch")
        assert torch.equal(fused.keep, ref.keep) and torch.equal(fused.vals, ref.vals) and torch.equal(fused.sign, ref.sign)
        assert torch.allclose(fused.scale.float(), ref.scale.float(), rtol=2e-3, atol=1e-6)


def test_nan_key_stays_kept(seed):
    """Inside a cache (the unchecked core; the public function refuses NaN) a NaN key is kept."""
    from sparkkv.method import _compress_keys, window_query_norm

    keys = torch.randn(1, 1, 5, 16)
    keys[0, 0, 2, 7] = float("nan")
    qn = window_query_norm(torch.randn(1, 2, 4, 16), 1)
    packed = _compress_keys(keys, qn, SparKConfig(key_prune_ratio=0.75), kernel="cpu")
    assert packed.keep_mask()[0, 0, 2, 7]
    assert torch.isfinite(packed.dense()[0, 0, [0, 1, 3, 4]]).all()
