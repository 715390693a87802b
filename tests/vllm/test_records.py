"""SparK page records (sparkkv.vllm.records): encode -> pages -> decode equals the library's own
`compress_keys(...).dense()` / `compress_values(...).dense()`. No vLLM needed: runs in every venv."""

import pytest
import torch

import sparkkv
from sparkkv.method import window_query_norm
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


@pytest.mark.parametrize("fields,needle", [
    ({"selection": "top_p"}, "selection='top_p'"),
    ({"recovery": "normal"}, "recovery='normal'"),
    ({"method": "snapkv+spark", "token_budget": 128}, "evicts tokens"),
    ({"method": "think"}, "method='think'"),
])
def test_configurations_records_cannot_store(fields, needle):
    with pytest.raises(ValueError, match="sparkkv.vllm") as info:
        check_config(sparkkv.SparKConfig(**fields))
    assert needle in str(info.value)
