"""The method grid: methods x key prune ratios x token budgets x quantization -> configurations, and value parsing.

A method name is `SparKConfig`'s (`dense`, `spark`, `think`, `none`, `snapkv`, `snapkv+spark`,
`pyramidkv+think`, ...) or a quantized baseline's (`quanto-int4`, `quanto-int2`, `hqq-int4`,
`hqq-int2`: transformers' `QuantizedCache`, `baselines.py`). The grid crosses each method with the
values that apply to it:

    dense                      one configuration (None: the cache keeps everything dense, never quantized)
    quanto-int4, hqq-int2...   one configuration each (QuantizedCache at its defaults)
    spark / think              x ratios
    none                       (no channel policy) plain quantization: x bits, without 16/16 (= dense)
    snapkv (eviction only)     x budgets
    snapkv+spark / +think      x ratios x budgets

and every `SparKConfig` method with `Quantization`: key bits x value bits (16 = not quantized) x
value prune ratios (spark only) x group sizes (quantized configurations only; an unquantized one keeps
the default) x mask formats (`trits`: spark only). Combinations `SparKConfig` refuses are left out; a
method left with none is an error naming it.

Budgets are token counts (an integer >= 1) or fractions of the prompt in (0, 1), as
`SparKConfig.token_budget`. `check_fits` verifies them against the context lengths before any
work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..config import KEY_PRUNING_POLICIES, MASK_FORMATS, QUANT_BITS, SparKConfig, parse_method
from . import baselines

DEFAULT_GROUP_SIZE = next(f.default for f in fields(SparKConfig) if f.name == "quant_group_size")


@dataclass(frozen=True)
class Quantization:
    """The quantization axes of a grid (each a list of values crossed with every method)."""

    key_bits: tuple[int, ...] = (16,)
    value_bits: tuple[int, ...] = (16,)
    value_ratios: tuple[float, ...] = (0.0,)
    group_sizes: tuple[int, ...] = (DEFAULT_GROUP_SIZE,)
    mask_formats: tuple[str, ...] = ("bits",)


def parse_ratio(text: str) -> float:
    """A key prune ratio: a finite number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ratio {text!r} is not a number; expected a number in [0, 1)") from None
    if not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"ratio {text!r} is out of range; expected a number in [0, 1)")
    return value


def parse_budget(text: str) -> int | float:
    """A token budget: an integer >= 1 (tokens) or a fraction in (0, 1) of the prompt."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a number; expected an integer token count >= 1 or a fraction in (0, 1)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget {text!r} is out of range; expected an integer token count >= 1 or a fraction in (0, 1)")
    if value < 1:
        return value
    if not value.is_integer():
        raise ValueError(f"budget {text!r} is neither a whole token count nor a fraction in (0, 1)")
    return int(value)


def parse_bits(text: str) -> int:
    """Stored bits of keys or values: one of 16 (not quantized), 8, 4, 2."""
    allowed = ", ".join(map(str, QUANT_BITS))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"bits {text!r} is not an integer; expected one of {allowed} (16 = not quantized)") from None
    if value not in QUANT_BITS:
        raise ValueError(f"bits {value} is not supported; expected one of {allowed} (16 = not quantized)")
    return value


def parse_value_ratio(text: str) -> float:
    """A value prune ratio: a finite number in [0, 1) (0 = values not pruned)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"value ratio {text!r} is not a number; expected a number in [0, 1)") from None
    if not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"value ratio {text!r} is out of range; expected a number in [0, 1)")
    return value


def parse_group_size(text: str) -> int:
    """A quantization group size: a multiple of 8 in [8, 1024]."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"group size {text!r} is not an integer; expected a multiple of 8 in [8, 1024]") from None
    if not 8 <= value <= 1024 or value % 8:
        raise ValueError(f"group size {value} is not a multiple of 8 in [8, 1024]")
    return value


def parse_mask_format(text: str) -> str:
    """A SparK mask format: bits or trits."""
    name = text.strip().lower()
    if name not in MASK_FORMATS:
        raise ValueError(f"unknown mask format {text!r}; expected one of {', '.join(MASK_FORMATS)}")
    return name


def parse_method_name(text: str) -> str:
    """A method name `SparKConfig` accepts or a quantized baseline's (lower-cased), else ValueError
    naming the choices."""
    if baselines.parse(text) is not None:
        return text.strip().lower()
    try:
        parse_method(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; or a quantized baseline {', '.join(baselines.METHODS)}") from None
    return text.strip().lower()


class NoConfiguration(ValueError):
    """A method that none of the grid's quantization values apply to (the message names it and why)."""


def _quantized_variants(method: str, channel: str, eviction: str | None, ratio: float, budget, quant: Quantization) -> list[SparKConfig]:
    """The configurations of one (method, ratio, budget) across the quantization axes that apply."""
    SparKConfig(method=method, key_prune_ratio=ratio, token_budget=budget)  # a bad budget or ratio is an error, not a skip
    out = []
    for value_ratio in quant.value_ratios:
        if value_ratio and channel != "spark":
            continue  # value pruning is SparK's
        for key_bits in quant.key_bits:
            for value_bits in quant.value_bits:
                quantized = key_bits < 16 or value_bits < 16
                if channel == "none" and eviction is None and not quantized:
                    continue  # no channel policy, no eviction, no quantization: that is dense
                for group in quant.group_sizes if quantized else (DEFAULT_GROUP_SIZE,):
                    for mask_format in quant.mask_formats:
                        if mask_format != "bits" and channel != "spark":
                            continue
                        try:
                            out.append(SparKConfig(method=method, key_prune_ratio=ratio, token_budget=budget,
                                                   value_prune_ratio=value_ratio, key_bits=key_bits, value_bits=value_bits,
                                                   quant_group_size=group, mask_format=mask_format))
                        except ValueError:
                            continue  # a combination SparKConfig refuses
    return out


def build_grid(methods: list[str], ratios: list[float], budgets: list[int | float],
               quant: Quantization | None = None) -> list:
    """The configurations of the grid (module docstring), dense first, without duplicates:
    `SparKConfig`s, None (dense) and `baselines.QuantizedCacheConfig`s."""
    quant = quant or Quantization()
    configs: list = []
    for method in methods:
        baseline = baselines.parse(method)
        if baseline is not None:
            configs.append(baseline)
            continue
        eviction, channel = parse_method(method)
        if channel == "dense":
            configs.append(None)
            continue
        if eviction is not None and not budgets:
            raise ValueError(f"method {method!r} evicts tokens: give at least one budget")
        if channel in KEY_PRUNING_POLICIES and not ratios:
            raise ValueError(f"method {method!r} prunes key channels: give at least one ratio")
        ratio_values = ratios if channel in KEY_PRUNING_POLICIES else [0.5]  # unused by eviction-only
        budget_values = budgets if eviction is not None else [None]
        mine = []
        for budget in budget_values:
            for ratio in ratio_values:
                mine += _quantized_variants(method, channel, eviction, ratio, budget, quant)
        if not mine:
            raise NoConfiguration(_why_empty(method, channel, eviction, quant))
        configs += mine
    unique: list = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    unique.sort(key=lambda c: c is not None)  # dense first, the rest in the order given
    return unique


def _why_empty(method: str, channel: str, eviction: str | None, quant: Quantization) -> str:
    if channel == "none" and eviction is None and all(k == 16 for k in quant.key_bits) and all(v == 16 for v in quant.value_bits):
        return (f"method {method!r} (no channel policy, no eviction) is plain quantization: give --key-bits or "
                "--value-bits below 16 (at 16/16 it is 'dense')")
    if channel != "spark" and not any(r == 0 for r in quant.value_ratios):
        return f"method {method!r}: --value-ratios {' '.join(f'{r:g}' for r in quant.value_ratios)} apply to spark only (add 0)"
    if channel != "spark" and "bits" not in quant.mask_formats:
        return f"method {method!r}: --mask-format trits applies to spark only (add bits)"
    return f"method {method!r}: no combination of the given bits, value ratios, group sizes and mask formats is valid for it"


def label(config) -> str:
    """The configuration's name in tables and records ('dense' for None)."""
    return "dense" if config is None else config.name


def series(config) -> str:
    """The line a configuration belongs to in the bytes plot: its method, plus its budget when it
    also prunes channels (points along the line are then the ratios), plus what it stores differently
    (key bits, value pruning, mask format, group size: points along a line are then the ratios and the
    value bits). A quantized baseline's line is its backend (points: its bits)."""
    if config is None:
        return "dense"
    if baselines.is_baseline(config):
        return f"{config.backend} (QuantizedCache)"
    name = config.method
    if config.key_bits < 16:
        name += f" kq{config.key_bits}"
    elif config.value_bits < 16:
        name += " kq16"
    if config.value_prune_ratio:
        name += f" v{config.value_prune_ratio:g}"
    if config.mask_format != "bits":
        name += f" {config.mask_format}"
    if config.quantized and config.quant_group_size != DEFAULT_GROUP_SIZE:
        name += f" g{config.quant_group_size}"
    if config.eviction is not None and config.prunes_key_channels:
        name += f" b{config.token_budget:g}"
    return name


def check_fits(configs: list, lengths: list[int]) -> None:
    """ValueError if a budget cannot apply to every context length (larger than the prompt, or
    smaller than the eviction window SnapKV/PyramidKV always keep)."""
    for config in configs:
        if not isinstance(config, SparKConfig) or config.token_budget is None:
            continue
        for length in lengths:
            budget = config.token_budget
            tokens = int(math.floor(budget * length)) if isinstance(budget, float) else budget
            if tokens > length:
                raise ValueError(f"budget {budget:g} is larger than the {length}-token context; use at most {length}")
            floor = config.min_budget_tokens
            if tokens < floor:
                raise ValueError(
                    f"budget {budget:g} keeps {tokens} tokens of a {length}-token context, fewer than the "
                    f"{floor} that {config.eviction} always keeps"
                )
