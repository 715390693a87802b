"""Token eviction (SnapKV, PyramidKV, StreamingLLM) composed with channel policies."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import sparkkv.eviction as eviction
from conftest import ROOT
from models import build_pair, rel
from sparkkv import PrefillCapture, SparKCache, SparKConfig
from sparkkv.eviction import pyramid_budget, resolve_budgets, snapkv_scores

FIXTURE = ROOT / "tests" / "fixtures" / "snapkv_kvpress"


@pytest.mark.parametrize("case_index", [0, 1])
def test_snapkv_matches_kvpress_fixture(monkeypatch, case_index):
    """Same weights and inputs as kvpress 0.5.5's SnapKVPress -> exactly the same kept positions."""
    case = json.loads((FIXTURE / "fixture.json").read_text())["cases"][case_index]
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "model", attn_implementation="sparkkv", dtype=torch.float32).eval()
    captured = []
    real_scores = eviction.snapkv_scores
    monkeypatch.setattr(eviction, "snapkv_scores", lambda *a, **k: captured.append(real_scores(*a, **k)) or captured[-1])
    ids = torch.tensor(case["input_ids"])
    config = SparKConfig(method="snapkv", token_budget=case["n_kept"], eviction_window=case["window_size"], pool_kernel=case["kernel_size"])
    cache = SparKCache(config)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
    assert rel(logits, torch.tensor(case["last_logits"])) < 1e-5  # prefill output is the dense one
    s, w = case["seq_len"], case["window_size"]
    for layer, ref in zip(cache.layers, case["layers"]):
        assert layer.blocks[0].positions.tolist() == ref["kept_positions"]
        ref_scores = torch.tensor(ref["scores"])[..., : s - w]
        assert rel(captured[ref["layer_idx"]], ref_scores) < 1e-5


def test_snapkv_scores_hand_checked():
    # 1 kv-head, 2 query heads, S=12, window 4: the window queries look only at keys 2 and 7.
    d, s = 8, 12
    keys = torch.zeros(1, 1, s, d)
    keys[0, 0, 2, 0] = 1.0
    keys[0, 0, 7, 1] = 1.0
    query = torch.zeros(1, 2, s, d)
    query[0, 0, -4:, 0] = 50.0  # head 0 -> key 2
    query[0, 1, -4:, 1] = 50.0  # head 1 -> key 7
    scores = snapkv_scores(query, keys, window=4, kernel=1, scaling=1.0)
    assert scores.shape == (1, 1, 8)
    assert scores[0, 0].argsort(descending=True)[:2].sort().values.tolist() == [2, 7]
    assert torch.allclose(scores[0, 0, [2, 7]], torch.tensor([0.5, 0.5]), atol=1e-6)
    pooled = snapkv_scores(query, keys, window=4, kernel=3, scaling=1.0)
    assert torch.allclose(pooled[0, 0, [1, 2, 3]], torch.full((3,), 0.5 / 3), atol=1e-6)  # zero-padded mean of 3
    config = SparKConfig(method="snapkv", token_budget=6, eviction_window=4, pool_kernel=1)
    _, _, positions = eviction.evict_tokens(config, keys, keys, query, None, torch.tensor([6]), 1.0)
    assert positions[0, 0].tolist()[:2] == [2, 7] and positions[0, 0].tolist()[2:] == [8, 9, 10, 11]


def test_streamingllm_hand_checked():
    keys = torch.randn(2, 3, 20, 8)
    config = SparKConfig(method="streamingllm", token_budget=8, sink_tokens=4)
    k, v, positions = eviction.evict_tokens(config, keys, keys + 1, None, None, torch.tensor([8]), 1.0)
    assert positions.tolist() == [[[0, 1, 2, 3, 16, 17, 18, 19]] * 3] * 2
    assert torch.equal(k, keys[:, :, [0, 1, 2, 3, 16, 17, 18, 19]]) and torch.equal(v, k + 1)


def test_pyramid_budgets_hand_checked():
    budgets = [pyramid_budget(100, 1000, 10, 20, layer, 5) for layer in range(5)]
    assert budgets == [186, 143, 100, 57, 14]  # linear, window in every layer, mean = 100
    assert sum(budgets) == 500
    # the deepest layers' budget never drops below the window; a short prompt caps the first layer
    capped = [pyramid_budget(100, 150, 10, 20, layer, 4) for layer in range(4)]
    assert capped[0] == 150 and min(capped) >= 10 and abs(sum(capped) - 400) <= 2
    assert [pyramid_budget(64, 1000, 64, 20, l, 3) for l in range(3)] == [64, 64, 64]


def test_budget_resolution_and_errors():
    c = SparKConfig(method="snapkv+spark", token_budget=0.25, eviction_window=16)
    assert resolve_budgets(c, 1000).tolist() == [250]
    # a fraction of each row's real tokens; a budget at or above a row's length keeps the row
    valid = torch.ones(2, 1000, dtype=torch.bool)
    valid[1, :600] = False
    assert resolve_budgets(c, 1000, valid).tolist() == [250, 100]
    assert resolve_budgets(SparKConfig(method="snapkv", token_budget=500), 300).tolist() == [300]
    # a fraction that comes to fewer tokens than the policy always keeps keeps that minimum (issue 16):
    # SnapKV's window, StreamingLLM's sinks + 1; the whole prompt when it is no longer
    assert resolve_budgets(SparKConfig(method="snapkv", token_budget=0.1), 300).tolist() == [64]
    assert resolve_budgets(SparKConfig(method="snapkv", token_budget=0.25), 3).tolist() == [3]  # "Hi"
    assert resolve_budgets(SparKConfig(method="pyramidkv", token_budget=0.1), 300, None, 0, 4).tolist() == [64]
    assert resolve_budgets(SparKConfig(method="streamingllm", token_budget=0.01, sink_tokens=4), 300).tolist() == [5]
    assert resolve_budgets(SparKConfig(method="streamingllm", token_budget=0.01, sink_tokens=4), 2).tolist() == [2]
    with pytest.raises(ValueError, match="smaller than eviction_window"):  # an int budget stays an error
        SparKConfig(method="snapkv", token_budget=10)
    with pytest.raises(ValueError, match="depth"):
        resolve_budgets(SparKConfig(method="pyramidkv", token_budget=100), 300)
    # a prompt shorter than the budget keeps everything and decodes like dense
    spark, dense = build_pair("llama")
    ids = torch.randint(0, 211, (1, 50))
    with torch.no_grad():
        cache = SparKCache(method="snapkv", token_budget=80)
        a = spark(ids, past_key_values=cache).logits
        assert cache.layers[0].blocks[0].positions is None and cache.layers[0].stats["kept_tokens"] == 50


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streamingllm", "snapkv+think", "snapkv+spark"])
def test_budget_equal_to_prompt_is_lossless(seed, method):
    """Eviction that keeps everything goes through the position-mapped path and reproduces dense."""
    spark, dense = build_pair("qwen3", seed=seed)
    ids = torch.randint(0, 211, (2, 70))
    config = SparKConfig(method=method, token_budget=70, key_prune_ratio=0.0, block_size=4, eviction_window=16)
    a = spark.generate(ids, past_key_values=SparKCache(config), max_new_tokens=9, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, min_new_tokens=9)
    b = dense.generate(ids, max_new_tokens=9, do_sample=False, output_logits=True, return_dict_in_generate=True, min_new_tokens=9)
    assert torch.equal(a.sequences, b.sequences)
    assert rel(torch.stack(a.logits), torch.stack(b.logits)) < 1e-4


def test_positions_stay_true_after_eviction(seed):
    """StreamingLLM evicts the same tokens in every head, so dense attention with those tokens masked out
    is an exact reference: RoPE positions of new tokens must be full-sequence positions."""
    spark, dense = build_pair("llama", seed=seed)
    s, budget, sink = 60, 24, 4
    ids = torch.randint(0, 211, (1, s))
    cache = SparKCache(SparKConfig(method="streamingllm", token_budget=budget, sink_tokens=sink, block_size=4))
    dense_cache = DynamicCache(config=dense.config)
    kept = torch.zeros(s, dtype=torch.bool)
    kept[:sink] = True
    kept[s - (budget - sink):] = True
    with torch.no_grad():
        spark(ids, past_key_values=cache)  # plain model(...) calls, no position_ids given
        dense(ids, past_key_values=dense_cache)
        assert cache.get_seq_length() == s and cache.layers[0].stored_tokens == budget
        tokens = torch.randint(0, 211, (1, 10))
        for i in range(10):
            tok = tokens[:, i : i + 1]
            mask = torch.cat([kept, torch.ones(i + 1, dtype=torch.bool)]).view(1, 1, 1, -1)
            a = spark(tok, past_key_values=cache).logits
            b = dense(tok, past_key_values=dense_cache, attention_mask=mask).logits
            assert rel(a, b) < 1e-5, i
        # a multi-token call after eviction (causal mask built from stored positions)
        more = torch.randint(0, 211, (1, 3))
        n = s + 10
        causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
        mask = torch.cat([torch.cat([kept, torch.ones(10, dtype=torch.bool)]).expand(3, n), causal], dim=1).view(1, 1, 3, n + 3)
        assert rel(spark(more, past_key_values=cache).logits, dense(more, past_key_values=dense_cache, attention_mask=mask).logits) < 1e-5


def test_think_ratio_zero_is_lossless(seed):
    spark, dense = build_pair("mistral", seed=seed)
    ids = torch.randint(0, 211, (1, 50))
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    a = spark.generate(ids, past_key_values=SparKCache(method="think", key_prune_ratio=0.0, block_size=4), **kw)
    b = dense.generate(ids, **kw)
    assert rel(torch.stack(a.logits), torch.stack(b.logits)) < 1e-4


def test_think_keeps_one_channel_set_per_head(seed):
    spark, _ = build_pair("llama", seed=seed)
    cache = SparKCache(method="think", key_prune_ratio=0.75, block_size=4)
    spark.generate(torch.randint(0, 211, (2, 40)), past_key_values=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    layer = cache.layers[1]
    dense_keys = torch.cat([c.dense() for c in layer.key_chunks], dim=2)
    used = dense_keys.abs().sum(2) > 0  # [B, H, D]: channels nonzero in any token (decode blocks included)
    assert (used.sum(-1) <= 16).all()
    assert all(torch.equal(c.idx, layer.think_channels) for c in layer.key_chunks)


def test_left_padding_with_eviction_matches_batch_one(seed):
    spark, _ = build_pair("qwen2", seed=seed)
    long_ids = torch.randint(1, 211, (1, 61))
    short_ids = torch.randint(1, 211, (1, 45))
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 16, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :16] = 0
    config = SparKConfig(method="snapkv+spark", token_budget=40, eviction_window=8, key_prune_ratio=0.5, window_size=8, block_size=4)
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    cache = SparKCache(config)
    batched = spark.generate(batch, attention_mask=mask, past_key_values=cache, **kw)
    single_cache = SparKCache(config)
    single = spark.generate(short_ids, past_key_values=single_cache, **kw)
    # the padded row kept exactly the batch-1 tokens (shifted by the 16 pads), no padding
    for lb, ls in zip(cache.layers, single_cache.layers):
        assert torch.equal(lb.blocks[0].positions[1, :, :40] - 16, ls.blocks[0].positions[0, :, :40])
    got = torch.stack([s[1] for s in batched.logits])
    want = torch.stack([s[0] for s in single.logits])
    assert rel(got, want) < 1e-3
    assert torch.equal(batched.sequences[1, -8:], single.sequences[0, -8:])


def test_layer_stats(seed):
    spark, _ = build_pair("llama", seed=seed, num_hidden_layers=4)
    cache = SparKCache(SparKConfig(method="pyramidkv+spark", token_budget=100, eviction_window=16, selection="top_p", top_p=0.8))
    spark.generate(torch.randint(0, 211, (1, 300)), past_key_values=cache, max_new_tokens=3, do_sample=False)
    stats = cache.layer_stats()
    kept = [s["kept_tokens"] for s in stats]
    assert kept == sorted(kept, reverse=True) and kept[0] > 100 > kept[-1] and abs(sum(kept) - 400) <= 4
    for s, layer in zip(stats, cache.layers):
        assert s["prompt_tokens"] == 300 and s["bytes"] == layer.nbytes
        hist = s["kept_channels_hist"]
        assert len(hist) > 1 and sum(hist.values()) == 2 * s["kept_tokens"]  # 2 kv-heads, variable T
        assert 1 <= min(hist) and max(hist) <= 64
        assert len(s["kept_channels_per_head"][0]) == 2


def test_spark_error_well_below_think_at_high_ratio(seed):
    """At equal token budget and ratio 0.8, SparK adds far less error on top of SnapKV than ThinK."""
    from sparkkv.eval.compare import compare_decode

    spark, _ = build_pair("llama", seed=seed, initializer_range=0.02, head_dim=128, num_attention_heads=8,
                          num_key_value_heads=2, hidden_size=256)
    prompt = torch.randint(0, 211, (1, 400))
    continuation = torch.randint(0, 211, (1, 6))
    base = SparKConfig(method="snapkv", token_budget=128)
    think = SparKConfig(method="snapkv+think", token_budget=128, key_prune_ratio=0.8)
    spark_cfg = SparKConfig(method="snapkv+spark", token_budget=128, key_prune_ratio=0.8)
    zero = spark_cfg.replace(recovery="zero")
    rows = {r["method"]: r for r in compare_decode(spark, prompt, continuation, [think, spark_cfg, zero], base=base)}
    t, s, z = (rows[c.name]["attn_err_vs_base"] for c in (think, spark_cfg, zero))
    assert s < 0.6 * t, (s, t)
    assert s < z, (s, z)  # recovery helps


def test_crop_after_eviction(seed):
    spark, dense = build_pair("llama", seed=seed)
    s, budget, sink = 60, 24, 4
    ids = torch.randint(0, 211, (1, s))
    cache = SparKCache(SparKConfig(method="streamingllm+spark", key_prune_ratio=0.0, token_budget=budget, sink_tokens=sink, block_size=4))
    kept = torch.zeros(s, dtype=torch.bool)
    kept[:sink] = True
    kept[s - (budget - sink):] = True
    more = torch.randint(0, 211, (1, 13))
    dense_cache = DynamicCache(config=dense.config)
    with torch.no_grad():
        spark(ids, past_key_values=cache), dense(ids, past_key_values=dense_cache)
        for i in range(13):
            step_mask = torch.cat([kept, torch.ones(i + 1, dtype=torch.bool)]).view(1, 1, 1, -1)
            spark(more[:, i : i + 1], past_key_values=cache)
            dense(more[:, i : i + 1], past_key_values=dense_cache, attention_mask=step_mask)
        with pytest.raises(NotImplementedError, match="evicted prompt"):
            cache.crop(-14)
        cache.crop(-10)  # through the tail and two packed blocks of generated tokens
        dense_cache.crop(-10)
        assert cache.get_seq_length() == 63 and cache.layers[0].stored_tokens == budget + 3
        tok = torch.randint(0, 211, (1, 1))
        mask = torch.cat([kept, torch.ones(4, dtype=torch.bool)]).view(1, 1, 1, -1)
        assert rel(spark(tok, past_key_values=cache).logits, dense(tok, past_key_values=dense_cache, attention_mask=mask).logits) < 1e-5


@pytest.mark.parametrize("method", ["snapkv+spark", "streamingllm", "pyramidkv"])
def test_short_prompt_with_fractional_budget_keeps_it(seed, method):
    """A chat server's "Hi": a fractional budget on a prompt shorter than the eviction window keeps the
    whole prompt and decodes like dense, instead of raising inside generate."""
    spark, dense = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (1, 5))
    config = SparKConfig(method=method, token_budget=0.25, key_prune_ratio=0.0)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    got = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    assert torch.equal(got, dense.generate(ids, **kw))


def test_chunked_prefill_with_eviction_is_refused_not_silently_unbudgeted(seed):
    """generate(prefill_chunk_size=N) sends the prompt in several forwards; the budget was applied to
    the first only, so the second is refused with a message that says what to do (issue 16)."""
    spark, _ = build_pair("llama", seed=seed)
    ids = torch.randint(0, 211, (1, 300))
    cache = SparKCache(SparKConfig(method="snapkv+spark", token_budget=128, key_prune_ratio=0.8))
    with pytest.raises(ValueError, match="chunked prefill.*prefill_chunk_size=None"):
        spark.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False, prefill_chunk_size=100)
    # in one forward the budget holds
    cache = SparKCache(SparKConfig(method="snapkv+spark", token_budget=128, key_prune_ratio=0.8))
    spark.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert cache.layer_stats()[0]["kept_tokens"] == 128
    # channel pruning alone takes chunks (later chunks are packed as decode blocks)
    cache = SparKCache(SparKConfig(key_prune_ratio=0.8))
    spark.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False, prefill_chunk_size=100)
    assert cache.layers[0].stored_tokens == cache.get_seq_length()


def test_tokens_after_a_finished_prompt(seed):
    """A question appended after a compressed context: end_prompt() (or a one-token forward) says the
    prompt is complete; the new tokens are stored like generated ones, not evicted."""
    spark, _ = build_pair("llama", seed=seed)
    context, question = torch.randint(0, 211, (1, 200)), torch.randint(0, 211, (1, 20))
    cache = SparKCache(SparKConfig(method="snapkv", token_budget=96))
    with torch.no_grad():
        spark(context, past_key_values=cache)
        with pytest.raises(ValueError, match="end_prompt"):
            spark(question, past_key_values=cache)
        cache.end_prompt()
        spark(question, past_key_values=cache)
    assert cache.layers[0].stored_tokens == 96 + 20 and cache.get_seq_length() == 220
    capture = PrefillCapture(max_queries=64)
    with torch.no_grad():
        spark(context, past_key_values=capture)
        forked = capture.compress(SparKConfig(method="snapkv", token_budget=96))
        spark(question, past_key_values=forked)  # a fork of a recorded prompt: the prompt is complete
    assert forked.layers[0].stored_tokens == 96 + 20
