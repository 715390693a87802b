"""SparKConfig validation: bad values fail where they are typed, naming the value and the range."""

import pytest

from sparkkv import SparKConfig
from sparkkv.config import parse_method


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(key_prune_ratio=1.0), ValueError, r"key_prune_ratio must be a number in \[0, 1\), got 1.0"),
        (dict(key_prune_ratio=-0.1), ValueError, "key_prune_ratio"),
        (dict(key_prune_ratio="0.5"), ValueError, "key_prune_ratio"),
        (dict(value_prune_ratio=1.5), ValueError, "value_prune_ratio"),
        (dict(window_size=0), ValueError, "window_size must be an int >= 1, got 0"),
        (dict(window_size=2.5), TypeError, "window_size"),
        (dict(recovery="avg"), ValueError, r"unknown recovery 'avg': expected one of \['mean', 'zero'"),
        (dict(selection="topk"), ValueError, "unknown selection 'topk'"),
        (dict(saliency="abs"), ValueError, "unknown saliency"),
        (dict(top_p=0.0), ValueError, r"top_p must be a number in \(0, 1\]"),
        (dict(recovery_constant=0), ValueError, "recovery_constant"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(compress_decode="yes"), TypeError, "compress_decode"),
        (dict(method="snapkv+quantize"), ValueError, "unknown method 'snapkv\\+quantize'"),
        (dict(method="spark+snapkv"), ValueError, "unknown method"),
        (dict(method="snapkv+spark"), ValueError, "needs token_budget"),
        (dict(method="spark", token_budget=100), ValueError, "has no eviction"),
        (dict(method="snapkv+spark", token_budget=32), ValueError, "smaller than eviction_window=64"),
        (dict(method="snapkv+spark", token_budget=1.5), ValueError, r"must be in \(0, 1\)"),
        (dict(method="snapkv+spark", token_budget=0), ValueError, "token_budget must be >= 1"),
        (dict(method="streamingllm", token_budget=4), ValueError, "must exceed sink_tokens"),
        (dict(pool_kernel=4), ValueError, "pool_kernel must be odd"),
        (dict(method="think", selection="top_p"), ValueError, "applies to the 'spark' channel policy"),
        (dict(method="snapkv", token_budget=100, value_prune_ratio=0.5), ValueError, "value_prune_ratio"),
    ],
)
def test_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparKConfig(**kwargs)


def test_method_names():
    assert parse_method("snapkv+spark") == ("snapkv", "spark")
    assert parse_method("pyramidkv+think") == ("pyramidkv", "think")
    assert parse_method("snapkv") == ("snapkv", "none")
    assert parse_method("dense") == (None, "dense")
    assert parse_method("spark") == (None, "spark")
    c = SparKConfig(method="snapkv+spark", key_prune_ratio=0.8, token_budget=512)
    assert (c.eviction, c.channel_policy, c.name) == ("snapkv", "spark", "snapkv+spark k0.8 b512")
    assert SparKConfig(method="snapkv+spark", token_budget=0.25).name.endswith("b0.25")


def test_round_trip_dict():
    c = SparKConfig(method="pyramidkv+think", key_prune_ratio=0.5, token_budget=256)
    assert SparKConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown SparKConfig fields \\['pooling_ratio'\\]"):
        SparKConfig.from_dict({"pooling_ratio": 0.65})
