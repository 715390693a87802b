"""`sparkkv demo`: a preset of `sparkkv eval` on the real model, sized for a few minutes on 2 CPU cores.

For dense, SnapKV, SnapKV+SparK, SnapKV+ThinK, SparK and ThinK (key prune ratio 0.8; SnapKV keeps
three quarters of the prompt) it prints needle accuracy (RULER niah_single_2: one 7-digit number
hidden in a text haystack), the perplexity of a text continuation with the prefix held in the
compressed cache, its change against dense, and the KV bytes per token.

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
from .experiment import GridSpec, pending_units, run_grid

from .records import Store
from .report import format_table
from .tasks import TaskInputs

log = logging.getLogger(__name__)

RATIO = 0.8
PPL_TOKENS = 32
BUDGET = 0.75  # fraction of the prompt SnapKV keeps: where eviction alone still mostly retrieves


def demo_configs(ratio: float = RATIO, budget: float = BUDGET) -> list[SparKConfig | None]:
    return [
        None,
        SparKConfig(method="snapkv", token_budget=budget),
        SparKConfig(method="snapkv+spark", key_prune_ratio=ratio, token_budget=budget),
        SparKConfig(method="snapkv+think", key_prune_ratio=ratio, token_budget=budget),
        SparKConfig(method="spark", key_prune_ratio=ratio),
        SparKConfig(method="think", key_prune_ratio=ratio),
    ]


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
    columns = [("method", "method", ""), ("accuracy", "needle accuracy", ".2f")]
    if not testbed:
        columns += [("ppl", "perplexity", ".3f"), ("ppl_change", "ppl vs dense", "")]
    columns += [("kv_bytes_per_token", "KV bytes/token", ",.0f"), ("kv_vs_dense", "vs dense", ".3f")]
    return title + "\n\n" + format_table(rows, columns)


__all__ = ["demo_configs", "run_demo", "summary"]
