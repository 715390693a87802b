"""Per-layer statistics of a compressed cache, for researchers.

`SparKCache.layer_stats()` returns one dict per layer:
    attention_type        "full_attention", "sliding_attention" or "chunked_attention"
    window                sliding window / attention chunk size (None for full attention)
    prompt_tokens         prompt length seen at prefill
    kept_tokens           tokens stored per kv-head after prefill (after eviction / the window)
    stored_tokens         tokens stored now (blocks + dense tail)
    dense_tail_tokens     recent tokens not yet compressed
    kept_channels_mean    mean key channels stored per token of the blocks
    kept_channels_hist    {kept channels: number of (batch, head, token) rows} (variable-T selections)
    kept_channels_per_head  [B][H] mean kept channels of each head's stored tokens
    bytes                 bytes the layer's tensors hold
    dense_bytes           bytes transformers' DynamicCache would hold for this layer after the
                          same tokens (its sliding layers keep `window - 1` tokens)
    backend               {"requested", "served": {backend: parts}, "not_served": {reason: parts}}
"""

from __future__ import annotations

from collections import Counter

import torch


def layer_stats(layer) -> dict:
    """Statistics of one `SparKLayer` (see the module docstring)."""
    stats = {"attention_type": layer.spec.attention_type, "window": layer.spec.window, **layer.stats}
    stats.update(stored_tokens=layer.stored_tokens, dense_tail_tokens=layer.tail_len, bytes=layer.nbytes)
    counts = [c for c in (block.keys.kept_per_row() for block in layer.blocks) if c.numel()]
    if counts:
        per_row = torch.cat(counts, dim=-1)
        stats["kept_channels_mean"] = per_row.float().mean().item()
        stats["kept_channels_hist"] = dict(sorted(Counter(per_row.flatten().tolist()).items()))
        stats["kept_channels_per_head"] = per_row.float().mean(-1).tolist()
    if layer.is_initialized:
        ref = layer.blocks[0].keys if layer.blocks else layer.tail_keys
        if ref is not None:
            b, h, _, d = ref.shape
            element = torch.empty((), dtype=layer.dtype).element_size()
            stats["dense_bytes"] = 2 * b * h * layer.spec.dense_tokens(layer.seen) * d * element
    stats["backend"] = layer.backend_report.as_dict()
    return stats
