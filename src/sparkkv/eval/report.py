"""Tables and plots from records: the one markdown table formatter and the two evaluation plots.

    format_table(rows, columns)      rows of dicts -> a markdown table
    pivot(records)                   methods as rows, (task, length) as columns, KV bytes/token last
    plot(records, folder)            PNGs: score vs KV bytes per token (one line per method), and
                                     score vs context length (one line per configuration)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> a markdown table; columns are (key, header, format spec or '' for str)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _column(record: dict) -> str:
    return f"{record['task']} @{record['length']}"


def pivot(records: list[dict]) -> str:
    """One row per configuration (in first-seen order): a score column per (task, length), then
    the mean KV bytes per token and its ratio to dense. Perplexity columns are perplexities
    (lower is better); every other column is the task metric in [0, 1]."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    columns = list(dict.fromkeys(_column(r) for r in records))
    cells = {(r["method"], _column(r)): r for r in records}
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        row = {"method": method}
        for column in columns:
            r = cells.get((method, column))
            row[column] = None if r is None else r["score"]
        row["kv_bytes_per_token"] = sum(r["kv_bytes_per_token"] for r in mine) / len(mine)
        row["kv_vs_dense"] = sum(r["kv_vs_dense"] for r in mine) / len(mine)
        rows.append(row)
    spec = [("method", "method", "")]
    spec += [(c, c.replace("perplexity", "ppl"), ".2f" if c.startswith("perplexity") else ".3f") for c in columns]
    spec += [("kv_bytes_per_token", "KV bytes/token", ",.0f"), ("kv_vs_dense", "vs dense", ".3f")]
    return format_table(rows, spec)


def describe(records: list[dict]) -> str:
    """One line: model, n per cell, lengths, what the scores are."""
    models = sorted({r["model"] for r in records})
    ns = sorted({r["n"] for r in records})
    return (
        f"model {', '.join(models)}; n = {', '.join(map(str, ns))} per cell; scores: task metric in [0, 1] "
        "(RULER string match, LongBench's metric), perplexity for `perplexity`; KV bytes/token after the prompt, all layers, K+V"
    )


def plot(records: list[dict], folder: Path) -> list[Path]:
    """Write the plots into `folder`; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'sparkkv[eval]')")
        return []
    folder = Path(folder)
    paths = []
    by_task_length: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        by_task_length[(r["task"], r["length"])].append(r)
    tasks = list(dict.fromkeys(r["task"] for r in records))

    colors = _series_colors(records)

    # score vs KV bytes per token, one panel per (task, length), one line per method series
    keys = sorted(by_task_length, key=lambda k: (tasks.index(k[0]), k[1]))
    fig, axes = _panels(plt, len(keys))
    for ax, key in zip(axes.flat, keys):
        _bytes_panel(ax, by_task_length[key], *key, colors)
    paths.append(_save(fig, axes, folder / "score_vs_kv_bytes.png", ncol=4))
    plt.close(fig)

    # score vs context length: one panel per task measured at several lengths, one line per
    # configuration; colour = its series (as in the bytes plot), line style = its key ratio,
    # marker = its token budget (largest first)
    multi = [t for t in tasks if len({r["length"] for r in records if r["task"] == t}) > 1]
    lengths = sorted({r["length"] for r in records if r["task"] in multi})
    budgets = sorted({b for r in records if (b := (r.get("config") or {}).get("token_budget")) is not None}, reverse=True)
    if multi:
        fig, axes = _panels(plt, len(multi))
        for ax, task in zip(axes.flat, multi):
            mine = [r for r in records if r["task"] == task]
            for method in dict.fromkeys(r["method"] for r in mine):
                group = [r for r in mine if r["method"] == method]
                pts = sorted((r["length"], r["score"]) for r in group)
                name = group[0].get("series") or method
                if name == "dense":
                    style = dict(color="black", linestyle="--", linewidth=2, marker="s")
                else:
                    config = group[0].get("config") or {}
                    ratio, budget = config.get("key_prune_ratio", 0.0), config.get("token_budget")
                    marker = "o" if budget is None else _BUDGET_MARKERS[budgets.index(budget) % len(_BUDGET_MARKERS)]
                    style = dict(color=colors.get(name), linestyle=_RATIO_STYLES.get(ratio, "-."), marker=marker)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], markersize=4, label=method, **style)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(x) for x in lengths])
            ax.set_xlabel("context length (tokens)")
            _score_axis(ax, task)
            ax.set_title(task, fontsize=10)
            ax.grid(alpha=0.3)
        paths.append(_save(fig, axes, folder / "score_vs_length.png", ncol=3))
        plt.close(fig)
    return paths


# line style per key prune ratio in the length plot (other ratios: dash-dot); marker per budget
_RATIO_STYLES = {0.0: "-", 0.5: "-", 0.8: "--", 0.9: ":"}
_BUDGET_MARKERS = ("^", "v", "D", "P")


def _series_colors(records: list[dict]) -> dict[str, str]:
    """One colour per method series, the same in every panel and plot (dense is black)."""
    names = dict.fromkeys(r.get("series") or r["method"] for r in records)
    names.pop("dense", None)
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _panels(plt, count: int):
    cols = min(3, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, axes, path: Path, ncol: int) -> Path:
    """Legend below the panels, in a band sized for its rows (so it never covers an axis label)."""
    handles, labels = _legend(axes)
    legend_rows = (len(labels) + ncol - 1) // ncol
    band = 0.25 + 0.17 * legend_rows  # inches
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + band)
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, band / (height + band), 1, 1))
    fig.savefig(path, dpi=110)
    return path


def _bytes_panel(ax, records: list[dict], task: str, length: int, colors: dict[str, str]) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r.get("series") or r["method"]].append(r)
    for name, mine in groups.items():
        pts = sorted((r["kv_bytes_per_token"], r["score"]) for r in mine)
        if name == "dense":
            ax.axhline(pts[0][1], color="black", linestyle="--", linewidth=1.5, label="dense")
            ax.plot([pts[0][0]], [pts[0][1]], marker="s", color="black")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=name, color=colors.get(name))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    ax.set_xlabel("KV bytes per token (log scale)")
    _score_axis(ax, task)
    ax.set_title(f"{task} @ {length} tokens", fontsize=10)
    ax.grid(alpha=0.3, which="both")


def _score_axis(ax, task: str) -> None:
    if task == "perplexity":
        ax.set_ylabel("perplexity (lower is better)")
    else:
        ax.set_ylabel("score")
        ax.set_ylim(-0.03, 1.03)


def _legend(axes):
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(text, handle)
    return list(seen.values()), list(seen)
