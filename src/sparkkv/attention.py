"""Attention over the packed cache, and the `"sparkkv"` attention function for transformers.

The model calls `cache.update(k, v, layer_idx)` and then the registered attention function with
whatever `update` returned. A `SparKCache` returns a `CacheHandle` (never a tensor), so the
function below can reach the layer: at the end of prefill it runs ordinary dense attention and
lets the layer compress; afterwards it attends over the packed prefix plus the dense tail.
With any other cache (or none), the function is plain SDPA.

CPU/PyTorch path: each packed chunk is rebuilt to dense keys transiently (one chunk at a time)
and attention is `matmul -> softmax -> matmul` over the GQA groups. Nothing dense is kept.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .packed import ColumnPackedTensor, PackedTensor

_MISUSE = (
    "a SparKCache was used by an attention function other than 'sparkkv'. Load the model with "
    "attn_implementation='sparkkv' (after `import sparkkv`), e.g. "
    "AutoModelForCausalLM.from_pretrained(path, attn_implementation='sparkkv') or "
    "model.set_attn_implementation('sparkkv'). Models whose attention does not go through "
    "transformers' AttentionInterface cannot use a SparKCache."
)


class CacheHandle:
    """What `SparKCache.update` returns in place of key/value tensors.

    Only the `"sparkkv"` attention function knows what to do with it; any other code that
    treats it as a tensor gets a `TypeError` explaining how to load the model.
    """

    __slots__ = ("layer",)

    def __init__(self, layer) -> None:
        self.layer = layer

    def __getattr__(self, name):
        raise TypeError(f"{_MISUSE} (attribute {name!r} was requested from the cache handle)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{_MISUSE} (torch function {getattr(func, '__name__', func)} got a cache handle)")

    def __repr__(self) -> str:
        return f"CacheHandle(layer={self.layer.layer_idx})"


def chunk_logits(query_rows: torch.Tensor, keys) -> torch.Tensor:
    """`query_rows [B, H, M, D] @ keys^T` -> `[B, H, M, S]` for any key storage.

    dense tensor: one matmul. ThinK columns: gather the query's kept channels, then a matmul over
    T channels only. SparK-packed: the fused CPU kernel when it applies (float32 logits), else
    the keys are rebuilt densely for this one chunk and dropped right after.
    """
    if isinstance(keys, torch.Tensor):
        return torch.matmul(query_rows, keys.transpose(-1, -2))
    if isinstance(keys, ColumnPackedTensor):
        b, h, m, _ = query_rows.shape
        idx = keys.idx.long().unsqueeze(2).expand(b, h, m, keys.fixed_t)
        return torch.matmul(query_rows.gather(-1, idx), keys.vals.transpose(-1, -2))
    if isinstance(keys, PackedTensor) and keys.vals.device.type == "cpu":
        from .kernels.cpu import packed_qk

        out = packed_qk(query_rows, keys)
        if out is not None:
            return out
    return torch.matmul(query_rows, keys.dense().transpose(-1, -2))


def _dense(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.dense()


def grouped_attention(query: torch.Tensor, chunks: list, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of `query [B, Hq, q, D]` over `(keys, values)` chunks of `S_i` tokens each.

    Keys and values may be dense `[B, Hkv, S_i, D]` tensors or packed (`PackedTensor`,
    `ColumnPackedTensor`); packed ones are read through `chunk_logits` / rebuilt one chunk at a
    time. `mask`: None, a bool mask (True = attend) or an additive float mask, broadcastable to
    `[B, Hkv or 1, q, sum S_i]`. The GQA group of every kv-head is handled as extra query rows,
    so keys are never repeated. Softmax in float32. Returns `[B, q, Hq, Dv]`.
    """
    b, hq, q, d = query.shape
    h = chunks[0][0].shape[1]
    g = hq // h
    qg = query.reshape(b, h, g * q, d)
    logits = torch.cat([chunk_logits(qg, k).float() for k, _ in chunks], dim=-1)
    s_total = logits.shape[-1]
    logits = logits.mul_(scaling).view(b, h, g, q, s_total)
    if mask is not None:
        mask = mask.unsqueeze(2)  # [B, H or 1, 1, q, S]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            logits = logits + mask.float()
    probs = logits.softmax(dim=-1).view(b, h, g * q, s_total)
    out = None
    start = 0
    for _, v in chunks:
        v = _dense(v)
        stop = start + v.shape[2]
        part = torch.matmul(probs[..., start:stop].to(v.dtype), v)
        out = part if out is None else out + part
        start = stop
    dv = out.shape[-1]
    return out.view(b, h, g, q, dv).reshape(b, hq, q, dv).transpose(1, 2)


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
    if isinstance(key, CacheHandle):
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if dropout:
            raise ValueError("sparkkv attention does not support attention dropout (it is an inference cache)")
        return key.layer.attend(module, query, attention_mask, scaling, **kwargs), None
    # No SparK cache: behave exactly like SDPA (training, DynamicCache, no cache).
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
