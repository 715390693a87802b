"""Build-on-first-use for the C++ kernels in this folder (torch.utils.cpp_extension + ninja).

Each extension is compiled once per machine with `-O3 -march=native -fopenmp` (a portable build
without `-march=native` on request, to test the code a CPU without AVX-512 runs) and cached by
torch in its build folder, `TORCH_EXTENSIONS_DIR/<name>` (default
~/.cache/torch_extensions/py<version>_cpu/<name>; about a minute the first time).
Without a compiler or ninja the build fails: the reason is logged once and kept, and
`attention_backend="auto"` then uses the PyTorch reference ("cpu" raises).

A build never blocks a run indefinitely. torch serialises builds with a `lock` file that it creates
before compiling and deletes afterwards; a process killed while building (SIGKILL, SIGTERM, a
closed terminal) leaves that file behind, and torch's next build of the same extension waits for it
to disappear, forever. So every load here first holds an OS lock of our own, `fcntl.flock` on
`sparkkv-build.lock` beside torch's `lock` in the same folder. The OS releases a flock when its
holder dies, and every live builder of these extensions holds it while it is inside torch: so a
process that holds it and still finds torch's `lock` knows the file is stale, deletes it (with a
warning) and builds. A process that finds the flock taken waits for it (another process is
building; after 5 s it logs a warning naming that pid) for at most `SPARKKV_BUILD_TIMEOUT` seconds
(default 600), then gives up with one warning saying which pid holds it and which folder to delete
if no build is running: "auto" uses the PyTorch reference for the rest of the process, "cpu" raises
with that reason. `guarded_load(folder, key, load)` puts the same guard around another library's
torch extension (optimum-quanto's CPU extension, which the QuantizedCache baselines build on first
use in quanto's own package folder: `sparkkv.eval.baselines`).

A folder that cannot be written (a read-only mount, a shared install) is used as it is when it
holds a build of exactly this source and these flags for this torch and Python, which every
successful load records in `sparkkv-build.json` beside the library: the `.so` is imported directly
(torch's loader cannot run there, it creates its `lock` first). Otherwise the reason (read-only,
no matching build) is logged and kept like any other build failure.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: torch's own file lock only
    fcntl = None

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_lock = threading.Lock()
_built: dict[str, object] = {}
_errors: dict[str, str] = {}

TIMEOUT_ENV = "SPARKKV_BUILD_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds: a cold build takes about a minute on 2 cores
FLOCK = "sparkkv-build.lock"  # our flock, beside torch's `lock`
STAMP = "sparkkv-build.json"  # what the library in the folder was built from
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class BuildTimeout(RuntimeError):
    """Another process held the build lock longer than SPARKKV_BUILD_TIMEOUT."""


def load(name: str, source: str, portable: bool = False):
    """The compiled extension `name` from `source` (a .cpp file in this folder, or an absolute
    path), or None when it cannot be built here (the reason is logged once and kept for
    `unavailable_reason`)."""
    key = name + ("_portable" if portable else "")
    if key in _built or key in _errors:
        return _built.get(key)
    with _lock:
        if key in _built or key in _errors:
            return _built.get(key)
        arch = ["-DSPARKKV_PORTABLE"] if portable else ["-march=native"]
        try:
            _built[key] = _load_or_build(key, _HERE / source, ["-O3", "-fopenmp", *arch], ["-fopenmp"])
        except Exception as exc:  # no compiler, no ninja, unsupported platform, read-only folder, timeout...
            detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            _errors[key] = detail if isinstance(exc, BuildTimeout) else \
                f"the C++ extension {key} could not be built ({type(exc).__name__}: {detail[:300]})"
            log.warning("sparkkv %s; the PyTorch reference serves instead", _errors[key])
    return _built.get(key)


def unavailable_reason(name: str, source: str, portable: bool = False) -> str | None:
    """None when the extension loads, else why not."""
    key = name + ("_portable" if portable else "")
    return None if load(name, source, portable) is not None else _errors.get(key, "not built")


def build_folder(key: str) -> Path:
    """The folder torch builds extension `key` in (created if missing)."""
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "_get_build_directory"):  # TORCH_EXTENSIONS_DIR or torch's default root
        return Path(cpp_extension._get_build_directory(key, verbose=False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    os.makedirs(os.path.join(root, key), exist_ok=True)
    return Path(root) / key


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
        if value >= 0:
            return value
    except ValueError:
        pass
    log.warning("%s=%r is not a number of seconds >= 0: using %.0f", TIMEOUT_ENV, text, DEFAULT_TIMEOUT)
    return DEFAULT_TIMEOUT


def _stamp(key: str, source: Path, cflags: list[str], ldflags: list[str]) -> dict:
    import torch

    return {
        "name": key,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "torch": torch.__version__,
        "python": sys.version.split()[0] + getattr(sys, "abiflags", ""),
    }


def _library(folder: Path, key: str) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return folder / f"{key}{LIB_EXT}"


def _load_or_build(key: str, source: Path, cflags: list[str], ldflags: list[str]):
    from torch.utils import cpp_extension

    folder = build_folder(key)
    stamp = _stamp(key, source, cflags, ldflags)

    def build():
        module = cpp_extension.load(name=key, sources=[str(source)], extra_cflags=list(cflags),  # torch appends to
                                    extra_ldflags=list(ldflags), build_directory=str(folder), verbose=False)  # the lists
        _write_stamp(folder, stamp)
        log.info("sparkkv C++ kernel %s built or up to date (%s)", key, folder)
        return module

    return guarded_load(folder, key, build, read_only=lambda exc: _load_prebuilt(key, folder, stamp, exc))


def _remove_stale_torch_lock(folder: Path) -> None:
    """Called holding our flock: every live builder holds it, so a torch `lock` still there is stale."""
    stale = folder / TORCH_LOCK
    if stale.exists():
        log.warning("sparkkv: removing %s, left by a build that was interrupted (its process is gone); rebuilding", stale)
        stale.unlink(missing_ok=True)


def guarded_load(folder: Path, key: str, load, read_only=None):
    """`load()` (a call that builds or loads a torch C++ extension whose build folder is `folder`:
    this module's kernels, or a library's own extension) under the build guard: our flock, a stale
    torch `lock` removed, at most SPARKKV_BUILD_TIMEOUT seconds of waiting (`BuildTimeout`). Every
    process that builds that extension through here is safe from the others' interrupted builds. A
    folder that cannot be written goes to `read_only(exc)` (default: `load()` itself)."""
    if fcntl is None:
        return load()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / FLOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in _READ_ONLY:
            return read_only(exc) if read_only is not None else load()
        raise
    try:
        _acquire(fd, folder, key)
        _remove_stale_torch_lock(folder)
        return load()
    finally:
        os.close(fd)


def _acquire(fd: int, folder: Path, key: str) -> None:
    """Take the flock on `fd`, waiting at most SPARKKV_BUILD_TIMEOUT seconds (BuildTimeout)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        timeout = _timeout()
        start = time.monotonic()
        told = False  # a live build takes a minute: say why the run pauses (not for a quick up-to-date check)
        while True:
            waited = time.monotonic() - start
            if waited >= timeout:
                raise BuildTimeout(
                    f"the C++ extension {key} was not loaded: waited {timeout:.0f} s for pid {_holder(fd)}, which holds "
                    f"{folder / FLOCK} (it is building {key}). If no build is running, delete {folder} and rerun "
                    f"({TIMEOUT_ENV} sets the wait in seconds)"
                ) from None
            if not told and waited >= 5:
                log.warning("sparkkv: pid %s is building the C++ extension %s in %s; waiting for it (at most %.0f s, %s)",
                            _holder(fd), key, folder, timeout, TIMEOUT_ENV)
                told = True
            time.sleep(min(0.1, max(0.0, timeout - waited)))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _write_stamp(folder: Path, stamp: dict) -> None:
    path = folder / STAMP
    text = json.dumps(stamp, indent=1, sort_keys=True) + "\n"
    try:
        if path.is_file() and path.read_text() == text:
            return
        tmp = folder / f".{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:  # the build itself worked: only a later read-only use needs the stamp
        log.info("sparkkv: could not write %s (%s)", path, exc)


def _load_prebuilt(key: str, folder: Path, stamp: dict, why: OSError):
    """Import the library of a folder we cannot write, if it was built from exactly this source."""
    library = _library(folder, key)
    try:
        found = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        found = None
    if found != stamp or not library.is_file():
        what = "no build" if not library.is_file() else "no build of this source and these flags" if found else f"no {STAMP}"
        raise RuntimeError(
            f"{folder} cannot be written ({why.strerror or why}) and holds {what}: make it writable, or point "
            "TORCH_EXTENSIONS_DIR at a writable folder"
        )
    spec = importlib.util.spec_from_file_location(key, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("sparkkv C++ kernel %s loaded from the read-only folder %s", key, folder)
    return module
