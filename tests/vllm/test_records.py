"""SparK page records (sparkkv.vllm.records): encode -> pages -> decode equals the library's own
`compress_keys(...).dense()` / `compress_values(...).dense()`. No vLLM needed: runs in every venv."""

import pytest
import torch

import sparkkv
from sparkkv.method import window_query_norm
from sparkkv.quant import QuantizedTensor
from sparkkv.vllm.records import RecordLayout, check_config


def _roundtrip(layout: RecordLayout, keys, values, qn, block_ids):
    """Write `keys, values [N, H, D]` token by token into pages `block_ids` (in order) and read
    them back as the operands attention sees."""
    n = keys.shape[0]
    pages = torch.zeros(int(block_ids.max()) + 3, layout.page_bytes, dtype=torch.uint8)
    pos = torch.arange(n)
    page_idx, offsets = block_ids[pos // layout.block_size], pos % layout.block_size
    layout.write(pages, page_idx, offsets, {**layout.encode_keys(keys, qn), **layout.encode_values(values)})
    if layout.key_codec == "spark":
        layout.header(pages)[block_ids] = qn
    used = block_ids[: -(-n // layout.block_size)]
    fields = layout.gather(pages, used, n)
    chan = layout.chan(layout.header(pages)[used[0]]) if layout.key_codec == "spark" else None
    return layout.keys_operand(fields, chan), layout.values_operand(fields)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,kv_heads,group,length,ratio", [
    (64, 3, 3, 1, 0.8), (64, 3, 1, 37, 0.8), (128, 2, 4, 129, 0.5), (64, 1, 8, 200, 0.8), (32, 4, 2, 17, 0.0),
    (128, 8, 4, 65, 0.8), (8, 2, 2, 5, 0.5),
])
@pytest.mark.parametrize("recovery", ["mean", "zero", "constant"])
def test_keys_roundtrip_equals_compress_keys(seed, dtype, head_dim, kv_heads, group, length, ratio, recovery):
    config = sparkkv.SparKConfig(key_prune_ratio=ratio, recovery=recovery)
    layout = RecordLayout.create(config, kv_heads, head_dim, block_size=16, dtype=dtype)
    keys = torch.randn(length, kv_heads, head_dim).to(dtype)
    values = torch.randn(length, kv_heads, head_dim).to(dtype)
    window = torch.randn(1, kv_heads * group, 32, head_dim)
    qn = window_query_norm(window, kv_heads)[0]
    block_ids = torch.randperm(40)[: -(-length // 16)]  # scattered pages, as a block table gives them
    k_op, v_op = _roundtrip(layout, keys, values, qn, block_ids)
    ref = sparkkv.compress_keys(keys.transpose(0, 1).unsqueeze(0), None, config, qn=qn.unsqueeze(0))
    assert k_op.vals.shape[-1] == ref.vals.shape[-1] == layout.kept
    torch.testing.assert_close(k_op.dense(), ref.dense(), rtol=0, atol=0)
    torch.testing.assert_close(k_op.dense(torch.float32), ref.dense(torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(v_op, values.transpose(0, 1).unsqueeze(0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 19, 100])
def test_pruned_values_roundtrip_equals_compress_values(seed, dtype, length):
    config = sparkkv.SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.5)
    layout = RecordLayout.create(config, 3, 64, block_size=32, dtype=dtype)
    keys, values = torch.randn(length, 3, 64).to(dtype), torch.randn(length, 3, 64).to(dtype)
    qn = torch.rand(3, 64) + 0.1
    _, v_op = _roundtrip(layout, keys, values, qn, torch.randperm(10)[: -(-length // 32)])
    ref = sparkkv.compress_values(values.transpose(0, 1).unsqueeze(0), 0.5)
    torch.testing.assert_close(v_op.dense(), ref.dense(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,head_dim,length", [(8, 64, 64, 1), (4, 64, 64, 37), (2, 16, 64, 129), (4, 32, 128, 19), (2, 8, 8, 5)])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_quantized_values_roundtrip_equals_the_library(seed, dtype, bits, group, head_dim, length, ratio):
    """value_bits < 16: the records hold the library's own codes (dense values per token, axis "row";
    pruned values' kept entries as `policies.py` quantizes them), and a token alone (a decode step)
    is coded as within a prompt. Against float64: every element within half a step of its value."""
    config = sparkkv.SparKConfig(key_prune_ratio=0.8, value_prune_ratio=ratio, value_bits=bits, quant_group_size=group)
    layout = RecordLayout.create(config, 3, head_dim, block_size=32, dtype=dtype)
    assert layout.value_codec == ("pruned+quant" if ratio else "quant")
    keys, values = torch.randn(length, 3, head_dim).to(dtype), torch.randn(length, 3, head_dim).to(dtype)
    qn = torch.rand(3, head_dim) + 0.1
    _, v_op = _roundtrip(layout, keys, values, qn, torch.randperm(12)[: -(-length // 32)])
    seq = values.transpose(0, 1).unsqueeze(0)
    if ratio:
        ref = sparkkv.compress_values(seq, ratio).with_quantized_vals(bits, group, symmetric=False)
    else:
        ref = QuantizedTensor.quantize(seq, bits, group, "row")
        q = ref.scale.double().repeat_interleave(group, -1)[..., :head_dim] / 2
        err = (v_op.dense(torch.float64) - seq.double()).abs()
        assert bool((err <= q * (1 + 1e-2) + 1e-6).all())
    torch.testing.assert_close(v_op.dense(), ref.dense(), rtol=0, atol=0)
    rows = layout.encode_values(values, rows=True)
    whole = layout.encode_values(values)
    if not ratio:  # per-token codes: a decode step writes what a prompt would
        assert all(torch.equal(rows[n], whole[n]) for n in whole)


def test_dense_method_stores_plain_keys(seed):
    layout = RecordLayout.create(sparkkv.SparKConfig(method="dense"), 2, 64, block_size=16, dtype=torch.bfloat16)
    assert layout.header_bytes == 0 and [r.name for r in layout.regions] == ["k", "v"]
    keys, values = torch.randn(21, 2, 64).bfloat16(), torch.randn(21, 2, 64).bfloat16()
    k_op, v_op = _roundtrip(layout, keys, values, None, torch.tensor([5, 2]))
    assert torch.equal(k_op[0].transpose(0, 1), keys) and torch.equal(v_op[0].transpose(0, 1), values)


def test_bytes_per_token_smollm2_geometry():
    """SmolLM2-135M (3 KV heads, head_dim 64, bf16, block 128) at k0.8: T = 13 kept, 172 bytes per
    (token, head) against 256 dense; the per-page header (3 x 64 float32) costs 6 bytes per token."""
    layout = RecordLayout.create(sparkkv.SparKConfig(key_prune_ratio=0.8), 3, 64, 128, torch.bfloat16)
    assert layout.kept == 13
    assert layout.record_bytes == 13 * 2 + 8 + 8 + 2 + 128 == 172
    assert layout.dense_token_bytes == 256
    assert layout.header_bytes == 3 * 64 * 4
    assert layout.page_bytes == 128 * 3 * 172 + 768  # regions 16-byte aligned, no padding needed here
    assert 128 * 3 * 256 / layout.page_bytes > 1.47


@pytest.mark.parametrize("value_bits,value_bytes", [(8, 64 + 2 + 2), (4, 32 + 2 + 2), (2, 16 + 2 + 2)])
def test_bytes_per_token_with_quantized_values(value_bits, value_bytes):
    """SmolLM2 geometry, k0.8 keys (44 B) + values as codes with one bf16 scale and zero per 64 channels."""
    config = sparkkv.SparKConfig(key_prune_ratio=0.8, value_bits=value_bits)
    layout = RecordLayout.create(config, 3, 64, 128, torch.bfloat16)
    assert layout.record_bytes == 44 + value_bytes
    assert layout.page_bytes == 128 * 3 * (44 + value_bytes) + 768


@pytest.mark.parametrize("fields,needle", [
    ({"selection": "top_p"}, "selection='top_p'"),
    ({"recovery": "normal"}, "recovery='normal'"),
    ({"method": "snapkv+spark", "token_budget": 128}, "evicts tokens"),
    ({"method": "think"}, "method='think'"),
    ({"key_bits": 4}, "key_bits=4"),
    ({"mask_format": "trits"}, "mask_format='trits'"),
])
def test_configurations_records_cannot_store(fields, needle):
    with pytest.raises(ValueError, match="sparkkv.vllm") as info:
        check_config(sparkkv.SparKConfig(**fields))
    assert needle in str(info.value)


def test_bench_configuration_names():
    from sparkkv.vllm.bench import config_fields, engine_kwargs

    assert config_fields("stock") is None and config_fields("fp8") is None
    assert engine_kwargs("stock") == {} and engine_kwargs("fp8") == {"kv_cache_dtype": "fp8"}
    assert engine_kwargs("k0.8") == {"attention_backend": "CUSTOM", "additional_config": {"sparkkv": {"key_prune_ratio": 0.8}}}
    assert config_fields("k0.8") == {"key_prune_ratio": 0.8}
    assert config_fields("k0.8v0.5") == {"key_prune_ratio": 0.8, "value_prune_ratio": 0.5}
    assert config_fields("k0.8vq4") == {"key_prune_ratio": 0.8, "value_bits": 4}
    assert config_fields("k0.8v0.5vq2") == {"key_prune_ratio": 0.8, "value_prune_ratio": 0.5, "value_bits": 2}
    with pytest.raises(ValueError, match="vq<value bits>"):
        config_fields("k0.8q4")


def _strided_pages(num_pages: int, page_bytes: int, pad: int = 48) -> torch.Tensor:
    """Pages as vLLM lays them out: `page_bytes` used of every `page_bytes + pad` (its page stride)."""
    raw = torch.zeros(num_pages * (page_bytes + pad), dtype=torch.uint8)
    return torch.as_strided(raw, (num_pages, page_bytes), (page_bytes + pad, 1))


@pytest.mark.parametrize("fields", [
    {"method": "dense"}, {"key_prune_ratio": 0.8}, {"key_prune_ratio": 0.5, "recovery": "zero"},
    {"key_prune_ratio": 0.8, "recovery": "constant"}, {"key_prune_ratio": 0.8, "value_prune_ratio": 0.5},
    {"key_prune_ratio": 0.8, "value_bits": 4, "quant_group_size": 32}, {"key_prune_ratio": 0.0, "value_bits": 8},
    {"key_prune_ratio": 0.8, "value_prune_ratio": 0.5, "value_bits": 2, "quant_group_size": 16},
])
@pytest.mark.parametrize("dtype,kv_heads,group,head_dim,block_size", [
    (torch.bfloat16, 3, 3, 64, 16), (torch.float32, 2, 4, 128, 8), (torch.float16, 1, 8, 32, 16), (torch.bfloat16, 4, 1, 64, 32),
    (torch.bfloat16, 2, 2, 64, 16),
])
@pytest.mark.parametrize("path", ["auto", "float32", "avx2", "portable"])
def test_kernel_reads_pages_in_place_as_gathered(seed, fields, dtype, kv_heads, group, head_dim, block_size, path):
    """`decode_partials(..., pages=, block_ids=)` over `page_operands` (the pages read in place, vLLM's
    page stride, scattered and repeated block ids, some slots masked) equals the same kernel over
    `gather_pages` copies exactly, and a float64 reference over the library's dense rebuild."""
    from sparkkv.kernels import cpu
    from sparkkv.kernels.reference import merge_partials

    if cpu.unavailable_reason(path == "portable"):
        pytest.skip(f"the CPU kernel is unavailable: {cpu.unavailable_reason(path == 'portable')}")
    config = sparkkv.SparKConfig(**fields)
    layout = RecordLayout.create(config, kv_heads, head_dim, block_size, dtype)
    pages = _strided_pages(11, layout.page_bytes)
    n = 7 * block_size
    keys, values = torch.randn(n, kv_heads, head_dim).to(dtype), torch.randn(n, kv_heads, head_dim).to(dtype)
    qn = torch.rand(kv_heads, head_dim) + 0.1
    stored = torch.randperm(10)[:7] + 1  # page 0 holds nothing: the operands only describe its bytes
    pos = torch.arange(n)
    layout.write(pages, stored[pos // block_size], pos % block_size,
                 {**layout.encode_keys(keys, qn), **layout.encode_values(values)})
    items = torch.cat([stored[torch.randperm(7)], stored[:2]])  # [9] kernel items, a page read twice
    b = items.shape[0]
    chan = layout.chan(qn.expand(b, kv_heads, head_dim).contiguous()) if layout.key_codec == "spark" else None
    rows = torch.randn(b, kv_heads, group, head_dim).to(dtype if dtype == torch.bfloat16 else torch.float32)
    bias = torch.zeros(b, 1, block_size)
    bias[0, 0, 3:] = float("-inf")
    bias[1] = float("-inf")  # an item that sees nothing
    scale = head_dim**-0.5
    k_in, v_in = layout.page_operands(pages, chan)
    got = cpu.decode_partials(rows, k_in, v_in, scale, bias=bias, path=path, pages=pages, block_ids=items)
    f = layout.gather_pages(pages, items)
    k_op, v_op = layout.keys_operand(f, chan), layout.values_operand(f)
    want = cpu.decode_partials(rows, k_op, v_op, scale, bias=bias, path=path)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    kd = k_op.dense(torch.float64) if hasattr(k_op, "dense") else k_op.double()
    vd = v_op.dense(torch.float64) if hasattr(v_op, "dense") else v_op.double()
    logits = torch.einsum("bhgd,bhsd->bhgs", rows.double(), kd) * scale + bias.double().unsqueeze(1)
    ref = torch.einsum("bhgs,bhsd->bhgd", torch.nan_to_num(logits.softmax(-1)), vd)
    out = merge_partials([got])
    tol = 2e-2 if path == "auto" else 1e-4
    torch.testing.assert_close(out[2:].double(), ref[2:], rtol=tol, atol=tol)
    torch.testing.assert_close(out[0].double(), ref[0], rtol=tol, atol=tol)


def test_kernel_refuses_bad_pages():
    from sparkkv.kernels import cpu

    if cpu.unavailable_reason():
        pytest.skip(f"the CPU kernel is unavailable: {cpu.unavailable_reason()}")
    layout = RecordLayout.create(sparkkv.SparKConfig(key_prune_ratio=0.8), 2, 64, 16, torch.bfloat16)
    pages = _strided_pages(4, layout.page_bytes)
    chan = layout.chan(torch.rand(2, 2, 64) + 0.1)
    k_in, v_in = layout.page_operands(pages, chan)
    rows = torch.randn(2, 2, 2, 64)
    with pytest.raises(RuntimeError, match=r"block_ids must lie in \[0, 4\)"):
        cpu.decode_partials(rows, k_in, v_in, 0.125, pages=pages, block_ids=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="pages and block_ids go together"):
        cpu.decode_partials(rows, k_in, v_in, 0.125, pages=pages)
    k_far, _ = layout.page_operands(pages[1:], chan)  # fields of page 1, not of page 0
    with pytest.raises(RuntimeError, match="views of the first page"):
        cpu.decode_partials(rows, k_far, v_in, 0.125, pages=pages, block_ids=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"chan must be contiguous float32 \[2, 2, 64\]"):
        cpu.decode_partials(rows, layout.page_operands(pages, chan[:1])[0], v_in, 0.125, pages=pages, block_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("fields", [{"key_prune_ratio": 0.8}, {"key_prune_ratio": 0.8, "value_bits": 4},
                                    {"key_prune_ratio": 0.8, "value_prune_ratio": 0.5}, {"method": "dense"}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_encode_refuses_non_finite_input(seed, fields, bad):
    """Nothing non-finite reaches a page (a record outlives its request: a reused page's stale slots
    are read and masked by a -inf bias, which a NaN would defeat): keys, qn and values are checked."""
    config = sparkkv.SparKConfig(**fields)
    layout = RecordLayout.create(config, 3, 64, block_size=16, dtype=torch.bfloat16)
    keys, values = torch.randn(5, 3, 64).bfloat16(), torch.randn(5, 3, 64).bfloat16()
    qn = torch.rand(3, 64)
    for name, tensor in (("keys", keys), ("qn", qn), ("values", values)):
        if name == "qn" and layout.key_codec == "dense":  # dense keys take no qn
            continue
        bad_tensor = tensor.clone()
        bad_tensor.view(-1)[int(torch.randint(tensor.numel(), ()))] = bad
        args = {"keys": keys, "qn": qn, "values": values, name: bad_tensor}
        with pytest.raises(ValueError, match=f"{name} holds 1 NaN/inf entry"):
            layout.encode_keys(args["keys"], args["qn"] if layout.key_codec == "spark" else None)
            layout.encode_values(args["values"])
