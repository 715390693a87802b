"""Build-on-first-use for the C++ kernels in this folder (torch.utils.cpp_extension + ninja).

Each extension is compiled once per machine with `-O3 -march=native -fopenmp` and cached by torch
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions). Without a compiler or ninja the
build fails; callers then use the PyTorch reference and say why (`unavailable_reason`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_lock = threading.Lock()
_built: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(name: str, source: str):
    """The compiled extension `name` from `source` (a .cpp file in this folder), or None when it
    cannot be built here (the reason is logged once and kept for `unavailable_reason`)."""
    if name in _built or name in _errors:
        return _built.get(name)
    with _lock:
        if name in _built or name in _errors:
            return _built.get(name)
        if os.environ.get("SPARKKV_CPU_KERNEL", "1") == "0":
            _errors[name] = "disabled by SPARKKV_CPU_KERNEL=0"
            return None
        try:
            from torch.utils.cpp_extension import load as load_extension

            _built[name] = load_extension(
                name=name,
                sources=[str(_HERE / source)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, unsupported platform...
            _errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("sparkkv C++ kernel %s unavailable, using the PyTorch reference (%s)", name, _errors[name])
    return _built.get(name)


def unavailable_reason(name: str, source: str) -> str | None:
    """None when the extension loads, else why not."""
    return None if load(name, source) is not None else _errors.get(name, "not built")
