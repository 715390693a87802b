"""Token eviction at the end of prefill (method.md section 7), applied before channel pruning.

    snapkv        score older prompt tokens by the softmax attention of the last
                  `eviction_window` queries, averaged over the window, 1-D average-pooled
                  (kernel `pool_kernel`), averaged over the GQA group; keep the top
                  `budget - window` older tokens plus the whole window.
    pyramidkv     SnapKV scores, per-layer budgets shrinking linearly with depth (`pyramid_beta`),
                  summing to the same total as a uniform budget.
    streamingllm  the first `sink_tokens` tokens plus the most recent ones.

Every (batch, kv-head) keeps the same number of tokens; which tokens differs per head.
Kept tokens stay in their original order and their logical positions are returned, so the
cache can look masks up by position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SparKConfig


def resolve_budget(config: SparKConfig, prompt_len: int, layer_idx: int, num_layers: int | None) -> int:
    """Tokens this layer keeps (per kv-head), window included. Raises on impossible budgets."""
    budget = config.token_budget
    if isinstance(budget, float):
        tokens = int(math.floor(budget * prompt_len))
        what = f"token_budget={budget} of a {prompt_len}-token prompt ({tokens} tokens)"
    else:
        tokens = int(budget)
        what = f"token_budget={budget}"
    if tokens > prompt_len:
        raise ValueError(f"{what} is larger than the prompt ({prompt_len} tokens); use at most {prompt_len}")
    if config.eviction in ("snapkv", "pyramidkv") and tokens < config.eviction_window:
        raise ValueError(
            f"{what} is smaller than eviction_window={config.eviction_window}; SnapKV/PyramidKV keep the whole window"
        )
    if config.eviction == "streamingllm" and tokens <= config.sink_tokens:
        raise ValueError(f"{what} must exceed sink_tokens={config.sink_tokens}")
    if config.eviction == "pyramidkv":
        if num_layers is None:
            raise ValueError("pyramidkv needs the model's num_hidden_layers (module.config is missing)")
        return pyramid_budget(tokens, prompt_len, config.eviction_window, config.pyramid_beta, layer_idx, num_layers)
    return tokens


def pyramid_budget(budget: int, prompt_len: int, window: int, beta: float, layer_idx: int, num_layers: int) -> int:
    """PyramidKV's per-layer budget (window included): the non-window budget `m = budget - window`
    goes linearly from `2m - m/beta` at layer 0 to `m/beta` at the last layer (capped at the
    prompt), so the layers' average is `m`."""
    m = budget - window
    low = m / beta
    high = 2 * m - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * m - high
    if num_layers == 1:
        return budget
    step = (high - low) / (num_layers - 1)
    return int(round(high - layer_idx * step)) + window


def snapkv_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    window: int,
    kernel: int,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV importance of the older prompt tokens: float32 `[B, Hkv, S - window]`.

    query `[B, Hq, S, D]` (prompt queries), keys `[B, Hkv, S, D]`, mask: the prefill mask
    (`[B, 1, S, S]` bool or additive) or None for plain causal.
    """
    b, hq, s, d = query.shape
    h = keys.shape[1]
    g = hq // h
    qw = query[:, :, -window:].float().reshape(b, h, g * window, d)
    logits = torch.matmul(qw, keys.float().transpose(-1, -2)).mul_(scaling).view(b, h, g, window, s)
    if mask is None:
        q_pos = torch.arange(s - window, s, device=keys.device)
        allowed = torch.arange(s, device=keys.device).view(1, s) <= q_pos.view(window, 1)
    else:
        rows = mask[:, :, -window:, :]
        allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        allowed = allowed.unsqueeze(2)  # [B, 1, 1, W, S]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
    scores = probs[..., : s - window].mean(dim=-2)  # [B, H, G, S - W]
    scores = F.avg_pool1d(scores.reshape(b * h * g, 1, s - window), kernel, stride=1, padding=kernel // 2)
    return scores.view(b, h, g, s - window).mean(dim=2)


def evict_tokens(
    config: SparKConfig,
    keys: torch.Tensor,
    values: torch.Tensor,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    budget: int,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep `budget` tokens per (batch, kv-head). Returns compact `(keys, values, positions)`,
    positions int64 `[B, Hkv, budget]` ascending. `key_valid [B, S]` marks non-padding tokens
    (padding is evicted first)."""
    b, h, s, d = keys.shape
    if budget >= s:
        positions = torch.arange(s, device=keys.device).expand(b, h, s)
        return keys, values, positions
    if config.eviction == "streamingllm":
        sink = config.sink_tokens
        keep = torch.cat([torch.arange(sink), torch.arange(s - (budget - sink), s)]).to(keys.device)
        positions = keep.expand(b, h, budget)
    else:
        window = config.eviction_window
        scores = snapkv_scores(query, keys, window, config.pool_kernel, scaling, mask)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, : s - window], float("-inf"))
        older = scores.topk(budget - window, dim=-1).indices
        window_pos = torch.arange(s - window, s, device=keys.device).expand(b, h, window)
        positions = torch.cat([older, window_pos], dim=-1).sort(dim=-1).values
    index = positions.unsqueeze(-1).expand(b, h, budget, d)
    return keys.gather(2, index), values.gather(2, positions.unsqueeze(-1).expand(b, h, budget, values.shape[-1])), positions
