"""`sparkkv eval` after a crash or beside another run: a rerun finishes the grid from what is on disk
(loading the model only if a sample is missing), writes exactly one record per cell, and leaves
results.csv equal to the records; a second run on a folder in use refuses at once, naming the pid.
"""

import csv
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

import sparkkv
from sparkkv import cli, models
from sparkkv.eval import records as rec
from sparkkv.eval.experiment import GridSpec, run_grid
from sparkkv.eval.records import RECORDS, SAMPLES, Store

GRID = ["eval", "--model", "testbed", "--tasks", "passkey", "kv_retrieval", "--lengths", "200", "--n", "3",
        "--methods", "dense", "snapkv+spark", "think", "--ratios", "0.8", "--budgets", "0.5", "--batch-size", "2",
        "--threads", "1", "--no-plots"]
CELLS = 2 * 3
SAMPLE_LINES = CELLS * 3


def argv(out: Path) -> list[str]:
    return [*GRID, "--out", str(out)]


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of GRID: the reference folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("reference") / "grid"
    assert cli.main(argv(out)) == 0
    return out


@pytest.fixture
def folder(finished, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(finished, out)
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def valid_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in lines(path)]  # every line must be complete JSON


def expected_csv(records: list[dict], tmp: Path) -> str:
    rec.write_csv(records, tmp)
    return tmp.read_text()


def check_folder(out: Path, reference: Path, tmp: Path) -> None:
    """Exactly one record per cell, equal to the uninterrupted run's; every line whole; the CSV is
    the records' table; no sample twice."""
    records = valid_rows(out / RECORDS)
    keys = [r["key"] for r in records]
    want = {r["key"]: r for r in valid_rows(reference / RECORDS)}
    assert sorted(keys) == sorted(want), "not exactly one record per cell"
    for r in records:
        w = want[r["key"]]
        for field in ("task", "method", "length", "n", "metric", "score", "kv_bytes_per_token", "dense_bytes_per_token",
                      "kv_vs_dense", "config"):
            assert r[field] == w[field], (field, r, w)
    samples = valid_rows(out / SAMPLES)
    assert len({(s["key"], s["index"]) for s in samples}) == len(samples) == SAMPLE_LINES
    table = (out / "results.csv").read_text()
    assert table == expected_csv(records, tmp / "expected.csv"), "results.csv does not match the records"
    assert len(list(csv.DictReader(table.splitlines()))) == CELLS


def spec_of(out: Path) -> GridSpec:
    args = cli.parse(argv(out))
    return GridSpec(model=args.model, tasks=args.tasks, lengths=args.lengths, n=args.n, configs=args.configs,
                    seed=args.seed, batch_size=args.batch_size)


# --- a run killed between its last sample line and the record (issue: every rerun exited 1) -------


def test_cut_last_record_line_is_rebuilt_from_the_samples_without_a_model(folder, finished, tmp_path, capsys, no_model):
    text = (folder / RECORDS).read_text()
    last = text.splitlines()[-1]
    (folder / RECORDS).write_text(text[: len(text) - len(last) // 2 - 1])  # cut mid-line, no newline
    samples = (folder / SAMPLES).read_text()
    code, out, err = run(argv(folder), capsys)
    assert code == 0, err
    assert (folder / SAMPLES).read_text() == samples  # nothing recomputed
    check_folder(folder, finished, tmp_path)
    assert "| dense |" in out


def test_samples_in_but_records_missing_finish_through_the_api_without_a_model(folder, finished, tmp_path):
    kept = lines(folder / RECORDS)[:-3]  # the last (task, length)'s three cells lost their records
    (folder / RECORDS).write_text("\n".join(kept) + "\n")
    store = Store(folder)
    try:
        records = run_grid(spec_of(folder), None, None, store)  # no model, no loader: must not need one
    finally:
        store.close()
    assert len(records) == CELLS
    check_folder(folder, finished, tmp_path)
    rebuilt = {r["key"]: r for r in records}
    for r in valid_rows(finished / RECORDS):  # the rebuilt records equal the lost ones (but the timings)
        assert rebuilt[r["key"]]["score"] == r["score"] and rebuilt[r["key"]]["seconds"] == r["seconds"]


def test_samples_in_but_records_missing_finish_through_the_cli_without_a_model(folder, finished, tmp_path, capsys, no_model):
    (folder / RECORDS).write_text("")
    code, _, err = run(argv(folder), capsys)
    assert code == 0, err
    check_folder(folder, finished, tmp_path)


def test_sample_lines_of_older_versions_load_the_model_once_and_lazily(folder, finished, tmp_path, capsys, monkeypatch):
    old = []  # lines written before the metric and the dense bytes were kept per sample
    for row in valid_rows(folder / SAMPLES):
        row.pop("metric"), row.pop("dense_bytes_per_token")
        old.append(json.dumps(row))
    (folder / SAMPLES).write_text("\n".join(old) + "\n")
    (folder / RECORDS).write_text("\n".join(lines(folder / RECORDS)[:-1]) + "\n")
    loads = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    code, _, err = run(argv(folder), capsys)
    assert code == 0, err
    assert len(loads) == 1
    records = valid_rows(folder / RECORDS)
    assert len(records) == CELLS and len({r["key"] for r in records}) == CELLS
    assert (folder / "results.csv").read_text() == expected_csv(records, tmp_path / "e.csv")


def test_stale_csv_is_rewritten_by_a_rerun_with_nothing_pending(folder, finished, tmp_path, capsys, no_model):
    records = valid_rows(folder / RECORDS)
    rec.write_csv(records[:-1], folder / "results.csv")  # killed between the record and the table
    code, _, err = run(argv(folder), capsys)
    assert code == 0, err
    check_folder(folder, finished, tmp_path)


def test_a_whole_last_line_without_its_newline_is_kept(folder, finished, tmp_path, capsys, no_model):
    text = (folder / RECORDS).read_text()
    (folder / RECORDS).write_text(text.rstrip("\n"))  # edited by hand: complete, but no newline
    code, _, err = run(argv(folder), capsys)
    assert code == 0, err
    assert (folder / RECORDS).read_text() == text
    check_folder(folder, finished, tmp_path)


# --- duplicates: never written, never reported -------------------------------------------------------


def test_duplicate_records_of_older_folders_are_read_and_reported_once(folder, finished, tmp_path, capsys, no_model):
    records = lines(folder / RECORDS)
    (folder / RECORDS).write_text("\n".join(records + records[:2]) + "\n")  # two runs at once, older version
    assert len(rec.read_records(folder)) == CELLS
    code, out, err = run(["report", str(folder), "--no-plots"], capsys)
    assert code == 0, err
    assert len(list(csv.DictReader((folder / "results.csv").read_text().splitlines()))) == CELLS
    assert out.count("| dense |") == 1
    code, _, err = run(argv(folder), capsys)
    assert code == 0, err
    assert len(lines(folder / RECORDS)) == CELLS + 2  # nothing appended
    with Store(folder) as store:
        assert len(store.records) == CELLS
        assert store.add_record(dict(store.records[0])) is False  # a second record of a cell: refused
    assert len(lines(folder / RECORDS)) == CELLS + 2


# --- one run per folder --------------------------------------------------------------------------------


def test_second_run_on_a_folder_in_use_refuses_naming_the_pid(folder, capsys, no_model):
    (folder / RECORDS).write_text("\n".join(lines(folder / RECORDS)[:3]) + "\n")  # work left, not to be touched
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}
    holder = Store(folder)  # this process holds the folder, as a running eval does
    try:
        code, out, err = run(argv(folder), capsys)
        assert code == 3, err
        assert cli.BUSY == 3
        assert len(err.strip().splitlines()) == 1 and f"pid {os.getpid()}" in err and str(folder) in err, err
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"} == before
        with pytest.raises(rec.FolderBusy, match=f"pid {os.getpid()}"):
            Store(folder)
        code, out, err = run(["report", str(folder), "--no-plots"], capsys)  # reads, writes nothing
        assert code == 0 and f"pid {os.getpid()}" in err and "results.csv" in err, err
        assert (folder / "results.csv").read_bytes() == before["results.csv"]
    finally:
        holder.close()
    code, out, err = run(argv(folder), capsys)  # released: the work is done now
    assert code == 0, err
    assert len(lines(folder / RECORDS)) == CELLS
