"""`SparKConfig`: one validated dataclass that names a compression configuration.

The same names are used by the library, the CLI and result files. A configuration is
`method` (which token-eviction policy and which channel policy) plus the numbers that
parametrise them. Everything is checked in `__post_init__`, so a bad value fails where the
user typed it, with a message naming the value and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

ATTN_IMPLEMENTATION = "sparkkv"  # the attention function (and mask) name `import sparkkv` registers with transformers
SALIENCY_FORMS = ("squared", "paper")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
SELECTIONS = ("ratio", "top_p", "grouped")
RECOVERIES = ("mean", "zero", "constant", "exponential", "normal")
QUANT_BITS = (16, 8, 4, 2)  # 16 = not quantized (the stored model dtype)
MASK_FORMATS = ("bits", "trits")

# Largest accepted `seed`. The cache seeds each compressed block with
# `seed + 7919 * layer + 104729 * first_token` (sparkkv/cache.py) and `torch.Generator.manual_seed`
# accepts at most 2**64 - 1, so capping the seed at 2**63 - 1 leaves room for 2**63 / 104729
# (~8.8e13) tokens of offsets.
SEED_MAX = 2**63 - 1

# method = "[<eviction>+]<channel>"; "dense" means no compression at all.
EVICTIONS = ("snapkv", "pyramidkv", "streamingllm")
CHANNEL_POLICIES = ("spark", "think", "none")
KEY_PRUNING_POLICIES = ("spark", "think")  # the channel policies that prune key channels


def parse_method(method: str) -> tuple[str | None, str]:
    """Split a method name into `(eviction or None, channel policy)`.

    Accepted spellings: `"spark"`, `"think"`, `"dense"`, `"snapkv"` (eviction only, same as
    `"snapkv+none"`), `"snapkv+spark"`, `"pyramidkv+think"`, `"streamingllm+spark"`, ...
    `"dense"` is returned as `(None, "dense")`.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name = method.strip().lower()
    if name == "dense":
        return None, "dense"
    parts = name.split("+")
    allowed = (
        f"'dense', a channel policy {CHANNEL_POLICIES}, an eviction {EVICTIONS}, "
        f"or '<eviction>+<channel policy>' such as 'snapkv+spark'"
    )
    if len(parts) == 1:
        (part,) = parts
        if part in EVICTIONS:
            return part, "none"
        if part in CHANNEL_POLICIES:
            return None, part
        raise ValueError(f"unknown method {method!r}: expected {allowed}")
    if len(parts) == 2 and parts[0] in EVICTIONS and parts[1] in CHANNEL_POLICIES:
        return parts[0], parts[1]
    raise ValueError(f"unknown method {method!r}: expected {allowed}")


def pruned_count(ratio: float, dim: int) -> int:
    """`floor(ratio * dim)`, tolerant to float noise (0.7 * 30 = 20.999999999999996 -> 21)."""
    return int(math.floor(ratio * dim + 1e-9))


@dataclass(frozen=True)
class SparKConfig:
    """How to compress the KV cache.

    Channel pruning (docs/method.md sections 3-6):
        key_prune_ratio: fraction `lam` of key channels pruned per token, in [0, 1).
            `P = floor(lam * D)` pruned, `T = D - P` kept (0.5 -> 64 of 128, 0.8 -> 26 of 128).
            Used by `selection="ratio"` and by ThinK.
        window_size: number `W` of last prompt queries that score the channels (>= 1).
        saliency: "squared" (`K^2 * ||q_c||`, the released code, default) or
            "paper" (`|K| * ||q_c||`, the paper's formula).
        selection: "ratio" (fixed T per token, the headline method), "top_p" (keep channels until
            their saliency reaches `top_p` of the token's total), "grouped" (bucket tokens by how
            many channels hold `grouped_mass` of their saliency; keeps 10/30/50/70/90% of D).
        top_p: saliency mass kept by `selection="top_p"`, in (0, 1].
        grouped_mass: saliency mass that defines `n99` for `selection="grouped"`, in (0, 1].
        recovery: what a pruned key entry contributes: "mean" (default), "zero", "constant",
            "exponential" or "normal" (seeded sampled ablations; these store one value per
            pruned entry, so they save no memory: accuracy studies only).
        recovery_constant: magnitude used by `recovery="constant"` (> 0, default 0.01).
        value_prune_ratio: fraction of value channels pruned per token with mean fill, in [0, 1)
            (0 = values stay dense, the default and the paper's headline setting).
        seed: seed of the sampled recoveries, an int in [0, 2**63 - 1] (`SEED_MAX`).
        mask_format: how SparK stores which channels a token keeps and the signs of the pruned ones:
            "bits" (a keep and a sign bit per channel, default) or "trits" (one ternary code per
            channel, kept / pruned+ / pruned-, five per byte: 1.6 bits instead of 2; needs a signed
            recovery, "mean" or "constant"). Lossless either way.

    Quantization (sparkkv/quant.py; stacks with the channel policy, docs/quantization.md):
        key_bits: bits of the stored key values, 16 (not quantized, default), 8, 4 or 2: SparK's
            kept values (symmetric codes, one scale per channel and group of `quant_group_size`
            tokens, each kept value read with its channel's), ThinK's kept columns and dense keys
            (method "none" or an eviction alone: groups of `quant_group_size` tokens per channel).
        value_bits: bits of the stored values (dense or pruned), 16, 8, 4 or 2 (groups of
            `quant_group_size` channels per token).
        quant_group_size: elements per scale/zero group, a multiple of 8 in [8, 1024].
        The dense tail of recent tokens (up to `block_size`) is never quantized.

    Decode:
        attention_backend: how attention reads the stored chunks after prefill (sparkkv/ops.py):
            "auto" (default: the fused C++ kernel for CPU tensors when it builds, else "torch"),
            "torch" (the PyTorch reference), "cpu" (the fused C++ kernels), "triton" (CUDA; on
            CPU tensors only under TRITON_INTERPRET=1). An explicit backend that cannot run raises
            at the first forward; one that cannot serve a chunk says why (log + layer_stats()).
        compress_decode: compress generated tokens too. They enter a dense tail; when the tail
            holds more than `block_size` tokens its oldest `block_size` are compressed with the
            query norms stored at prefill. False keeps every generated token dense (the paper).
        block_size: tokens compressed at a time from the dense tail (>= 1). Sliding-window layers
            also drop expired tokens a block at a time.
        compress_sliding: apply the channel policy to sliding-window and chunked-attention layers
            too (default True: on models whose layers are mostly or all sliding, such as Gemma 3
            or Mistral with a window, that is where the memory is). False keeps those layers dense,
            exactly as DynamicCache does. Such layers are never evicted (docs/design.md).

    Token eviction (applied at the end of prefill, before channel pruning):
        method: "[<eviction>+]<channel policy>"; see `parse_method`. Default "spark".
        token_budget: tokens kept per layer and kv-head after eviction: an int >= 1, or a float in
            (0, 1) meaning that fraction of the prompt. Required by an eviction method.
        eviction_window: SnapKV/PyramidKV observation window (last prompt tokens, always kept).
        pool_kernel: SnapKV's 1-D average-pool kernel size (odd, >= 1).
        pyramid_beta: PyramidKV's beta (budget of the deepest layer is budget / beta).
        sink_tokens: StreamingLLM's number of initial tokens always kept.
    """

    method: str = "spark"
    key_prune_ratio: float = 0.5
    window_size: int = 32
    saliency: str = "squared"
    selection: str = "ratio"
    top_p: float = 0.9
    grouped_mass: float = 0.99
    recovery: str = "mean"
    recovery_constant: float = 0.01
    value_prune_ratio: float = 0.0
    seed: int = 0
    attention_backend: str = "auto"
    compress_decode: bool = True
    block_size: int = 64
    compress_sliding: bool = True
    token_budget: int | float | None = None
    eviction_window: int = 64
    pool_kernel: int = 5
    pyramid_beta: float = 20.0
    sink_tokens: int = 4
    key_bits: int = 16
    value_bits: int = 16
    quant_group_size: int = 64
    mask_format: str = "bits"

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_budget(self)
        _check_quantization(self)
        _check_policy_options(self)

    @property
    def quantized(self) -> bool:
        """Whether keys or values are stored as integer codes."""
        return self.key_bits < 16 or self.value_bits < 16

    # --- derived names -------------------------------------------------------------------------
    @property
    def eviction(self) -> str | None:
        """The token-eviction policy (`None` when tokens are not evicted)."""
        return parse_method(self.method)[0]

    @property
    def channel_policy(self) -> str:
        """'spark', 'think', 'none' (eviction only) or 'dense' (no compression)."""
        return parse_method(self.method)[1]

    @property
    def prunes_key_channels(self) -> bool:
        """Whether the channel policy prunes key channels (SparK, ThinK) and so reads window queries."""
        return self.channel_policy in KEY_PRUNING_POLICIES

    @property
    def min_budget_tokens(self) -> int | None:
        """Fewest tokens the eviction policy keeps (None without eviction): SnapKV/PyramidKV's whole
        observation window, StreamingLLM's sinks plus one recent token."""
        eviction = self.eviction
        if eviction is None:
            return None
        return self.eviction_window if eviction in ("snapkv", "pyramidkv") else self.sink_tokens + 1

    def budget_floor_reason(self) -> str:
        """Why a token budget below `min_budget_tokens` cannot apply (completes "token_budget=... ")."""
        if self.eviction == "streamingllm":
            return f"must exceed sink_tokens={self.sink_tokens} for streamingllm"
        return f"is smaller than eviction_window={self.eviction_window}: SnapKV/PyramidKV always keep the whole observation window"

    @property
    def name(self) -> str:
        """A short label for tables and result files, e.g. 'snapkv+spark k0.8 b512'."""
        eviction, channel = parse_method(self.method)
        label = channel if eviction is None else f"{eviction}+{channel}"
        if channel == "think" or (channel == "spark" and self.selection == "ratio"):
            label += f" k{self.key_prune_ratio:g}"
        if channel == "spark":
            if self.selection == "top_p":
                label += f" top_p{self.top_p:g}"
            elif self.selection == "grouped":
                label += " grouped" + (f"{self.grouped_mass:g}" if self.grouped_mass != 0.99 else "")
            if self.value_prune_ratio:
                label += f" v{self.value_prune_ratio:g}"
            if self.recovery != "mean":
                label += f" {self.recovery}"
        if self.key_bits < 16:
            label += f" kq{self.key_bits}"
        if self.value_bits < 16:
            label += f" vq{self.value_bits}"
        if self.quantized and self.quant_group_size != 64:
            label += f" g{self.quant_group_size}"
        if self.mask_format != "bits":
            label += f" {self.mask_format}"
        if self.token_budget is not None:
            label += f" b{self.token_budget:g}"
        return label

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SparKConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SparKConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "SparKConfig":
        return replace(self, **changes)


def _check_fields(c: "SparKConfig") -> None:
    """Every field on its own: type and range."""
    parse_method(c.method)
    _check_fraction("key_prune_ratio", c.key_prune_ratio)
    _check_fraction("value_prune_ratio", c.value_prune_ratio)
    _check_int("window_size", c.window_size, 1)
    _check_choice("saliency", c.saliency, SALIENCY_FORMS)
    _check_choice("selection", c.selection, SELECTIONS)
    _check_choice("recovery", c.recovery, RECOVERIES)
    _check_mass("top_p", c.top_p)
    _check_mass("grouped_mass", c.grouped_mass)
    if not _is_real(c.recovery_constant) or not (c.recovery_constant > 0 and math.isfinite(c.recovery_constant)):
        raise ValueError(f"recovery_constant must be a finite number > 0, got {c.recovery_constant!r}")
    _check_int("seed", c.seed, 0)
    if c.seed > SEED_MAX:
        raise ValueError(
            f"seed must be an int in [0, 2**63 - 1], got {c.seed}: the cache adds per-layer and per-block "
            "offsets to it and torch.Generator.manual_seed takes at most 2**64 - 1"
        )
    _check_choice("attention_backend", c.attention_backend, ATTENTION_BACKENDS)
    if not isinstance(c.compress_decode, bool):
        raise TypeError(f"compress_decode must be a bool, got {c.compress_decode!r}")
    _check_int("block_size", c.block_size, 1)
    if not isinstance(c.compress_sliding, bool):
        raise TypeError(f"compress_sliding must be a bool, got {c.compress_sliding!r}")
    _check_int("eviction_window", c.eviction_window, 1)
    _check_int("pool_kernel", c.pool_kernel, 1)
    if c.pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd (the pool keeps the sequence length), got {c.pool_kernel}")
    if not _is_real(c.pyramid_beta) or not c.pyramid_beta >= 1:
        raise ValueError(f"pyramid_beta must be a number >= 1, got {c.pyramid_beta!r}")
    _check_int("sink_tokens", c.sink_tokens, 0)


def _check_budget(c: "SparKConfig") -> None:
    """The token budget against the eviction policy."""
    eviction, channel = parse_method(c.method)
    budget = c.token_budget
    if budget is not None:
        if isinstance(budget, bool) or not _is_real(budget):
            raise TypeError(f"token_budget must be an int >= 1, a float in (0, 1), or None; got {budget!r}")
        if isinstance(budget, int):
            if budget < 1:
                raise ValueError(f"token_budget must be >= 1 tokens (or a fraction in (0, 1)), got {budget}")
        elif not 0 < budget < 1:
            raise ValueError(
                f"a float token_budget is a fraction of the prompt and must be in (0, 1), got {budget!r}; "
                "give an int for a token count"
            )
    if eviction is not None and budget is None:
        raise ValueError(f"method {c.method!r} evicts tokens and needs token_budget (an int or a fraction in (0, 1))")
    if eviction is None and budget is not None:
        raise ValueError(
            f"token_budget={budget!r} given but method {c.method!r} has no eviction; "
            f"use e.g. 'snapkv+{channel if channel != 'dense' else 'none'}'"
        )
    if isinstance(budget, int) and eviction is not None and budget < c.min_budget_tokens:
        raise ValueError(f"token_budget={budget} {c.budget_floor_reason()}")


def _check_policy_options(c: "SparKConfig") -> None:
    """Options that apply to one channel policy only."""
    channel = parse_method(c.method)[1]
    if channel != "spark" and c.selection != "ratio":
        raise ValueError(f"selection={c.selection!r} applies to the 'spark' channel policy only, not {channel!r}")
    if c.value_prune_ratio > 0 and channel != "spark":
        raise ValueError(f"value_prune_ratio applies to the 'spark' channel policy only, not {channel!r}")


def _check_quantization(c: "SparKConfig") -> None:
    """The quantization fields, and what they stack with."""
    channel = parse_method(c.method)[1]
    for name in ("key_bits", "value_bits"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value not in QUANT_BITS:
            raise ValueError(f"{name} must be one of {list(QUANT_BITS)} (16 = not quantized), got {value!r}")
    _check_int("quant_group_size", c.quant_group_size, 8)
    if c.quant_group_size > 1024 or c.quant_group_size % 8:
        raise ValueError(f"quant_group_size must be a multiple of 8 in [8, 1024], got {c.quant_group_size}")
    _check_choice("mask_format", c.mask_format, MASK_FORMATS)
    quantized = c.key_bits < 16 or c.value_bits < 16
    if quantized and channel == "dense":
        raise ValueError("method 'dense' stores the cache as it is; for plain quantization use method='none' "
                         "(no channel policy) with key_bits / value_bits")
    if c.key_bits < 16 and channel == "spark" and c.selection != "ratio":
        raise ValueError(f"key_bits={c.key_bits} quantizes fixed-T rows; selection={c.selection!r} keeps a "
                         "variable number of channels per token (use selection='ratio')")
    if c.key_bits < 16 and channel == "spark" and c.recovery in ("exponential", "normal"):
        raise ValueError(f"key_bits={c.key_bits} cannot be combined with the sampled recovery {c.recovery!r}")
    if c.mask_format == "trits" and (channel != "spark" or c.recovery not in ("mean", "constant")):
        raise ValueError("mask_format='trits' codes SparK's keep mask with the pruned entries' signs: it needs "
                         f"the 'spark' channel policy and recovery 'mean' or 'constant' (got {c.method!r}, "
                         f"recovery={c.recovery!r})")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_fraction(name: str, value) -> None:
    if not _is_real(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_mass(name: str, value) -> None:
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {list(choices)}")
