"""The transformers integration: the `"sparkkv"` attention function and the cache handle.

The model calls `cache.update(k, v, layer_idx)`, then the registered attention function with
whatever `update` returned. A `SparKCache` returns a `CacheHandle` (never a tensor), through which
the function reaches the layer:

  first forward (prefill)  ordinary dense attention over the prompt (transformers' SDPA), then
                           `layer.compress_prefill(...)` with the model's own query states;
  later forwards           `layer.attend(...)`: attention over the stored blocks (sparkkv.ops).

With any other cache (or none) the function is exactly SDPA, so one loaded model serves both
the dense reference and the compressed runs.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops
from .cache import CacheHandle, PrefillCapture, PrefillInputs
from .compat import check_attention_call, check_config

def _prefill_rows(layer, cache) -> int:
    """How many of the last prompt queries compression reads."""
    if isinstance(cache, PrefillCapture):
        return cache.max_queries
    config = layer.config
    return max(config.window_size, config.eviction_window if config.eviction else 0)


def _first_columns(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The first `length` columns of a mask wider than the keys.

    The legacy `_update_causal_mask` of some models in older releases of the supported range
    (transformers 5.0: Persimmon) builds masks over absolute positions with one spare column, and
    their eager attention reads the first key-length columns; SDPA would reject the width.
    """
    return mask[..., :length] if mask is not None and mask.shape[-1] > length else mask


def sparkkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The function registered as `"sparkkv"` in transformers' `AttentionInterface`."""
    if not isinstance(key, CacheHandle):
        # No SparK cache: exactly SDPA (training, DynamicCache, no cache).
        attention_mask = _first_columns(attention_mask, key.shape[-2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer, cache = key.layer, key.cache
    attention_mask = _first_columns(attention_mask, layer.seen)  # every path below reads `seen` tokens
    sinks = kwargs.pop("s_aux", None)  # attention sinks (GPT-OSS): one logit per query head
    check_attention_call(module, query, attention_mask, dropout, kwargs)  # refuse what we do not implement
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if cache is not None and cache.specs is None and hasattr(module, "config"):
        check_config(module.config, module)  # the mask hook has done this unless the model builds masks without it
        cache.bind(module.config)
    if getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
        # KV sharing (Gemma 3n): this layer reads another layer's keys/values. In the forward
        # that prefilled them, the owner kept the dense prompt on the handle, as DynamicCache
        # returns its full states; afterwards the owner's storage is read without changing it.
        if key.prompt is not None:
            out, _ = sdpa_attention_forward(module, query, *key.prompt, attention_mask, scaling=scaling, **kwargs)
            return out, None
        return layer.attend(query, attention_mask, scaling, sinks, owner=False), None
    if layer.needs_prefill:
        keys, values = layer.prompt()
        if sinks is None:
            out, _ = sdpa_attention_forward(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)
        else:  # SDPA has no sinks: the reference path, a block of query rows at a time
            out = ops.prefill_attention(query, keys, values, attention_mask, scaling, sinks)
        inputs = PrefillInputs.from_forward(keys, values, query, attention_mask, scaling, _prefill_rows(layer, cache))
        if isinstance(cache, PrefillCapture):
            cache.record(layer.layer_idx, inputs)
        layer.compress_prefill(inputs)
        return out, None
    return layer.attend(query, attention_mask, scaling, sinks), None
