"""The method (saliency -> select -> recover -> pack) against float64 references."""

import math

import pytest
import torch

from reference import ref_keep_count, ref_query_norm, ref_recovered_keys, ref_saliency
from sparkkv import SparKConfig, compress_keys, compress_values
from sparkkv.method import saliency, select_channels, think_keep_mask, value_scores, window_query_norm

SHAPES = [  # (B, Hkv, G, S, W, D)
    (1, 1, 1, 7, 3, 8),
    (2, 2, 2, 13, 5, 64),
    (1, 2, 4, 9, 4, 128),
    (2, 1, 8, 5, 6, 64),
    (3, 4, 1, 11, 1, 16),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def rand_inputs(b, h, g, s, w, d, dtype=torch.float32):
    keys = torch.randn(b, h, s, d) * torch.rand(d) * 3  # channels of different scales, as in real keys
    queries = torch.randn(b, h * g, w, d) * torch.rand(d) * 2
    return keys.to(dtype), queries.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_query_norm_and_saliency(seed, shape):
    b, h, g, s, w, d = shape
    keys, queries = rand_inputs(*shape)
    window_mask = torch.rand(b, w) > 0.3
    for mask in (None, window_mask):
        qn = window_query_norm(queries, h, mask)
        assert qn.shape == (b, h, d)
        assert rel(qn, ref_query_norm(queries, h, mask)) < 1e-6
        for form in ("squared", "paper"):
            assert rel(saliency(keys, qn, form), ref_saliency(keys, ref_query_norm(queries, h, mask), form)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 0.3])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
@pytest.mark.parametrize("form", ["squared", "paper"])
def test_compress_keys_matches_reference(seed, shape, ratio, recovery, form):
    b, h, g, s, w, d = shape
    keys, queries = rand_inputs(*shape)
    config = SparKConfig(key_prune_ratio=ratio, recovery=recovery, saliency=form, recovery_constant=0.05)
    packed = compress_keys(keys, queries, config)
    ref, ref_keep = ref_recovered_keys(keys, queries, ratio=ratio, form=form, recovery=recovery, constant=0.05)
    assert torch.equal(packed.keep_mask(), ref_keep)
    assert packed.fixed_t == d - math.floor(ratio * d + 1e-9)
    assert rel(packed.dense(), ref) < 1e-6
    # kept entries are bit-exact copies of the keys
    assert torch.equal(packed.dense()[ref_keep], keys[ref_keep])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compress_keys_half_precision(seed, dtype):
    keys, queries = rand_inputs(2, 2, 4, 33, 8, 128, dtype)
    packed = compress_keys(keys, queries, SparKConfig(key_prune_ratio=0.8))
    ref, keep = ref_recovered_keys(keys, queries, ratio=0.8)
    assert packed.vals.dtype == dtype and packed.dense().dtype == dtype
    assert torch.equal(packed.dense()[keep], keys[keep])
    assert rel(packed.dense(), ref) < 1e-2


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("selection", ["top_p", "grouped"])
def test_variable_selection_matches_reference(seed, shape, selection):
    b, h, g, s, w, d = shape
    keys, queries = rand_inputs(*shape)
    config = SparKConfig(selection=selection, top_p=0.8)
    qn = window_query_norm(queries, h)
    keep = select_channels(saliency(keys, qn), config)
    sal = ref_saliency(keys, ref_query_norm(queries, h))
    counts = keep.sum(-1)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (b, h, s))):
        row = sal[tuple(idx)]
        expected = ref_keep_count(row, selection, 0.5, 0.8, 0.99)
        # rows whose cumulative mass sits within float32 noise of the threshold may legitimately differ by one
        ordered = row.sort(descending=True).values
        fractions = ordered.cumsum(0) / ordered.sum()
        target = 0.8 if selection == "top_p" else 0.99
        if (fractions - target).abs().min() < 1e-5:
            continue
        assert counts[tuple(idx)].item() == expected, (tuple(idx), counts[tuple(idx)].item(), expected)
        kept_sal = row[keep[tuple(idx)]]
        pruned_sal = row[~keep[tuple(idx)]]
        if pruned_sal.numel() and kept_sal.numel():
            assert kept_sal.min() >= pruned_sal.max()  # the most salient channels are the kept ones
    # the packed form stores exactly the kept values, no padding, and reconstructs the reference
    packed = compress_keys(keys, queries, config)
    assert packed.fixed_t is None or bool((counts == counts.flatten()[0]).all())
    assert packed.vals.numel() == int(packed.keep_mask().sum())
    ref, ref_keep = ref_recovered_keys(keys, queries, selection=selection, top_p=0.8)
    rows_equal = (packed.keep_mask() == ref_keep).all(-1)
    assert rows_equal.float().mean() > 0.9
    assert rel(packed.dense()[rows_equal], ref[rows_equal]) < 1e-6


def test_grouped_keep_sizes_at_128():
    # n99 buckets keep 12 / 38 / 64 / 89 / 115 channels at D = 128
    d = 128
    config = SparKConfig(selection="grouped")
    sizes = []
    for n_hot in (10, 40, 70, 100, 128):
        s = torch.zeros(1, 1, 1, d)
        s[..., :n_hot] = 1.0  # n99 == n_hot (uniform mass over n_hot channels)
        sizes.append(int(select_channels(s, config).sum()))
    assert sizes == [12, 38, 64, 89, 115]


def test_zero_query_norm_channels_are_finite(seed):
    keys, queries = rand_inputs(2, 2, 2, 17, 4, 64)
    queries[..., :10] = 0  # channels no window query uses
    for form in ("squared", "paper"):
        packed = compress_keys(keys, queries, SparKConfig(key_prune_ratio=0.8, saliency=form))
        dense = packed.dense()
        assert torch.isfinite(dense).all()
        # those channels have zero saliency, so they are pruned, and recover to 0
        assert (dense[..., :10] == 0).all()
    all_zero = compress_keys(keys, torch.zeros_like(queries), SparKConfig(key_prune_ratio=0.8))
    assert torch.isfinite(all_zero.dense()).all()


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_cancelling_gqa_group_recovers_like_float64(seed, groups):
    """The heads of a group nearly cancel, so the pooled query norm is ~1e-4 of the queries: the
    recovered entries (`1/sqrt(qn)`) must still match the float64 reference (a float32 pooling
    was off by 2e-5 relative, found by the property test)."""
    keys = torch.randn(2, 2, 9, 32, dtype=torch.float64)
    base = torch.randn(2, 2, 1, 4, 32, dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** i for i in range(groups)], dtype=torch.float64).reshape(1, 1, groups, 1, 1)
    queries = (base * signs + 1e-4 * torch.randn(2, 2, groups, 4, 32, dtype=torch.float64)).reshape(2, 2 * groups, 4, 32)
    packed = compress_keys(keys, queries, SparKConfig(key_prune_ratio=0.5))
    ref, ref_keep = ref_recovered_keys(keys, queries, ratio=0.5)
    assert torch.equal(packed.keep_mask(), ref_keep)
    torch.testing.assert_close(packed.dense(torch.float64), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("recovery", ["exponential", "normal"])
def test_sampled_recovery_seeded_and_well_formed(seed, recovery):
    keys, queries = rand_inputs(2, 2, 2, 19, 4, 64)
    config = SparKConfig(key_prune_ratio=0.5, recovery=recovery, seed=seed % 1000)
    a = compress_keys(keys, queries, config).dense()
    b = compress_keys(keys, queries, config).dense()
    c = compress_keys(keys, queries, config.replace(seed=seed % 1000 + 1)).dense()
    assert torch.equal(a, b) and not torch.equal(a, c)
    ref, keep = ref_recovered_keys(keys, queries, ratio=0.5)
    assert torch.equal(a[keep], keys[keep])
    qn = ref_query_norm(queries, 2)
    sal = ref_saliency(keys, qn)
    pruned = ~keep
    # signs are the true signs (sign(0) negative), saliency of a recovered entry never exceeds the keep threshold
    sign = torch.where(keys > 0, 1.0, -1.0)
    nonzero = pruned & (a != 0)
    assert torch.equal(torch.sign(a[nonzero].float()), sign[nonzero])
    recovered_sal = a.double() ** 2 * qn[:, :, None, :]
    threshold = torch.where(keep, sal, torch.full_like(sal, float("inf"))).amin(-1, keepdim=True)
    assert (recovered_sal[pruned] <= threshold.expand_as(sal)[pruned] * (1 + 1e-4)).all()
    # assigned by rank: within a token, a more salient pruned channel never gets a smaller draw
    for bi, hi, t in [(0, 0, 0), (1, 1, 5), (0, 1, 18)]:
        p = pruned[bi, hi, t]
        true_rank = sal[bi, hi, t][p].argsort()
        drawn = recovered_sal[bi, hi, t][p][true_rank]
        assert (drawn[1:] >= drawn[:-1] * (1 - 1e-4) - 1e-12).all()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_value_pruning_reference(seed, ratio):
    b, h, s, d = 2, 3, 21, 64
    values = torch.randn(b, h, s, d)
    packed = compress_values(values, ratio)
    v = values.double()
    diversity = v.var(2, unbiased=False, keepdim=True) + v.var(3, unbiased=False, keepdim=True)
    diversity = diversity / diversity.amax(dim=(2, 3), keepdim=True)
    score = 0.7 * v.abs() + 0.3 * diversity
    assert (value_scores(values).double() - score).abs().max() < 1e-5
    n_pruned = math.floor(ratio * d + 1e-9)
    pruned = torch.zeros_like(v, dtype=torch.bool).scatter(-1, score.argsort(-1)[..., :n_pruned], True)
    expected = torch.where(pruned, (v * pruned).sum(-1, keepdim=True) / n_pruned, v)
    assert torch.equal(packed.keep_mask(), ~pruned)
    assert rel(packed.dense(), expected) < 1e-6


def test_think_channels_reference(seed):
    b, h, g, s, w, d = 2, 2, 4, 23, 6, 64
    keys, queries = rand_inputs(b, h, g, s, w, d)
    qn = window_query_norm(queries, h)
    idx = think_keep_mask(keys, qn.pow(2), 0.5)
    ref_q = ref_query_norm(queries, h) ** 2 / w  # mean over the window of the pooled q^2
    ref_score = ref_q * keys.double().pow(2).mean(2)
    expected = ref_score.topk(32, dim=-1).indices.sort(-1).values
    assert torch.equal(idx, expected)


def test_bad_inputs_are_rejected():
    keys = torch.randn(1, 2, 5, 12)
    with pytest.raises(ValueError, match="head_dim=12"):
        compress_keys(keys, torch.randn(1, 2, 3, 12))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        compress_keys(torch.randn(1, 2, 5, 16), torch.randn(1, 3, 3, 16))
    with pytest.raises(ValueError, match="keys must be"):
        compress_keys(torch.randn(2, 5, 16), torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="do not match"):
        compress_keys(torch.randn(1, 2, 5, 16), torch.randn(2, 2, 3, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_public_functions_refuse_non_finite_input_and_count_it(seed, dtype, bad):
    """compress_keys / compress_values refuse NaN/inf anywhere in their tensors (docs/nonfinite.md),
    naming the argument and the number of bad entries; finite input of any magnitude passes."""
    keys, queries = rand_inputs(2, 2, 2, 37, 4, 64, dtype)
    cfg = SparKConfig(key_prune_ratio=0.5, window_size=4)
    n = int(torch.randint(1, 4, ()).item())
    where = torch.randperm(keys.numel())[:n]
    for name, call in (("keys", lambda k: compress_keys(k, queries, cfg)), ("values", lambda v: compress_values(v, 0.5))):
        x = keys.clone()
        x.view(-1)[where] = bad
        with pytest.raises(ValueError, match=rf"{name} holds {n} NaN/inf entr(y|ies)"):
            call(x)
    huge = keys.clone()
    huge.view(-1)[where] = torch.finfo(dtype).max  # finite extremes are not refused
    compress_values(huge, 0.5)
    qn = window_query_norm(queries, 2)
    qn[1, 0, 3] = abs(bad)  # qn is a norm: NaN or +inf
    with pytest.raises(ValueError, match=r"qn holds 1 NaN/inf entry"):
        compress_keys(keys, None, cfg, qn=qn)
