"""Quantized storage (sparkkv/quant.py) and the ternary mask code (packed.py): against float64
references computed here from the raw stored fields, on random inputs with a fresh seed."""

import math

import pytest
import torch

from sparkkv import SparKConfig, compress_keys, compress_values, ops
from sparkkv.kernels.reference import reference_attention
from sparkkv.packed import ColumnPackedTensor, PackedTensor, pack_trits, unpack_trits
from sparkkv.quant import QuantizedTensor, pack_codes, quant_scale_dtype, unpack_codes


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ref_codes(q: QuantizedTensor) -> torch.Tensor:
    """The codes, one per element, read bit by bit from the packed bytes (float64 reference)."""
    b, h, s, n = q.shape
    out = torch.zeros(b, h, s, n, dtype=torch.float64)
    raw = q.codes.long()
    for i in range(n):
        bit = i * q.bits
        out[..., i] = ((raw[..., bit // 8] >> (bit % 8)) & ((1 << q.bits) - 1)).double()
    return out


def ref_dequantize(q: QuantizedTensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """float64 `[B, H, S, N]` from codes, scale and zero (the format's definition): element n of
    token s reads the scale of group n // group ("row"), of token group (offset + s) // group and
    column n ("token") or column channels[..., s, n] ("channel")."""
    b, h, s, n = q.shape
    codes = ref_codes(q)
    mid = ((1 << q.bits) - 1) / 2

    def per_element(stat):
        stat = stat.double()
        if q.axis == "row":
            return stat[..., torch.arange(n) // q.group]
        per_token = stat[:, :, (q.offset + torch.arange(s)) // q.group, :]
        return per_token if q.axis == "token" else per_token.gather(-1, channels)

    scale = per_element(q.scale)
    zero = -mid * scale if q.zero is None else per_element(q.zero)
    return codes * scale + zero


SHAPES = [(1, 1, 9, 8), (2, 3, 37, 26), (2, 2, 70, 64), (1, 4, 5, 13)]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_pack_bit_by_bit(seed, bits):
    for n in (1, 3, 13, 64, 66):
        codes = torch.randint(0, 1 << bits, (2, 3, 4, n))
        packed = pack_codes(codes, bits)
        assert packed.shape[-1] == math.ceil(n * bits / 8) and packed.dtype == torch.uint8
        assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))
        fake = QuantizedTensor((2, 3, 4, n), torch.float32, packed, torch.ones(2, 3, 4, 1), None, bits, 1024)
        assert torch.equal(ref_codes(fake), codes.double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", ["row", "token"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_the_format_and_rounds_to_nearest(seed, shape, axis, symmetric, bits, dtype):
    x = (torch.randn(shape) * torch.rand(1, shape[1], 1, shape[3]) * 3 + 0.5).to(dtype)
    group = 16
    q = QuantizedTensor.quantize(x, bits, group, axis, symmetric)
    assert q.scale.dtype == quant_scale_dtype(dtype) and (q.zero is None) == symmetric
    want = ref_dequantize(q)
    assert torch.allclose(q.dense(torch.float32).double(), want, rtol=1e-6, atol=1e-6)
    assert q.dense().dtype == dtype
    # round to nearest over the group's range: at most half a step (plus the scale's own rounding)
    b, h, s, n = shape
    scale = q.scale.double()
    step = scale.repeat_interleave(group, -1)[..., :n] if axis == "row" else scale.repeat_interleave(group, 2)[:, :, q.offset : q.offset + s]
    slack = 0.5 * step * (1 + 2 ** -7) + 1e-3 * x.double().abs().amax()
    assert ((want - x.double()).abs() <= slack).all()
    # bytes: codes, scale (and zero), nothing else
    groups = (s * math.ceil(n / group)) if axis == "row" else (math.ceil(s / group) * n)
    assert q.offset == (0 if axis == "row" else (-s) % group)  # token groups end at the last token
    expected = b * h * (s * math.ceil(n * bits / 8) + groups * (1 if symmetric else 2) * 2)
    assert q.nbytes == expected


@pytest.mark.parametrize("axis", ["row", "token"])
def test_slices_and_batch_selection_are_exact(seed, axis):
    x = torch.randn(3, 2, 53, 24)
    q = QuantizedTensor.quantize(x, 4, 8, axis)
    full = q.dense(torch.float64)
    for start, stop in [(0, 53), (0, 17), (5, 30), (8, 16), (52, 53), (13, 13)]:
        part = q.slice_seq(start, stop)
        assert part.shape == (3, 2, stop - start, 24)
        assert torch.equal(part.dense(torch.float64), full[:, :, start:stop])
        assert torch.equal(part.slice_seq(1, max(stop - start, 1)).dense(torch.float64), full[:, :, start + 1 : stop])
    index = torch.tensor([2, 0, 0])
    assert torch.equal(q.index_batch(index).dense(torch.float64), full[index])


def test_non_finite_entries_spread_over_their_group():
    x = torch.randn(1, 1, 8, 16)
    x[0, 0, 3, 5] = float("nan")
    q = QuantizedTensor.quantize(x, 4, 8, "row")
    d = q.dense(torch.float32)
    assert torch.isnan(d[0, 0, 3, :8]).all() and torch.isfinite(d[0, 0, 3, 8:]).all() and torch.isfinite(d[0, 0, :3]).all()


@pytest.mark.parametrize("d", [8, 13, 64, 128])
def test_trits_round_trip(seed, d):
    keep = torch.rand(2, 3, 11, d) < 0.3
    positive = torch.rand(2, 3, 11, d) < 0.5
    trits = pack_trits(keep, positive)
    assert trits.shape == (2, 3, 11, math.ceil(d / 5)) and trits.dtype == torch.uint8
    got_keep, got_positive = unpack_trits(trits, d)
    assert torch.equal(got_keep, keep) and torch.equal(got_positive & ~keep, positive & ~keep)
    # the format: sum of trit * 3^j over five channels
    t = torch.where(keep, 0, torch.where(positive, 2, 1))
    assert int(trits[0, 0, 0, 0]) == sum(int(t[0, 0, 0, j]) * 3**j for j in range(min(5, d)))


@pytest.mark.parametrize("ratio", [0.5, 0.8])
@pytest.mark.parametrize("recovery", ["mean", "constant"])
def test_trits_packed_tensor_is_lossless_and_smaller(seed, ratio, recovery):
    keys, queries = torch.randn(2, 3, 41, 64), torch.randn(2, 6, 8, 64)
    bits = compress_keys(keys, queries, SparKConfig(key_prune_ratio=ratio, recovery=recovery))
    trits = bits.with_trits()
    assert trits.keep is None and trits.sign is None
    assert torch.equal(trits.dense(torch.float32), bits.dense(torch.float32))
    assert torch.equal(trits.kept_per_row(), bits.kept_per_row())
    assert bits.nbytes - trits.nbytes == 2 * 3 * 41 * (2 * 64 // 8 - math.ceil(64 / 5))
    for part in (trits.slice_seq(3, 29), trits.index_batch(torch.tensor([1, 1, 0]))):
        ref = bits.slice_seq(3, 29) if part.shape[2] == 26 else bits.index_batch(torch.tensor([1, 1, 0]))
        assert torch.equal(part.dense(torch.float32), ref.dense(torch.float32))
    with pytest.raises(ValueError, match="signs"):
        compress_keys(keys, queries, SparKConfig(key_prune_ratio=ratio, recovery="zero")).with_trits()


def _attention_case(seed, b, h, g, s, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(b, h, s, d, generator=gen) * torch.rand(1, h, 1, d, generator=gen) * 2).to(dtype)
    values = torch.randn(b, h, s, d, generator=gen).to(dtype)
    queries = torch.randn(b, h * g, 8, d, generator=gen).to(dtype)
    query = torch.randn(b, h * g, 1, d, generator=gen).to(dtype)
    return keys, values, queries, query


def _quantized_chunks(keys, values, queries, kind, bits):
    cfg = SparKConfig(key_prune_ratio=0.8, window_size=8)
    if kind == "dense":
        return QuantizedTensor.quantize(keys, bits, 16, "token"), QuantizedTensor.quantize(values, bits, 16, "row")
    if kind == "spark":
        k = compress_keys(keys, queries, cfg).with_trits().with_quantized_vals(bits, 32, symmetric=True, axis="channel")
        return k, QuantizedTensor.quantize(values, bits, 32, "row")
    if kind == "spark+pruned values":
        k = compress_keys(keys, queries, cfg).with_quantized_vals(bits, 16, symmetric=True)
        return k, compress_values(values, 0.5).with_quantized_vals(bits, 16, symmetric=False)
    idx = torch.randperm(keys.shape[-1])[: keys.shape[-1] // 2].sort().values.expand(*keys.shape[:2], -1)
    return ColumnPackedTensor.from_dense(keys, idx).with_quantized_vals(bits, 16), QuantizedTensor.quantize(values, bits, 16, "row")


def _ref_dense(chunk) -> torch.Tensor:
    """float64 dense keys/values from the raw fields, independently of the chunk's own `dense()`."""
    if isinstance(chunk, QuantizedTensor):
        return ref_dequantize(chunk)
    if isinstance(chunk, ColumnPackedTensor):
        out = torch.zeros(chunk.shape, dtype=torch.float64)
        index = chunk.idx.long().unsqueeze(2).expand(*chunk.shape[:3], chunk.fixed_t)
        return out.scatter_(-1, index, ref_dequantize(chunk.vals))
    keep = chunk.keep_mask()
    out = chunk.fill_values(keep, torch.float64).double()
    return out.masked_scatter_(keep, ref_dequantize(chunk.vals, ref_kept_channels(keep)))


def ref_kept_channels(keep: torch.Tensor) -> torch.Tensor:
    """int64 `[B, H, S, T]`: the kept channels of every row of a fixed-T mask, ascending."""
    return torch.stack([row.nonzero().flatten() for row in keep.reshape(-1, keep.shape[-1])]).reshape(*keep.shape[:3], -1)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(1, 1, 9, 8), (2, 3, 70, 64), (2, 2, 37, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_axis_scales_each_kept_value_by_its_channel(seed, bits, shape, dtype):
    """SparK's kept key values on the "channel" axis: one symmetric scale per channel and token group,
    set by the largest kept |value| of that channel in the group; every value within half a step."""
    b, h, s, d = shape
    keys = (torch.randn(shape) * torch.rand(1, h, 1, d) * 4).to(dtype)
    packed = compress_keys(keys, torch.randn(b, 2 * h, 8, d), SparKConfig(key_prune_ratio=0.8, window_size=8))
    group = 16
    q = packed.with_quantized_vals(bits, group, symmetric=True, axis="channel").vals
    keep = packed.keep_mask()
    channels = ref_kept_channels(keep)
    assert q.axis == "channel" and q.zero is None and q.scale.shape == (b, h, math.ceil(s / group), d)
    want = ref_dequantize(q, channels)
    assert torch.allclose(q.dense(torch.float32, channels).double(), want, rtol=1e-6, atol=1e-6)
    # the scale: 2 max|x| / levels over the channel's kept entries in its token group
    full = torch.zeros(shape, dtype=torch.float64).masked_scatter_(keep, packed.vals.double())
    tok_group = (q.offset + torch.arange(s)) // group
    for gi in range(q.scale.shape[2]):
        amax = full[:, :, tok_group == gi].abs().amax(2)
        assert torch.allclose(q.scale[:, :, gi].double(), 2 * amax / ((1 << bits) - 1), rtol=2 ** -6, atol=1e-30)
    step = q.scale.double()[:, :, tok_group].gather(-1, channels)
    assert ((want - packed.vals.double()).abs() <= 0.5 * step * (1 + 2 ** -6) + 1e-6).all()
    assert q.nbytes == b * h * (s * math.ceil(packed.fixed_t * bits / 8) + math.ceil(s / group) * d * 2)
    # the packed tensor reads its codes with its own channels; slices and batch picks keep them exact
    dense = packed.with_quantized_vals(bits, group, symmetric=True, axis="channel")
    assert torch.equal(dense.kept_values(torch.float64), q.dense(torch.float64, channels))
    for start, stop in [(0, s), (1, s - 1), (s - 1, s)]:
        assert torch.equal(dense.slice_seq(start, stop).dense(torch.float64), dense.dense(torch.float64)[:, :, start:stop])
    index = torch.tensor([b - 1, 0])
    assert torch.equal(dense.index_batch(index).dense(torch.float64), dense.dense(torch.float64)[index])
    with pytest.raises(ValueError, match="channels"):
        q.dense()
    with pytest.raises(ValueError, match="channel"):
        QuantizedTensor.quantize(packed.vals, bits, group, "channel", symmetric=True)


def test_channel_axis_of_a_padded_row_equals_the_row_alone(seed):
    """Left padding takes no part in the per-channel statistics of the kept values."""
    cfg = SparKConfig(key_prune_ratio=0.75, window_size=4)
    alone = torch.randn(1, 2, 45, 16) * 3
    padded = torch.cat([torch.randn(1, 2, 19, 16) * 100, alone], dim=2)
    queries = torch.randn(1, 2, 4, 16)
    valid = (torch.arange(64) >= 19).unsqueeze(0)
    q_alone = compress_keys(alone, queries, cfg).with_quantized_vals(4, 16, True, axis="channel")
    q_padded = compress_keys(padded, queries, cfg).with_quantized_vals(4, 16, True, axis="channel", valid=valid)
    assert torch.equal(q_padded.dense(torch.float32)[:, :, 19:], q_alone.dense(torch.float32))


@pytest.mark.parametrize("kind", ["dense", "spark", "spark+pruned values", "think"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_attention_over_quantized_chunks_matches_float64(seed, kind, groups, bits, backend):
    keys, values, queries, query = _attention_case(seed, 2, 2, groups, 37, 64, torch.float32)
    k, v = _quantized_chunks(keys, values, queries, kind, bits)
    got = ops.attend(query, [(k, v, None)], 0.125, ops.backend(backend, query.device))  # [B, 1, Hq, D]
    want = reference_attention(query.view(2, 2, groups, 64).double(), _ref_dense(k), _ref_dense(v), 0.125)
    assert rel(got[:, 0].reshape(2, 2, groups, 64), want) < 1e-5


@pytest.mark.parametrize("symmetric", [False, True])
def test_token_groups_of_a_padded_row_equal_the_row_alone(seed, symmetric):
    """Left padding does not move a row's token groups (they end at the last token) and takes no part
    in the statistics: the real tokens quantize as the row alone does."""
    alone = torch.randn(1, 2, 45, 16) * 3
    padded = torch.cat([torch.randn(1, 2, 19, 16) * 100, alone], dim=2)  # wild padding values
    valid = torch.arange(64) >= 19
    q_alone = QuantizedTensor.quantize(alone, 4, 16, "token", symmetric)
    q_padded = QuantizedTensor.quantize(padded, 4, 16, "token", symmetric, valid=valid.unsqueeze(0))
    assert torch.equal(q_padded.dense(torch.float32)[:, :, 19:], q_alone.dense(torch.float32))
    filler = torch.ones(1, 2, 45, dtype=torch.bool)
    filler[:, 1, :7] = False  # per-head validity (eviction fillers)
    q = QuantizedTensor.quantize(alone, 4, 16, "token", symmetric, valid=filler)
    assert torch.equal(q.dense(torch.float32)[:, 0], q_alone.dense(torch.float32)[:, 0])
