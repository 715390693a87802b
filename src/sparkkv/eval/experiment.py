"""One evaluation grid, end to end: tasks x lengths x configurations on one model, resumable.

    spec = GridSpec(model="smollm2-135m", tasks=["niah_single_2"], lengths=[2048], n=50,
                    configs=build_grid(["dense", "snapkv+spark"], [0.8], [256]))
    records = run_grid(spec, model, tokenizer, Store(out_dir))

For every (task, length) the samples are generated once, grouped in batches of equal length, and
each batch is prefilled once for all configurations (`runner.run_batch`). Per-sample results are
appended to the store as they finish and a cell's record as soon as all its samples are in, so an
interrupted run resumes where it stopped and a rerun skips finished cells.

Resuming never needs the model for work that is already on disk: each sample line carries what its
cell's record needs besides the samples themselves (the task's metric name and the dense bytes per
token of the model that computed it), so a run killed after a cell's last sample but before its
record finishes that cell from the file. The model is loaded (`load`) only when a sample must be
computed, or for a cell whose sample lines were written by a version that did not store those two
values. Two designs were possible: storing the two values, or loading the model lazily whenever a
cell is unrecorded. Storing them is what makes a resume independent of the model (a multi-GB model,
a network fetch, another dtype: the dense bytes are those of the run that measured the samples);
lazy loading remains only as the fallback for old folders.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields

from .. import __version__
from ..config import SparKConfig
from . import runner, tasks
from .grid import label, series
from .records import Store, cell_key

log = logging.getLogger(__name__)

# `SparKConfig` fields added after result folders already existed (issue 18's quantization). A cell's
# identity leaves each of them out while it holds its default, so every configuration that existed
# before keeps the key it had and old folders still resume; a new field goes at the end of this list.
LATER_FIELDS = ("key_bits", "value_bits", "quant_group_size", "mask_format")
_DEFAULTS = {f.name: f.default for f in fields(SparKConfig)}


def identity_config(config) -> dict | None:
    """What of a configuration defines its cells: None for dense, `to_dict()` otherwise, without the
    `LATER_FIELDS` that hold their defaults (so the keys of older configurations do not change)."""
    if config is None:
        return None
    data = config.to_dict()
    if isinstance(config, SparKConfig):
        for name in LATER_FIELDS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
    return data


@dataclass
class GridSpec:
    model: str
    tasks: list[str]
    lengths: list[int]
    n: int
    configs: list  # SparKConfig, None (dense) or baselines.QuantizedCacheConfig
    seed: int = 0
    batch_size: int = 4
    max_new_tokens: int | None = None  # overrides every task's own generation budget
    inputs: tasks.TaskInputs = field(default_factory=tasks.TaskInputs)

    def identity(self, task: str, length: int, config) -> dict:
        needed = tasks.needed_input(task)
        return {
            "model": self.model,
            "task": task,
            "length": length,
            "n": self.n,
            "seed": self.seed,
            "config": identity_config(config),
            "max_new_tokens": self.max_new_tokens,
            "input": None if needed is None else str(getattr(self.inputs, needed)),
            "ppl_tokens": self.inputs.ppl_tokens if task == "perplexity" else None,
        }


def pending_units(spec: GridSpec, store: Store) -> int:
    """(cell, sample) pairs still to compute."""
    total = 0
    for task in spec.tasks:
        for length in spec.lengths:
            for config in spec.configs:
                key = cell_key(spec.identity(task, length, config))
                if not store.finished(key):
                    total += sum(not store.sample_done(key, i) for i in range(spec.n))
    return total


def run_grid(spec: GridSpec, model, tokenizer, store: Store, progress=None, load=None) -> list[dict]:
    """Compute every unfinished cell of `spec`; returns the grid's records (old and new).

    `model` and `tokenizer` are used only if a sample must be computed; they may be None with
    `load` a callable returning `(model, tokenizer)`, called at most once and only then. Whatever
    is pending, the store's CSV is rewritten at the end, so it matches the records."""
    loaded: list = [model, tokenizer]

    def need_model():
        if loaded[0] is None:
            if load is None:
                raise ValueError("run_grid: a sample must be computed but no model was given (pass model= or load=)")
            loaded[:] = load()
        return loaded

    for task in spec.tasks:
        for length in spec.lengths:
            cells = {label(c): (c, cell_key(spec.identity(task, length, c))) for c in spec.configs}
            todo = {name: ck for name, ck in cells.items() if not store.finished(ck[1])}
            if not todo:
                continue
            pending = any(not store.sample_done(key, i) for _, key in todo.values() for i in range(spec.n))
            samples = None
            prefill_seconds = 0.0
            if pending:
                model, tokenizer = need_model()
                dense_per_token = runner.dense_bytes_per_token(model)
                samples = _samples(spec, task, length, tokenizer)
                for batch in runner.batches(samples, spec.batch_size):
                    configs = {
                        name: config
                        for name, (config, key) in todo.items()
                        if not all(store.sample_done(key, s.index) for s in batch)
                    }
                    if not configs:
                        continue

                    def on_result(name: str, result: runner.SampleResult, batch=batch) -> None:
                        key = todo[name][1]
                        if store.sample_done(key, result.index):
                            return
                        store.add_sample({"key": key, **asdict(result), "method": name, "task": task, "length": length,
                                          "metric": samples[0].metric, "dense_bytes_per_token": dense_per_token})
                        if progress is not None:
                            progress.update(1)

                    prefill_seconds += runner.run_batch(model, tokenizer, batch, configs, on_result)
            for name, (config, key) in todo.items():
                rows = [store.samples[key][i] for i in range(spec.n)]
                metric = rows[0].get("metric")
                dense_per_token = rows[0].get("dense_bytes_per_token")
                if metric is None or dense_per_token is None:  # sample lines of an older version
                    model, tokenizer = need_model()
                    if samples is None:
                        samples = _samples(spec, task, length, tokenizer)
                    metric, dense_per_token = samples[0].metric, runner.dense_bytes_per_token(model)
                results = [runner.SampleResult(**{f: row[f] for f in runner.SampleResult.__dataclass_fields__}) for row in rows]
                summary = runner.aggregate(results)
                store.add_record(
                    {
                        "key": key,
                        "task": task,
                        "model": spec.model,
                        "method": name,
                        "series": series(config),
                        "config": None if config is None else config.to_dict(),
                        "length": length,
                        "seed": spec.seed,
                        "metric": metric,
                        **summary,
                        "dense_bytes_per_token": dense_per_token,
                        "kv_vs_dense": summary["kv_bytes_per_token"] / dense_per_token,
                        "prefill_seconds": prefill_seconds,
                        "max_new_tokens": spec.max_new_tokens,
                        "version": __version__,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                )
                log.info("%s @%d %s: %.4f", task, length, name, summary["score"])
    store.write_csv()  # a run killed between a record and the table, then a rerun with nothing to do
    keys = {cell_key(spec.identity(t, length, c)) for t in spec.tasks for length in spec.lengths for c in spec.configs}
    return [r for r in store.records if r.get("key") in keys]


def _samples(spec: GridSpec, task: str, length: int, tokenizer) -> list:
    samples = tasks.generate(task, tokenizer, length, spec.n, spec.seed, spec.inputs)
    if spec.max_new_tokens is not None:
        for s in samples:
            s.max_new_tokens = spec.max_new_tokens
    return samples
