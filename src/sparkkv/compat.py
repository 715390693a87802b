"""Which transformers models and attention features the packed cache serves, and clear refusals for the rest.

A `SparKCache` reproduces dense attention only for models whose attention layers hand the cache's
output straight to the registered attention function (transformers' `AttentionInterface`) and ask
nothing of that function beyond a (causal, sliding or chunked) mask and a scaling. Everything else
is refused here, with one message naming the model and the reason, instead of producing wrong
numbers or a traceback from deep inside the model:

  model level   `check_model_class(model_or_config)` / `unsupported_reason(...)`: code that does not
                route attention through `AttentionInterface`, attention code that reads or transforms
                the cached keys/values itself, and layer kinds that keep state other than keys/values
                (linear attention, convolutions, sparse indexers). The `"sparkkv"` mask function
                (`sparkkv_mask`) runs this check at the first forward of a model loaded with
                `attn_implementation="sparkkv"`; call it yourself *before* loading where transformers
                fails inside `from_pretrained` (see `LOAD_FAILURES`).
  call level    `check_attention_call(module, query, attention_mask, dropout, kwargs)`: at every
                attention call that reaches a `SparKCache`, what the model asks of the attention
                function (attention sinks, logit softcapping, position bias, sparse indices, a
                non-causal module without a mask, dropout, head_dim...). Unknown keyword arguments
                are refused too: the packed path cannot honour what it does not know.

Both checks are pure (they inspect classes, configs and keyword names; they never run the model),
and the lists below are plain data, so supporting a feature later means deleting one entry.
tests/test_architectures.py runs every causal-LM architecture of the installed transformers against
these lists (docs/architectures.md is its outcome table).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import sdpa_mask
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING,
)


class UnsupportedModelError(ValueError):
    """A model, or a feature of its attention, that sparkkv's packed cache does not implement.

    `model`: which model (class, model_type, attention module); `reason`: what it does that the
    packed cache cannot serve, e.g. "uses attention sinks (...)".
    """

    def __init__(self, model: str, reason: str) -> None:
        self.model, self.reason = model, reason
        super().__init__(
            f"{model} {reason}: sparkkv's packed cache cannot serve it; use a DynamicCache "
            "(attn_implementation='sdpa' or 'eager') for this model instead"
        )

# ---------------------------------------------------------------------------------------------
# call level: what an attention module passes to the attention function
# ---------------------------------------------------------------------------------------------
# Keyword arguments that ask for a feature the packed path does not implement (refused when the
# value is not None). Drop an entry once the feature is implemented and tested against eager.
# (`s_aux`, GPT-OSS's attention sinks, is implemented: the attention function takes it out first.)
UNSUPPORTED_ATTENTION_KWARGS: dict[str, str] = {
    "sinks": "attention sinks passed as `sinks`",
    "softcap": "attention logit softcapping (`softcap`, e.g. Gemma 2)",
    "position_bias": "a learned position bias added to the attention logits (`position_bias`, T5-style)",
    "indices": "sparse attention over indexer-selected tokens (`indices`, e.g. DeepSeek sparse attention)",
    "block_indices": "block-sparse attention (`block_indices`)",
}

# Keyword arguments that leave the result unchanged, or whose effect reaches the packed path
# through the attention mask (sliding windows, packed sequences, position ids).
IGNORED_ATTENTION_KWARGS = frozenset(
    {
        "cache_position",
        "cu_seq_lens_k",
        "cu_seq_lens_q",
        "is_causal",  # only read by SDPA when there is no mask; both paths see the same mask
        "logits_to_keep",  # generation plumbing some models forward with **kwargs
        "max_length_k",
        "max_length_q",
        "num_items_in_batch",
        "output_attentions",  # attention weights are not returned (None), as with SDPA
        "output_hidden_states",
        "output_router_logits",
        "position_ids",
        "seq_idx",
        "sliding_window",  # the mask carries the window
        "use_cache",
    }
)


def model_name(module: torch.nn.Module) -> str:
    """`"GptOssForCausalLM (model_type 'gpt_oss', attention module GptOssAttention)"` for an attention module."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "a model")
    where = f"model_type {model_type!r}, " if model_type else ""
    return f"{name} ({where}attention module {type(module).__name__})"


def check_attention_call(
    module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float, kwargs: dict,
    packs_bits: bool = True,
) -> None:
    """Refuse an attention call the packed path would answer differently from eager attention.

    The arguments are those the attention function received: the attention `module`, `query`
    `[B, Hq, q, D]`, `attention_mask` (None or `[B, 1 or H, q, S]`), the `dropout` probability and
    the extra keyword arguments `kwargs`; `packs_bits`: whether the cache's configuration stores bit
    masks (SparK keys, pruned values), which need a head_dim that is a multiple of 8 (dense,
    eviction-only and ThinK configurations take any). Raises `UnsupportedModelError` naming the model and the
    feature; returns None when the call is supported. Cheap (no tensor work): it runs at every
    attention call that reaches a SparKCache.
    """
    problem = None
    for key, value in kwargs.items():
        if value is None or key in IGNORED_ATTENTION_KWARGS:
            continue
        problem = UNSUPPORTED_ATTENTION_KWARGS.get(key, f"the attention argument {key!r}, which sparkkv does not know")
        break
    if problem is None and attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True) is False:
        # A prompt without a mask is causal for the mask function and full for SDPA's `is_causal`
        # test, which reads this flag; only eager attention with an explicit mask is unambiguous.
        problem = "a non-causal attention module (is_causal=False) given no attention mask"
    if problem is None and dropout:
        problem = f"attention dropout (p={dropout}; sparkkv is an inference cache: call model.eval())"
    if problem is None and packs_bits and (query.shape[-1] < 8 or query.shape[-1] % 8):
        problem = f"head_dim={query.shape[-1]} (the packed format needs a positive multiple of 8)"
    if problem is not None:
        raise UnsupportedModelError(model_name(module), f"uses {problem}")


# ---------------------------------------------------------------------------------------------
# model level: the model's code and layer kinds
# ---------------------------------------------------------------------------------------------
# transformers model packages (transformers/models/<package>) that pass transformers' own
# AttentionInterface test but cannot use a SparKCache: their attention code reads or transforms the
# cached keys/values before (or instead of) calling the attention function, or they have no
# attention at all. Found by tests/test_architectures.py with transformers 5.24. (Models that cache
# a latent and expand it, MLA-style, are found structurally: see `_caches_latents`.)
INCOMPATIBLE_PACKAGES: dict[str, str] = {
    "diffllama": "splits the cached values into two halves before calling the attention function",
    "doge": "computes its dynamic attention mask from the cached values",
    "dory": "re-runs its layers in loops that read and extend the cached keys/values themselves",
    "jetmoe": "repeats the cached keys/values per expert before calling the attention function",
    "mllama": "has cross-attention layers that read the cached image keys/values from the cache layers directly",
    "xlstm": "has no attention layers (a recurrent model whose state lives in its own cache)",
}

# Cache layer kinds (a config's `layer_types`) that a SparKCache serves: the mask carries sliding and
# chunked windows; "moe"/"mlp" layers have no attention. Any other kind keeps recurrent, convolution
# or indexer state that only transformers' own cache layers hold.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "moe", "mlp"})

# Models for which transformers itself fails inside `from_pretrained(..., attn_implementation="sparkkv")`,
# before any sparkkv code runs (a bare `KeyError: 'sparkkv'`): only `check_model_class` called
# before loading gives these a clear message.
LOAD_FAILURES: dict[str, str] = {
    "falcon": "FalconDecoderLayer picks its attention class from a table keyed by attn_implementation",
    "git": "GitAttention picks its attention class from a table keyed by attn_implementation",
    "gpt_neo": "GPTNeoBlock picks its attention class from a table keyed by attn_implementation",
}


def _package(cls: type) -> str | None:
    """`transformers.models.<package>.modeling_<x>` -> `<package>` (None for code outside transformers)."""
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["transformers", "models"] else None


@functools.lru_cache(maxsize=None)
def _class_for_config(config_class: type) -> type | None:
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        try:
            return mapping[config_class]
        except (KeyError, ValueError, ImportError):
            continue
    return None


def _resolve(model: Any) -> tuple[type | None, PretrainedConfig | None]:
    """(model class, config) of a model class, model instance, config, or `model_type` string."""
    if isinstance(model, str):
        from transformers import AutoConfig

        model = AutoConfig.for_model(model)
    if isinstance(model, PreTrainedModel):
        return type(model), model.config
    if isinstance(model, type) and issubclass(model, PreTrainedModel):
        return model, None
    if isinstance(model, PretrainedConfig):
        return _class_for_config(type(model)), model
    raise TypeError(
        f"expected a transformers model class, model, config or model_type string, got {type(model).__name__}"
    )


MLA_REASON = "caches latent keys/values (multi-head latent attention) and expands them after reading the cache"


def _caches_latents(cls: type) -> bool:
    """Whether the model's code defines an attention module with `expand_kv`: it caches a latent
    (multi-head latent attention, MLA) and expands it into keys/values after reading the cache."""
    module = sys.modules.get(cls.__module__)
    return any(
        isinstance(obj, type) and issubclass(obj, torch.nn.Module) and "expand_kv" in vars(obj)
        for obj in vars(module or object).values()
    )


def _code_reason(cls: type) -> str | None:
    """Why the code of a (decoder) model class cannot use a SparKCache (None when it can)."""
    package = _package(cls)
    if package in LOAD_FAILURES:
        return f"does not route its attention through transformers' AttentionInterface ({LOAD_FAILURES[package]})"
    if package in INCOMPATIBLE_PACKAGES:
        return INCOMPATIBLE_PACKAGES[package]
    if _caches_latents(cls):
        return MLA_REASON
    # transformers' own test for "attention goes through AttentionInterface" (it reads the
    # model's source; see PreTrainedModel._can_set_attn_implementation).
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return "does not route its attention through transformers' AttentionInterface (it has attention code of its own)"
    return None


@functools.lru_cache(maxsize=None)
def _classes_reason(cls: type | None, decoder: type | None) -> str | None:
    """`_code_reason` of the decoder, and of a multimodal wrapper's own package tables (its
    vision/audio towers never meet the cache, so only the decoder's code is inspected)."""
    if cls is not None and decoder is not None and decoder is not cls:
        package = _package(cls)
        if package in LOAD_FAILURES or package in INCOMPATIBLE_PACKAGES:
            return _code_reason(cls)
    target = decoder or cls
    return None if target is None else _code_reason(target)


def _layer_reason(text_config: PretrainedConfig) -> str | None:
    """Why a (decoder) configuration's layer kinds cannot use a SparKCache, None when they can."""
    kinds = getattr(text_config, "layer_types", None) or ()
    unsupported = sorted({str(k) for k in kinds} - SUPPORTED_LAYER_TYPES)
    if unsupported:
        return (
            f"has layers of type {', '.join(map(repr, unsupported))}, which keep state other than keys/values "
            "(only full, sliding-window and chunked attention layers can be packed)"
        )
    return None


# Older releases of the supported range do not name every layer kind in their configs (transformers
# 5.0: no `layer_types` on Bamba, Jamba, Mamba, Zamba, ...) and keep MLA's latent in code without
# `expand_kv` (DeepSeek-V2/V3 there: a size mismatch deep in the model instead of a refusal). These
# fallbacks run after the checks above, so they change no outcome where those already decide.
# names that only code keeping recurrent (SSM / convolution) state uses, in the modeling module
RECURRENT_STATE_MARKERS = ("has_previous_state", "ssm_states", "conv_states")


@functools.lru_cache(maxsize=None)
def _keeps_recurrent_state(cls: type | None) -> bool:
    module = sys.modules.get(cls.__module__) if cls is not None else None
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # no source (frozen or compiled module): judged by the other checks
        return False
    return any(marker in source for marker in RECURRENT_STATE_MARKERS)


def _fallback_reason(decoder: type | None, text_config: PretrainedConfig | None) -> str | None:
    """MLA by its config (`kv_lora_rank`), recurrent state by the decoder's code (see above)."""
    if text_config is not None and getattr(text_config, "kv_lora_rank", None):
        return MLA_REASON
    if _keeps_recurrent_state(decoder):
        return "keeps recurrent (state-space or convolution) state in its cache, which only transformers' own cache holds"
    return None


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot use a SparKCache, or None when nothing known prevents it.

    `model`: a transformers model class, model instance, config, or `model_type` string (a bare
    class is judged with its default config). For a multimodal model the decoder (its text
    model) is judged. Attention features chosen at run time (sinks, softcapping, ...) are checked
    at the first forward by `check_attention_call`. Classes from outside transformers (remote
    code) pass unless they fail transformers' AttentionInterface test.
    """
    cls, config = _resolve(model)
    if config is None and cls is not None:
        try:
            config = cls.config_class()
        except Exception:  # noqa: BLE001 - a class without a default config is judged by its code only
            config = None
    text = _text_config(config)
    decoder = cls if text is config else _class_for_config(type(text))
    return (_classes_reason(cls, decoder) or (None if text is None else _layer_reason(text))
            or _fallback_reason(decoder or cls, text))


def _text_config(config: PretrainedConfig | None) -> PretrainedConfig | None:
    """The decoder's config of a multimodal config, else the config itself (class-level test
    first: reading attributes of a config instance is slow)."""
    if config is None or not type(config).sub_configs:
        return config
    return config.get_text_config(decoder=True)


@functools.lru_cache(maxsize=None)
def _config_class_reason(config_class: type) -> str | None:
    """`_classes_reason` for the model class of a config class (its decoder found from the
    class's default config)."""
    cls = _class_for_config(config_class)
    try:
        text_class = type(_text_config(config_class()))
    except Exception:  # noqa: BLE001 - no default config: judge the class itself
        text_class = config_class
    decoder = cls if text_class is config_class else _class_for_config(text_class)
    return _classes_reason(cls, decoder)


def _label(model: Any) -> str:
    cls, config = _resolve(model)
    name = cls.__name__ if cls is not None else type(config).__name__
    model_type = getattr(config, "model_type", None) or getattr(getattr(cls, "config_class", None), "model_type", None)
    return f"{name} (model_type {model_type!r})" if model_type else name


def check_model_class(model: Any) -> None:
    """Raise `UnsupportedModelError` naming the model and the reason when it cannot use a SparKCache.

    Call it before `from_pretrained(..., attn_implementation="sparkkv")` (with the config, e.g.
    `AutoConfig.from_pretrained(path)`): for the models in `LOAD_FAILURES` transformers fails
    inside `from_pretrained` with a bare `KeyError: 'sparkkv'` that sparkkv cannot intercept.
    The other refusals are also raised at the model's first forward (see `sparkkv_mask`).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(_label(model), reason)


def sparkkv_mask(*args, config: PretrainedConfig | None = None, **kwargs):
    """The `"sparkkv"` mask function: SDPA's boolean mask, after `check_model_class(config)`.

    transformers builds the mask once per forward, before any attention layer runs, and passes the
    config: this is the first point where a model loaded with `attn_implementation="sparkkv"` can
    be refused whatever its attention code does with the cache (the class check is memoized).
    """
    if config is not None and "allow_is_bidirectional_skip" not in kwargs:  # encoder masks never meet a cache
        check_config(config)
    return sdpa_mask(*args, config=config, **kwargs)


def check_config(config: PretrainedConfig, module: torch.nn.Module | None = None) -> None:
    """`check_model_class` for the config a model runs with (its class checks memoized): called by
    the mask hook, and by the attention function when a layer first meets a SparKCache, with the
    attention `module` (models that build their mask without the hook, e.g. legacy
    `_update_causal_mask` code in transformers 5.0). The module's package is judged too: a decoder's
    text config may map to no model class (Mllama's in 5.0)."""
    text = _text_config(config)
    reason = (_config_class_reason(type(config)) or _layer_reason(text)
              or _fallback_reason(_class_for_config(type(text)), text))
    if reason is not None:
        raise UnsupportedModelError(_label(config), reason)
    reason = _classes_reason(None, type(module)) if module is not None else None  # the module's own code
    if reason is not None:
        package = _package(type(module))
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(package, type(module).__name__)
        raise UnsupportedModelError(f"{name} (model_type {package!r})", reason)
