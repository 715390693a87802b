"""Result files of an evaluation folder, written as the work finishes so a run can resume.

    DIR/records.jsonl   one JSON record per finished cell (task x model x configuration x length x n):
                        task, model, method, series, config (every SparKConfig field; null for
                        dense), length, n, seed, metric, score, kv_bytes_per_token,
                        dense_bytes_per_token, kv_vs_dense, seconds, prefill_seconds,
                        max_new_tokens, version, key, finished (+ nll, scored_tokens: perplexity)
    DIR/samples.jsonl   one line per finished (cell, sample): the per-sample score or NLL, the
                        prediction, bytes; a cell's record is written once all its n samples are in
    DIR/results.csv     the records as a table (rewritten after each cell and by `sparkkv report`)

A cell's `key` hashes everything that defines it (model, task, length, n, seed, configuration,
task inputs, generation limit), so a rerun of the same command skips finished cells and finished
samples, and a changed command computes only what is new.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

RECORDS = "records.jsonl"
SAMPLES = "samples.jsonl"
CSV = "results.csv"
CSV_COLUMNS = (
    "task", "model", "method", "length", "n", "metric", "score", "kv_bytes_per_token", "dense_bytes_per_token",
    "kv_vs_dense", "seconds", "version",
)


def cell_key(identity: dict) -> str:
    """Stable hash of a cell's identity (a JSON-serialisable dict)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out_dir(folder: Path) -> None:
    """ValueError unless `folder` is a writable directory; creates it (and only it) if missing.

    Called after every other argument is checked and before any model loads, so a bad `--out`
    fails at once, not after hours of work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {folder} cannot be created ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {folder} is not writable")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupted write: that work is redone
                continue
    return rows


class Store:
    """The records and per-sample results of one folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records = _read_jsonl(self.folder / RECORDS)
        self.done_cells = {r["key"] for r in self.records}
        self.samples: dict[str, dict[int, dict]] = {}
        for row in _read_jsonl(self.folder / SAMPLES):
            self.samples.setdefault(row["key"], {})[row["index"]] = row

    def finished(self, key: str) -> bool:
        return key in self.done_cells

    def sample_done(self, key: str, index: int) -> bool:
        return index in self.samples.get(key, {})

    def add_sample(self, row: dict) -> None:
        self.samples.setdefault(row["key"], {})[row["index"]] = row
        _append(self.folder / SAMPLES, row)

    def add_record(self, record: dict) -> None:
        self.records.append(record)
        self.done_cells.add(record["key"])
        _append(self.folder / RECORDS, record)
        write_csv(self.records, self.folder / CSV)


def _append(path: Path, row: dict) -> None:
    broken_tail = False  # a line cut by an interrupted write must not swallow the next one
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            broken_tail = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if broken_tail else "") + json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(folder: Path) -> list[dict]:
    """The finished cells of an evaluation folder (ValueError if it has none)."""
    path = Path(folder) / RECORDS
    if not path.is_file():
        raise ValueError(f"{folder} holds no {RECORDS}: run `sparkkv eval --out {folder}` first")
    return _read_jsonl(path)


def write_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_COLUMNS, "config"], extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "config": json.dumps(r.get("config"))})
