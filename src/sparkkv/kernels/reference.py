"""Plain PyTorch pieces shared by the kernels and the attention ops: the log-sum-exp merge of
online-softmax partials."""

from __future__ import annotations

import torch


def merge_partials(parts) -> torch.Tensor:
    """Merge `(m, l, acc)` partials along their split axis (dim 2): `m, l [B, H, P_i, M]`,
    `acc [B, H, P_i, M, Dv]` -> `[B, H, M, Dv]` float32. A split that saw nothing has m = -inf
    and weight 0; a row that saw nothing at all gets 0."""
    m = torch.cat([p[0] for p in parts], dim=2)
    l = torch.cat([p[1] for p in parts], dim=2)
    acc = torch.cat([p[2] for p in parts], dim=2)
    m_max = m.amax(dim=2, keepdim=True)
    m_max = torch.where(m_max == float("-inf"), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_max)
    return (acc * w.unsqueeze(-1)).sum(2) / (l * w).sum(2).clamp_min(1e-30).unsqueeze(-1)
