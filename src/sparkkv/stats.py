"""Per-layer and per-head statistics of a compressed cache, for researchers.

`SparKCache.layer_stats()` returns one dict per layer:
    prompt_tokens         prompt length seen at prefill
    kept_tokens           tokens stored per kv-head after eviction (prompt part)
    stored_tokens         tokens stored now (packed chunks + dense tail)
    dense_tail_tokens     generated tokens not yet compressed
    kept_channels_mean    mean kept key channels per stored, compressed token
    kept_channels_hist    {kept channels: number of (batch, head, token) rows} (variable-T selections)
    kept_channels_per_head  [B][H] mean kept channels of each head's compressed tokens
    bytes                 bytes the layer's tensors hold
    dense_bytes           bytes a dense bf16/fp32 cache of the same *logical* length would hold
"""

from __future__ import annotations

from collections import Counter

import torch

from .packed import ColumnPackedTensor, PackedTensor


def _kept_channels(chunk) -> torch.Tensor | None:
    if isinstance(chunk, PackedTensor):
        return chunk.kept_per_row()
    if isinstance(chunk, ColumnPackedTensor):
        b, h, s, _ = chunk.shape
        return torch.full((b, h, s), chunk.fixed_t, dtype=torch.int64, device=chunk.vals.device)
    if isinstance(chunk, torch.Tensor):
        b, h, s, d = chunk.shape
        return torch.full((b, h, s), d, dtype=torch.int64, device=chunk.device)
    return None


def layer_stats(layer) -> dict:
    """Statistics of one `SparKLayer` (see the module docstring)."""
    counts = [c for c in (_kept_channels(k) for k in layer.key_chunks) if c is not None and c.numel()]
    stats = dict(layer.stats)
    stats.update(
        stored_tokens=layer.stored_tokens,
        dense_tail_tokens=layer.tail_len,
        bytes=layer.nbytes,
    )
    if counts:
        per_row = torch.cat(counts, dim=-1)
        stats["kept_channels_mean"] = per_row.float().mean().item()
        stats["kept_channels_hist"] = dict(sorted(Counter(per_row.flatten().tolist()).items()))
        stats["kept_channels_per_head"] = per_row.float().mean(-1).tolist()
    if layer.is_initialized:
        ref = layer.key_chunks[0] if layer.key_chunks else layer.tail_keys
        if ref is not None:
            b, h, _, d = ref.shape
            element = torch.empty((), dtype=layer.dtype).element_size()
            stats["dense_bytes"] = 2 * b * h * layer.seen * d * element
    return stats
