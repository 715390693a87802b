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

def _prefill_rows(layer, cache) -> int:
    """How many of the last prompt queries compression reads."""
    if isinstance(cache, PrefillCapture):
        return cache.max_queries
    config = layer.config
    return max(config.window_size, config.eviction_window if config.eviction else 0)


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
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer, cache = key.layer, key.cache
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if dropout:
        raise ValueError("sparkkv attention does not support attention dropout (it is an inference cache)")
    if cache is not None and cache.specs is None and hasattr(module, "config"):
        cache.bind(module.config)
    sinks = kwargs.pop("s_aux", None)
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
