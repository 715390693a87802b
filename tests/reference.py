"""Plain float64 references, written independently of the library (row by row, no packing)."""

from __future__ import annotations

import math

import torch


def ref_query_norm(window_queries: torch.Tensor, num_kv_heads: int, window_mask=None) -> torch.Tensor:
    b, hq, w, d = window_queries.shape
    g = hq // num_kv_heads
    q = window_queries.double()
    out = torch.zeros(b, num_kv_heads, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(num_kv_heads):
            pooled = sum(q[bi, h * g + j] for j in range(g)) / g  # [W, D]
            for wi in range(w):
                if window_mask is None or window_mask[bi, wi]:
                    out[bi, h] += pooled[wi] ** 2
    return out.sqrt()


def ref_saliency(keys, qn, form="squared"):
    k = keys.double()
    return (k * k if form == "squared" else k.abs()) * qn.double()[:, :, None, :]


def ref_keep_count(s_row: torch.Tensor, selection: str, ratio: float, top_p: float, mass: float) -> int:
    d = s_row.numel()
    if selection == "ratio":
        return d - int(math.floor(ratio * d + 1e-9))
    ordered = sorted(s_row.tolist(), reverse=True)
    total = sum(ordered)

    def count(p):
        acc = 0.0
        for i, v in enumerate(ordered):
            acc += v
            if acc >= p * total:
                return i + 1
        return d

    if selection == "top_p":
        return count(top_p)
    n99 = count(mass)
    for bound, keep in zip((0.2, 0.4, 0.6, 0.8), (0.1, 0.3, 0.5, 0.7)):
        if n99 <= math.floor(bound * d + 1e-9):
            return max(1, math.floor(keep * d + 1e-9))
    return math.floor(0.9 * d + 1e-9)


def ref_recovered_keys(keys, window_queries, *, ratio=0.5, form="squared", recovery="mean", constant=0.01,
                       selection="ratio", top_p=0.9, mass=0.99, window_mask=None):
    """Khat [B, H, S, D] float64 for the deterministic recoveries, plus the keep mask."""
    b, h, s, d = keys.shape
    qn = ref_query_norm(window_queries, h, window_mask)
    sal = ref_saliency(keys, qn, form)
    k = keys.double()
    out = torch.zeros_like(k)
    keep = torch.zeros(k.shape, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for t in range(s):
                row = sal[bi, hi, t]
                n_keep = ref_keep_count(row, selection, ratio, top_p, mass)
                order = sorted(range(d), key=lambda c: -row[c].item())
                kept = set(order[:n_keep])
                pruned = [c for c in range(d) if c not in kept]
                a = sum(row[c].item() for c in pruned) / len(pruned) if pruned else 0.0
                for c in range(d):
                    if c in kept:
                        out[bi, hi, t, c] = k[bi, hi, t, c]
                        keep[bi, hi, t, c] = True
                        continue
                    sign = 1.0 if k[bi, hi, t, c] > 0 else -1.0
                    q = qn[bi, hi, c].item()
                    if recovery == "zero" or (recovery == "mean" and q == 0):
                        val = 0.0
                    elif recovery == "constant":
                        val = sign * constant
                    elif form == "squared":
                        val = sign * math.sqrt(a / q)
                    else:
                        val = sign * a / q
                    out[bi, hi, t, c] = val
    return out, keep


def ref_attention(query, keys, values, mask, scaling):
    """query [B, Hq, q, D]; keys/values [B, Hkv, S, D]; mask bool [B, 1, q, S] or None -> [B, q, Hq, D]."""
    b, hq, q, d = query.shape
    g = hq // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2)


def ref_value_pruned(values, ratio):
    """Value pruning with mean fill, row by row in float64: (dense [B, H, S, D], keep mask, scores).

    score[t, c] = 0.7 |v| + 0.3 * diversity / max(diversity), diversity[t, c] = var over tokens of
    channel c + var over channels of token t (population variances); the floor(ratio * D) lowest
    scores of a token are pruned and become the token's mean pruned value."""
    b, h, s, d = values.shape
    v = values.double()
    p = int(math.floor(ratio * d + 1e-9))
    out = v.clone()
    keep = torch.ones(v.shape, dtype=torch.bool)
    scores = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            x = v[bi, hi]
            col_mean = [sum(x[t, c].item() for t in range(s)) / s for c in range(d)]
            var_seq = [sum((x[t, c].item() - col_mean[c]) ** 2 for t in range(s)) / s for c in range(d)]
            var_chan = []
            for t in range(s):
                m = sum(x[t].tolist()) / d
                var_chan.append(sum((e - m) ** 2 for e in x[t].tolist()) / d)
            div = [[var_seq[c] + var_chan[t] for c in range(d)] for t in range(s)]
            peak = max(max(row) for row in div)
            for t in range(s):
                for c in range(d):
                    scores[bi, hi, t, c] = 0.7 * abs(x[t, c].item()) + 0.3 * (div[t][c] / peak if peak > 0 else 0.0)
                pruned = sorted(range(d), key=lambda c: scores[bi, hi, t, c].item())[:p]
                if pruned:
                    fill = sum(x[t, c].item() for c in pruned) / len(pruned)
                    for c in pruned:
                        out[bi, hi, t, c] = fill
                        keep[bi, hi, t, c] = False
    return out, keep, scores
