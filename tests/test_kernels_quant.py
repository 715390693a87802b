"""The fused kernels over ternary mask codes and quantized storage (issue 18): the CPU kernel on
every path and the Triton kernel (interpreter on CPU), against float64 attention over the operands
rebuilt here from their raw stored fields (digits, bits, codes, scales), on random inputs with a
fresh seed; and through `ops.attend` and a model's cache, where the backend must report that it
served every part.

Operand kinds: SparK keys with trits (raw, or quantized kept values with per-channel scales; fixed or
variable T) or keep + sign bits with quantized kept values (per-row scales), dense quantized keys
(groups of tokens per channel), ThinK's quantized kept columns, dense quantized values (groups per
row), pruned values with quantized kept values; bits 8 / 4 / 2; float32 / bfloat16 / float16 models.
"""

import math
from dataclasses import replace

import pytest
import torch

from models import build_pair, rel
from sparkkv import SparKCache, SparKConfig, compress_keys, ops
from sparkkv.kernels import cpu
from sparkkv.kernels.operands import key_operand, value_operand
from sparkkv.kernels.reference import merge_partials, reference_attention
from sparkkv.method import compress_values
from sparkkv.packed import ColumnPackedTensor, DenseChunk, PackedTensor
from sparkkv.quant import QuantizedTensor
from test_kernels import check_threads_do_not_change_results
from test_quant import ref_dequantize, ref_kept_channels

CPU_OK = cpu.load() is not None
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="the CPU kernel cannot be built here (no compiler/ninja)")


def cpu_paths() -> list[str]:
    """Every CPU path that is distinct on this machine ("avx2" differs from "auto" only where the
    AVX-512 paths are compiled in)."""
    if not CPU_OK:
        return []
    paths = ["auto", "float32", "portable"]
    if cpu.load().has_avx512_path() and cpu.load().has_avx2_path():
        paths.insert(2, "avx2")
    return paths


# ------------------------------------------------------------------------------------------------
# float64 references from the raw stored fields
# ------------------------------------------------------------------------------------------------
def ref_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    """bool [..., d] from bytes: bit c % 8 of byte c // 8."""
    c = torch.arange(d)
    return ((bits.long()[..., c // 8] >> (c % 8)) & 1).bool()


def ref_trit_digits(trits: torch.Tensor, d: int) -> torch.Tensor:
    """int [..., d]: digit c % 5 of byte c // 5 in base 3."""
    c = torch.arange(d)
    return (trits.long()[..., c // 5] // (3 ** (c % 5))) % 3


def ref_dense(x) -> torch.Tensor:
    """float64 [B, H, S, D] of any operand kind, from its raw fields."""
    if isinstance(x, torch.Tensor):
        return x.double()
    if isinstance(x, QuantizedTensor):
        return ref_dequantize(x)
    assert isinstance(x, PackedTensor) and x.fill is None
    d = x.shape[-1]
    if x.trits is not None:
        digits = ref_trit_digits(x.trits, d)
        keep, positive = digits == 0, digits == 2
    else:
        keep = ref_bits(x.keep, d)
        positive = ref_bits(x.sign, d) if x.sign is not None else None
    kept = ref_dequantize(x.vals, ref_kept_channels(keep)) if isinstance(x.vals, QuantizedTensor) else x.vals.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    if positive is not None or x.scale is not None or x.chan is not None:
        out = positive.double() * 2 - 1 if positive is not None else torch.ones(x.shape, dtype=torch.float64)
        if x.scale is not None:
            out = out * x.scale.double()[..., None]
        if x.chan is not None:
            out = out * x.chan.double()[:, :, None, :]
    return out.masked_scatter(keep, kept.reshape(-1) if kept.dim() == 4 else kept)


def new_kind(x) -> bool:
    """Whether `x` is one of the kinds this file is about (trits or codes somewhere)."""
    if isinstance(x, QuantizedTensor):
        return True
    return isinstance(x, PackedTensor) and (x.trits is not None or isinstance(x.vals, QuantizedTensor))


# ------------------------------------------------------------------------------------------------
# operands
# ------------------------------------------------------------------------------------------------
KEY_KINDS = ["trits", "trits+q", "bits+q", "trits var T", "dense q", "think q", "dense"]
VALUE_KINDS = ["q", "pruned q", "pruned", "dense"]
# every (keys, values) pair with a ternary code or codes in it (the others: tests/test_kernels.py)
PAIRS = [(k, v) for k in KEY_KINDS for v in VALUE_KINDS if k != "dense" or v in ("q", "pruned q")]


def make_keys(kind, b, h, s, d, dtype, bits, group=32, g=4):
    """A key operand of `kind` (ThinK: its kept columns, dense keys of T channels, and the columns)."""
    keys = (torch.randn(b, h, s, d) * torch.rand(d) * 3).to(dtype)
    window = torch.randn(b, h * g, 6, d)
    spark = lambda **kw: compress_keys(keys, window, SparKConfig(key_prune_ratio=0.8, **kw))  # noqa: E731
    if kind == "trits":
        return spark().with_trits()
    if kind == "trits+q":  # per-channel scales over token groups, as the cache stores SparK keys
        return spark().with_trits().with_quantized_vals(bits, group, symmetric=True, axis="channel")
    if kind == "bits+q":
        return spark(recovery="constant").with_quantized_vals(bits, group, symmetric=True)
    if kind == "trits var T":
        return compress_keys(keys, window, SparKConfig(selection="top_p", top_p=0.8)).with_trits()
    if kind == "dense q":
        return QuantizedTensor.quantize(keys, bits, group, "token")
    if kind == "think q":
        idx = torch.stack([torch.randperm(d)[: max(1, d // 5)].sort().values for _ in range(b * h)]).view(b, h, -1)
        return ColumnPackedTensor.from_dense(keys, idx).with_quantized_vals(bits, group)
    return keys


def make_values(kind, b, h, s, dv, dtype, bits, group=32):
    values = torch.randn(b, h, s, dv).to(dtype)
    if kind == "q":
        return QuantizedTensor.quantize(values, bits, group, "row")
    if kind == "pruned q":
        return compress_values(values, 0.5).with_quantized_vals(bits, group, symmetric=False)
    if kind == "pruned":
        return compress_values(values, 0.8)
    return values


def query_for(keys, q):
    """Query rows and the key operand a kernel reads for `keys` (ThinK gathers its columns)."""
    return key_operand(keys, q)


def check_cpu(q, keys, values, path, bias=None, splits=None):
    rows, k = query_for(keys, q)
    v = value_operand(values)
    scaling = q.shape[-1] ** -0.5
    m, l, acc = cpu.decode_partials(rows, k, v, scaling, bias, splits, path=path)
    want = reference_attention(rows.double(), ref_dense(k), ref_dense(v), scaling, bias)
    assert rel(merge_partials([(m, l, acc)]), want) < 2e-5, path
    return m, l, acc


# ------------------------------------------------------------------------------------------------
# the CPU kernel
# ------------------------------------------------------------------------------------------------
def test_reference_agrees_with_the_formats_own_dense(seed):
    """The float64 rebuild used here is the format's own definition (`chunk.dense(float32)`)."""
    for kind in KEY_KINDS:
        keys = make_keys(kind, 2, 2, 19, 64, torch.bfloat16, 4)
        _, k = key_operand(keys, torch.zeros(2, 2, 1, 64))
        assert torch.allclose(ref_dense(k), (k if isinstance(k, torch.Tensor) else k.dense(torch.float32)).double(),
                              rtol=1e-6, atol=1e-6), kind
    for kind in VALUE_KINDS:
        v = make_values(kind, 2, 2, 19, 64, torch.float16, 2)
        assert torch.allclose(ref_dense(v), (v if isinstance(v, torch.Tensor) else v.dense(torch.float32)).double(),
                              rtol=1e-6, atol=1e-6), kind


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("keys_kind, values_kind", PAIRS)
def test_cpu_decode_matches_float64(seed, keys_kind, values_kind, bits, dtype):
    b, h, g, s, d = 2, 2, 4, 77, 64
    keys = make_keys(keys_kind, b, h, s, d, dtype, bits)
    values = make_values(values_kind, b, h, s, d, dtype, bits)
    assert new_kind(key_operand(keys, None)[1]) or new_kind(values)
    q = torch.randn(b, h, g, d).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    for path in cpu_paths():
        check_cpu(q, keys, values, path, splits=3)


@needs_cpu
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (40, 48), (128, 64)])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("s", [1, 33, 1000])
def test_cpu_decode_shapes(seed, d, dv, g, s):
    """Head dims 64 / 128, multiples of 8 that are not of 16, Dv != D; GQA groups 1/2/4/8; one
    token, one block plus one, many blocks; one and several splits; batch 2."""
    b, h = 2, 3
    cases = [
        (make_keys("trits+q", b, h, s, d, torch.bfloat16, 4, g=g), make_values("q", b, h, s, dv, torch.bfloat16, 4)),
        (make_keys("dense q", b, h, s, d, torch.bfloat16, 2, group=16, g=g), make_values("pruned q", b, h, s, dv, torch.bfloat16, 2, 16)),
        (make_keys("think q", b, h, s, d, torch.float16, 8, g=g), make_values("q", b, h, s, dv, torch.float16, 8, 64)),
    ]
    q = torch.randn(b, h, g, d)
    for keys, values in cases:
        for path in cpu_paths():
            for splits in (1, 4):
                check_cpu(q, keys, values, path, splits=splits)


@needs_cpu
@pytest.mark.parametrize("n", [1, 7, 13, 26, 100])
@pytest.mark.parametrize("group", [8, 12, 64])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cpu_dense_codes_any_width_and_group(seed, n, group, bits):
    """Dense codes of any row width (ThinK keeps 26 of 128; partial bytes and partial 8-lane chunks)
    and group sizes that are not multiples of 8, on both axes; a token-axis slice that starts inside
    a group (offset > 0)."""
    b, h, s = 2, 2, 45
    keys = (torch.randn(b, h, s + 9, n) * 2).bfloat16()
    values = torch.randn(b, h, s, n).bfloat16()
    full = QuantizedTensor.quantize(keys, bits, group, "token")
    k = full.slice_seq(9, 9 + s)
    assert k.offset == (full.offset + 9) % group  # groups end at the last token (quant.py)
    v = QuantizedTensor.quantize(values, bits, group, "row")
    q = torch.randn(b, h, 4, n)
    for path in cpu_paths():
        check_cpu(q, k, v, path, splits=2)
        check_cpu(q, v, k, path, splits=1)  # row-axis keys, token-axis values


@needs_cpu
def test_cpu_packed_vals_on_the_token_axis(seed):
    """Kept values quantized along tokens (a layout the cache does not make; the kernel reads it)."""
    keys = make_keys("trits", 2, 2, 70, 64, torch.float32, 4)
    keys = replace(keys, vals=QuantizedTensor.quantize(keys.vals, 4, 16, "token"))
    values = make_values("q", 2, 2, 70, 64, torch.float32, 4)
    for path in cpu_paths():
        check_cpu(torch.randn(2, 2, 4, 64), keys, values, path, splits=2)


@needs_cpu
@pytest.mark.parametrize("bias_heads", [1, 2])
def test_cpu_bias_and_masked_split(seed, bias_heads):
    b, h, g, s, d = 2, 2, 4, 300, 64
    keys = make_keys("trits+q", b, h, s, d, torch.bfloat16, 4)
    values = make_values("q", b, h, s, d, torch.bfloat16, 2)
    q = torch.randn(b, h, g, d).bfloat16()
    bias = torch.randn(b, bias_heads, s)
    bias[torch.rand(b, bias_heads, s) < 0.3] = float("-inf")
    bias[0, :, :100] = float("-inf")  # 3 splits of 100 tokens: batch 0's first split sees nothing
    for path in cpu_paths():
        m, l, acc = check_cpu(q, keys, values, path, bias=bias, splits=3)
        assert torch.isinf(m[0, :, 0]).all() and (l[0, :, 0] == 0).all() and (acc[0, :, 0] == 0).all()


@needs_cpu
@pytest.mark.parametrize("kind", ["trits", "trits+q", "bits+q", "trits var T", "dense q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_packed_qk(seed, kind, dtype):
    """Logits only (per-row masks) over the new key kinds."""
    b, h, s, d = 2, 3, 300, 64
    keys = make_keys(kind, b, h, s, d, dtype, 4)
    for m in (1, 4, 9):
        q = torch.randn(b, h, m, d)
        want = q.double() @ ref_dense(keys).transpose(-1, -2)
        for path in cpu_paths():
            got = cpu.packed_qk(q, keys, path=path)
            assert got.shape == (b, h, m, s) and rel(got, want) < 1e-5, path


@needs_cpu
def test_cpu_threads_do_not_change_results(seed):
    keys = make_keys("trits+q", 1, 4, 700, 128, torch.bfloat16, 4)
    values = make_values("q", 1, 4, 700, 128, torch.bfloat16, 4)
    check_threads_do_not_change_results(keys, values, torch.randn(1, 4, 4, 128).bfloat16())


@needs_cpu
def test_cpu_can_serve_the_new_kinds_and_still_refuses_fill(seed):
    for kind in KEY_KINDS:
        keys = make_keys(kind, 1, 2, 9, 64, torch.bfloat16, 2)
        for vkind in VALUE_KINDS:
            assert cpu.can_serve(key_operand(keys, None)[1], make_values(vkind, 1, 2, 9, 64, torch.bfloat16, 2)) is None
    sampled = compress_keys(torch.randn(1, 2, 9, 64), torch.randn(1, 4, 3, 64), SparKConfig(recovery="normal"))
    assert "fill" in cpu.can_serve(sampled, torch.randn(1, 2, 9, 64))
    odd = QuantizedTensor.quantize(torch.randn(1, 2, 9, 64), 4, 16, "row")
    assert "3-bit" in cpu.can_serve(replace(odd, bits=3), torch.randn(1, 2, 9, 64))
    assert "differ" in cpu.can_serve(odd, odd.slice_seq(0, 5))


# ------------------------------------------------------------------------------------------------
# through ops.attend and a cache
# ------------------------------------------------------------------------------------------------
def attend_case(seed_gen_dtype=torch.bfloat16, g=4):
    """Parts of one cache layer: quantized blocks of several kinds, pruned values, a dense tail."""
    b, h, d = 2, 2, 64
    s1, s2, s3, tail = 70, 33, 40, 5
    parts = [
        (make_keys("trits+q", b, h, s1, d, seed_gen_dtype, 4, g=g), make_values("q", b, h, s1, d, seed_gen_dtype, 4)),
        (make_keys("dense q", b, h, s2, d, seed_gen_dtype, 2, group=16), make_values("pruned q", b, h, s2, d, seed_gen_dtype, 2, 16)),
        (make_keys("think q", b, h, s3, d, seed_gen_dtype, 8), make_values("q", b, h, s3, d, seed_gen_dtype, 8)),
        (DenseChunk(torch.randn(b, h, tail, d).to(seed_gen_dtype)), DenseChunk(torch.randn(b, h, tail, d).to(seed_gen_dtype))),
    ]
    masks = []
    for keys, _ in parts:
        mask = torch.rand(b, 1, 1, keys.shape[2]) < 0.8
        mask[..., 0] = True
        masks.append(mask)
    return [(k, v, m) for (k, v), m in zip(parts, masks)]


def attend_reference(query, parts, scaling):
    b, hq, _, d = query.shape
    h = parts[0][0].shape[1]
    keys = torch.cat([ref_dense(k.dense(torch.float32) if isinstance(k, ColumnPackedTensor) else
                                k.data if isinstance(k, DenseChunk) else k) for k, _, _ in parts], dim=2)
    values = torch.cat([ref_dense(v.data if isinstance(v, DenseChunk) else v) for _, v, _ in parts], dim=2)
    bias = torch.cat([torch.where(m[:, :, 0], 0.0, float("-inf")) for _, _, m in parts], dim=-1).double()
    rows = query.double().view(b, h, hq // h, d)
    return reference_attention(rows, keys, values, scaling, bias)  # [B, H, G, Dv]


@needs_cpu
@pytest.mark.parametrize("g", [1, 4])
def test_attend_through_cpu_backend_serves_every_part(seed, g):
    parts = attend_case(g=g)
    query = torch.randn(2, 2 * g, 1, 64).bfloat16()
    report = ops.BackendReport("cpu")
    got = ops.attend(query, parts, 0.125, ops.backend("cpu", query.device), report=report)
    assert report.served == {"cpu": len(parts)} and not report.not_served
    want = attend_reference(query, parts, 0.125)
    assert rel(got[:, 0].float().reshape(want.shape), want) < 1e-2  # the output is rounded to bf16
    got32 = ops.attend(query.float(), parts, 0.125, ops.backend("cpu", query.device))
    # a float32 query gets float32 logits; on an AVX512_BF16 CPU the P.V over the dense tail's bf16
    # values still takes the bf16 dot (P rounded to bf16, docs/kernels.md: 9e-4 seen on Zen 4), so
    # there the whole layer is held to the bf16 bound and the quantized parts alone to float32's
    bf16_pv = cpu.load().has_bf16_dot()
    assert rel(got32[:, 0].reshape(want.shape), want) < (1e-2 if bf16_pv else 2e-5)
    quantized = parts[:-1]
    got32q = ops.attend(query.float(), quantized, 0.125, ops.backend("cpu", query.device))
    assert rel(got32q[:, 0].reshape(want.shape), attend_reference(query, quantized, 0.125)) < 2e-5


QUANT_CONFIGS = {
    "spark trits kq4 vq4": SparKConfig(key_prune_ratio=0.8, mask_format="trits", key_bits=4, value_bits=4,
                                       quant_group_size=32, block_size=4),
    "spark kq2 pruned vq2": SparKConfig(key_prune_ratio=0.5, value_prune_ratio=0.5, key_bits=2, value_bits=2,
                                        quant_group_size=16, block_size=4),
    "plain 2-bit": SparKConfig(method="none", key_bits=2, value_bits=2, quant_group_size=16, block_size=4),
    "think kq8 vq4": SparKConfig(method="think", key_prune_ratio=0.5, key_bits=8, value_bits=4, quant_group_size=16,
                                 block_size=4),
}


@needs_cpu
@pytest.mark.parametrize("name", list(QUANT_CONFIGS))
def test_model_decode_through_cpu_kernel(seed, name):
    """A model's decode over quantized caches: the CPU kernel serves every part and agrees with the
    PyTorch reference backend."""
    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the decode mask reaches the kernel as a bias
    config = QUANT_CONFIGS[name]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              attention_mask=mask)
    ref = spark.generate(ids, past_key_values=SparKCache(config.replace(attention_backend="torch")), **kw)
    cache = SparKCache(config.replace(attention_backend="cpu"))
    fused = spark.generate(ids, past_key_values=cache, **kw)
    assert rel(torch.stack(fused.logits), torch.stack(ref.logits)) < 1e-5
    for stats in cache.layer_stats():
        assert stats["backend"]["served"].get("cpu", 0) > 0 and not stats["backend"]["not_served"], stats["backend"]


# ------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU: slow, so fewer cases)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_kernel():
    import os

    pytest.importorskip("triton", reason="triton is not installed (pip install 'sparkkv[gpu]')")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it before triton is imported)")
    from sparkkv.kernels import triton_decode

    return triton_decode


def check_triton(kernel, q, keys, values, splits=2, bias=None, block_n=16):
    rows, k = query_for(keys, q)
    v = value_operand(values)
    got = merge_partials([kernel.decode_partials(rows, k, v, 0.125, bias, splits=splits, block_n=block_n)])
    want = reference_attention(rows.double(), ref_dense(k), ref_dense(v), 0.125, bias)
    assert rel(got, want) < 2e-5


BITS_DTYPES = [(4, torch.bfloat16), (2, torch.float16), (8, torch.float32)]
# every pair once, bits and dtype cycling; the headline pair (trits + codes, coded values) at all nine
TRITON_CASES = [(k, v, *BITS_DTYPES[i % 3]) for i, (k, v) in enumerate(PAIRS)] + [
    ("trits+q", "q", bits, dtype) for bits in (8, 4, 2) for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("keys_kind, values_kind, bits, dtype", TRITON_CASES)
def test_triton_decode_matches_float64(triton_kernel, seed, keys_kind, values_kind, bits, dtype):
    b, h, g, s, d = 2, 2, 4, 45, 64
    keys = make_keys(keys_kind, b, h, s, d, dtype, bits, group=16)
    values = make_values(values_kind, b, h, s, d, dtype, bits, group=16)
    check_triton(triton_kernel, torch.randn(b, h, g, d), keys, values)


@pytest.mark.parametrize("shape, dv", [((1, 1, 1, 37, 64), 64), ((1, 2, 8, 40, 128), 128), ((2, 1, 2, 21, 40), 24),
                                       ((2, 2, 4, 70, 128), 64)], ids=["gqa1", "gqa8-d128", "gqa2-d40-dv24", "gqa4-d128-dv64"])
def test_triton_decode_shapes(triton_kernel, seed, shape, dv):
    b, h, g, s, d = shape
    keys = make_keys("trits+q", b, h, s, d, torch.bfloat16, 4, group=16, g=g)
    values = make_values("q", b, h, s, dv, torch.bfloat16, 2, group=8)
    check_triton(triton_kernel, torch.randn(b, h, g, d), keys, values, splits=2)
    sliced = QuantizedTensor.quantize(torch.randn(b, h, s + 3, 26).bfloat16(), 4, 8, "token").slice_seq(3, 3 + s)
    check_triton(triton_kernel, torch.randn(b, h, g, 26), sliced, values, splits=1)  # offset 3, width 26


def test_triton_bias_and_masked_split(triton_kernel, seed):
    keys = make_keys("dense q", 2, 2, 48, 64, torch.float32, 4, group=16)
    values = make_values("pruned q", 2, 2, 48, 64, torch.float32, 4, group=16)
    bias = torch.randn(2, 2, 48)
    bias[torch.rand(2, 2, 48) < 0.3] = float("-inf")
    bias[0, :, :16] = float("-inf")
    check_triton(triton_kernel, torch.randn(2, 2, 4, 64), keys, values, splits=3, bias=bias)


def test_attend_through_triton_backend_serves_every_part(triton_kernel, seed):
    parts = attend_case(torch.float32, g=2)
    query = torch.randn(2, 4, 1, 64)
    report = ops.BackendReport("triton")
    got = ops.attend(query, parts, 0.125, ops.backend("triton", query.device), report=report)
    assert report.served == {"triton": len(parts)} and not report.not_served
    want = attend_reference(query, parts, 0.125)
    assert rel(got[:, 0].reshape(want.shape), want) < 2e-5


def test_model_decode_through_triton(triton_kernel, seed):
    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 30))
    config = QUANT_CONFIGS["spark trits kq4 vq4"]
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = spark.generate(ids, past_key_values=SparKCache(config.replace(attention_backend="torch")), **kw)
    cache = SparKCache(config.replace(attention_backend="triton"))
    fused = spark.generate(ids, past_key_values=cache, **kw)
    assert rel(torch.stack(fused.logits), torch.stack(ref.logits)) < 1e-5
    for stats in cache.layer_stats():
        assert stats["backend"]["served"].get("triton", 0) > 0 and not stats["backend"]["not_served"]


def test_bytes_of_the_operands_are_what_the_kernels_read():
    """Sanity of the headline configuration's operand sizes (trits: ceil(D/5) bytes per row; 4-bit
    codes: half a byte per kept value)."""
    keys = make_keys("trits+q", 1, 1, 10, 128, torch.bfloat16, 4, group=64)
    assert keys.trits.shape[-1] == math.ceil(128 / 5) and keys.vals.codes.shape[-1] == math.ceil(keys.fixed_t * 4 / 8)
