"""Tables and plots from records: the one markdown table formatter, the Pareto front and the evaluation plots.

    format_table(rows, columns)      rows of dicts -> a markdown table
    pivot(records)                   methods as rows, (task, length) as columns, KV bytes/token last
    pareto_front(points, lower)      indices of the non-dominated (bytes, score) points (a pure function)
    fronts(records)                  the front of each (task, length) panel; bytes = `kv_vs_dense`
    front_table(records), pick_table(records)   the fronts as text; the best method under each byte budget
    baseline_table(records)          each QuantizedCache point against the best sparkkv one at no more bytes
    plot(records, folder)            PNGs: score vs KV bytes per token (one line per method), score vs
                                     context length (one line per configuration), and score vs bytes
                                     with the Pareto front marked (every configuration a point)
"""

from __future__ import annotations

import logging
import math
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


# --- the Pareto front -------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool = False) -> list[int]:
    """Indices of the points `(bytes, score)` that no other point dominates, by increasing bytes.

    A point dominates another if it holds no more bytes and scores at least as well, and is strictly
    better in one of the two (`lower_is_better`: for perplexity). Of points equal in both, the first
    given is on the front. Points with a non-finite coordinate are never on it."""
    sign = -1.0 if lower_is_better else 1.0
    order = sorted(
        (i for i, (b, s) in enumerate(points) if math.isfinite(b) and math.isfinite(s)),
        key=lambda i: (points[i][0], -sign * points[i][1], i),
    )
    front, best = [], -math.inf
    for i in order:
        score = sign * points[i][1]
        if score > best:
            front.append(i)
            best = score
    return front


def lower_is_better(task: str) -> bool:
    return task == "perplexity"


def _panels_of(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    panels: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        panels[(r["task"], r["length"])].append(r)
    return {k: panels[k] for k in sorted(panels, key=lambda k: (tasks.index(k[0]), k[1]))}


def fronts(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(task, length) -> the records on that panel's Pareto front of score vs `kv_vs_dense`, by
    increasing bytes."""
    out = {}
    for key, mine in _panels_of(records).items():
        idx = pareto_front([(r["kv_vs_dense"], r["score"]) for r in mine], lower_is_better(key[0]))
        out[key] = [mine[i] for i in idx]
    return out


def family(record: dict) -> str:
    """'dense', 'baseline' (transformers' QuantizedCache), 'sparkkv quantized' or 'sparkkv'."""
    config = record.get("config")
    if config is None:
        return "dense"
    if config.get("cache") == "QuantizedCache":
        return "baseline"
    if config.get("key_bits", 16) < 16 or config.get("value_bits", 16) < 16:
        return "sparkkv quantized"
    return "sparkkv"


def front_table(records: list[dict]) -> str:
    """Each panel's Pareto front (score vs bytes), one row per front point by increasing bytes."""
    rows = []
    for (task, length), front in fronts(records).items():
        for r in front:
            rows.append({"panel": f"{task} @{length}", "vs_dense": r["kv_vs_dense"], "bytes": r["kv_bytes_per_token"],
                         "method": r["method"] + (" (QuantizedCache)" if family(r) == "baseline" else ""),
                         "score": _format_score(task, r["score"])})
    return format_table(rows, [("panel", "panel", ""), ("vs_dense", "vs dense", ".3f"), ("bytes", "KV bytes/token", ",.0f"),
                               ("method", "method on the front", ""), ("score", "score", "")])


PICK_BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1)


def pick(front: list[dict], budget: float) -> dict | None:
    """The best-scoring front record holding at most `budget` of the dense bytes (None if none fits)."""
    fitting = [r for r in front if r["kv_vs_dense"] <= budget + 1e-12]
    return fitting[-1] if fitting else None


def pick_table(records: list[dict], budgets: tuple[float, ...] = PICK_BUDGETS) -> str:
    """Which configuration to pick under each byte budget (a fraction of dense), per panel: the best
    score among the configurations measured that hold no more than that."""
    panels = fronts(records)
    rows = []
    for budget in budgets:
        row = {"budget": f"<= {budget:g}x"}
        for (task, length), front in panels.items():
            r = pick(front, budget)
            row[f"{task} @{length}"] = "-" if r is None else f"{r['method']} ({_format_score(task, r['score'])})"
        rows.append(row)
    columns = [("budget", "KV bytes vs dense", "")] + [(f"{t} @{n}", f"{t.replace('perplexity', 'ppl')} @{n}", "") for t, n in panels]
    return format_table(rows, columns)


def baseline_table(records: list[dict]) -> str:
    """For every QuantizedCache baseline point: the best sparkkv configuration of the same panel that
    holds no more bytes, and whether it scores at least as well ('' when no baseline was measured)."""
    rows = []
    for (task, length), mine in _panels_of(records).items():
        sign = -1.0 if lower_is_better(task) else 1.0
        ours = [r for r in mine if family(r) in ("sparkkv", "sparkkv quantized")]
        for base in (r for r in mine if family(r) == "baseline"):
            fitting = [r for r in ours if r["kv_vs_dense"] <= base["kv_vs_dense"] + 1e-12]
            best = max(fitting, key=lambda r: (sign * r["score"], -r["kv_vs_dense"]), default=None)
            row = {"panel": f"{task} @{length}", "baseline": base["method"], "b_vs": base["kv_vs_dense"],
                   "b_score": _format_score(task, base["score"])}
            if best is None:
                row.update(method="-", verdict="no sparkkv point at these bytes")
            else:
                better = sign * best["score"] >= sign * base["score"]
                row.update(method=best["method"], vs=best["kv_vs_dense"], score=_format_score(task, best["score"]),
                           verdict="at least as good" if better else "worse")
            rows.append(row)
    if not rows:
        return ""
    return format_table(rows, [("panel", "panel", ""), ("baseline", "baseline", ""), ("b_vs", "its bytes vs dense", ".3f"),
                               ("b_score", "its score", ""), ("method", "best sparkkv at no more bytes", ""),
                               ("vs", "bytes vs dense", ".3f"), ("score", "score", ""), ("verdict", "sparkkv is", "")])


def _format_score(task: str, score: float) -> str:
    return f"{score:.2f}" if lower_is_better(task) else f"{score:.3f}"


def describe(records: list[dict]) -> str:
    """One line: model, n per cell (per column where the columns differ), what the scores are."""
    models = sorted({r["model"] for r in records})
    ns = sorted({r["n"] for r in records})
    if len(ns) > 1:
        per_column = {}
        for r in records:
            per_column.setdefault(_column(r), set()).add(r["n"])
        n_text = "n per cell: " + ", ".join(f"{c.replace('perplexity', 'ppl')} {'/'.join(map(str, sorted(v)))}"
                                           for c, v in per_column.items())
    else:
        n_text = f"n = {ns[0]} per cell" if ns else "no cells"
    return (
        f"model {', '.join(models)}; {n_text}; scores: task metric in [0, 1] "
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

    # score vs bytes (fraction of dense), every configuration a point, the Pareto front marked
    fig, axes = _panels(plt, len(keys))
    for ax, key in zip(axes.flat, keys):
        _front_panel(ax, by_task_length[key], *key)
    paths.append(_save(fig, axes, folder / "score_vs_bytes_front.png", ncol=5))
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
                elif family(group[0]) == "baseline":
                    style = dict(color=colors.get(name), linestyle=":", linewidth=2, marker="X")
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


_BASELINE_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2")  # reds / purples: the QuantizedCache lines


def _series_colors(records: list[dict]) -> dict[str, str]:
    """One colour per method series, the same in every panel and plot (dense is black; the quantized
    baselines take their own reds and purples, never used by a sparkkv series)."""
    baseline = dict.fromkeys(r.get("series") or r["method"] for r in records if family(r) == "baseline")
    names = dict.fromkeys(r.get("series") or r["method"] for r in records if family(r) != "baseline")
    names.pop("dense", None)
    palette = [c for c in (f"C{i}" for i in range(10)) if c not in ("C3", "C4", "C5", "C6")]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    colors.update({name: _BASELINE_COLORS[i % len(_BASELINE_COLORS)] for i, name in enumerate(baseline)})
    return colors


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
        if family(mine[0]) == "baseline":
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="X", markersize=8, linestyle=":", linewidth=2,
                    label=name, color=colors.get(name))
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


# the front plot: one style per family (the legend), the front as a step line through ringed points
_FAMILY_STYLES = {
    "dense": dict(marker="s", color="black", s=40, zorder=4),
    "sparkkv": dict(marker="o", color="C0", s=22, zorder=3),
    "sparkkv quantized": dict(marker="^", color="C2", s=26, zorder=3),
    "baseline": dict(marker="X", color="#d62728", s=80, zorder=5),
}
_FAMILY_LABELS = {"dense": "dense", "sparkkv": "sparkkv (channels / eviction)", "sparkkv quantized": "sparkkv quantized",
                  "baseline": "QuantizedCache baseline (quanto / HQQ)"}


def _front_panel(ax, records: list[dict], task: str, length: int) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for fam, style in _FAMILY_STYLES.items():
        mine = [r for r in records if family(r) == fam]
        if mine:
            ax.scatter([r["kv_vs_dense"] for r in mine], [r["score"] for r in mine], label=_FAMILY_LABELS[fam], **style)
    idx = pareto_front([(r["kv_vs_dense"], r["score"]) for r in records], lower_is_better(task))
    front = [records[i] for i in idx]
    if front:
        xs, ys = [r["kv_vs_dense"] for r in front], [r["score"] for r in front]
        ax.step(xs, ys, where="post", color="0.35", linestyle="--", linewidth=1.2, zorder=2, label="Pareto front")
        ax.scatter(xs, ys, s=130, facecolors="none", edgecolors="0.2", linewidths=1.2, zorder=6)
    labelled = {id(r) for r in front} | {id(r) for r in records if family(r) == "baseline"}
    for r in records:
        if id(r) in labelled:
            ax.annotate(r["method"], (r["kv_vs_dense"], r["score"]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color="#d62728" if family(r) == "baseline" else "0.15", zorder=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV bytes vs dense (log scale)")
    _score_axis(ax, task)
    if lower_is_better(task):
        ax.set_yscale("log")
    ax.set_title(f"{task} @ {length} tokens: Pareto front", fontsize=10)
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
