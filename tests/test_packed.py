"""Packed storage: bit packing, round trips, structural operations, real byte counts."""

import pytest
import torch

from sparkkv import SparKConfig, compress_keys, compress_values
from sparkkv.packed import ColumnPackedTensor, PackedTensor, pack_bits, popcount_rows, storage_nbytes, unpack_bits


@pytest.mark.parametrize("d", [8, 16, 64, 128, 256])
def test_bits_round_trip(seed, d):
    mask = torch.rand(3, 5, d) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (3, 5, d // 8)
    assert torch.equal(unpack_bits(bits, d), mask)
    assert torch.equal(popcount_rows(bits), mask.sum(-1))
    # bit c % 8 of byte c // 8 is channel c
    one = torch.zeros(d, dtype=torch.bool)
    one[d - 1] = True
    assert pack_bits(one)[-1].item() == 128


def test_pack_bits_rejects_odd_width():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(2, 12, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variable", [False, True])
def test_from_dense_round_trip(seed, dtype, variable):
    x = torch.randn(2, 3, 17, 64).to(dtype)
    if variable:
        keep = torch.rand(2, 3, 17, 64) > 0.6
    else:
        keep = torch.zeros(2, 3, 17, 64, dtype=torch.bool).scatter(-1, torch.rand(2, 3, 17, 64).argsort(-1)[..., :20], True)
    sign = x > 0
    scale = torch.rand(2, 3, 17)
    chan = torch.rand(2, 3, 64)
    p = PackedTensor.from_dense(x, keep, sign=sign, scale=scale, chan=chan)
    assert (p.fixed_t is None) == variable
    dense = p.dense()
    assert torch.equal(dense[keep], x[keep])
    # the per-token scalar is stored in the model dtype (float32 for float16 models: range)
    stored_scale = scale.to(torch.float32 if dtype == torch.float16 else dtype).float()
    expected_fill = (torch.where(sign, 1.0, -1.0) * stored_scale[..., None] * chan[:, :, None, :]).to(dtype)
    assert torch.equal(dense[~keep], expected_fill[~keep])
    # no recovery fields -> zeros; explicit fill -> exactly those values
    assert torch.equal(PackedTensor.from_dense(x, keep).dense(), torch.where(keep, x, torch.zeros_like(x)))
    fill = torch.randn_like(x)
    assert torch.equal(PackedTensor.from_dense(x, keep, fill=fill).dense(), torch.where(keep, x, fill))


def test_nbytes_matches_byte_formula(seed):
    b, h, s, d = 2, 4, 37, 128
    for ratio, dtype in [(0.5, torch.bfloat16), (0.8, torch.bfloat16), (0.8, torch.float32), (0.0, torch.float16)]:
        keys = torch.randn(b, h, s, d).to(dtype)
        queries = torch.randn(b, 2 * h, 8, d).to(dtype)
        p = compress_keys(keys, queries, SparKConfig(key_prune_ratio=ratio))
        es = keys.element_size()
        t = d - int(ratio * d + 1e-9)
        scale_bytes = 4 if dtype == torch.float16 else es  # float16 models keep sqrt(a_t) in float32
        per_row = t * es + d // 8 + d // 8 + scale_bytes  # kept values, keep bits, sign bits, sqrt(a_t)
        assert p.nbytes == b * h * s * per_row + b * h * d * 4  # + one float32 1/sqrt(qn) per head
        zero = compress_keys(keys, queries, SparKConfig(key_prune_ratio=ratio, recovery="zero"))
        assert zero.nbytes == b * h * s * (t * es + d // 8)
    values = torch.randn(b, h, s, d).to(torch.bfloat16)
    pv = compress_values(values, 0.8)
    assert pv.nbytes == b * h * s * ((d - 102) * 2 + d // 8 + 2)


def test_nbytes_counts_whole_storages():
    base = torch.zeros(1000)
    view = base[:10]
    assert storage_nbytes(view) == 4000  # a view keeps its whole base alive
    assert storage_nbytes(view, base) == 4000  # counted once
    x = torch.randn(1, 1, 64, 16)
    keep = torch.ones_like(x, dtype=torch.bool)
    p = PackedTensor.from_dense(x[:, :, :4], keep[:, :, :4])
    assert p.nbytes == 4 * 16 * 4 + 4 * 2  # owns compact copies, not the 64-token base


@pytest.mark.parametrize("selection", ["ratio", "top_p", "grouped"])
@pytest.mark.parametrize("recovery", ["mean", "zero", "normal"])
def test_structural_operations(seed, selection, recovery):
    keys = torch.randn(3, 2, 21, 64)
    queries = torch.randn(3, 4, 5, 64)
    p = compress_keys(keys, queries, SparKConfig(selection=selection, recovery=recovery, key_prune_ratio=0.75))
    dense = p.dense()
    index = torch.tensor([2, 0, 0, 1])
    assert torch.equal(p.index_batch(index).dense(), dense[index])
    sliced = p.slice_seq(3, 11)
    assert torch.equal(sliced.dense(), dense[:, :, 3:11])
    assert sliced.nbytes < p.nbytes
    empty = p.slice_seq(0, 0)
    assert empty.dense().shape == (3, 2, 0, 64)


def test_column_packed(seed):
    x = torch.randn(2, 3, 9, 64)
    idx = torch.rand(2, 3, 64).argsort(-1)[..., :16].sort(-1).values
    c = ColumnPackedTensor.from_dense(x, idx)
    mask = torch.zeros(2, 3, 1, 64, dtype=torch.bool).scatter(-1, idx.unsqueeze(2), True).expand_as(x)
    assert torch.equal(c.dense(), torch.where(mask, x, torch.zeros_like(x)))
    assert c.nbytes == 2 * 3 * 9 * 16 * 4 + 2 * 3 * 16 * 2
    assert torch.equal(c.index_batch(torch.tensor([1, 1])).dense(), c.dense()[[1, 1]])
    assert torch.equal(c.slice_seq(2, 5).dense(), c.dense()[:, :, 2:5])
