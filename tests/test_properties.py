"""Property-based tests of the public API (`compress_keys`, `compress_values`, `SparKConfig`).

For random shapes (odd lengths, S = 1, GQA groups 1..8, batch 1..3, D = 8..256), dtypes, ratios,
selections and recoveries, every call either raises one `TypeError`/`ValueError` naming the bad
argument, or returns an output that is finite (the inputs are) and matches the float64
reference of tests/reference.py. Hypothesis draws fresh cases every run (60 per test;
SPARKKV_HYPOTHESIS_EXAMPLES=500 for a longer search); a failure prints the `@reproduce_failure`
blob that replays it.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import ref_keep_count, ref_query_norm, ref_recovered_keys, ref_saliency, ref_value_pruned
from sparkkv import SparKCache, SparKConfig, compress_keys, compress_values
from sparkkv.config import RECOVERIES, SALIENCY_FORMS, SEED_MAX, SELECTIONS

PROPERTY = settings(
    max_examples=int(os.environ.get("SPARKKV_HYPOTHESIS_EXAMPLES", 60)), deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
# one mutation of a valid case per test id: every mutation runs on several random cases
PER_MUTATION = settings(PROPERTY, max_examples=max(2, PROPERTY.max_examples // 6))
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# tolerance of the recovered entries against float64: the recovery scale is stored in the model dtype
# float32: a recovered entry is sqrt(mean of up to D float32 products / qn): ~D * eps relative error
RTOL = {torch.float32: 5e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
MAX_ELEMENTS = 6144  # keys per case (B * Hkv * S * D): the float64 references loop in Python


@st.composite
def key_cases(draw):
    """A valid compress_keys case: keys, window queries, optional window mask, config."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    g = draw(st.integers(1, 8))
    d = 8 * draw(st.integers(1, 32))
    s = draw(st.integers(1, max(1, min(17, MAX_ELEMENTS // (b * h * d)))))
    w = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(d, generator=gen) * 3  # channels of different scales, as in real keys
    keys = (torch.randn(b, h, s, d, generator=gen) * scales).to(dtype)
    queries = (torch.randn(b, h * g, w, d, generator=gen) * torch.rand(d, generator=gen) * 2).to(dtype)
    if draw(st.booleans()):  # channels no window query uses: zero saliency, recover to 0
        queries[..., : draw(st.integers(0, d))] = 0
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(b, w, generator=gen) > 0.4
        mask[:, -1] = True  # at least one real query per row
    selection = draw(st.sampled_from(SELECTIONS))
    config = SparKConfig(
        key_prune_ratio=draw(st.floats(0.0, 0.95)),
        saliency=draw(st.sampled_from(SALIENCY_FORMS)),
        selection=selection,
        top_p=draw(st.floats(0.3, 1.0)),
        grouped_mass=draw(st.floats(0.5, 1.0)),
        recovery=draw(st.sampled_from(RECOVERIES)),
        recovery_constant=draw(st.floats(1e-3, 1.0)),
        seed=draw(st.integers(0, SEED_MAX)),
    )
    return keys, queries, mask, config


def _ordered(row):
    return sorted(row.tolist(), reverse=True)


def _stable_rows(sal: torch.Tensor, counts: torch.Tensor, config: SparKConfig) -> torch.Tensor:
    """bool [B, H, S]: rows whose kept set is not decided by float noise (no near-tie at the keep
    threshold, no cumulative mass within 1e-5 of top_p / grouped_mass)."""
    b, h, s, d = sal.shape
    stable = torch.ones(b, h, s, dtype=torch.bool)
    for idx in np.ndindex(b, h, s):
        row = _ordered(sal[idx])
        k = int(counts[idx])
        if 0 < k < d and abs(row[k - 1] - row[k]) <= 1e-5 * max(abs(row[k - 1]), 1e-30):
            stable[idx] = False
        if config.selection != "ratio":
            total = sum(row) or 1.0
            fractions = np.cumsum(row) / total
            target = config.top_p if config.selection == "top_p" else config.grouped_mass
            if np.abs(fractions - target).min() < 1e-5:
                stable[idx] = False
    return stable


@PROPERTY
@given(key_cases())
def test_compress_keys_matches_float64_reference(case):
    keys, queries, mask, config = case
    b, h, s, d = keys.shape
    packed = compress_keys(keys, queries, config, window_mask=mask)
    dense = packed.dense(torch.float32)
    assert dense.shape == keys.shape and torch.isfinite(dense).all()
    keep = packed.keep_mask()
    assert torch.equal(packed.dense()[keep], keys[keep])  # kept entries are bit-exact copies
    qn = ref_query_norm(queries, h, mask)
    sal = ref_saliency(keys, qn, config.saliency)
    expected_counts = torch.tensor(
        [ref_keep_count(sal[idx], config.selection, config.key_prune_ratio, config.top_p, config.grouped_mass) for idx in np.ndindex(b, h, s)]
    ).reshape(b, h, s)
    stable = _stable_rows(sal, expected_counts, config)
    assert torch.equal(keep.sum(-1)[stable], expected_counts[stable])
    if config.selection == "ratio":
        assert packed.fixed_t == d - math.floor(config.key_prune_ratio * d + 1e-9)
    if config.recovery in ("mean", "zero", "constant"):
        ref, ref_keep = ref_recovered_keys(
            keys, queries, ratio=config.key_prune_ratio, form=config.saliency, recovery=config.recovery,
            constant=config.recovery_constant, selection=config.selection, top_p=config.top_p,
            mass=config.grouped_mass, window_mask=mask,
        )
        rows = stable & (keep == ref_keep).all(-1)
        assert rows.float().mean() >= 0.5 or stable.float().mean() < 0.5, "most stable rows keep the reference channels"
        a, r = dense[rows].double(), ref[rows]
        scale = keys.double().abs().max().clamp_min(1e-30)
        assert ((a - r).abs() <= RTOL[keys.dtype] * (r.abs() + 1e-3 * scale)).all()
    else:  # sampled recoveries: true signs, never above the keep threshold's saliency
        pruned = ~keep & (dense != 0)
        sign = torch.where(keys > 0, 1.0, -1.0)
        assert torch.equal(torch.sign(dense[pruned]), sign[pruned])
        recovered = dense.double() ** 2 if config.saliency == "squared" else dense.double().abs()
        recovered = recovered * qn[:, :, None, :]
        kept_sal = torch.where(keep, sal, torch.full_like(sal, math.inf)).amin(-1, keepdim=True)
        bound = torch.where(torch.isinf(kept_sal), sal.amax(-1, keepdim=True), kept_sal).expand_as(sal)
        assert (recovered[pruned] <= bound[pruned] * (1 + RTOL[keys.dtype] * 10) + 1e-12).all()


@PROPERTY
@given(key_cases(), st.integers(0, 2**31 - 1))
def test_compress_keys_is_deterministic_and_qn_equivalent(case, seed):
    keys, queries, mask, config = case
    a = compress_keys(keys, queries, config, window_mask=mask, generator=torch.Generator().manual_seed(seed))
    from sparkkv.method import window_query_norm

    qn = window_query_norm(queries, keys.shape[1], mask)
    b = compress_keys(keys, None, config, qn=qn, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a.dense(), b.dense()) and torch.equal(a.keep, b.keep)


# ---------------------------------------------------------------------------------------------
# invalid compress_keys arguments: one mutation of a valid case each
# ---------------------------------------------------------------------------------------------
def _nan_at(x, index=0):
    x = x.clone()
    x.view(-1)[index % x.numel()] = float("nan")
    return x


def _inf_at(x, index=0):
    x = x.clone()
    x.view(-1)[index % x.numel()] = -float("inf")
    return x


KEY_MUTATIONS = {  # name -> (mutate(keys, queries, mask, config, i) -> kwargs, error, argument named)
    "numpy keys": (lambda k, q, m, c, i: dict(keys=k.float().numpy()), TypeError, "keys"),
    "int keys": (lambda k, q, m, c, i: dict(keys=k.to(torch.int64)), TypeError, "keys"),
    "bool keys": (lambda k, q, m, c, i: dict(keys=k > 0), TypeError, "keys"),
    "3-D keys": (lambda k, q, m, c, i: dict(keys=k[0]), ValueError, "keys"),
    "S=0": (lambda k, q, m, c, i: dict(keys=k[:, :, :0]), ValueError, "keys"),
    "B=0": (lambda k, q, m, c, i: dict(keys=k[:0], window_queries=q[:0], window_mask=None), ValueError, "keys"),
    "D not a multiple of 8": (
        lambda k, q, m, c, i: dict(keys=k[..., : k.shape[-1] - 1 - i % 7], window_queries=q[..., : k.shape[-1] - 1 - i % 7]),
        ValueError,
        "head_dim",
    ),
    "NaN key": (lambda k, q, m, c, i: dict(keys=_nan_at(k, i)), ValueError, "keys"),
    "inf key": (lambda k, q, m, c, i: dict(keys=_inf_at(k, i)), ValueError, "keys"),
    "W=0": (lambda k, q, m, c, i: dict(window_queries=q[:, :, :0], window_mask=None), ValueError, "window_queries"),
    "NaN query": (lambda k, q, m, c, i: dict(window_queries=_nan_at(q, q.shape[-1] * (q.shape[2] - 1)), window_mask=None), ValueError, "window_queries"),
    "int queries": (lambda k, q, m, c, i: dict(window_queries=q.to(torch.int32)), TypeError, "window_queries"),
    "numpy queries": (lambda k, q, m, c, i: dict(window_queries=q.float().numpy()), TypeError, "window_queries"),
    "batch mismatch": (lambda k, q, m, c, i: dict(window_queries=torch.cat([q, q]), window_mask=None), ValueError, "window_queries"),
    "head_dim mismatch": (lambda k, q, m, c, i: dict(window_queries=torch.cat([q, q], dim=-1)), ValueError, "window_queries"),
    "heads not a GQA multiple": (
        lambda k, q, m, c, i: dict(keys=torch.cat([k, k], dim=1), window_queries=q[:, :1].expand(-1, 3, -1, -1)),
        ValueError,
        "key/value heads",
    ),
    "no queries, no qn": (lambda k, q, m, c, i: dict(window_queries=None, window_mask=None), ValueError, "window_queries"),
    "both queries and qn": (lambda k, q, m, c, i: dict(qn=torch.ones(k.shape[0], k.shape[1], k.shape[3])), ValueError, "qn"),
    "empty mask row": (lambda k, q, m, c, i: dict(window_mask=torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)), ValueError, "window_mask"),
    "int mask": (lambda k, q, m, c, i: dict(window_mask=torch.ones(q.shape[0], q.shape[2], dtype=torch.int64)), TypeError, "window_mask"),
    "mask shape": (lambda k, q, m, c, i: dict(window_mask=torch.ones(q.shape[0], q.shape[2] + 1, dtype=torch.bool)), ValueError, "window_mask"),
    "dict config": (lambda k, q, m, c, i: dict(config=c.to_dict()), TypeError, "config"),
    "string config": (lambda k, q, m, c, i: dict(config="spark"), TypeError, "config"),
    "think config": (lambda k, q, m, c, i: dict(config=SparKConfig(method="think")), ValueError, "config.method"),
    "generator": (lambda k, q, m, c, i: dict(generator=0), TypeError, "generator"),
    "qn shape": (lambda k, q, m, c, i: dict(window_queries=None, window_mask=None, qn=torch.ones(k.shape[0], k.shape[1] + 1, k.shape[3])), ValueError, "qn"),
    "negative qn": (lambda k, q, m, c, i: dict(window_queries=None, window_mask=None, qn=-torch.ones(k.shape[0], k.shape[1], k.shape[3])), ValueError, "qn"),
    "device mismatch": (lambda k, q, m, c, i: dict(window_queries=q.to("meta"), window_mask=None), ValueError, "window_queries"),
}


@pytest.mark.parametrize("mutation", sorted(KEY_MUTATIONS))
@PER_MUTATION
@given(case=key_cases(), i=st.integers(0, 10**6))
def test_compress_keys_bad_arguments_raise_naming_them(mutation, case, i):
    keys, queries, mask, config = case
    mutate, error, named = KEY_MUTATIONS[mutation]
    kwargs = dict(keys=keys, window_queries=queries, config=config, window_mask=mask)
    kwargs.update(mutate(keys, queries, mask, config, i))
    with pytest.raises(error) as info:
        compress_keys(**kwargs)
    assert named in str(info.value), (mutation, str(info.value))


# ---------------------------------------------------------------------------------------------
# compress_values
# ---------------------------------------------------------------------------------------------
@st.composite
def value_cases(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d = 8 * draw(st.integers(1, 16))
    s = draw(st.integers(1, max(1, min(13, 1536 // (b * h * d)))))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = (torch.randn(b, h, s, d, generator=gen) * torch.rand(d, generator=gen) * 2).to(dtype)
    return values, draw(st.floats(0.0, 0.99))


@PROPERTY
@given(value_cases())
def test_compress_values_matches_float64_reference(case):
    values, ratio = case
    packed = compress_values(values, ratio)
    dense = packed.dense(torch.float32)
    assert torch.isfinite(dense).all()
    keep = packed.keep_mask()
    assert torch.equal(packed.dense()[keep], values[keep])
    ref, ref_keep, scores = ref_value_pruned(values, ratio)
    d = values.shape[-1]
    p = math.floor(ratio * d + 1e-9)
    assert (keep.sum(-1) == d - p).all()
    # rows without a near-tie at the pruning threshold prune exactly the reference's channels
    ordered = scores.sort(dim=-1).values
    tie = torch.zeros(keep.shape[:3], dtype=torch.bool) if p in (0, d) else (
        (ordered[..., p] - ordered[..., p - 1]).abs() <= 1e-5 * ordered[..., p].abs().clamp_min(1e-30)
    )
    rows = ~tie
    assert torch.equal(keep[rows], ref_keep[rows])
    a, r = dense[rows].double(), ref[rows]
    assert ((a - r).abs() <= RTOL[values.dtype] * (r.abs() + 1e-3 * values.double().abs().max())).all()


BAD_RATIOS = [1.0, 1.5, -0.5, -1e-9, float("nan"), float("inf"), -float("inf")]
BAD_RATIO_TYPES = ["a", "0.5", None, True, torch.tensor(0.5), [0.5], 1j]


@pytest.mark.parametrize("ratio", BAD_RATIOS + BAD_RATIO_TYPES, ids=repr)
@PER_MUTATION
@given(case=value_cases())
def test_compress_values_bad_ratio_names_ratio(ratio, case):
    values, _ = case
    error = ValueError if isinstance(ratio, float) else TypeError
    with pytest.raises(error, match=r"ratio must be a number in \[0, 1\)"):
        compress_values(values, ratio)


VALUE_MUTATIONS = {
    "numpy": (lambda v, i: v.float().numpy(), TypeError),
    "int": (lambda v, i: v.to(torch.int16), TypeError),
    "bool": (lambda v, i: v > 0, TypeError),
    "3-D": (lambda v, i: v[0], ValueError),
    "S=0": (lambda v, i: v[:, :, :0], ValueError),
    "NaN": (lambda v, i: _nan_at(v, i), ValueError),
    "inf": (lambda v, i: _inf_at(v, i), ValueError),
    "D=12": (lambda v, i: torch.zeros(*v.shape[:3], 12), ValueError),
}


@pytest.mark.parametrize("mutation", sorted(VALUE_MUTATIONS))
@PER_MUTATION
@given(case=value_cases(), i=st.integers(0, 10**6))
def test_compress_values_bad_values_name_values(mutation, case, i):
    values, ratio = case
    mutate, error = VALUE_MUTATIONS[mutation]
    with pytest.raises(error, match="values|head_dim=12"):
        compress_values(mutate(values, i), ratio)


# ---------------------------------------------------------------------------------------------
# SparKConfig
# ---------------------------------------------------------------------------------------------
# Per field: values that must be accepted, values that must be refused (with the field's name).
FIELDS = {
    "key_prune_ratio": (st.floats(0, 0.999), st.sampled_from([1.0, 2, -0.1, math.nan, math.inf, "0.5", None])),
    "value_prune_ratio": (st.floats(0, 0.999), st.sampled_from([1.0, -1, math.nan, "x"])),
    "window_size": (st.integers(1, 10**6), st.sampled_from([0, -3, 2.5, True, "8", None])),
    "top_p": (st.floats(1e-6, 1.0), st.sampled_from([0.0, 1.01, -0.5, math.nan, math.inf])),
    "grouped_mass": (st.floats(1e-6, 1.0), st.sampled_from([0.0, 1.5, math.nan])),
    "recovery_constant": (st.floats(1e-9, 1e6), st.sampled_from([0, -1.0, math.nan, math.inf, "1"])),
    "seed": (st.integers(0, SEED_MAX), st.sampled_from([-1, SEED_MAX + 1, 2**64 - 1, 2**64, 1.0, True, None])),
    "block_size": (st.integers(1, 4096), st.sampled_from([0, -1, 1.5, False])),
    "saliency": (st.sampled_from(SALIENCY_FORMS), st.sampled_from(["abs", "", None, 1])),
    "selection": (st.sampled_from(SELECTIONS), st.sampled_from(["topk", None])),
    "recovery": (st.sampled_from(RECOVERIES), st.sampled_from(["avg", "Mean ", None])),
    "compress_decode": (st.booleans(), st.sampled_from([0, 1, "yes", None])),
    "pool_kernel": (st.integers(0, 20).map(lambda n: 2 * n + 1), st.sampled_from([0, 2, 4, -1, 3.0])),
    "sink_tokens": (st.integers(0, 64), st.sampled_from([-1, 1.5, None])),
}


@PROPERTY
@given(st.data())
def test_config_accepts_valid_and_names_the_bad_field(data):
    valid = {name: data.draw(good, label=name) for name, (good, _) in FIELDS.items() if data.draw(st.booleans())}
    config = SparKConfig(**valid)
    assert SparKConfig.from_dict(config.to_dict()) == config and isinstance(config.name, str)
    for value in (config.key_prune_ratio, config.value_prune_ratio, config.top_p, config.grouped_mass, config.recovery_constant):
        assert math.isfinite(value)
    bad_field = data.draw(st.sampled_from(sorted(FIELDS)), label="bad field")
    bad_value = data.draw(FIELDS[bad_field][1], label="bad value")
    with pytest.raises((TypeError, ValueError), match=bad_field):
        SparKConfig(**{**valid, bad_field: bad_value})


def test_largest_seed_runs_every_prefill_and_block():
    """seed = SEED_MAX with a sampled recovery: the cache adds per-layer and per-block offsets."""
    from models import build_pair

    spark, _ = build_pair("llama", num_hidden_layers=3)
    cache = SparKCache(SparKConfig(recovery="exponential", seed=SEED_MAX, block_size=4))
    with torch.no_grad():
        spark(torch.randint(0, 211, (1, 30)), past_key_values=cache)
        for _ in range(6):
            spark(torch.randint(0, 211, (1, 1)), past_key_values=cache)
    assert len(cache.layers[2].key_chunks) > 1  # decode blocks were compressed (seeded) too
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\], got 18446744073709551615"):
        SparKConfig(seed=2**64 - 1)
