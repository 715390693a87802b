"""The plain PyTorch reference every attention kernel is checked against, and the log-sum-exp merge.

A decode kernel returns, per split of the sequence, online-softmax partials `(m, l, acc)`:
`m [B, H, P, M]` the largest (scaled, biased) logit the split saw, `l [B, H, P, M]` the sum of
`exp(logit - m)`, `acc [B, H, P, M, Dv]` the unnormalised `sum exp(logit - m) * v`. A split that saw
only masked tokens has `m = -inf, l = 0, acc = 0`. `merge_partials` combines any number of such
partials (splits of one chunk, other chunks, the dense tail) into the attention output.

`reference_partials` is the one reference: in float64 it is what the tests compare kernels with, in
float32 it is the `torch` attention backend (`sparkkv.ops`). It reads keys and values through
`rebuild`: any stored chunk (`packed.Chunk`: its `dense()`) or a plain tensor.

Nothing here imports the cache or the attention module: kernels depend on `packed.py` only.
"""

from __future__ import annotations

import torch


def rebuild(x, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense `[B, H, S, D]` tensor a kernel sees, in `dtype`: a plain tensor converted, a stored
    chunk rebuilt with its pruned entries computed in float32 and not rounded to the storage dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return x.dense(torch.float64 if dtype == torch.float64 and x.dtype == torch.float64 else torch.float32).to(dtype)


def reference_partials(query_rows, keys, values, scaling: float, bias: torch.Tensor | None = None,
                       dtype=torch.float64, mask: torch.Tensor | None = None):
    """One-split partials `(m [B, H, 1, M], l [B, H, 1, M], acc [B, H, 1, M, Dv])` in `dtype`.

    query_rows `[B, H, M, D]`; keys / values: stored chunks or dense `[B, H, S, D | Dv]` tensors;
    bias `[B, 1 or H, S]` additive (-inf = masked), the same for every query row; or `mask`, bool
    broadcastable to `[B, H, M, S]` (True = attend), when rows differ.
    """
    k, v = rebuild(keys, dtype), rebuild(values, dtype)
    logits = torch.matmul(query_rows.to(dtype), k.transpose(-1, -2)) * scaling
    if bias is not None:
        logits = logits + bias.to(dtype).unsqueeze(2)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    m = logits.amax(-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # a row that sees nothing here
    p = torch.exp(logits - m_safe.unsqueeze(-1))
    return m.unsqueeze(2), p.sum(-1).unsqueeze(2), torch.matmul(p, v).unsqueeze(2)


def reference_attention(query_rows, keys, values, scaling: float, bias: torch.Tensor | None = None, dtype=torch.float64):
    """Softmax attention of `query_rows [B, H, M, D]` over one chunk -> `[B, H, M, Dv]` in `dtype`."""
    return merge_partials([reference_partials(query_rows, keys, values, scaling, bias, dtype)])


def merge_partials(parts) -> torch.Tensor:
    """Log-sum-exp merge of `(m, l, acc)` partials along their split axis (dim 2) -> `[B, H, M, Dv]`.

    Rows whose every partial is empty (all tokens masked) come out as zeros."""
    m = torch.cat([p[0] for p in parts], dim=2)
    l = torch.cat([p[1] for p in parts], dim=2)
    acc = torch.cat([p[2] for p in parts], dim=2)
    m_max = m.amax(dim=2, keepdim=True)
    m_max = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_max)  # splits that saw nothing have m = -inf -> weight 0
    return (acc * w.unsqueeze(-1)).sum(2) / (l * w).sum(2).clamp_min(1e-30).unsqueeze(-1)
