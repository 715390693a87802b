"""`sparkkv demo`: a preset of `sparkkv eval` on the real model, sized for a few minutes on 2 CPU cores.

For dense, SnapKV, SnapKV+SparK, SnapKV+ThinK, SparK and ThinK (key prune ratio 0.8; SnapKV keeps
three quarters of the prompt), sparkkv's quantized storage (plain 4-bit and 2-bit, SparK k0.8 with
quantized kept keys and values) and the quantized caches users would pick instead (transformers'
`QuantizedCache` with optimum-quanto at 4 and 2 bits, when the `quant` extra is installed; HQQ if only
it is), it prints needle accuracy (RULER niah_single_2: one 7-digit number hidden in a text haystack),
the perplexity of a text continuation with the prefix held in the compressed cache, its change
against dense, the KV bytes per token, which rows are on the Pareto front of score vs bytes, and
which configuration to pick under each byte budget.

The text (haystack and perplexity) is Python's own reference documentation (`pydoc_data.topics`,
part of every CPython install), so the demo needs no data files. If the real model cannot be fetched, one line
says so and the demo runs the testbed version (the shipped 3.7M-parameter retrieval model on its own
passkey / multikey / kv_retrieval tasks; no perplexity).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from ..config import SparKConfig
from . import baselines, report
from .experiment import GridSpec, pending_units, run_grid
from .records import Store
from .report import format_table
from .tasks import TaskInputs

log = logging.getLogger(__name__)

RATIO = 0.8
PPL_TOKENS = 32
BUDGET = 0.75  # fraction of the prompt SnapKV keeps: where eviction alone still mostly retrieves


PICK_BUDGETS = (1.0, 0.3, 0.2, 0.15, 0.1)


def quantized_configs(ratio: float = RATIO) -> list[SparKConfig]:
    """sparkkv's quantized rows: plain 4-bit and 2-bit (no channel policy), and SparK with 4-bit kept
    keys (ternary masks), 4-bit values, then 2-bit values with 80 % of the value channels pruned."""
    return [
        SparKConfig(method="none", key_bits=4, value_bits=4),
        SparKConfig(method="none", key_bits=2, value_bits=2),
        SparKConfig(method="spark", key_prune_ratio=ratio, key_bits=4, value_bits=4, mask_format="trits"),
        SparKConfig(method="spark", key_prune_ratio=ratio, key_bits=4, value_bits=2, mask_format="trits"),
    ]


def demo_baselines() -> tuple[list[baselines.QuantizedCacheConfig], str | None]:
    """The QuantizedCache rows the installed packages allow (quanto at 4 and 2 bits, else HQQ), and a
    line saying what is left out and why (None when quanto runs)."""
    if baselines.unavailable("quanto") is None:
        return [baselines.parse("quanto-int4"), baselines.parse("quanto-int2")], None
    if baselines.unavailable("hqq") is None:
        return [baselines.parse("hqq-int4"), baselines.parse("hqq-int2")], None
    return [], f"QuantizedCache baselines left out: {baselines.unavailable('quanto')}"


def demo_configs(ratio: float = RATIO, budget: float = BUDGET, quantized: bool = True) -> list:
    configs = [
        None,
        SparKConfig(method="snapkv", token_budget=budget),
        SparKConfig(method="snapkv+spark", key_prune_ratio=ratio, token_budget=budget),
        SparKConfig(method="snapkv+think", key_prune_ratio=ratio, token_budget=budget),
        SparKConfig(method="spark", key_prune_ratio=ratio),
        SparKConfig(method="think", key_prune_ratio=ratio),
    ]
    if quantized:
        configs += quantized_configs(ratio) + demo_baselines()[0]
    return configs


def demo_text(folder: Path) -> Path:
    """Write the demo's perplexity text (Python's reference documentation) into `folder`."""
    from pydoc_data.topics import topics

    path = Path(folder) / "python_reference_topics.txt"
    if not path.is_file():
        path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def real_spec(model: str, n: int, lengths: list[int], seed: int, text: Path) -> tuple[GridSpec, GridSpec]:
    needle = GridSpec(model=model, tasks=["niah_single_2"], lengths=lengths, n=n, configs=demo_configs(), seed=seed,
                      batch_size=6, max_new_tokens=12, inputs=TaskInputs(haystack=text))
    ppl = GridSpec(model=model, tasks=["perplexity"], lengths=lengths, n=max(1, n // 4), configs=demo_configs(), seed=seed,
                   batch_size=6, inputs=TaskInputs(text=text, ppl_tokens=PPL_TOKENS))
    return needle, ppl


def run_demo(model: str = "smollm2-135m", n: int | None = None, lengths: list[int] | None = None, seed: int = 0,
             out: Path | None = None, stream=None, progress=None) -> list[dict]:
    """Run the preset and print its table to `stream` (stdout). Returns the records.

    `progress(total, desc)`, if given, makes a progress bar (an object with `update(k)` and `close()`)."""
    from .. import models

    stream = stream or sys.stdout
    start = time.perf_counter()
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="sparkkv-demo-"))
    store = Store(folder)
    try:
        loaded = models.load(model)
        testbed = model == "testbed"
    except models.ModelLoadError as exc:
        print(f"could not fetch {model} ({exc}); running the testbed version instead", file=stream)
        loaded, testbed, model = models.load("testbed"), True, "testbed"
    if testbed:
        spec = GridSpec(model=model, tasks=["passkey", "multikey", "kv_retrieval"], lengths=lengths or [1024], n=n or 10,
                        configs=demo_configs(budget=0.25), seed=seed, batch_size=5)
        specs = [spec]
    else:
        specs = list(real_spec(model, n or 12, lengths or [1024], seed, demo_text(folder)))
    bar = progress(sum(pending_units(s, store) for s in specs), "demo (configuration x sample)") if progress else None
    records = []
    try:
        for s in specs:
            records += run_grid(s, *loaded, store, bar)
    finally:
        if bar is not None:
            bar.close()
    print(summary(records, testbed), file=stream)
    note = demo_baselines()[1]
    if note:
        print(f"\n{note}", file=stream)
    print(f"\n(done in {time.perf_counter() - start:.0f} s; records in {folder})", file=stream)
    return records


def summary(records: list[dict], testbed: bool) -> str:
    """The demo table: one row per configuration."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    needle = [r for r in records if r["task"] != "perplexity"]
    ppl = {r["method"]: r["score"] for r in records if r["task"] == "perplexity"}
    rows = []
    for method in methods:
        mine = [r for r in needle if r["method"] == method]
        row = {
            "method": method,
            "accuracy": sum(r["score"] for r in mine) / len(mine),
            "ppl": ppl.get(method),
            "kv_bytes_per_token": sum(r["kv_bytes_per_token"] for r in mine) / len(mine),
            "kv_vs_dense": sum(r["kv_vs_dense"] for r in mine) / len(mine),
        }
        if ppl.get(method) is not None and ppl.get("dense"):
            row["ppl_change"] = f"{100 * (ppl[method] / ppl['dense'] - 1):+.1f}%"
        rows.append(row)
    first = needle[0]
    tasks = ", ".join(dict.fromkeys(r["task"] for r in needle))
    title = (
        f"model {first['model']}, {first['length']}-token contexts; needle accuracy: {tasks}, n={first['n']} per task"
        + ("" if testbed else f" in Python's reference docs; perplexity: {records[-1]['n']} windows of the same text, "
           f"{first['length']} tokens in the cache, the next {PPL_TOKENS} scored")
        + f"; KV bytes per token after the prompt (dense: {first['dense_bytes_per_token']:,})"
    )
    # the Pareto fronts of needle accuracy and of perplexity against bytes
    on_needle = {rows[i]["method"] for i in report.pareto_front([(r["kv_vs_dense"], r["accuracy"]) for r in rows])}
    with_ppl = [r for r in rows if r.get("ppl") is not None]
    on_ppl = {with_ppl[i]["method"] for i in report.pareto_front([(r["kv_vs_dense"], r["ppl"]) for r in with_ppl], True)}
    for row in rows:
        row["front"] = " + ".join(name for name, on in (("needle", row["method"] in on_needle), ("ppl", row["method"] in on_ppl)) if on)
        if baselines.parse(row["method"].split(" ")[0]) is not None:
            row["method"] += " (QuantizedCache)"
    columns = [("method", "method", ""), ("accuracy", "needle accuracy", ".2f")]
    if not testbed:
        columns += [("ppl", "perplexity", ".3f"), ("ppl_change", "ppl vs dense", "")]
    columns += [("kv_bytes_per_token", "KV bytes/token", ",.0f"), ("kv_vs_dense", "vs dense", ".3f"),
                ("front", "on the Pareto front", "")]
    return title + "\n\n" + format_table(rows, columns) + "\n\n" + _picks(rows, testbed)


def _picks(rows: list[dict], testbed: bool) -> str:
    """One line per byte budget: the row with the best needle accuracy among those that hold at most
    that fraction of the dense bytes (ties: the better perplexity, then the fewer bytes)."""
    lines = ["what to pick under a byte budget (best needle accuracy within it" + ("" if testbed else ", then perplexity") + "):"]
    for budget in PICK_BUDGETS:
        fitting = [r for r in rows if r["kv_vs_dense"] <= budget + 1e-12]
        if not fitting:
            lines.append(f"  <= {budget:g}x dense: nothing measured fits")
            continue
        best = max(fitting, key=lambda r: (round(r["accuracy"], 9), -(r.get("ppl") or 0.0), -r["kv_vs_dense"]))
        ppl = "" if best.get("ppl") is None else f", perplexity {best['ppl']:.3f}"
        lines.append(f"  <= {budget:g}x dense: {best['method']} (needle {best['accuracy']:.2f}{ppl}, {best['kv_vs_dense']:.3f}x)")
    return "\n".join(lines)


__all__ = ["demo_baselines", "demo_configs", "quantized_configs", "run_demo", "summary"]
