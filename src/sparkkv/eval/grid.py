"""The method grid: methods x key prune ratios x token budgets -> `SparKConfig`s, and value parsing.

A method name is `SparKConfig`'s (`dense`, `spark`, `think`, `snapkv`, `snapkv+spark`,
`pyramidkv+think`, ...). The grid crosses each method with the values that apply to it:

    dense                      one configuration (None: the cache keeps everything dense)
    spark / think              x ratios
    snapkv (eviction only)     x budgets
    snapkv+spark / +think      x ratios x budgets

Budgets are token counts (an integer >= 1) or fractions of the prompt in (0, 1), as
`SparKConfig.token_budget`. `check_fits` verifies them against the context lengths before any
work starts.
"""

from __future__ import annotations

import math

from ..config import KEY_PRUNING_POLICIES, SparKConfig, parse_method


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


def parse_method_name(text: str) -> str:
    """A method name `SparKConfig` accepts (lower-cased), else ValueError naming the choices."""
    parse_method(text)
    return text.strip().lower()


def build_grid(methods: list[str], ratios: list[float], budgets: list[int | float]) -> list[SparKConfig | None]:
    """The configurations of the grid (module docstring), dense first, without duplicates."""
    configs: list[SparKConfig | None] = []
    for method in methods:
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
        for budget in budget_values:
            for ratio in ratio_values:
                configs.append(SparKConfig(method=method, key_prune_ratio=ratio, token_budget=budget))
    unique: list[SparKConfig | None] = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    unique.sort(key=lambda c: c is not None)  # dense first, the rest in the order given
    return unique


def label(config: SparKConfig | None) -> str:
    """The configuration's name in tables and records ('dense' for None)."""
    return "dense" if config is None else config.name


def series(config: SparKConfig | None) -> str:
    """The line a configuration belongs to in the bytes plot: its method, plus its budget when it
    also prunes channels (points along the line are then the ratios)."""
    if config is None:
        return "dense"
    if config.eviction is not None and config.prunes_key_channels:
        return f"{config.method} b{config.token_budget:g}"
    return config.method


def check_fits(configs: list[SparKConfig | None], lengths: list[int]) -> None:
    """ValueError if a budget cannot apply to every context length (larger than the prompt, or
    smaller than the eviction window SnapKV/PyramidKV always keep)."""
    for config in configs:
        if config is None or config.token_budget is None:
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
