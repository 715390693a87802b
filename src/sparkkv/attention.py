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

import os

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .compat import check_attention_call
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
    if q == 1 and _use_triton(query, chunks):
        return _triton_decode(qg, chunks, mask, scaling).view(b, hq, 1, -1).transpose(1, 2)
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


def _use_triton(query: torch.Tensor, chunks: list) -> bool:
    """Opt-in (SPARKKV_TRITON=1) until the kernel has been validated on a GPU; CPU only under the
    Triton interpreter (TRITON_INTERPRET=1), which is how the tests run it."""
    if os.environ.get("SPARKKV_TRITON") != "1":
        return False
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from .kernels import triton_decode

    return any(
        isinstance(k, PackedTensor) and isinstance(v, torch.Tensor) and triton_decode.supports(k, v) for k, v in chunks
    )


def _triton_decode(qg: torch.Tensor, chunks: list, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Decode step: per-chunk online-softmax partials (Triton for packed chunks, PyTorch for the
    rest), merged by log-sum-exp. qg `[B, H, G, D]` -> `[B, H, G, Dv]`."""
    from .kernels import triton_decode

    bias = None
    if mask is not None:  # [B, H or 1, 1, S] -> additive [B, H, S]
        m = mask[:, :, 0, :]
        bias = torch.where(m, 0.0, float("-inf")) if m.dtype == torch.bool else m.float()
        bias = bias.expand(qg.shape[0], qg.shape[1], -1)
    parts, start = [], 0
    for k, v in chunks:
        length = k.shape[2]
        chunk_bias = None if bias is None else bias[..., start : start + length].contiguous()
        start += length
        if isinstance(k, PackedTensor) and isinstance(v, torch.Tensor) and triton_decode.supports(k, v):
            parts.append(triton_decode.packed_decode_partials(qg, k, v, scaling, chunk_bias))
        else:
            keys = k if isinstance(k, torch.Tensor) else (k.dense() if isinstance(k, PackedTensor) else k.dense())
            parts.append(triton_decode.dense_partials(qg, keys, _dense(v), scaling, chunk_bias))
    return triton_decode.merge_partials(parts).to(qg.dtype)


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
        check_attention_call(module, query, attention_mask, dropout, kwargs)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return key.layer.attend(module, query, attention_mask, scaling, **kwargs), None
    # No SparK cache: behave exactly like SDPA (training, DynamicCache, no cache).
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
