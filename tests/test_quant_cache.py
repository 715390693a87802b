"""Quantized storage kinds inside a SparKCache: every kind through real (random-weight) models, bytes
against the format's formula, crops, beam search, sliding layers, and the configuration's errors."""

import math

import pytest
import torch
from transformers import DynamicCache

from models import FAMILIES, build_hybrid, build_pair, rel
from sparkkv import SparKCache, SparKConfig
from sparkkv.packed import ColumnPackedTensor, PackedTensor
from sparkkv.quant import QuantizedTensor


def decode(model, cache, ids, steps):
    """Prefill `ids`, then feed `steps [B, n]` one token at a time; the logits of every forward."""
    out = []
    with torch.no_grad():
        out.append(model(ids, past_key_values=cache).logits[:, -1])
        for i in range(steps.shape[1]):
            out.append(model(steps[:, i : i + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out)


QUANTIZED = [
    dict(method="none", key_bits=8, value_bits=8),
    dict(key_prune_ratio=0.0, key_bits=8, value_bits=8, mask_format="trits"),
    dict(method="think", key_prune_ratio=0.0, key_bits=8, value_bits=8),
    dict(key_prune_ratio=0.0, value_prune_ratio=0.0, key_bits=8, value_bits=8),
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fields", QUANTIZED, ids=lambda f: SparKConfig(**f).name)
def test_eight_bits_stays_close_to_dense(seed, family, fields):
    """At ratio 0 and 8 bits every kind is within quantization noise of DynamicCache, prompt
    blocks, decode blocks and the dense tail included."""
    spark, dense = build_pair(family, seed=seed)
    ids, steps = torch.randint(0, 211, (2, 45)), torch.randint(0, 211, (2, 11))
    got = decode(spark, SparKCache(SparKConfig(block_size=4, quant_group_size=16, **fields)), ids, steps)
    want = decode(dense, DynamicCache(config=dense.config), ids, steps)
    assert rel(got[0], want[0]) < 1e-5  # prefill attention is dense
    assert rel(got, want) < 2e-2


def test_bytes_are_the_formula(seed):
    """nbytes of a prefilled layer: codes at `bits / 8` bytes per entry plus a float16 scale and zero
    per group, nothing else (the SparK rows: codes + trits + recovery scale + one chan vector)."""
    b, h, s, d, g, hq = 2, 2, 200, 64, 32, 4
    keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    queries = torch.randn(b, hq, 32, d)
    from sparkkv.cache import PrefillInputs, SparKLayer

    def layer(**fields):
        layer = SparKLayer(SparKConfig(quant_group_size=g, **fields), 0)
        layer.compress_prefill(PrefillInputs(keys, values, queries, None, None, d**-0.5))
        return layer

    plain = layer(method="none", key_bits=4, value_bits=2)
    k, v = plain.key_chunks[0], plain.blocks[0].values
    assert isinstance(k, QuantizedTensor) and k.axis == "token" and isinstance(v, QuantizedTensor) and v.axis == "row"
    assert k.nbytes == b * h * (s * d // 2 + math.ceil(s / g) * d * 2 * 2)
    assert v.nbytes == b * h * s * (d // 4 + math.ceil(d / g) * 2 * 2)
    assert plain.nbytes == k.nbytes + v.nbytes
    spark = layer(key_prune_ratio=0.8, key_bits=4, value_bits=4, mask_format="trits")
    k = spark.key_chunks[0]
    t = d - int(0.8 * d)
    assert isinstance(k, PackedTensor) and isinstance(k.vals, QuantizedTensor) and k.vals.zero is None
    assert k.vals.axis == "channel"  # one float16 scale per channel and group of g tokens
    assert k.scale.dtype == torch.bfloat16  # the recovery scale too is small beside codes (packed.py)
    per_row = math.ceil(t * 4 / 8) + math.ceil(d / 5) + 2  # codes, trits, bf16 recovery scale (float32 model)
    # + the per-channel scales, + the per-head chan vector (float32)
    assert k.nbytes == b * h * (s * per_row + math.ceil(s / g) * d * 2 + d * 4)
    think = layer(method="think", key_prune_ratio=0.5, key_bits=2)
    k = think.key_chunks[0]
    assert isinstance(k, ColumnPackedTensor) and isinstance(k.vals, QuantizedTensor)
    assert k.nbytes == b * h * (s * (d // 2) // 4 + math.ceil(s / g) * (d // 2) * 2 * 2) + b * h * (d // 2) * 2


def test_crop_and_beam_search_through_quantized_blocks(seed):
    spark, dense = build_pair("llama", seed=seed)
    config = SparKConfig(method="none", key_bits=8, value_bits=8, block_size=4, quant_group_size=8)
    ids = torch.randint(0, 211, (1, 30))
    cache, dyn = SparKCache(config), DynamicCache(config=dense.config)
    steps = torch.randint(0, 211, (1, 14))
    decode(spark, cache, ids, steps)
    decode(dense, dyn, ids, steps)
    for n in (3, 6, 13):  # into the tail, decode blocks, the prompt block (a slice keeps its groups)
        cache.crop(-n)
        dyn.crop(-n)
        tok = torch.randint(0, 211, (1, 1))
        with torch.no_grad():
            assert rel(spark(tok, past_key_values=cache).logits, dense(tok, past_key_values=dyn).logits) < 2e-2
    kw = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False)
    got = spark.generate(ids, past_key_values=SparKCache(config), **kw)
    assert got.shape == (1, 38)


def test_sliding_layers_are_quantized_too(seed):
    spark, _ = build_hybrid("gemma3", window=16, seed=seed)
    ids = torch.randint(0, 97, (1, 60))
    quantized, full = SparKCache(SparKConfig(key_prune_ratio=0.5, key_bits=4, value_bits=4, block_size=4)), SparKCache(
        SparKConfig(key_prune_ratio=0.5, block_size=4))
    for cache in (quantized, full):
        decode(spark, cache, ids, torch.randint(0, 97, (1, 9)))
    by_type, ref = quantized.nbytes_by_layer_type(), full.nbytes_by_layer_type()
    assert by_type["sliding_attention"] < 0.6 * ref["sliding_attention"]
    assert by_type["full_attention"] < 0.6 * ref["full_attention"]


@pytest.mark.parametrize("fields,match", [
    (dict(key_bits=3), "key_bits must be one of"),
    (dict(value_bits=16.0), "value_bits must be one of"),
    (dict(method="dense", key_bits=4), "method='none'"),
    (dict(selection="top_p", key_bits=4), "selection='ratio'"),
    (dict(recovery="normal", key_bits=4), "sampled recovery"),
    (dict(mask_format="trits", recovery="zero"), "recovery 'mean' or 'constant'"),
    (dict(method="think", mask_format="trits"), "'spark' channel policy"),
    (dict(mask_format="hex"), "unknown mask_format"),
    (dict(quant_group_size=12), "multiple of 8"),
    (dict(quant_group_size=2048), r"\[8, 1024\]"),
])
def test_bad_quantization_fields_name_the_value(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparKConfig(**fields)
