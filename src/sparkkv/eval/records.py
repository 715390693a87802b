"""Result files of an evaluation folder, written as the work finishes so a run can resume.

    DIR/records.jsonl   one JSON record per finished cell (task x model x configuration x length x n):
                        task, model, method, series, config (every SparKConfig field; null for
                        dense), length, n, seed, metric, score, kv_bytes_per_token,
                        dense_bytes_per_token, kv_vs_dense, seconds, prefill_seconds,
                        max_new_tokens, version, key, finished (+ nll, scored_tokens: perplexity)
    DIR/samples.jsonl   one line per finished (cell, sample): the per-sample score or NLL, the
                        prediction, bytes, the task's metric and the dense bytes per token; a cell's
                        record is written once all its n samples are in
    DIR/results.csv     the records as a table (rewritten after each cell, at the end of every
                        run and by `sparkkv report`; replaced atomically)
    DIR/.lock           held (an OS lock, `fcntl.flock`) by the one process writing the folder;
                        it holds that process's pid. The OS drops the lock when its process ends,
                        however it ends, so the file is never stale and is never deleted

A cell's `key` hashes everything that defines it (model, task, length, n, seed, configuration,
task inputs, generation limit), so a rerun of the same command skips finished cells and finished
samples, and a changed command computes only what is new.

Crash safety: every line is appended and fsynced on its own, so a killed run leaves at most one cut
line at the end of a file; `Store` (under the lock) cuts it off before appending, and a cut line is
work that is redone. A cell whose samples are all in but whose record is missing (killed between
the two) gets its record from its sample lines alone, without the model. Records are unique per
`key`: a `Store` never appends a second record of a cell, and reading keeps the first record of a
key (folders that older versions let two runs write at once hold duplicates).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: no folder lock
    fcntl = None

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
SAMPLES = "samples.jsonl"
CSV = "results.csv"
LOCK = ".lock"
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


# --- the folder lock ------------------------------------------------------------------------------


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock (`pid`, None if it could not be read)."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder, self.pid = Path(folder), pid
        who = f"pid {pid}" if pid is not None else "a process whose pid could not be read"
        super().__init__(f"{self.folder} is in use by another sparkkv run ({who}): wait for it to end or use another folder")


class FolderLock:
    """An exclusive `fcntl.flock` on DIR/.lock, taken at once or `FolderBusy` (never waits); not
    taken (`held` False) where the folder cannot be written at all.

    The OS releases it when the holding process ends, even by SIGKILL, so it is never stale; the
    holder writes its pid into the file for the other process's message. `release()` (or the end of
    a `with` block, or the process) gives it back; the file itself stays (deleting a lock file
    races with a process that has just opened it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # nobody can write here: nothing to guard
                log.info("%s cannot be written (%s): reading it without a lock", self.folder, exc.strerror)
                return
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FolderBusy(self.folder, _holder_pid(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _holder_pid(path: Path) -> int | None:
    """The pid the holder wrote (it writes right after taking the lock: retry briefly)."""
    for _ in range(20):
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        try:
            os.kill(pid, 0)  # alive? (a pid left by an earlier holder is replaced within microseconds)
        except PermissionError:
            return pid  # alive, another user's
        except OSError:
            time.sleep(0.05)
            continue
        return pid
    return None


# --- reading ----------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted write: that work is redone
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def unique_records(records: list[dict]) -> list[dict]:
    """The first record of each cell `key` (records without a key are all kept), in file order."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = r.get("key")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(r)
    return out


def _repair_tail(path: Path) -> None:
    """Cut a line left unfinished by a killed write (called under the lock: no writer is live).
    A last line that is complete JSON but lacks its newline (edited by hand) only gets the newline."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        while True:  # find the start of the last line
            f.seek(start)
            chunk = f.read(size - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            start = max(0, start - (1 << 20))
        begin = start + cut + 1 if cut >= 0 else 0
        try:
            json.loads(chunk[begin - start :].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.info("%s: dropping a line cut by an interrupted write (%d bytes)", path, size - begin)
            f.truncate(begin)
        else:
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


class Store:
    """The records and per-sample results of one folder (see the module docstring).

    Takes the folder's lock first (`FolderBusy` if another process holds it) and holds it until
    `close()` (or the end of a `with` block); then repairs a cut last line and reads the files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.folder)
        if self.lock.held:  # no other writer is alive: what is unfinished on disk is dead
            for name in (RECORDS, SAMPLES):
                _repair_tail(self.folder / name)
            for tmp in self.folder.glob(f".{CSV}.*.tmp"):  # left by a run killed while writing the table
                tmp.unlink(missing_ok=True)
        self.records = unique_records(_read_jsonl(self.folder / RECORDS))
        self.done_cells = {r["key"] for r in self.records if "key" in r}
        self.samples: dict[str, dict[int, dict]] = {}
        for row in _read_jsonl(self.folder / SAMPLES):
            if "key" in row and "index" in row:
                self.samples.setdefault(row["key"], {}).setdefault(row["index"], row)  # the first one wins

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finished(self, key: str) -> bool:
        return key in self.done_cells

    def sample_done(self, key: str, index: int) -> bool:
        return index in self.samples.get(key, {})

    def add_sample(self, row: dict) -> None:
        if self.sample_done(row["key"], row["index"]):
            return
        self.samples.setdefault(row["key"], {})[row["index"]] = row
        _append(self.folder / SAMPLES, row)

    def add_record(self, record: dict) -> bool:
        """Append the record of a cell and rewrite the CSV; False (nothing written) if the cell
        already has one."""
        if record["key"] in self.done_cells:
            log.warning("cell %s already has a record: not written twice", record["key"])
            return False
        self.records.append(record)
        self.done_cells.add(record["key"])
        _append(self.folder / RECORDS, record)
        self.write_csv()
        return True

    def write_csv(self) -> None:
        """Rewrite DIR/results.csv from every record of the folder."""
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
    """The finished cells of an evaluation folder, one per cell `key` (ValueError if it has no
    records file). Reads without the lock: a run may be appending (a cut last line is skipped)."""
    path = Path(folder) / RECORDS
    if not path.is_file():
        raise ValueError(f"{folder} holds no {RECORDS}: run `sparkkv eval --out {folder}` first")
    return unique_records(_read_jsonl(path))


def write_csv(records: list[dict], path: Path) -> None:
    """The records (one per cell `key`) as a table. Written to a temporary file and renamed over
    `path`, so a kill never leaves a half-written table; not written when `path` already holds it."""
    path = Path(path)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, "config"], extrasaction="ignore")
    writer.writeheader()
    for r in unique_records(records):
        writer.writerow({**r, "config": json.dumps(r.get("config"))})
    data = buffer.getvalue().encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
