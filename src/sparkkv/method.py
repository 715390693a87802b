"""SparK, the method, in one place: saliency -> select -> recover -> pack.

Shapes (docs/method.md section 2): keys `K [B, Hkv, S, D]` after RoPE (and any key norm), window
queries `Qw [B, Hq, W, D]` after RoPE and the model's own query norm, `Hq = G * Hkv`.
Arithmetic runs in float32 whatever the model dtype; only the packed values keep it.

    qn   = window_query_norm(Qw, Hkv)           # [B, Hkv, D]   ||mean_G(Qw)[:, c]||_2 over the window
    s    = saliency(K, qn)                      # [B, Hkv, S, D] K^2 * qn   (or |K| * qn)
    keep = select_channels(s, config)           # [B, Hkv, S, D] bool, per token
    rec  = recover(K, s, keep, qn, config)      # what the pruned entries become
    out  = PackedTensor.from_dense(K, keep, ...)  # kept values + bit masks + one scalar per token

`compress_keys` runs the four steps. `compress_values` is the optional value pruning
(section 6) and `think_keep_mask` the structured ThinK baseline's channel choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SparKConfig, pruned_count
from .packed import PackedTensor, scale_dtype


# ---------------------------------------------------------------------------------------------
# 1. saliency
# ---------------------------------------------------------------------------------------------
def window_query_norm(
    window_queries: torch.Tensor, num_kv_heads: int, window_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-channel query norm over the window, GQA-pooled: `[B, Hq, W, D]` -> float32 `[B, Hkv, D]`.

    The query vectors of a GQA group are averaged first (not their norms), then the L2 norm
    over the window is taken per channel. `window_mask [B, W]` (bool) drops padded queries.
    Pooled in float64 (float32 on MPS, which has none): the group mean can cancel, and a small
    norm sets a large recovered value (`1/sqrt(qn)`); the tensor is tiny, so this costs nothing.
    """
    if window_queries.dim() != 4:
        raise ValueError(f"window_queries must be [B, Hq, W, D], got shape {tuple(window_queries.shape)}")
    b, hq, w, d = window_queries.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({num_kv_heads})")
    wide = torch.float32 if window_queries.device.type == "mps" else torch.float64
    pooled = window_queries.to(wide).reshape(b, num_kv_heads, hq // num_kv_heads, w, d).mean(dim=2)
    if window_mask is not None:  # where(), not a product: a dropped row may hold NaN/inf
        keep = window_mask.to(pooled.device, torch.bool).reshape(b, 1, w, 1)
        pooled = torch.where(keep, pooled, torch.zeros_like(pooled))
    return pooled.norm(dim=2).float()


def saliency(keys: torch.Tensor, qn: torch.Tensor, form: str = "squared") -> torch.Tensor:
    """Per-token, per-channel saliency: `K^2 * qn` ("squared", the released code) or `|K| * qn`
    ("paper"). keys `[B, Hkv, S, D]`, qn `[B, Hkv, D]` -> float32 `[B, Hkv, S, D]`."""
    k = keys.float()
    magnitude = k * k if form == "squared" else k.abs()
    return magnitude * qn.float().unsqueeze(2)


# ---------------------------------------------------------------------------------------------
# 2. selection
# ---------------------------------------------------------------------------------------------
def _mask_from_counts(s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the `counts[b, h, t]` most salient channels of every row."""
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank_keep = torch.arange(s.shape[-1], device=s.device) < counts.unsqueeze(-1)
    return torch.zeros_like(rank_keep).scatter_(-1, order, rank_keep)


def _mass_count(s: torch.Tensor, mass: float) -> torch.Tensor:
    """Smallest number of top channels whose saliency reaches `mass` of the row total (>= 1)."""
    sorted_s = s.sort(dim=-1, descending=True).values
    cum = sorted_s.cumsum(-1)
    target = cum[..., -1:] * mass
    below = (cum < target * (1 - 1e-6)).sum(-1)  # tolerance: cum of a float32 row can miss its own total
    return (below + 1).clamp(max=s.shape[-1])


GROUPED_BOUNDS = (0.2, 0.4, 0.6, 0.8)
GROUPED_KEEP = (0.1, 0.3, 0.5, 0.7, 0.9)


def _select_ratio(s: torch.Tensor, config: SparKConfig) -> torch.Tensor:
    """The `T = D - floor(lam * D)` most salient channels of each token."""
    d = s.shape[-1]
    t = d - pruned_count(config.key_prune_ratio, d)
    if t == d:
        return torch.ones_like(s, dtype=torch.bool)
    # stable: among equal saliencies the lower channel is kept (the fused kernel's rule too)
    idx = s.argsort(dim=-1, descending=True, stable=True)[..., :t]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def _select_top_p(s: torch.Tensor, config: SparKConfig) -> torch.Tensor:
    """Channels in descending saliency until their sum reaches `top_p` of the token's total."""
    return _mask_from_counts(s, _mass_count(s, config.top_p))


def _select_grouped(s: torch.Tensor, config: SparKConfig) -> torch.Tensor:
    """Bucket tokens by `n99` (channels holding `grouped_mass` of the saliency) and keep
    floor(0.1, 0.3, 0.5, 0.7, 0.9 * D) channels for n99 <= 0.2D, 0.4D, 0.6D, 0.8D, above."""
    d = s.shape[-1]
    n99 = _mass_count(s, config.grouped_mass)
    bounds = torch.tensor([pruned_count(f, d) for f in GROUPED_BOUNDS], device=s.device)
    keep_sizes = torch.tensor([max(1, pruned_count(f, d)) for f in GROUPED_KEEP], device=s.device)
    bucket = torch.bucketize(n99, bounds, right=False)  # n99 <= 0.2D -> 0, ..., > 0.8D -> 4
    return _mask_from_counts(s, keep_sizes[bucket])


# `SparKConfig.selection` -> the rule (names: config.SELECTIONS)
SELECTORS = {"ratio": _select_ratio, "top_p": _select_top_p, "grouped": _select_grouped}


def select_channels(s: torch.Tensor, config: SparKConfig) -> torch.Tensor:
    """Which channels every token keeps: float `[B, H, S, D]` -> bool `[B, H, S, D]`, by
    `config.selection` ("ratio", "top_p", "grouped"; see `SELECTORS`)."""
    return SELECTORS[config.selection](s, config)


# ---------------------------------------------------------------------------------------------
# 3. recovery
# ---------------------------------------------------------------------------------------------
@dataclass
class Recovery:
    """What the pruned entries become, in the packed fields' terms (see `packed.py`)."""

    sign: torch.Tensor | None = None  # bool [B, H, S, D], True = positive
    scale: torch.Tensor | None = None  # [B, H, S]
    chan: torch.Tensor | None = None  # [B, H, D]
    fill: torch.Tensor | None = None  # [B, H, S, D] explicit values (sampled recoveries)


def inverse_saliency_factor(qn: torch.Tensor, form: str) -> torch.Tensor:
    """`chan[c]` such that `sign * scale_t * chan[c]` has saliency `scale_t^2` (squared) or
    `scale_t` (paper): `1/sqrt(qn)` or `1/qn`; 0 where `qn == 0`, so that a channel no window
    query uses recovers to 0 instead of inf/NaN."""
    qn = qn.float()
    inv = qn.rsqrt() if form == "squared" else qn.reciprocal()
    return torch.where(qn > 0, inv, torch.zeros_like(inv))


def _magnitude_from_saliency(w: torch.Tensor, qn: torch.Tensor, form: str) -> torch.Tensor:
    """Key magnitude whose saliency is `w` on each channel."""
    chan = inverse_saliency_factor(qn, form).unsqueeze(2)
    return (w.clamp_min(0).sqrt() if form == "squared" else w) * chan


class DeterministicRecovery:
    """A recovery that is a function of the token's mean pruned saliency `a_t` (or of nothing):
    the PyTorch pipeline and the fused kernel share it (`fields` maps `a_t` to the stored fields)."""

    fused = True  # the fused compression kernel serves it

    def __init__(self, sign: bool, fields) -> None:
        self.sign = sign  # whether pruned entries keep their sign bit
        self.fields = fields  # (mean [B, H, S] float32, qn [B, H, D], config) -> (scale or None, chan or None)

    def __call__(self, keys, s, keep, qn, config, generator=None) -> Recovery:
        pruned = ~keep
        mean = (s * pruned).sum(-1) / pruned.sum(-1).clamp_min(1)
        scale, chan = self.fields(mean, qn, config)
        return Recovery(sign=keys > 0 if self.sign else None, scale=scale, chan=chan)


class SampledRecovery:
    """Seeded draws per pruned entry (ablations): explicit values, no fused kernel."""

    fused = False

    def __call__(self, keys, s, keep, qn, config, generator=None) -> Recovery:
        return Recovery(fill=_sampled_fill(keys, s, keep, qn, config, generator))


def _mean_fields(mean, qn, config):
    scale = mean.sqrt() if config.saliency == "squared" else mean
    return scale, inverse_saliency_factor(qn, config.saliency)


def _constant_fields(mean, qn, config):
    return None, torch.full(qn.shape, float(config.recovery_constant), device=qn.device)


# `SparKConfig.recovery` -> the rule (names: config.RECOVERIES)
RECOVERY_RULES = {
    "mean": DeterministicRecovery(sign=True, fields=_mean_fields),
    "zero": DeterministicRecovery(sign=False, fields=lambda mean, qn, config: (None, None)),
    "constant": DeterministicRecovery(sign=True, fields=_constant_fields),
    "exponential": SampledRecovery(),
    "normal": SampledRecovery(),
}


def recovery_channel_factor(qn: torch.Tensor, config: SparKConfig) -> torch.Tensor | None:
    """The per-channel factor `chan [B, Hkv, D]` that `compress_keys` stores for these query norms
    `qn [B, Hkv, D]` (mean recovery: `1/sqrt(qn)`; constant: the constant), or None (zero and the
    sampled recoveries store none): what a store that keeps `qn` per page needs to rebuild keys."""
    rule = RECOVERY_RULES[config.recovery]
    if not isinstance(rule, DeterministicRecovery):
        return None
    return rule.fields(torch.zeros(qn.shape[:2], device=qn.device), qn.float(), config)[1]


def recover(
    keys: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    qn: torch.Tensor,
    config: SparKConfig,
    generator: torch.Generator | None = None,
) -> Recovery:
    """Recovery of the pruned entries (docs/method.md section 5), by `config.recovery`.

    mean:     `a_t = mean_{c pruned} s[t, c]`; entry -> `sign(K) * sqrt(a_t / qn[c])`
              (`a_t / qn[c]` for the paper's saliency form). Stored as `scale_t = sqrt(a_t)` and
              `chan = 1/sqrt(qn)`. `sign(0)` counts as negative, as in the released code.
    zero:     0 (no recovery; what ThinK does).
    constant: `sign(K) * recovery_constant`.
    exponential / normal: per token, draw the pruned saliencies from an exponential (mean
              `a_t`) or a normal (mean, std of the pruned saliencies) distribution, clip to
              [0, keep threshold], assign by rank to the pruned channels, map back with the sign.
    """
    return RECOVERY_RULES[config.recovery](keys, s, keep, qn, config, generator)


def _sampled_fill(keys, s, keep, qn, config, generator) -> torch.Tensor:
    """Sampled recovery (ablation), see `recover`. The distribution is fitted to the token's
    *pruned* saliencies (exponential: same mean `a_t` as mean recovery; normal: their mean and
    std); fitting to all saliencies puts most draws above the keep threshold, where the clip
    collapses them to one value. Draws on the CPU, so a seed reproduces on every device."""
    d = s.shape[-1]
    rows = s.reshape(-1, d).cpu()
    pruned = ~keep.reshape(-1, d).cpu()
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    n_pruned = pruned.sum(-1, keepdim=True)
    mean = (rows * pruned).sum(-1, keepdim=True) / n_pruned.clamp_min(1)
    if config.recovery == "exponential":
        draws = -torch.log1p(-torch.rand(rows.shape, generator=generator)) * mean
    else:
        var = ((rows - mean) ** 2 * pruned).sum(-1, keepdim=True) / n_pruned.clamp_min(1)
        draws = mean + var.sqrt() * torch.randn(rows.shape, generator=generator)
    threshold = torch.where(pruned, torch.full_like(rows, float("inf")), rows).amin(-1, keepdim=True)
    threshold = torch.where(torch.isinf(threshold), rows.amax(-1, keepdim=True), threshold)
    draws = torch.minimum(draws.clamp_min(0), threshold)
    # Assign by rank: the largest draw goes to the most salient pruned channel. Kept channels are
    # pushed to the end of the order, so pruned channel j (by saliency) gets the j-th largest draw.
    order_true = torch.where(pruned, rows, torch.full_like(rows, -1.0)).argsort(dim=-1, descending=True, stable=True)
    ranked_draws = draws.sort(-1, descending=True).values
    ranked_draws = torch.where(torch.arange(d) < n_pruned, ranked_draws, torch.zeros_like(ranked_draws))
    w = torch.zeros_like(rows).scatter_(-1, order_true, ranked_draws).reshape(s.shape).to(s.device)
    sign = torch.where(keys > 0, 1.0, -1.0)
    return (sign * _magnitude_from_saliency(w, qn, config.saliency)) * (~keep)


# ---------------------------------------------------------------------------------------------
# 4. the whole pipeline
# ---------------------------------------------------------------------------------------------
def check_head_dim(d: int) -> None:
    if d < 8 or d % 8:
        raise ValueError(f"head_dim={d} cannot be packed: sparkkv stores one bit per channel in bytes, so head_dim must be a positive multiple of 8")


# Public-boundary validation (compress_keys / compress_values). The cache calls the unchecked cores
# (_compress_keys / _compress_values) once per block, so none of this runs on its hot path.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x, layout: str) -> None:
    """`x` must be a floating-point torch.Tensor whose shape is `layout` (e.g. "[B, Hkv, S, D]"),
    every dimension >= 1."""
    if not isinstance(x, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if type(x).__module__.split(".")[0] == "numpy" else ""
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}{hint}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    ndim = layout.count(",") + 1
    if x.dim() != ndim or 0 in x.shape:
        raise ValueError(f"{name} must be a {ndim}-D tensor {layout} with every dimension >= 1, got shape {tuple(x.shape)}")


def _check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} on {ref.device}: put them on the same device")


def _check_finite(name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """No NaN/inf in `x` (in its rows selected by the bool `rows`, when given); see docs/nonfinite.md.
    The common case (all finite) is decided by `aminmax` (NaN propagates to both, an infinity is an
    extreme): several times cheaper than `isfinite` over a prompt's keys, which only counts when needed."""
    if rows is None and x.numel():
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
    bad = ~torch.isfinite(x)
    if rows is not None:
        bad = bad & rows
    count = int(bad.sum())
    if count:
        raise ValueError(
            f"{name} holds {count} NaN/inf entr{'y' if count == 1 else 'ies'}: sparkkv's public functions take finite "
            "input only (one non-finite entry would spread over a whole token or key/value head; see docs/nonfinite.md)"
        )


def _check_compress_keys_args(keys, window_queries, config, window_mask, qn, generator) -> SparKConfig:
    """Validate `compress_keys`' arguments; returns the config to use."""
    if config is None:
        config = SparKConfig()
    elif not isinstance(config, SparKConfig):
        hint = " (SparKConfig.from_dict builds one from a dict)" if isinstance(config, dict) else ""
        raise TypeError(f"config must be a SparKConfig or None, got {type(config).__name__}{hint}")
    if config.channel_policy != "spark":
        raise ValueError(
            f"compress_keys implements the 'spark' channel policy; config.method={config.method!r} names "
            f"{config.channel_policy!r} (use a SparKCache for other methods)"
        )
    _check_tensor("keys", keys, "[B, Hkv, S, D]")
    b, h, _, d = keys.shape
    check_head_dim(d)
    if (window_queries is None) == (qn is None):
        raise ValueError("compress_keys needs exactly one of window_queries [B, Hq, W, D] and qn [B, Hkv, D]")
    if qn is not None:
        _check_tensor("qn", qn, "[B, Hkv, D]")
        if tuple(qn.shape) != (b, h, d):
            raise ValueError(f"qn must be [B, Hkv, D] = {[b, h, d]} to match keys {tuple(keys.shape)}, got {tuple(qn.shape)}")
        _check_same_device("qn", qn, "keys", keys)
        _check_finite("qn", qn)
        if bool((qn < 0).any()):
            raise ValueError("qn holds negative entries; it is a per-channel norm (>= 0)")
        if window_mask is not None:
            raise ValueError("window_mask applies to window_queries; it cannot be combined with qn")
    else:
        _check_tensor("window_queries", window_queries, "[B, Hq, W, D]")
        bq, hq, w, dq = window_queries.shape
        if bq != b or dq != d:
            raise ValueError(
                f"window_queries {tuple(window_queries.shape)} do not match keys {tuple(keys.shape)} in batch or head_dim"
            )
        if hq % h:
            raise ValueError(f"window_queries have {hq} heads, which is not a multiple of key/value heads (keys have {h})")
        _check_same_device("window_queries", window_queries, "keys", keys)
        rows = None
        if window_mask is not None:
            if not isinstance(window_mask, torch.Tensor) or window_mask.dtype != torch.bool:
                raise TypeError(f"window_mask must be a bool torch.Tensor [B, W] (True = real query), got {_describe(window_mask)}")
            if tuple(window_mask.shape) != (b, w):
                raise ValueError(f"window_mask must be [B, W] = {[b, w]}, got shape {tuple(window_mask.shape)}")
            _check_same_device("window_mask", window_mask, "keys", keys)
            empty = (~window_mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"window_mask masks out every query of batch rows {empty}: a window needs at least one real query")
            rows = window_mask.reshape(b, 1, w, 1)
        _check_finite("window_queries", window_queries, rows)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _check_finite("keys", keys)
    return config


def _describe(x) -> str:
    return f"a tensor of {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


# The compression kernel: "auto" (the fused C++ kernel where it serves: CPU tensors of float32,
# bfloat16 or float16, the fixed-ratio selection, a deterministic recovery, the kernel built here;
# else the PyTorch steps above), "torch" (always the steps above), "cpu" (the fused kernel, or an error).
# Chosen by device and dtype, never by the attention backend. Both give the same selection.
COMPRESS_KERNELS = ("auto", "torch", "cpu")


def _compress_keys(
    keys: torch.Tensor, qn: torch.Tensor, config: SparKConfig, generator: torch.Generator | None = None, kernel: str = "auto"
) -> PackedTensor:
    """`compress_keys` without validation, for callers that own their inputs (the cache, per block):
    keys `[B, Hkv, S, D]`, qn float32 `[B, Hkv, D]` -> `PackedTensor`."""
    if kernel != "torch":
        reason = _fused_unavailable(keys, config)
        if reason is None:
            return _compress_fused(keys, qn, config)
        if kernel == "cpu":
            raise RuntimeError(f"kernel='cpu' was requested but the fused compression kernel cannot serve: {reason}")
    s = saliency(keys, qn, config.saliency)
    keep = select_channels(s, config)
    rec = recover(keys, s, keep, qn, config, generator)
    return PackedTensor.from_dense(keys, keep, sign=rec.sign, scale=rec.scale, chan=rec.chan, fill=rec.fill)


def compress_keys(
    keys: torch.Tensor,
    window_queries: torch.Tensor | None,
    config: SparKConfig | None = None,
    *,
    window_mask: torch.Tensor | None = None,
    qn: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    kernel: str = "auto",
) -> PackedTensor:
    """Prune and pack keys with SparK.

    keys `[B, Hkv, S, D]` (floating point, finite, D a multiple of 8); window_queries
    `[B, Hq, W, D]` (the last W >= 1 prompt queries, after RoPE and the model's query norm,
    `Hq` a multiple of `Hkv`); `window_mask [B, W]` (bool) marks real (non-padding) queries,
    at least one per row. Pass `qn [B, Hkv, D]` instead of the queries to reuse stored query
    norms. `config`: a `SparKConfig` whose channel policy is "spark" (None: the defaults).
    `kernel`: "auto" (default), "torch" or "cpu" (see `COMPRESS_KERNELS`).
    Returns a `PackedTensor`: `.dense()` -> `[B, Hkv, S, D]` keys attention sees, `.nbytes`.
    Bad arguments raise `TypeError`/`ValueError` naming the argument (docs/nonfinite.md for NaN/inf).
    """
    config = _check_compress_keys_args(keys, window_queries, config, window_mask, qn, generator)
    if kernel not in COMPRESS_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {list(COMPRESS_KERNELS)}")
    if qn is None:
        qn = window_query_norm(window_queries, keys.shape[1], window_mask)
    return _compress_keys(keys, qn.float(), config, generator, kernel)


def _fused_unavailable(keys: torch.Tensor, config: SparKConfig) -> str | None:
    """Why the fused CPU compression kernel cannot serve these keys and this config, or None."""
    if keys.device.type != "cpu":
        return f"keys are on {keys.device}, not the CPU"
    if keys.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"keys are {keys.dtype}; the kernel reads float32, bfloat16 and float16"
    if config.selection != "ratio":
        return f"selection={config.selection!r}: the kernel serves the fixed-ratio selection"
    if not RECOVERY_RULES[config.recovery].fused:
        return f"recovery={config.recovery!r} draws explicit values; the kernel serves the deterministic recoveries"
    from .kernels import cpu_compress

    return cpu_compress.unavailable()


def _compress_fused(keys: torch.Tensor, qn: torch.Tensor, config: SparKConfig) -> PackedTensor:
    """`compress_keys` through kernels/cpu_compress.cpp (same result as the steps above)."""
    from .kernels import cpu_compress

    d = keys.shape[-1]
    t = d - pruned_count(config.key_prune_ratio, d)
    rule = RECOVERY_RULES[config.recovery]
    vals, keep, sign, mean = cpu_compress.compress_fixed(keys, qn, t, config.saliency == "squared", rule.sign)
    scale, chan = rule.fields(mean, qn, config)
    return PackedTensor(
        shape=tuple(keys.shape),
        dtype=keys.dtype,
        vals=vals,
        keep=keep,
        sign=sign,
        scale=None if scale is None else scale.to(scale_dtype(keys.dtype)),
        chan=chan,
    )


def _token_weights(token_mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """`[B, S]` or `[B, H, S]` bool -> float32 `[B, H, S, 1]` (1 = real token), or None."""
    if token_mask is None:
        return None
    b, h, s, _ = shape
    m = token_mask if token_mask.dim() == 3 else token_mask.unsqueeze(1)
    return m.expand(b, h, s).unsqueeze(-1).float()


def value_scores(values: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Query-agnostic value importance (the released code's heuristic, docs/method.md section 6):
    `0.7 * |v| + 0.3 * diversity / max(diversity)`, where diversity[t, c] is the variance of
    channel c across the tokens plus the variance of token t across the channels.
    `token_mask` (`[B, S]` or `[B, H, S]` bool) restricts the statistics to real tokens, so a
    padded row scores its tokens as it would alone."""
    v = values.float()
    w = _token_weights(token_mask, v.shape)
    if w is None:
        var_seq = v.var(dim=2, unbiased=False, keepdim=True) if v.shape[2] > 1 else torch.zeros_like(v[:, :, :1])
    else:
        n = w.sum(dim=2, keepdim=True).clamp_min(1)
        mean = (v * w).sum(dim=2, keepdim=True) / n
        var_seq = ((v - mean) ** 2 * w).sum(dim=2, keepdim=True) / n
    var_chan = v.var(dim=3, unbiased=False, keepdim=True)
    diversity = var_seq + var_chan
    peak = (diversity if w is None else diversity * w).amax(dim=(2, 3), keepdim=True)
    diversity = torch.where(peak > 0, diversity / peak.clamp_min(1e-30), torch.zeros_like(diversity))
    return 0.7 * v.abs() + 0.3 * diversity


def _compress_values(values: torch.Tensor, ratio: float, token_mask: torch.Tensor | None = None) -> PackedTensor:
    """`compress_values` without validation, for callers that own their inputs (the cache, per block)."""
    d = values.shape[-1]
    p = pruned_count(ratio, d)
    scores = value_scores(values, token_mask)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if p:
        idx = scores.topk(p, dim=-1, largest=False, sorted=False).indices
        keep = keep.scatter(-1, idx, False)
    pruned = ~keep
    mean_pruned = (values.float() * pruned).sum(-1) / pruned.sum(-1).clamp_min(1)
    return PackedTensor.from_dense(values, keep, scale=mean_pruned)


def compress_values(values: torch.Tensor, ratio: float, *, token_mask: torch.Tensor | None = None) -> PackedTensor:
    """Prune `floor(ratio * D)` value channels per token by `value_scores`; each pruned entry
    becomes the token's mean pruned value. values `[B, Hkv, S, D]` (floating point, finite, D a
    multiple of 8), `ratio` a number in [0, 1) -> `PackedTensor`. `token_mask` (`[B, S]` or
    `[B, Hkv, S]` bool, optional) marks real (non-padding) tokens for the statistics. Bad
    arguments raise `TypeError`/`ValueError` naming the argument."""
    _check_tensor("values", values, "[B, Hkv, S, D]")
    check_head_dim(values.shape[-1])
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if token_mask is not None:
        b, h, s, _ = values.shape
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be a bool torch.Tensor [B, S] or [B, Hkv, S], got {_describe(token_mask)}")
        if tuple(token_mask.shape) not in ((b, s), (b, h, s)):
            raise ValueError(f"token_mask must be [B, S] = {[b, s]} or [B, Hkv, S] = {[b, h, s]}, got {tuple(token_mask.shape)}")
        _check_same_device("token_mask", token_mask, "values", values)
    _check_finite("values", values)
    return _compress_values(values, float(ratio), token_mask)


def think_keep_mask(
    keys: torch.Tensor, qn_sq_mean: torch.Tensor, ratio: float, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ThinK's structured choice: one channel set per (batch, kv-head) for all tokens.

    Channel score `mean_window(q^2) * mean_tokens(k^2)` (`qn_sq_mean [B, Hkv, D]` is the
    GQA-pooled `mean_window(q^2)`; `token_mask` restricts the token mean to real tokens);
    keeps the top `D - floor(ratio * D)`. Returns the kept channel indices, ascending:
    int64 `[B, Hkv, T]`.
    """
    d = keys.shape[-1]
    t = d - pruned_count(ratio, d)
    k2 = keys.float().pow(2)
    w = _token_weights(token_mask, keys.shape)
    k2_mean = k2.mean(dim=2) if w is None else (k2 * w).sum(dim=2) / w.sum(dim=2).clamp_min(1)
    score = qn_sq_mean.float() * k2_mean
    return score.topk(t, dim=-1).indices.sort(dim=-1).values
