"""Token eviction at the end of prefill (docs/method.md section 7), applied before channel pruning.

Each policy marks the prompt tokens it keeps (`keep`: a bool mask and a priority), and one shared
step turns that into stored slots (`select`):

    SnapKV        score older prompt tokens by the softmax attention of the last
                  `eviction_window` queries, averaged over the window, 1-D average-pooled
                  (kernel `pool_kernel`), averaged over the GQA group; keep the top
                  `budget - window` older tokens plus the whole window.
    PyramidKV     SnapKV scores, per-layer budgets shrinking linearly with depth (`pyramid_beta`),
                  summing to the same total as a uniform budget.
    StreamingLLM  the first `sink_tokens` tokens plus the most recent ones.

Padding: every row is treated as if it were alone. Its budget comes from its own length (a
fractional budget is a fraction of the row's real tokens; a budget at or above the row's length
keeps the whole row), padding is never kept in place of a real token, and StreamingLLM's sinks are
the row's first real tokens. Rows of one batch must store the same number of tokens, so a row
whose budget is smaller than the batch's largest fills the difference with filler slots at
logical position -1, which every mask hides.

Every (batch, kv-head) then keeps the same number of tokens; which tokens differs per head.
Kept tokens stay in their original order and their logical positions are returned, so the
cache can look masks up by position.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from . import masks
from .config import SparKConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------
def resolve_budgets(
    config: SparKConfig,
    prompt_len: int,
    valid: torch.Tensor | None = None,
    layer_index: int | None = None,
    num_layers: int | None = None,
) -> torch.Tensor:
    """Tokens each batch row keeps in this layer (per kv-head), window included: int64 `[B]`
    (`[1]` without a padding mask). `valid [B, S]` marks real tokens; `layer_index` /
    `num_layers` place the layer among the full-attention layers (PyramidKV).

    A budget at or above a row's length keeps the row. A fractional budget that comes to fewer
    tokens than the policy always keeps (SnapKV's window, StreamingLLM's sinks + 1: a short prompt,
    a chat server's "Hi") keeps that minimum, which is the whole prompt when the prompt is no
    longer (logged at debug level); an int budget that small is refused by `SparKConfig`."""
    lengths = [prompt_len] if valid is None else [int(n) for n in valid.sum(-1).tolist()]
    policy = EVICTIONS[config.eviction]
    budget = config.token_budget
    out = []
    for length in lengths:
        tokens = int(math.floor(budget * length)) if isinstance(budget, float) else int(budget)
        if tokens >= length:
            out.append(length)  # nothing to evict
            continue
        if tokens < config.min_budget_tokens:
            if not isinstance(budget, float):
                raise ValueError(f"token_budget={budget} {config.budget_floor_reason()}")
            log.debug("token_budget=%s of a %d-token prompt is %d tokens, fewer than %s always keeps: keeping %d",
                      budget, length, tokens, config.eviction, min(config.min_budget_tokens, length))
            tokens = config.min_budget_tokens
            if tokens >= length:
                out.append(length)
                continue
        out.append(min(policy.layer_budget(config, tokens, length, layer_index, num_layers), length))
    return torch.tensor(out, dtype=torch.int64)


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


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def snapkv_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    window: int,
    kernel: int,
    scaling: float,
    mask: torch.Tensor | None = None,
    window_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV importance of the older prompt tokens: float32 `[B, Hkv, S - window]`.

    query `[B, Hq, n >= window, D]` (the last prompt queries), keys `[B, Hkv, S, D]`, mask: the
    prefill mask's rows for those queries (`[B, 1, n, S]` bool or additive) or None for plain
    causal; `window_valid [B, window]` drops query rows (padding, non-finite) from the scores.
    """
    b, hq = query.shape[:2]
    s, d = keys.shape[2], keys.shape[3]
    h = keys.shape[1]
    g = hq // h
    qw = query[:, :, -window:].float().reshape(b, h, g * window, d)
    logits = torch.matmul(qw, keys.float().transpose(-1, -2)).mul_(scaling).view(b, h, g, window, s)
    rows = None if mask is None else mask[:, :, -window:, :]
    allowed = masks.causal_rows(rows, torch.arange(s - window, s, device=keys.device), s)
    if rows is not None:
        allowed = allowed.unsqueeze(2)  # [B, 1, 1, W, S]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
    if window_valid is not None:
        probs = probs * window_valid.to(probs.dtype).view(b, 1, 1, window, 1)
    scores = probs[..., : s - window].mean(dim=-2)  # [B, H, G, S - W]
    scores = F.avg_pool1d(scores.reshape(b * h * g, 1, s - window), kernel, stride=1, padding=kernel // 2)
    return scores.view(b, h, g, s - window).mean(dim=2)


# ---------------------------------------------------------------------------------------------
# policies
# ---------------------------------------------------------------------------------------------
class StreamingLLM:
    """The row's first `sink_tokens` real tokens plus its most recent ones."""

    def layer_budget(self, config, tokens, length, layer_index, num_layers) -> int:
        return tokens

    def keep(self, config, keys, query, mask_rows, budgets, scaling, real, window_valid):
        """`(kept [B, H, S] bool, priority [B, H, S])`: the tokens kept, and which to prefer."""
        b, h = keys.shape[:2]
        order = real.long().cumsum(-1) - 1  # index of each real token among the row's real tokens
        length = real.sum(-1, keepdim=True)
        recent = (budgets - config.sink_tokens).unsqueeze(-1)
        kept = (real & ((order < config.sink_tokens) | (order >= length - recent))).unsqueeze(1).expand(b, h, -1)
        return kept, kept.float()


class SnapKV:
    """The observation window's attention decides which older tokens stay; the window always stays."""

    def layer_budget(self, config, tokens, length, layer_index, num_layers) -> int:
        return tokens

    def keep(self, config, keys, query, mask_rows, budgets, scaling, real, window_valid):
        b, h, s, _ = keys.shape
        window = config.eviction_window
        older = s - window
        if window_valid is not None and window_valid.shape[-1] > window:
            window_valid = window_valid[:, -window:]
        scores = snapkv_scores(query, keys, window, config.pool_kernel, scaling, mask_rows, window_valid)
        real_older = real[:, None, :older].expand(b, h, older)
        scores = scores.masked_fill(~real_older, float("-inf"))
        rank = torch.empty_like(scores, dtype=torch.int64)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank.scatter_(-1, order, torch.arange(older, device=keys.device).expand(b, h, older))
        kept_older = real_older & (rank < (budgets - window).view(b, 1, 1))
        in_window = torch.ones(b, h, window, dtype=torch.bool, device=keys.device)
        # the window outranks every older token; among older tokens, the better score first
        priority = torch.cat([(older - rank).float(), torch.full((b, h, window), float(older + 1), device=keys.device)], -1)
        return torch.cat([kept_older, in_window], dim=-1), priority


class PyramidKV(SnapKV):
    """SnapKV with per-layer budgets that shrink linearly with depth."""

    def layer_budget(self, config, tokens, length, layer_index, num_layers) -> int:
        if layer_index is None or num_layers is None:
            raise ValueError("pyramidkv needs the layer's depth: build the cache with model_config= or run it inside a model")
        return pyramid_budget(tokens, length, config.eviction_window, config.pyramid_beta, layer_index, num_layers)


EVICTIONS = {"snapkv": SnapKV(), "pyramidkv": PyramidKV(), "streamingllm": StreamingLLM()}


# ---------------------------------------------------------------------------------------------
# the shared step
# ---------------------------------------------------------------------------------------------
def select(kept: torch.Tensor, priority: torch.Tensor, slots: int) -> torch.Tensor:
    """Positions of the `slots` highest-priority tokens of every row, where `kept` marks the
    tokens the policy keeps (at most `slots` per row); the other picks are fillers, returned as
    position -1 (masked everywhere). `[..., S]` -> int64 `[..., slots]`, ascending."""
    priority = torch.where(kept, priority, torch.full_like(priority, -1.0))
    picked = priority.topk(slots, dim=-1).indices
    positions = torch.where(kept.gather(-1, picked), picked, torch.full_like(picked, -1))
    return positions.sort(dim=-1).values


def evict_tokens(
    config: SparKConfig,
    keys: torch.Tensor,
    values: torch.Tensor,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    budgets: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    window_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep `max(budgets)` slots per (batch, kv-head): row b keeps `budgets[b]` real tokens (see
    the module docstring); a row with a smaller budget fills its other slots with filler tokens
    at position -1, which every mask hides. Returns compact `(keys, values, positions)`,
    positions int64 `[B, Hkv, K]` ascending. `valid [B, S]` marks non-padding tokens;
    `window_valid [B, n]` the last query rows that may score (SnapKV)."""
    b, h, s, d = keys.shape
    device = keys.device
    budgets = budgets.to(device).expand(b)
    slots = int(budgets.max())
    if slots >= s and bool((budgets == s).all()):
        positions = torch.arange(s, device=device).expand(b, h, s)
        return keys, values, positions
    real = torch.ones(b, s, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    kept, priority = EVICTIONS[config.eviction].keep(config, keys, query, mask, budgets, scaling, real, window_valid)
    positions = select(kept, priority, slots)
    index = positions.clamp_min(0).unsqueeze(-1)
    kept_keys = keys.gather(2, index.expand(b, h, slots, d))
    kept_values = values.gather(2, index.expand(b, h, slots, values.shape[-1]))
    return kept_keys, kept_values, positions


def evict(config: SparKConfig, inputs, rows_valid: torch.Tensor, layer_index: int | None, num_layers: int | None):
    """The prompt a full-attention layer keeps: `(keys, values, positions or None, token_mask or None)`.

    `inputs`: the layer's `PrefillInputs`; `rows_valid [B, n]`: which recorded query rows may score.
    `positions` int32 `[B, Hkv, K]` (None when nothing was evicted); `token_mask`: bool marking the
    real tokens of what is kept (`[B, Hkv, K]`, or the prompt's `[B, S]`; None without padding)."""
    keys, values, query, valid = inputs.keys, inputs.values, inputs.queries, inputs.valid
    b, h, s, _ = keys.shape
    if query.shape[2] < min(config.eviction_window, s):
        raise ValueError(f"eviction_window={config.eviction_window} needs more prefill queries than were recorded ({query.shape[2]})")
    budget = resolve_budgets(config, s, valid, layer_index, num_layers)
    keys, values, positions = evict_tokens(config, keys, values, query, inputs.mask_rows, budget, inputs.scaling, valid, rows_valid)
    if positions.shape[-1] == s and bool((positions == torch.arange(s, device=positions.device)).all()):
        return keys, values, None, valid  # nothing evicted
    real = torch.ones(b, s, dtype=torch.bool, device=keys.device) if valid is None else valid
    p = positions.long()
    token_mask = real.unsqueeze(1).expand(b, h, s).gather(-1, p.clamp_min(0)) & (p >= 0)
    return keys, values, positions.to(torch.int32), token_mask
