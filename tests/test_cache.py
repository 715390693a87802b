"""The SparK cache inside real transformers models (random weights, built from configs)."""

import pytest
import torch
from transformers import DynamicCache

from models import FAMILIES, build_pair, rel
from sparkkv import SparKCache, SparKConfig


def step_by_step(spark, dense, ids, cache, steps=12, attention_mask=None):
    """Prefill + greedy decode with both models, feeding the dense model's tokens to both.
    Returns the relative logit error at every step."""
    dense_cache = DynamicCache(config=dense.config)
    errors = []
    mask = attention_mask
    with torch.no_grad():
        a = spark(ids, past_key_values=cache, attention_mask=mask).logits[:, -1]
        b = dense(ids, past_key_values=dense_cache, attention_mask=mask).logits[:, -1]
        errors.append(rel(a, b))
        for _ in range(steps):
            tok = b.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            a = spark(tok, past_key_values=cache, attention_mask=mask).logits[:, -1]
            b = dense(tok, past_key_values=dense_cache, attention_mask=mask).logits[:, -1]
            errors.append(rel(a, b))
    return errors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ratio_zero_reproduces_dense(seed, family):
    spark, dense = build_pair(family, seed=seed)
    ids = torch.randint(0, 211, (1, 83))
    # small blocks so that generated tokens are packed during the test too
    cache = SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4, window_size=16))
    errors = step_by_step(spark, dense, ids, cache, steps=14)
    assert max(errors) < 1e-4, errors
    layer = cache.layers[0]
    assert len(layer.key_chunks) > 1 and layer.tail_keys.shape[2] <= 4  # prompt packed, decode blocks packed
    assert cache.get_seq_length() == 83 + 14


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_generate_runs_and_stays_close(seed, family, ratio):
    spark, dense = build_pair(family, seed=seed)
    ids = torch.randint(0, 211, (2, 70))
    cache = SparKCache(SparKConfig(key_prune_ratio=ratio, block_size=8))
    out = spark.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out.shape == (2, 82)
    assert cache.get_seq_length() == 81  # the last generated token is never fed back
    errors = step_by_step(spark, dense, ids, SparKCache(SparKConfig(key_prune_ratio=ratio)), steps=4)
    assert errors[0] < 1e-5  # prefill logits come from dense attention
    # lossy (nonzero error) but finite; random models have no outlier channels, so errors are large
    assert all(0 < e < 2 for e in errors[1:]), errors


def test_bf16_4096_prefill_bytes():
    spark, dense = build_pair("llama", dtype=torch.bfloat16, num_hidden_layers=1, head_dim=128, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    ids = torch.randint(0, 211, (1, 4096))
    cache = SparKCache(SparKConfig(key_prune_ratio=0.8))
    dense_cache = DynamicCache(config=dense.config)
    with torch.no_grad():
        spark(ids, past_key_values=cache)
        dense(ids, past_key_values=dense_cache)
    dense_bytes = sum(l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in dense_cache.layers)
    assert dense_bytes == 4096 * 2 * 128 * 2 * 2
    ratio = cache.nbytes / dense_bytes
    assert ratio <= 0.72, ratio
    # the layer holds no dense key of a compressed token
    layer = cache.layers[0]
    assert layer.tail_keys is None and layer.key_chunks[0].vals.shape == (1, 2, 4096, 26)


def test_left_padding_matches_batch_one(seed):
    spark, dense = build_pair("qwen3", seed=seed)
    long_ids = torch.randint(1, 211, (1, 61))
    short_ids = torch.randint(1, 211, (1, 45))
    pad = torch.zeros(1, 16, dtype=torch.long)
    batch_ids = torch.cat([long_ids, torch.cat([pad, short_ids], dim=1)])
    mask = torch.ones_like(batch_ids)
    mask[1, :16] = 0
    config = SparKConfig(key_prune_ratio=0.8, window_size=8, block_size=4)
    batched = spark.generate(batch_ids, attention_mask=mask, past_key_values=SparKCache(config), max_new_tokens=10,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, min_new_tokens=10)
    for row, ids in enumerate((long_ids, short_ids)):
        single = spark.generate(ids, past_key_values=SparKCache(config), max_new_tokens=10, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, min_new_tokens=10)
        got = torch.stack([s[row] for s in batched.logits])
        want = torch.stack([s[0] for s in single.logits])
        assert rel(got, want) < 1e-3
        assert torch.equal(batched.sequences[row, -10:], single.sequences[0, -10:])


def test_beam_search_and_batch_ops_at_ratio_zero(seed):
    spark, dense = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (2, 40))
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, min_new_tokens=8)
    a = spark.generate(ids, past_key_values=SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4)), **kw)
    b = dense.generate(ids, **kw)
    assert torch.equal(a, b)
    # batch_select_indices keeps one row; it then decodes like a cache built for that row alone
    cache, single = SparKCache(SparKConfig(key_prune_ratio=0.5, block_size=4)), SparKCache(SparKConfig(key_prune_ratio=0.5, block_size=4))
    with torch.no_grad():
        spark(ids, past_key_values=cache)
        spark(ids[1:], past_key_values=single)
        cache.batch_select_indices(torch.tensor([1]))
        tok = torch.randint(0, 211, (1, 6))
        for i in range(6):
            x = spark(tok[:, i : i + 1], past_key_values=cache).logits
            y = spark(tok[:, i : i + 1], past_key_values=single).logits
            assert rel(x, y) < 1e-5


def test_crop_matches_dense(seed):
    spark, dense = build_pair("mistral", seed=seed)
    ids = torch.randint(0, 211, (1, 50))
    cache = SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4))
    dense_cache = DynamicCache(config=dense.config)
    more = torch.randint(0, 211, (1, 11))
    with torch.no_grad():
        spark(ids, past_key_values=cache), dense(ids, past_key_values=dense_cache)
        for i in range(11):
            spark(more[:, i : i + 1], past_key_values=cache), dense(more[:, i : i + 1], past_key_values=dense_cache)
        cache.crop(-7)  # reaches into packed decode blocks
        dense_cache.crop(-7)
        assert cache.get_seq_length() == dense_cache.get_seq_length() == 54
        nxt = torch.randint(0, 211, (1, 3))
        a = spark(nxt, past_key_values=cache).logits  # multi-token forward over a packed prefix
        b = dense(nxt, past_key_values=dense_cache).logits
    assert rel(a, b) < 1e-4


def test_mistral_sliding_window(seed):
    spark, dense = build_pair("mistral", seed=seed, sliding_window=24)
    ids = torch.randint(0, 211, (1, 60))
    errors = step_by_step(spark, dense, ids, SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4)), steps=6)
    assert max(errors) < 1e-4


def test_sparkkv_attention_without_spark_cache_is_sdpa(seed):
    spark, dense = build_pair("qwen2", seed=seed)
    ids = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        assert rel(spark(ids).logits, dense(ids).logits) < 1e-6
    assert torch.equal(spark.generate(ids, max_new_tokens=5, do_sample=False), dense.generate(ids, max_new_tokens=5, do_sample=False))


def test_spark_cache_with_other_attention_is_a_clear_error():
    _, dense = build_pair("llama")
    with pytest.raises(TypeError, match="attn_implementation='sparkkv'"):
        dense(torch.randint(0, 211, (1, 10)), past_key_values=SparKCache())


def test_unpackable_head_dim_is_a_clear_error():
    spark, _ = build_pair("llama", head_dim=12, hidden_size=48)
    with pytest.raises(ValueError, match="head_dim=12"):
        spark(torch.randint(0, 211, (1, 10)), past_key_values=SparKCache())


@pytest.mark.parametrize("method", ["dense", "snapkv", "streamingllm", "think"])
def test_any_head_dim_for_methods_that_pack_no_bits(seed, method):
    """Dense, eviction-only and ThinK configurations store no bit masks: head_dim 12 works (issue 16)
    and, keeping every token and channel, matches DynamicCache."""
    spark, dense = build_pair("llama", seed=seed, head_dim=12, hidden_size=48)
    ids = torch.randint(0, 211, (2, 40))
    budget = {"snapkv": 40, "streamingllm": 40}.get(method)
    config = SparKConfig(method=method, token_budget=budget, key_prune_ratio=0.0, block_size=4, eviction_window=16)
    errors = step_by_step(spark, dense, ids, SparKCache(config), steps=6)
    assert max(errors) < 1e-4, errors


def test_compress_decode_false_keeps_generated_tokens_dense(seed):
    spark, _ = build_pair("llama", seed=seed)
    cache = SparKCache(SparKConfig(key_prune_ratio=0.5, block_size=4, compress_decode=False))
    spark.generate(torch.randint(0, 211, (1, 30)), past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    layer = cache.layers[0]
    assert len(layer.key_chunks) == 1 and layer.tail_len == 11
    stats = cache.layer_stats()[0]
    assert stats["prompt_tokens"] == 30 and stats["dense_tail_tokens"] == 11 and stats["kept_channels_mean"] == 32
