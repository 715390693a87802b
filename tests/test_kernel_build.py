"""The C++ extension loader (`sparkkv.kernels.build`): an interrupted build never blocks a later
run, a build lock held too long ends in a fallback with one warning saying what to delete, a
read-only folder holding the build is used, and a missing compiler or ninja still means: logged
once, "auto" falls back, "cpu" raises.

Every test builds a tiny CPython extension (no torch headers: about a second) in its own
TORCH_EXTENSIONS_DIR under tmp_path, never the shared kernel folder."""

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import sparkkv
from sparkkv.kernels import build

DUMMY = r"""
#include <Python.h>
#define SPK_STR2(x) #x
#define SPK_STR(x) SPK_STR2(x)
#define SPK_CAT2(a, b) a##b
#define SPK_CAT(a, b) SPK_CAT2(a, b)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, SPK_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC SPK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""

# what a run does on its first forward, with the dummy source: load it, report. argv: key, then
# JSON [[extensions root, source], ...]: each case in turn, the loader's memory of the key dropped between
LOAD = """
import json, logging, os, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from sparkkv.kernels import build
key = sys.argv[1]
for root, source in json.loads(sys.argv[2]):
    os.environ["TORCH_EXTENSIONS_DIR"] = root
    folder = Path(root) / key
    try:
        (folder / "probe").touch()
        (folder / "probe").unlink()
        writable = True
    except OSError:
        writable = False
    module = build.load(key, source)
    print(json.dumps({"answer": None if module is None else module.answer(), "writable": writable,
                      "reason": build.unavailable_reason(key, source)}), flush=True)
    build._built.pop(key, None)
    build._errors.pop(key, None)
"""


def load_command(key: str, *cases) -> list[str]:
    return [sys.executable, "-c", LOAD, key, json.dumps([[str(root), str(source)] for root, source in cases])]


@pytest.fixture
def dummy(tmp_path, monkeypatch):
    """(key, source path, extensions root): a fresh extension name in a fresh TORCH_EXTENSIONS_DIR
    (set for this process too); the loader's memory of the name is dropped afterwards."""
    key = f"sparkkv_test_{uuid.uuid4().hex[:10]}"
    source = tmp_path / "dummy.cpp"
    source.write_text(DUMMY)
    root = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    yield key, source, root
    build._built.pop(key, None)
    build._errors.pop(key, None)


def _env(root: Path, **extra) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(root), OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(Path(sparkkv.__file__).resolve().parents[1])
    return env


def _loaded(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def test_a_build_killed_midway_leaves_torch_lock_and_the_next_load_rebuilds(dummy, tmp_path):
    """SIGKILL (to the whole process group: python, ninja, the compiler) while torch holds its
    `lock`: the file stays. The next load must not wait for it (torch's own loader waits forever):
    it finds the lock stale, says so, rebuilds and loads."""
    key, source, root = dummy
    folder = root / key
    first = subprocess.Popen(load_command(key, (root, source)), env=_env(root), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (folder / "lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert (folder / "lock").exists()  # what an interrupted build leaves
    try:
        second = subprocess.run(load_command(key, (root, source)), env=_env(root), capture_output=True, text=True,
                                timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the load after an interrupted build hung (torch's stale `lock` was waited on)")
    [result] = _loaded(second)
    assert result["answer"] == 42 and result["reason"] is None
    assert "removing" in second.stderr and str(folder / "lock") in second.stderr
    assert not (folder / "lock").exists()


def test_a_build_lock_held_too_long_falls_back_with_one_warning(dummy, monkeypatch, caplog):
    key, source, root = dummy
    folder = root / key
    folder.mkdir(parents=True)
    holder = os.open(folder / "sparkkv-build.lock", os.O_RDWR | os.O_CREAT)  # a live builder (pid 424242, say)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"424242\n")
    (folder / "lock").touch()  # torch's lock beside it is the live builder's, not stale
    monkeypatch.setenv("SPARKKV_BUILD_TIMEOUT", "0.5")
    results = []

    def load_twice():  # in a thread: a regression that waits forever must fail this test, not hang the suite
        results.extend([build.load(key, str(source)), build.load(key, str(source))])  # decided once per process

    thread = threading.Thread(target=load_twice, daemon=True)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="sparkkv.kernels.build"):
            thread.start()
            thread.join(60)
        elapsed = time.monotonic() - start
        hung = thread.is_alive()
    finally:
        os.close(holder)
        if thread.is_alive():  # let a stuck load go (it holds the loader's lock that later tests need)
            (folder / "lock").unlink(missing_ok=True)
            thread.join(120)
    assert not hung, "the load waited on the build lock without a timeout"
    assert results == [None, None]
    assert 0.5 <= elapsed < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    for part in ("424242", str(folder), "delete", "SPARKKV_BUILD_TIMEOUT", "PyTorch reference"):
        assert part in warnings[0], (part, warnings[0])
    reason = build.unavailable_reason(key, str(source))
    assert "424242" in reason and f"delete {folder}" in reason
    assert (folder / "lock").exists()  # never removed while its builder may be alive


def _read_only(folder: Path, command: list[str]) -> list[str]:
    """`command` run where `folder` cannot be written: chmod -R a-w, and for root (whom chmod does
    not stop) also a read-only bind mount in a private mount namespace."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() != 0:
        return command
    wrap = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    if shutil.which("unshare") is None:
        pytest.skip("running as root (chmod does not stop root's writes) and no `unshare` for a read-only mount")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", wrap, str(folder), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root (chmod does not stop root's writes) and no read-only bind mount here: {probe.stderr.strip()}")
    return ["unshare", "-m", "sh", "-c", wrap, str(folder), *command]


def test_a_read_only_folder_holding_the_build_is_used(dummy, tmp_path):
    """A copy of a built folder, made read-only (a shared install, a read-only mount), loads; one
    built from another source, or one with no build, is refused with the reason (not loaded)."""
    key, source, root = dummy
    module = build.load(key, str(source))  # a normal first build, in this process
    assert module is not None and module.answer() == 42
    shipped = tmp_path / "shipped"
    shutil.copytree(root / key, shipped / "built" / key)
    (shipped / "empty" / key).mkdir(parents=True)
    other = tmp_path / "other.cpp"
    other.write_text(DUMMY.replace("42", "43"))
    folder = shipped / "built" / key
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    command = _read_only(shipped, load_command(key, (shipped / "built", source), (shipped / "built", other),
                                               (shipped / "empty", source)))
    try:
        used, other_source, empty = _loaded(subprocess.run(command, env=_env(shipped), capture_output=True, text=True,
                                                           timeout=150))
    finally:
        for path in [shipped, *shipped.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert not (used["writable"] or other_source["writable"] or empty["writable"]), "still writable: the test proves nothing"
    assert used["answer"] == 42 and used["reason"] is None
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()} == before
    for refused in (other_source, empty):
        assert refused["answer"] is None and "cannot be written" in refused["reason"], refused
        assert "TORCH_EXTENSIONS_DIR" in refused["reason"]
    assert "this source" in other_source["reason"] and "no build" in empty["reason"]


def test_no_ninja_is_logged_once_auto_falls_back_and_cpu_raises(dummy, monkeypatch, caplog):
    from torch.utils import cpp_extension

    key, source, root = dummy

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions (pip install ninja to get it)")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    with caplog.at_level(logging.WARNING, logger="sparkkv.kernels.build"):
        assert build.load(key, str(source)) is None
        assert build.load(key, str(source)) is None
    assert len(caplog.records) == 1 and "Ninja is required" in caplog.records[0].getMessage()
    assert "Ninja is required" in build.unavailable_reason(key, str(source))
    fd = os.open(root / key / "sparkkv-build.lock", os.O_RDWR)  # the failed build let go of its lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)

    # the real kernel's name in that state: "auto" serves with the PyTorch reference, "cpu" raises why
    from sparkkv import ops
    from sparkkv.kernels import cpu

    name = cpu._NAME
    monkeypatch.delitem(build._built, name, raising=False)
    monkeypatch.setitem(build._errors, name, build._errors[key])
    assert ops.resolve_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(RuntimeError, match="Ninja is required"):
        ops.resolve_backend("cpu", torch.device("cpu"))


def test_guarded_load_frees_another_librarys_extension_from_a_stale_torch_lock(dummy, tmp_path):
    """`build.guarded_load` is what sparkkv wraps around a library's own torch extension (quanto's):
    with a `lock` left by an interrupted build in that folder, torch's loader alone waits forever;
    under the guard the lock is removed (logged) and the extension builds and loads."""
    from torch.utils import cpp_extension

    key, source, _ = dummy
    folder = tmp_path / "library_build"
    folder.mkdir()
    (folder / "lock").touch()  # an interrupted build's leftover, no live builder

    def load():
        return cpp_extension.load(name=key, sources=[str(source)], build_directory=str(folder), verbose=False)

    results = []
    thread = threading.Thread(target=lambda: results.append(build.guarded_load(folder, key, load)), daemon=True)
    thread.start()
    thread.join(240)
    if thread.is_alive():
        (folder / "lock").unlink(missing_ok=True)
        thread.join(120)
        pytest.fail("the guarded load waited on a stale torch lock")
    [module] = results
    assert module.answer() == 42
    assert not (folder / "lock").exists()


def test_guarded_load_waits_for_a_live_builder_at_most_the_timeout(tmp_path, monkeypatch):
    folder = tmp_path / "library_build"
    folder.mkdir()
    holder = os.open(folder / "sparkkv-build.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"424242\n")
    (folder / "lock").touch()  # the live builder's
    monkeypatch.setenv("SPARKKV_BUILD_TIMEOUT", "0.3")
    try:
        with pytest.raises(build.BuildTimeout, match="424242"):
            build.guarded_load(folder, "some_ext", lambda: pytest.fail("loaded while another process builds"))
    finally:
        os.close(holder)
    assert (folder / "lock").exists()
