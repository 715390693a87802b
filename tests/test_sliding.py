"""Sliding-window, chunked and hybrid models: a SparKCache keeps only what each layer type can
still see, decodes like DynamicCache at ratio 0, and never holds more than DynamicCache."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Llama4TextConfig

from models import HYBRID_COMMON, HYBRIDS, build_hybrid, rel
from sparkkv import SparKCache, SparKConfig
from sparkkv.cache import LayerSpec, layer_specs
from sparkkv.packed import storage_nbytes

WINDOW = 16


def dynamic_bytes(cache: DynamicCache) -> int:
    return storage_nbytes(*[t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None])


def run_both(spark, dense, cache, dyn, ids, steps, crop=0, each_step=None):
    """Prefill, `steps` greedy steps (dense model's tokens fed to both), optional crop and 4 more
    steps; `each_step()` runs after every forward. Returns the relative logit error at every step."""
    errors = []
    if not hasattr(dyn, "activate_past_recording"):
        crop = 0  # transformers < 5.24: DynamicCache's sliding layers cannot crop past their window
    with torch.no_grad():
        a = spark(ids, past_key_values=cache).logits[:, -1]
        b = dense(ids, past_key_values=dyn).logits[:, -1]
        errors.append(rel(a, b))
        if crop and hasattr(dyn, "activate_past_recording"):
            dyn.activate_past_recording()
            cache.activate_past_recording()
        for i in range(steps + (4 if crop else 0)):
            if crop and i == steps:
                cache.crop(-crop)
                dyn.crop(-crop)
                assert cache.get_seq_length() == dyn.get_seq_length()
                for layer in cache.layers + dyn.layers:  # as generate() does when it hands the cache back
                    if hasattr(layer, "record_past"):
                        layer.record_past = False
            tok = b.argmax(-1, keepdim=True)
            a = spark(tok, past_key_values=cache).logits[:, -1]
            b = dense(tok, past_key_values=dyn).logits[:, -1]
            errors.append(rel(a, b))
            if each_step is not None:
                each_step()
    return errors


@pytest.mark.parametrize("windows", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_ratio_zero_matches_dynamic_cache(seed, name, windows):
    spark, dense = build_hybrid(name, WINDOW, seed=seed)
    ids = torch.randint(0, 97, (2, windows * WINDOW))
    cache = SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4))
    dyn = DynamicCache(config=dense.config)
    errors = run_both(spark, dense, cache, dyn, ids, steps=WINDOW + 3, crop=3)  # past a window boundary
    assert max(errors) < 1e-4, errors
    for layer, spec in zip(cache.layers, layer_specs(spark.config)):
        assert layer.spec == spec
        if spec.attention_type == "sliding_attention":
            # what the current and the next query can see, plus less than one block
            assert WINDOW - 1 <= layer.stored_tokens <= WINDOW + 3
        else:
            assert layer.stored_tokens == layer.seen


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_holds_less_than_dynamic_cache(seed, name):
    """At ratio 0.8 every layer holds exactly its stored tokens at the packed rate (counted from the
    storages), sliding layers store at most a block more than DynamicCache, and the whole cache
    holds less than DynamicCache at every length."""
    spark, dense = build_hybrid(name, WINDOW, seed=seed)
    b, h, d = 1, HYBRID_COMMON["num_key_value_heads"], HYBRID_COMMON["head_dim"]
    t = d - int(0.8 * d)
    packed_row = t * 4 + d // 8 + d // 8 + 4  # float32 model: kept values, keep bits, sign bits, sqrt(a_t)
    dense_row = d * 4
    for windows in (1, 3, 8):
        ids = torch.randint(0, 97, (b, windows * WINDOW))
        cache = SparKCache(SparKConfig(key_prune_ratio=0.8, block_size=4))
        dyn = DynamicCache(config=dense.config)

        def smaller():  # after every decode step, not only at the end
            assert cache.nbytes < dynamic_bytes(dyn), (windows, cache.get_seq_length(), cache.nbytes, dynamic_bytes(dyn))

        run_both(spark, dense, cache, dyn, ids, steps=WINDOW + 5, each_step=smaller)
        for layer in cache.layers:
            packed_tokens = layer.stored_tokens - layer.tail_len
            # + two float32 vectors per head: the window query norms and their 1/sqrt (`chan`)
            expected = b * h * (packed_tokens * (packed_row + dense_row) + layer.tail_len * 2 * dense_row) + 2 * b * h * d * 4
            assert layer.nbytes == expected
            dyn_tokens = layer.spec.dense_tokens(layer.seen)
            assert layer.stored_tokens <= dyn_tokens + 3 + (layer.spec.attention_type != "full_attention")
        assert cache.nbytes < dynamic_bytes(dyn), (windows, cache.nbytes, dynamic_bytes(dyn))
        by_type = cache.nbytes_by_layer_type()
        assert sum(by_type.values()) == cache.nbytes
        stats = cache.layer_stats()
        assert all(s["bytes"] < s["dense_bytes"] for s in stats)


def test_chunked_attention_llama4(seed):
    config = Llama4TextConfig(**{**HYBRID_COMMON, "num_hidden_layers": 4, "attention_chunk_size": 8,
                                 "intermediate_size_mlp": 128, "num_local_experts": 2})
    torch.manual_seed(seed)
    spark = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sparkkv").eval()
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    dense.load_state_dict(spark.state_dict())
    cache = SparKCache(SparKConfig(key_prune_ratio=0.0, block_size=4))
    errors = run_both(spark, dense, cache, DynamicCache(config=dense.config), torch.randint(0, 97, (1, 29)), steps=12)
    assert max(errors) < 1e-4, errors
    for layer in cache.layers:
        if layer.spec.attention_type == "chunked_attention":
            assert layer.stored_tokens <= layer.seen % 8 + 3  # the current chunk (plus part of a block)
        else:
            assert layer.stored_tokens == 41


def test_layer_specs_from_configs():
    gemma3 = HYBRIDS["gemma3"][0](512)
    specs = layer_specs(gemma3)
    assert [s.attention_type for s in specs] == ["sliding_attention"] * 5 + ["full_attention"]
    assert specs[0].window == 512 and specs[5] == LayerSpec("full_attention", None, 0, 1)
    mistral = HYBRIDS["mistral"][0](None)
    assert all(s == LayerSpec("full_attention", None, i, 2) for i, s in enumerate(layer_specs(mistral)))
    assert LayerSpec("sliding_attention", 10).first_needed(25) == 16
    assert LayerSpec("chunked_attention", 10).first_needed(25) == 20
    assert LayerSpec("sliding_attention", 10).dense_tokens(25) == 9


def test_pyramid_depth_counts_full_layers_only(seed):
    """PyramidKV's schedule runs over the full-attention layers; sliding layers are not evicted."""
    spark, _ = build_hybrid("gemma3", WINDOW, seed=seed, num_hidden_layers=12)  # 10 sliding, 2 full
    cache = SparKCache(SparKConfig(method="pyramidkv+spark", token_budget=40, eviction_window=8, key_prune_ratio=0.5))
    with torch.no_grad():
        spark(torch.randint(0, 97, (1, 100)), past_key_values=cache)
    kept = {i: layer.stats["kept_tokens"] for i, layer in enumerate(cache.layers)}
    full = [i for i, layer in enumerate(cache.layers) if layer.spec.attention_type == "full_attention"]
    assert [cache.layers[i].spec.full_index for i in full] == [0, 1]
    assert kept[full[0]] > 40 > kept[full[1]] and abs(kept[full[0]] + kept[full[1]] - 80) <= 1
    assert all(kept[i] == WINDOW - 1 for i in kept if i not in full)


def test_crop_beyond_dropped_window_is_a_clear_error(seed):
    spark, _ = build_hybrid("mistral", WINDOW, seed=seed)
    cache = SparKCache(SparKConfig(key_prune_ratio=0.5, block_size=4))
    with torch.no_grad():
        spark(torch.randint(0, 97, (1, 3 * WINDOW)), past_key_values=cache)
        for _ in range(6):
            spark(torch.randint(0, 97, (1, 1)), past_key_values=cache)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-5)
