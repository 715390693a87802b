"""The transformers integration: the `"sparkkv"` attention function.

The model calls `cache.update(k, v, layer_idx)`, then the registered attention function with
whatever `update` returned. A `SparKCache` returns a `CacheHandle` (never a tensor): this forward's
view of the layer (cache.py). The function only reads it:

  prefill forward  (`handle.prompt` holds the dense prompt) ordinary dense attention over the
                   prompt (transformers' SDPA), then `layer.compress_prefill(...)` with the model's
                   own query states;
  later forwards   attention over the snapshot of stored blocks (`handle.attend`, sparkkv.ops).

With any other cache (or none) the function is exactly SDPA, so one loaded model serves both
the dense reference and the compressed runs.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import masks, ops
from .cache import CacheHandle, PrefillInputs
from .compat import check_attention_call, check_config
from .policies import packs_bits


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
        attention_mask = masks.first_columns(attention_mask, key.shape[-2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    handle = key
    attention_mask = masks.first_columns(attention_mask, handle.seen)  # every path below reads `seen` tokens
    sinks = kwargs.pop("s_aux", None)  # attention sinks (GPT-OSS): one logit per query head
    check_attention_call(module, query, attention_mask, dropout, kwargs, packs_bits(handle.layer.config))  # refuse what we do not implement
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    cache = handle.cache
    if cache is not None and cache.specs is None and hasattr(module, "config"):
        check_config(module.config, module)  # the mask hook has done this unless the model builds masks without it
        cache.bind(module.config)
    if handle.prompt is None:
        return handle.attend(query, attention_mask, scaling, sinks), None
    keys, values = handle.prompt
    if sinks is None:
        out, _ = sdpa_attention_forward(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)
    else:  # SDPA has no sinks: the reference path, a block of query rows at a time
        out = ops.prefill_attention(query, keys, values, attention_mask, scaling, sinks)
    # KV sharing (Gemma 3n): a later layer reads this layer's handle; only the owner compresses
    layer = handle.layer
    if getattr(module, "layer_idx", layer.layer_idx) == layer.layer_idx:
        layer.compress_prefill(PrefillInputs.from_forward(keys, values, query, attention_mask, scaling, layer.prefill_rows))
    return out, None
