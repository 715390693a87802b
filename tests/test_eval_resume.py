"""`sparkkv eval` after a crash or beside another run: a rerun finishes the grid from what is on disk
(loading the model only if a sample is missing), writes exactly one record per cell, and leaves
results.csv equal to the records; a second run on a folder in use refuses at once, naming the pid.

The last test kills real CLI processes with SIGKILL at random points of a small testbed grid
(SPARKKV_KILL_POINTS, default 20) and checks every rerun; SPARKKV_KILL_EXEC=1 starts every run as
`python -m sparkkv.cli` instead of a child of the fork server (tests/cli_processes.py; slow: the
imports alone take about 8 s of CPU per run here)."""

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


# --- real processes --------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(sparkkv.__file__).resolve().parents[1]), str(Path(__file__).parent)])
    return env


@pytest.fixture(scope="module")
def launcher():
    from cli_processes import ExecLauncher, ForkServer

    if os.environ.get("SPARKKV_KILL_EXEC") == "1":
        yield ExecLauncher(_env())
        return
    if not hasattr(os, "fork") or not Path("/proc/self/stat").exists():
        pytest.skip("the fork server needs fork() and /proc (Linux)")
    server = ForkServer(_env())
    yield server
    server.close()


def test_two_concurrent_runs_the_second_refuses_with_the_first_pid(launcher, finished, tmp_path):
    from cli_processes import wait_until

    out = tmp_path / "grid"
    first = launcher.start(argv(out), tmp_path / "first")
    lock = out / ".lock"
    assert wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid)
                      or (out / SAMPLES).is_file(), 60), first.output()
    second = launcher.start(argv(out), tmp_path / "second")
    code = launcher.wait(second)
    first_alive = launcher.alive(first)
    err = second.stderr.read_text()
    assert code == 3, second.output()
    assert first_alive, "the first run ended before the second could meet it: grid too small"
    assert len(err.strip().splitlines()) == 1 and f"pid {first.pid}" in err, err
    assert launcher.wait(first) == 0, first.output()
    check_folder(out, finished, tmp_path)
    third = launcher.start(argv(out), tmp_path / "third")  # the lock died with the first run
    assert launcher.wait(third) == 0, third.output()
    check_folder(out, finished, tmp_path)


def _lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def test_sigkill_at_random_points_every_rerun_finishes_the_grid(launcher, finished, tmp_path, seed):
    """Trials on fresh folders: 1-3 runs in a row killed with SIGKILL (at a random time, or a few ms
    after a random sample or record line appears), then a rerun to the end, checked like every run
    that finished on its own: one record per cell, equal to the uninterrupted run's, CSV = records."""
    from cli_processes import wait_until

    rng = random.Random(seed)
    points = int(os.environ.get("SPARKKV_KILL_POINTS", "20"))
    start = time.monotonic()
    calibrate = launcher.start(argv(tmp_path / "calibrate"), tmp_path / "calibrate")
    assert launcher.wait(calibrate) == 0, calibrate.output()
    full = time.monotonic() - start  # one whole run, as a child sees it
    kills, history, trial = 0, [], 0
    while kills < points:
        trial += 1
        out = tmp_path / f"trial{trial}"
        for attempt in range(rng.randint(1, 3)):
            run_ = launcher.start(argv(out), tmp_path / f"t{trial}-{attempt}")
            if rng.random() < 0.5:
                delay = rng.uniform(0, 1.1 * full)
                time.sleep(delay)
                how = f"after {delay:.3f} s"
            else:
                name = rng.choice([SAMPLES, RECORDS])
                target = _lines_in(out / name) + rng.randint(1, SAMPLE_LINES if name == SAMPLES else CELLS)
                wait_until(lambda: _lines_in(out / name) >= target or not launcher.alive(run_), 2 * full + 5)
                extra = rng.uniform(0, 0.005)
                time.sleep(extra)
                how = f"{extra * 1000:.1f} ms after line {target} of {name}"
            launcher.kill(run_)
            code = launcher.wait(run_)
            history.append(f"trial {trial} run {attempt}: {how}: {'killed' if code == -9 else f'exit {code}'}")
            context = f"seed {seed}\n" + "\n".join(history) + "\n" + run_.output()
            if code == -9:
                kills += 1
            else:  # it finished before the kill: a rerun that ended, checked as one
                assert code == 0, context
                check_folder(out, finished, tmp_path)
        rerun = launcher.start(argv(out), tmp_path / f"t{trial}-rerun")
        code = launcher.wait(rerun)
        context = f"seed {seed}\n" + "\n".join(history) + "\n" + rerun.output()
        assert code == 0, context
        try:
            check_folder(out, finished, tmp_path)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{context}") from None
    print(f"{kills} SIGKILLs in {trial} trials, {time.monotonic() - start:.1f} s; a whole run took {full:.2f} s")
