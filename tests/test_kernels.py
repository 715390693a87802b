"""The fused CPU kernels (kernels/cpu_decode.cpp) against float64 references built from the packed fields.

Paths: "auto" (bf16 dot products where the data is bf16 and the CPU has AVX512_BF16), "float32"
(AVX-512 float32 FMAs; the AVX2 path on CPUs without AVX-512), "avx2" (where AVX-512 is compiled
in: the AVX2 path it hands other calls to) and "portable" (the scalar build compiled without
AVX-512 or AVX2). Ternary codes and quantized operands: tests/test_kernels_quant.py.
"""

import math

import pytest
import torch

from models import build_pair, rel
from sparkkv import SparKCache, SparKConfig, compress_keys
from sparkkv.kernels import cpu
from sparkkv.kernels.reference import merge_partials, reference_attention
from sparkkv.method import compress_values
from sparkkv.packed import PackedTensor, unpack_bits

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="the CPU kernel cannot be built here (no compiler/ninja)")

PATHS = ["auto", "float32", "portable"]
if cpu.load() is not None and cpu.load().has_avx512_path() and cpu.load().has_avx2_path():
    PATHS.insert(2, "avx2")  # the AVX2 path is otherwise what "auto" and "float32" run


def rounds_to_bf16(path, q, keys, values) -> bool:
    """Whether the kernel may round to bfloat16 (pruned key entries / probabilities) on this path."""
    module = cpu.load()
    if path != "auto" or not module.has_bf16_dot():
        return False
    dtype = lambda x: x.vals.dtype if isinstance(x, PackedTensor) else x.dtype  # noqa: E731
    return dtype(values) == torch.bfloat16 or (q.dtype == torch.bfloat16 and dtype(keys) == torch.bfloat16)


def make_keys(kind, b, h, s, d, dtype, g=4):
    """kind: "dense", a recovery ("mean", "zero", "constant": fixed T) or a selection ("top_p",
    "grouped": variable T)."""
    keys = (torch.randn(b, h, s, d) * torch.rand(d) * 3).to(dtype)
    if kind == "dense":
        return keys
    window = torch.randn(b, h * g, 6, d)
    if kind in ("top_p", "grouped"):
        return compress_keys(keys, window, SparKConfig(selection=kind, top_p=0.8))
    return compress_keys(keys, window, SparKConfig(key_prune_ratio=0.75, recovery=kind))


def make_values(kind, b, h, s, dv, dtype):
    values = torch.randn(b, h, s, dv).to(dtype)
    return values if kind == "dense" else compress_values(values, float(kind))


def check(q, keys, values, bias=None, splits=None, path="auto"):
    scaling = q.shape[-1] ** -0.5
    m, l, acc = cpu.decode_partials(q, keys, values, scaling, bias, splits, path=path)
    b, h, mq, _ = q.shape
    p = m.shape[2]
    assert m.dtype == l.dtype == acc.dtype == torch.float32
    assert m.shape == l.shape == (b, h, p, mq) and acc.shape == (b, h, p, mq, values.shape[-1])
    if splits is not None:
        assert p == min(splits, keys.shape[2])
    got = merge_partials([(m, l, acc)])
    ref = reference_attention(q, keys, values, scaling, bias)
    tol = 1e-2 if rounds_to_bf16(path, q, keys, values) else 2e-5
    assert rel(got, ref) < tol
    return m, l, acc


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("values_kind", ["dense", "0.5", "0.8"])
@pytest.mark.parametrize("keys_kind", ["mean", "zero", "constant", "top_p", "grouped", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_float64(seed, path, values_kind, keys_kind, dtype):
    b, h, g, s, d = 2, 2, 4, 77, 64
    keys = make_keys(keys_kind, b, h, s, d, dtype)
    values = make_values(values_kind, b, h, s, d, dtype)
    q = torch.randn(b, h, g, d).to(dtype)
    check(q, keys, values, splits=3, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (40, 40), (128, 64), (48, 80)])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("s", [1, 77, 1000])
def test_decode_shapes(seed, path, d, dv, g, s):
    """Head dims 64/128, an odd multiple of 8 (packed 40: the scalar path inside the native build) and
    Dv != D; GQA groups 1/4/8; lengths inside one block, across blocks, across splits."""
    b, h = 2, 2
    keys = make_keys("mean", b, h, s, d, torch.bfloat16, g)
    values = make_values("0.5", b, h, s, dv, torch.bfloat16)
    q = torch.randn(b, h, g, d).bfloat16()
    for splits in (1, 4):
        check(q, keys, values, splits=splits, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_dtypes(seed, path, dtype):
    """float16 storage (scale in float32, as the cache stores it for float16 models) and float32
    query rows against bfloat16 keys (the float32 logits path inside "auto")."""
    b, h, g, s, d = 1, 3, 4, 130, 128
    keys = make_keys("mean", b, h, s, d, dtype)
    if dtype == torch.float16:
        keys.scale = keys.scale.float()
    values = make_values("0.8", b, h, s, d, dtype)
    if dtype == torch.float16:
        values.scale = values.scale.float()
    for q in (torch.randn(b, h, g, d).to(dtype), torch.randn(b, h, g, d)):
        check(q, keys, values, splits=2, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias_heads", [1, 2])
def test_decode_bias_and_masked_split(seed, path, bias_heads):
    """-inf entries everywhere, a fully masked split (m = -inf, l = 0, acc = 0), a fully masked row."""
    b, h, g, s, d = 2, 2, 4, 300, 64
    keys = make_keys("mean", b, h, s, d, torch.bfloat16)
    values = make_values("0.8", b, h, s, d, torch.bfloat16)
    q = torch.randn(b, h, g, d).bfloat16()
    bias = torch.randn(b, bias_heads, s).float()
    bias[torch.rand(b, bias_heads, s) < 0.3] = float("-inf")
    bias[0, :, :100] = float("-inf")  # splits=3 -> 100 tokens each: the first split of batch 0 is masked
    m, l, acc = check(q, keys, values, bias=bias, splits=3, path=path)
    assert torch.isinf(m[0, :, 0]).all() and (m[0, :, 0] < 0).all()
    assert (l[0, :, 0] == 0).all() and (acc[0, :, 0] == 0).all()
    bias[1] = float("-inf")  # every token of batch 1 masked: its rows come out as zeros
    m, l, acc = cpu.decode_partials(q, keys, values, d**-0.5, bias, 3, path=path)
    assert torch.isinf(m[1]).all() and (l[1] == 0).all() and (merge_partials([(m, l, acc)])[1] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d, dv", [(1, 1), (7, 7), (26, 128), (40, 100), (100, 33), (26, 64)])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_dense_any_head_dim(seed, path, d, dv, g, dtype):
    """Dense keys (ThinK hands the kernel its T kept channels, e.g. 26 of 128) and dense values
    whose head dims are not multiples of 16: the AVX-512 paths read the last partial chunk with
    masked loads. (26, 64) pairs such keys with packed values. Odd lengths, -inf bias entries."""
    b, h, s = 2, 2, 77
    keys = make_keys("dense", b, h, s, d, dtype)
    values = make_values("0.5" if dv == 64 else "dense", b, h, s, dv, dtype)
    q = torch.randn(b, h, g, d).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    # one token, one block plus one, several blocks; the bias shared by the heads or per head
    for length, bias_heads in ((1, 1), (33, h), (s, 1)):
        bias = torch.randn(b, bias_heads, length)
        bias[torch.rand(bias.shape) < 0.3] = float("-inf")
        bias[..., length // 2] = 0.0  # no fully masked row (test_decode_bias_and_masked_split has them)
        k = keys[:, :, :length].contiguous()
        v = (values.slice_seq(0, length) if isinstance(values, PackedTensor) else values[:, :, :length].contiguous())
        for splits in (1, 3):
            check(q, k, v, bias=bias, splits=splits, path=path)


def test_partials_merge_with_other_chunks(seed):
    """Two chunks (packed prefix + dense tail) merged by log-sum-exp equal attention over their concatenation."""
    b, h, g, d = 1, 2, 4, 128
    keys = make_keys("mean", b, h, 500, d, torch.float32)
    values = make_values("dense", b, h, 500, d, torch.float32)
    tail_k, tail_v = torch.randn(b, h, 9, d), torch.randn(b, h, 9, d)
    q = torch.randn(b, h, g, d)
    parts = [cpu.decode_partials(q, keys, values, 0.1, splits=4), cpu.decode_partials(q, tail_k, tail_v, 0.1)]
    whole_k = torch.cat([keys.dense(torch.float32), tail_k], dim=2)
    whole_v = torch.cat([values, tail_v], dim=2)
    assert rel(merge_partials(parts), reference_attention(q, whole_k, whole_v, 0.1)) < 2e-5


def test_empty_chunk(seed):
    keys = make_keys("mean", 1, 2, 5, 64, torch.bfloat16).slice_seq(0, 0)  # compress_keys refuses S=0
    values = make_values("dense", 1, 2, 5, 64, torch.bfloat16)[:, :, :0]
    m, l, acc = cpu.decode_partials(torch.randn(1, 2, 4, 64), keys, values, 0.1)
    assert torch.isinf(m).all() and (l == 0).all() and acc.shape == (1, 2, 1, 4, 64) and (acc == 0).all()
    assert cpu.packed_qk(torch.randn(1, 2, 4, 64), keys).shape == (1, 2, 4, 0)


def test_threads_do_not_change_results(seed):
    keys = make_keys("top_p", 1, 4, 700, 128, torch.bfloat16)
    values = make_values("0.8", 1, 4, 700, 128, torch.bfloat16)
    check_threads_do_not_change_results(keys, values, torch.randn(1, 4, 4, 128).bfloat16())


def check_threads_do_not_change_results(keys, values, q):
    """1 and 2 threads give bit-identical partials (also used by tests/test_kernels_quant.py)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.decode_partials(q, keys, values, 0.1, splits=5)
        torch.set_num_threads(2)
        two = cpu.decode_partials(q, keys, values, 0.1, splits=5)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# packed_qk: logits only
# ------------------------------------------------------------------------------------------------
def ref_logits(q, packed, round_fill=False):
    """float64 from the stored fields: kept values in place, pruned entries = sign * scale * chan
    (rounded to the storage dtype when `round_fill`, as the bf16 dot-product path sees them)."""
    b, h, s, d = packed.shape
    keep = unpack_bits(packed.keep, d)
    vals = torch.zeros(packed.shape, dtype=torch.float64).masked_scatter_(keep, packed.vals.double())
    fill = torch.zeros(packed.shape, dtype=torch.float64)
    if packed.sign is not None or packed.scale is not None or packed.chan is not None:
        fill = unpack_bits(packed.sign, d).double() * 2 - 1 if packed.sign is not None else torch.ones(packed.shape, dtype=torch.float64)
        if packed.scale is not None:
            fill = fill * packed.scale.double()[..., None]
        if packed.chan is not None:
            fill = fill * packed.chan.double()[:, :, None, :]
        if round_fill:
            fill = fill.float().to(packed.vals.dtype).double()
    return q.double() @ torch.where(keep, vals, fill).transpose(-1, -2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [8, 16, 64, 128])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
def test_packed_qk_matches_float64(seed, path, dtype, d, recovery):
    b, h, g, s = 2, 3, 4, 37
    keys = (torch.randn(b, h, s, d) * 2).to(dtype)
    packed = compress_keys(keys, torch.randn(b, h * g, 5, d), SparKConfig(key_prune_ratio=0.75, recovery=recovery))
    for m in (1, 4, 20):  # 20 query rows: several 4-row blocks of the logits stage
        q = torch.randn(b, h, m, d)
        got = cpu.packed_qk(q, packed, path=path)
        assert got.dtype == torch.float32 and got.shape == (b, h, m, s)
        assert rel(got, ref_logits(q, packed)) < 1e-5
        # bf16 query rows meet bf16 keys in bf16 dot products: exact products, fill rounded to bf16
        qb = q.to(dtype) if dtype == torch.bfloat16 else q
        # (packed keys whose head dim is not a multiple of 16 take the scalar path: float32 fills)
        round_fill = path == "auto" and dtype == torch.bfloat16 and d % 16 == 0 and cpu.load().has_bf16_dot()
        assert rel(cpu.packed_qk(qb, packed, path=path), ref_logits(qb, packed, round_fill)) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 7, 26, 40, 100])
def test_packed_qk_dense_any_head_dim(seed, path, dtype, d):
    """Logits against dense keys whose head dim is not a multiple of 16 (masked last chunk)."""
    b, h, s = 2, 3, 45
    keys = (torch.randn(b, h, s, d) * 2).to(dtype)
    for m in (1, 4, 7):
        q = torch.randn(b, h, m, d)
        # float32 rows: float32 FMAs; bf16 rows against bf16 keys: bf16 dot products on "auto"
        for q in (q, q.bfloat16()) if dtype == torch.bfloat16 else (q,):
            got = cpu.packed_qk(q, keys, path=path)
            assert got.dtype == torch.float32 and got.shape == (b, h, m, s)
            # products of stored values are exact in float32 and bf16 dot products alike
            assert rel(got, q.double() @ keys.double().transpose(-1, -2)) < 1e-5


def test_avx512_serves_dense_head_dims():
    """Which head dims the AVX-512 paths take: dense operands any D <= 256, packed ones D % 16 == 0."""
    module = cpu.load()
    native = module.has_avx512_path()
    for d in (1, 7, 26, 40, 100, 128, 256):
        assert module.avx512_serves(d, d, False, False) == native
        assert module.avx512_serves(d, 128, False, True) == native  # packed values of a multiple of 16
        assert module.avx512_serves(d, d, True, False) == (native and d % 16 == 0)
        assert module.avx512_serves(128, d, False, True) == (native and d % 16 == 0)
    assert not module.avx512_serves(264, 128, False, False)  # query/key rows kept in at most 16 registers
    assert not cpu.load(portable=True).avx512_serves(26, 128, False, False)


@pytest.mark.parametrize("selection", ["top_p", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [5, 300, 777])  # within one block, across several work items
def test_packed_qk_variable_t(seed, selection, dtype, s):
    b, h, d = 2, 3, 64
    keys = (torch.randn(b, h, s, d) * torch.rand(d) * 3).to(dtype)
    packed = compress_keys(keys, torch.randn(b, h * 2, 5, d), SparKConfig(selection=selection, top_p=0.8))
    assert packed.fixed_t is None
    q = torch.randn(b, h, 4, d)
    for path in PATHS:
        assert rel(cpu.packed_qk(q, packed, path=path), ref_logits(q, packed)) < 1e-5


# ------------------------------------------------------------------------------------------------
# what the kernel refuses, and how it says so
# ------------------------------------------------------------------------------------------------
def test_can_serve_and_errors(seed):
    keys, queries = torch.randn(1, 2, 9, 64), torch.randn(1, 2, 4, 64)
    sampled = compress_keys(keys, queries, SparKConfig(recovery="normal"))
    values = torch.randn(1, 2, 9, 64)
    assert cpu.can_serve(sampled, values) is not None and "fill" in cpu.can_serve(sampled, values)
    assert cpu.packed_qk(torch.randn(1, 2, 1, 64), sampled) is None
    with pytest.raises(ValueError, match="fill"):
        cpu.decode_partials(queries, sampled, values, 0.1)
    assert cpu.can_serve(keys, values) is None
    assert "differ" in cpu.can_serve(keys, values[:, :, :5])
    assert "int" in cpu.can_serve(keys.int(), values)
    with pytest.raises(ValueError, match=r"bias must be \[1, 1 or 2, 9\]"):
        cpu.decode_partials(queries, keys, values, 0.1, bias=torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="path must be one of"):
        cpu.decode_partials(queries, keys, values, 0.1, path="gpu")
    with pytest.raises(ValueError, match="splits must be >= 1"):
        cpu.decode_partials(queries, keys, values, 0.1, splits=0)
    with pytest.raises(ValueError, match="head_dim"):
        cpu.decode_partials(torch.randn(1, 2, 4, 32), keys, values, 0.1)


def test_default_splits():
    assert cpu.default_splits(8, 32768, threads=2) == 1  # 8 items already feed 2 threads twice
    assert cpu.default_splits(8, 32768, threads=16) == 4
    assert cpu.default_splits(1, 300, threads=16) == 1  # no split under 256 tokens
    assert cpu.default_splits(1, 100_000, threads=8) == math.ceil(16 / 1)


@pytest.mark.parametrize("config", [SparKConfig(key_prune_ratio=0.8, block_size=4), SparKConfig(selection="top_p", block_size=4)],
                         ids=["ratio", "top_p"])
def test_model_same_with_and_without_kernel(seed, monkeypatch, config):
    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 90))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fast = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    monkeypatch.setattr(cpu, "packed_qk", lambda *a, **k: None)  # force the PyTorch rebuild path
    slow = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    assert rel(torch.stack(fast.logits), torch.stack(slow.logits)) < 1e-5
