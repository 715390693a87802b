"""Build-on-first-use for the C++ kernels in this folder (torch.utils.cpp_extension + ninja).

Each extension is compiled once per machine with `-O3 -march=native -fopenmp` (a portable build
without `-march=native` on request, to test the code a CPU without AVX-512 runs) and cached by
torch (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions; about a minute the first time).
Without a compiler or ninja the build fails: the reason is logged once and kept, and
`attention_backend="auto"` then uses the PyTorch reference ("cpu" raises).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_lock = threading.Lock()
_built: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(name: str, source: str, portable: bool = False):
    """The compiled extension `name` from `source` (a .cpp file in this folder), or None when it
    cannot be built here (the reason is logged once and kept for `unavailable_reason`)."""
    key = name + ("_portable" if portable else "")
    if key in _built or key in _errors:
        return _built.get(key)
    with _lock:
        if key in _built or key in _errors:
            return _built.get(key)
        try:
            from torch.utils.cpp_extension import load as load_extension

            arch = ["-DSPARKKV_PORTABLE"] if portable else ["-march=native"]
            _built[key] = load_extension(
                name=key,
                sources=[str(_HERE / source)],
                extra_cflags=["-O3", "-fopenmp", *arch],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            log.info("sparkkv C++ kernel %s built", key)
        except Exception as exc:  # no compiler, no ninja, unsupported platform...
            _errors[key] = f"the C++ extension {key} could not be built ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            log.warning("sparkkv %s; the PyTorch reference serves instead", _errors[key])
    return _built.get(key)


def unavailable_reason(name: str, source: str, portable: bool = False) -> str | None:
    """None when the extension loads, else why not."""
    key = name + ("_portable" if portable else "")
    return None if load(name, source, portable) is not None else _errors.get(key, "not built")
