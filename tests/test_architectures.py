"""Every causal-LM architecture transformers ships either matches eager attention at ratio 0 or is
refused with a message naming the model and the reason (issue 9, item 6); plus the refusal rules
of `sparkkv.compat` on their own.

The matrix runs every architecture (about 40 s, 2.6 GB peak RSS on the 2-core dev machine);
`SPARKKV_MATRIX=fast` runs a subset that still covers every outcome, for quick iterations.
"""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig

import sparkkv
from architectures import UNTESTABLE, causal_lm_types, documented_status, run_architecture, tiny_config
from sparkkv import SparKCache, SparKConfig, UnsupportedModelError, check_model_class
from sparkkv.compat import (
    UNSUPPORTED_ATTENTION_KWARGS,
    check_attention_call,
    sparkkv_mask,
    unsupported_reason,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"

# One or more of every outcome class: plain decoders, sliding/chunked windows, KV sharing, BERT- and
# BART-style decoders, MoE, multimodal decoders, and every kind of refusal named in the issue.
FAST = [
    "llama", "qwen2", "qwen3", "mistral", "gemma3_text", "cohere2", "llama4_text", "gemma3n_text", "gpt2",
    "gptj", "bert", "bart", "mixtral", "phi3", "olmo3",
    "gpt_oss", "gemma2", "deepseek_v3", "bloom", "falcon", "bigbird_pegasus", "qwen3_next", "jetmoe", "cpmant",
    "mamba", "blt",
]
FULL = os.environ.get("SPARKKV_MATRIX", "full") != "fast"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", causal_lm_types() if FULL else FAST)
def test_architecture_matches_eager_or_is_refused(model_type):
    outcome = run_architecture(model_type)
    assert outcome.status in ("supported", "refused", "untestable"), outcome.detail
    assert documented_status(DOC).get(model_type) == outcome.status, (
        f"docs/architectures.md is out of date for {model_type} ({outcome.status}: {outcome.detail}); "
        "regenerate it: PYTHONPATH=src python tests/architectures.py --markdown docs/architectures.md"
    )


def test_fast_subset_and_doc_cover_every_architecture():
    documented = documented_status(DOC)
    assert set(documented) == set(causal_lm_types()), "regenerate docs/architectures.md"
    assert set(FAST) <= set(causal_lm_types())
    for status in ("supported", "refused", "untestable"):
        assert any(documented[m] == status for m in FAST), status
    assert set(UNTESTABLE) <= set(causal_lm_types())


# ---------------------------------------------------------------------------------------------
# the reproductions, one by one
# ---------------------------------------------------------------------------------------------
def _first_forward(model_type, **overrides):
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparkkv").eval()
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 9)), past_key_values=SparKCache(SparKConfig(key_prune_ratio=0.0)))


@pytest.mark.parametrize(
    "model_type, names, feature",
    [
        ("gemma2", "Gemma2ForCausalLM", "softcapping"),
        ("deepseek_v3", "DeepseekV3ForCausalLM", "latent keys/values"),
        ("bloom", "BloomForCausalLM", "AttentionInterface"),
    ],
)
def test_first_forward_refuses_with_model_and_feature(model_type, names, feature):
    with pytest.raises(UnsupportedModelError, match=names) as info:
        _first_forward(model_type)
    assert feature in str(info.value) and "DynamicCache" in str(info.value)
    assert "other than 'sparkkv'" not in str(info.value)  # not the misleading "wrong attention function" message


def test_falcon_is_refused_before_loading():
    config = tiny_config("falcon")
    with pytest.raises(UnsupportedModelError, match=r"FalconForCausalLM \(model_type 'falcon'\).*table keyed by attn_implementation"):
        check_model_class(config)
    # the limitation check_model_class exists for: transformers fails inside loading
    with pytest.raises(KeyError, match="sparkkv"):
        AutoModelForCausalLM.from_config(config, attn_implementation="sparkkv")


def test_gemma2_without_softcapping_is_supported():
    """Refusals follow what the call asks for, not the model name."""
    outcome_config = tiny_config("gemma2")
    outcome_config.attn_logit_softcapping = None
    model = AutoModelForCausalLM.from_config(outcome_config, attn_implementation="sparkkv").eval()
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 9)), past_key_values=SparKCache(SparKConfig(key_prune_ratio=0.0)))


# ---------------------------------------------------------------------------------------------
# check_attention_call
# ---------------------------------------------------------------------------------------------
class FakeAttention(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4)
        self.is_causal = is_causal


def query(d=16, q=5):
    return torch.zeros(1, 4, q, d)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_ATTENTION_KWARGS))
def test_unsupported_kwargs_are_refused_by_name(key):
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type 'llama', attention module FakeAttention\)") as info:
        check_attention_call(FakeAttention(), query(), None, 0.0, {key: torch.zeros(1)})
    assert f"`{key}`" in str(info.value)
    check_attention_call(FakeAttention(), query(), None, 0.0, {key: None})  # None means "not used"


def test_refusal_list_is_data(monkeypatch):
    with pytest.raises(UnsupportedModelError, match="logit softcapping"):
        check_attention_call(FakeAttention(), query(), None, 0.0, {"softcap": 50.0})
    monkeypatch.delitem(UNSUPPORTED_ATTENTION_KWARGS, "softcap")
    monkeypatch.setattr("sparkkv.compat.IGNORED_ATTENTION_KWARGS", frozenset({"softcap"}))
    check_attention_call(FakeAttention(), query(), None, 0.0, {"softcap": 50.0})


def test_other_call_features():
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    harmless = dict(position_ids=torch.arange(5), sliding_window=4, is_causal=True, output_attentions=False, cache_position=torch.arange(5))
    check_attention_call(FakeAttention(), query(), None, 0.0, harmless)
    with pytest.raises(UnsupportedModelError, match="attention argument 'alibi_slopes', which sparkkv does not know"):
        check_attention_call(FakeAttention(), query(), mask, 0.0, {"alibi_slopes": torch.zeros(4)})
    with pytest.raises(UnsupportedModelError, match="attention dropout"):
        check_attention_call(FakeAttention(), query(), mask, 0.1, {})
    with pytest.raises(UnsupportedModelError, match="head_dim=12"):
        check_attention_call(FakeAttention(), query(d=12), mask, 0.0, {})
    # a module that says it is not causal, given no mask, is ambiguous (SDPA would attend both ways)
    with pytest.raises(UnsupportedModelError, match="non-causal"):
        check_attention_call(FakeAttention(is_causal=False), query(), None, 0.0, {})
    check_attention_call(FakeAttention(is_causal=False), query(), mask, 0.0, {})  # an explicit mask decides
    check_attention_call(FakeAttention(is_causal=False), query(q=1), None, 0.0, {})  # one decode row sees everything


# ---------------------------------------------------------------------------------------------
# check_model_class / unsupported_reason / the mask hook
# ---------------------------------------------------------------------------------------------
def test_check_model_class_accepts_every_form():
    import transformers

    assert unsupported_reason("llama") is None
    assert unsupported_reason(transformers.LlamaForCausalLM) is None
    assert unsupported_reason(LlamaConfig()) is None
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    check_model_class(model)
    assert "AttentionInterface" in unsupported_reason(transformers.BloomForCausalLM)
    assert "latent" in unsupported_reason(AutoConfig.for_model("deepseek_v3"))
    assert "'linear_attention'" in unsupported_reason("qwen3_next")
    assert unsupported_reason("got_ocr2") is None  # a multimodal model is judged by its decoder (Qwen2)
    with pytest.raises(TypeError, match="model_type string, got dict"):
        check_model_class({"model_type": "llama"})


def test_layer_kinds_decide_per_config():
    config = tiny_config("llama")
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="'linear_attention'"):
        check_model_class(config)
    config.layer_types = ["sliding_attention", "chunked_attention"]
    check_model_class(config)


def test_fallbacks_for_releases_without_layer_kinds():
    """transformers 5.0 has no `layer_types` on SSM hybrids and no `expand_kv` in MLA code: the config's
    `kv_lora_rank` and the decoder's recurrent-state code refuse them there (checked by hand on 5.0.0)."""
    from transformers import Mamba2ForCausalLM

    from sparkkv.compat import MLA_REASON, _fallback_reason

    config = tiny_config("llama")
    config.kv_lora_rank = 16  # what DeepSeek-V2/V3 configs carry
    assert unsupported_reason(config) == MLA_REASON
    kwargs = dict(batch_size=1, q_length=3, kv_length=3, allow_is_causal_skip=False)
    with pytest.raises(UnsupportedModelError, match="latent"):
        sparkkv_mask(config=config, **kwargs)
    assert "recurrent" in _fallback_reason(Mamba2ForCausalLM, None)
    assert _fallback_reason(type(AutoModelForCausalLM.from_config(tiny_config("llama"))), tiny_config("llama")) is None


def test_attention_refuses_models_that_skip_the_mask_hook(monkeypatch):
    """Models whose masks do not come from the "sparkkv" mask function (legacy `_update_causal_mask`
    code in transformers 5.0) are refused by the attention function when a layer first meets the cache."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sparkkv.compat import check_config

    config = tiny_config("llama")
    config.kv_lora_rank = 16
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparkkv").eval()
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sparkkv", sdpa_mask)  # no hook
    with pytest.raises(UnsupportedModelError, match="latent"), torch.no_grad():
        model(torch.randint(3, 100, (1, 5)), past_key_values=SparKCache(SparKConfig()))
    # a module from a refused package, whatever config it carries (Mllama's text config maps to no class in 5.0)
    module = type("JetMoeAttention", (torch.nn.Module,), {"__module__": "transformers.models.jetmoe.modeling_jetmoe"})()
    with pytest.raises(UnsupportedModelError, match=r"JetMoeForCausalLM \(model_type 'jetmoe'\)"):
        check_config(tiny_config("llama"), module)
    check_config(tiny_config("llama"), torch.nn.Linear(2, 2))


def test_mask_hook_refuses_and_otherwise_is_sdpa_mask():
    from transformers.masking_utils import sdpa_mask

    kwargs = dict(batch_size=1, q_length=3, kv_length=3, allow_is_causal_skip=False)
    assert torch.equal(sparkkv_mask(config=tiny_config("llama"), **kwargs), sdpa_mask(**kwargs))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM"):
        sparkkv_mask(config=AutoConfig.for_model("bloom"), **kwargs)
    # encoder (bidirectional) masks never meet a cache: not checked
    sparkkv_mask(config=AutoConfig.for_model("bloom"), allow_is_bidirectional_skip=False, **kwargs)


def test_dynamic_cache_stays_sdpa_for_supported_models():
    """The refusals only concern SparKCache: a supported model loaded with "sparkkv" still runs a DynamicCache."""
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"), attn_implementation="sparkkv").eval()
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 9)), past_key_values=DynamicCache(config=model.config))
    assert sparkkv.ATTN_IMPLEMENTATION == model.config._attn_implementation
