"""The quantized caches users pick instead of sparkkv: transformers' `QuantizedCache`, run through its real
backends, as methods of the evaluation grid.

    quanto-int4, quanto-int2   QuantizedCache(backend="quanto", nbits=4 / 2)   (package optimum-quanto)
    hqq-int4, hqq-int2         QuantizedCache(backend="hqq", nbits=4 / 2)      (package hqq)

Both at QuantizedCache's own defaults: `q_group_size=64`, `residual_length=128`, `axis_key=axis_value=0`
(groups of 64 consecutive channels of one token, for keys and values alike; transformers' docstring calls
it per-channel, KIVI would quantize keys per channel over tokens). quanto is installed by the `quant`
extra (`pip install -e ".[quant]"`), HQQ by the `hqq` extra (its own: once installed, transformers
imports it in every `import transformers.cache_utils`, about 5 s per process).

A grid forks them from the same shared prefill as every other configuration (`runner.run_batch`):
prefill attention is dense for a `QuantizedCache` too (its first `update` quantizes the prompt and
returns it unquantized), so the captured prompt keys and values are fed to it layer by layer
(`prefill_cache`), exactly what its own prefill would store, and decoding then runs through the model
(whose `"sparkkv"` attention is plain SDPA for a cache that is not a `SparKCache`). Bytes are counted
as for a `SparKCache` (`cache_nbytes`): `untyped_storage().nbytes()` of every tensor the cache holds,
the inner tensors of quanto's tensor subclasses (packed codes, scales, shifts) and of HQQ's
`(codes, meta)` pairs, plus the dense residual keys and values (empty right after the prompt).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch

from ..tensors import storage_nbytes

# backend -> (module that must import, the pip package that provides it)
# backend -> (module to find, pip package, sparkkv extra that installs it)
BACKENDS = {"quanto": ("optimum.quanto", "optimum-quanto", "quant"), "hqq": ("hqq.core.quantize", "hqq", "hqq")}
BITS = (4, 2)
METHODS = tuple(f"{backend}-int{bits}" for backend in BACKENDS for bits in BITS)
# QuantizedCache's defaults (transformers 5.x `QuantizedLayer`), recorded in every cell's config
DEFAULT_GROUP_SIZE = 64
DEFAULT_RESIDUAL_LENGTH = 128


@dataclass(frozen=True)
class QuantizedCacheConfig:
    """One `QuantizedCache` configuration of the grid (its name is its method, e.g. `quanto-int4`)."""

    backend: str
    nbits: int
    q_group_size: int = DEFAULT_GROUP_SIZE
    residual_length: int = DEFAULT_RESIDUAL_LENGTH

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown QuantizedCache backend {self.backend!r}: expected one of {list(BACKENDS)}")
        if self.nbits not in BITS:
            raise ValueError(f"QuantizedCache nbits must be one of {list(BITS)} here, got {self.nbits!r}")

    @property
    def name(self) -> str:
        label = f"{self.backend}-int{self.nbits}"
        if self.q_group_size != DEFAULT_GROUP_SIZE:
            label += f" g{self.q_group_size}"
        if self.residual_length != DEFAULT_RESIDUAL_LENGTH:
            label += f" r{self.residual_length}"
        return label

    @property
    def method(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        """What defines the cell (its identity) and what the record keeps."""
        return {"cache": "QuantizedCache", **asdict(self)}


def parse(text: str) -> QuantizedCacheConfig | None:
    """The baseline a method name names (`quanto-int4`, ...), or None if it names none."""
    name = text.strip().lower()
    if name not in METHODS:
        return None
    backend, bits = name.split("-int")
    return QuantizedCacheConfig(backend, int(bits))


def is_baseline(config) -> bool:
    return isinstance(config, QuantizedCacheConfig)


def unavailable(backend: str) -> str | None:
    """Why the backend cannot run here (one line with the fix), or None when it can."""
    module, package, extra = BACKENDS[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"QuantizedCache(backend={backend!r}) needs the {package} package: pip install -e \".[{extra}]\" (or pip install {package})"
    try:
        from transformers.cache_utils import QuantizedCache  # noqa: F401
    except ImportError as exc:
        return f"this transformers has no QuantizedCache ({exc})"
    return None


def prefill_cache(capture, config: QuantizedCacheConfig, model_config):
    """A `QuantizedCache` holding the prompt that `capture` (a `sparkkv.PrefillCapture`) recorded, as
    if it had prefilled it itself: each layer's recorded dense keys and values go through its `update`."""
    from transformers.cache_utils import QuantizedCache

    reason = unavailable(config.backend)
    if reason is not None:
        raise RuntimeError(reason)
    recorded = capture.recorded
    if not recorded:
        raise RuntimeError("prefill_cache needs a PrefillCapture that has seen a prefill")
    if config.backend == "quanto" and next(iter(recorded.values())).keys.device.type == "cpu":
        _quanto_extension()
    cache = QuantizedCache(backend=config.backend, config=model_config, nbits=config.nbits,
                           q_group_size=config.q_group_size, residual_length=config.residual_length)
    for layer_idx in sorted(recorded):
        inputs = recorded[layer_idx]
        if inputs.valid is not None and not bool(inputs.valid.all()):
            raise ValueError("a QuantizedCache quantizes padding tokens with the rest: the grid prefills unpadded batches only")
        cache.update(inputs.keys, inputs.values, layer_idx)
    return cache


def _quanto_extension() -> None:
    """Build (or load) optimum-quanto's CPU extension under sparkkv's build guard before the cache
    needs it. quanto builds it with torch's loader on first use, in its own package folder; a run
    killed during that build (Ctrl-C in the first baseline run) leaves torch's `lock` there, and every
    later run would wait for it forever inside the first decode step. Through
    `build.guarded_load` the stale lock is removed and the build redone, with the wait bounded."""
    try:
        from optimum.quanto.library.extensions import get_extension

        ext = get_extension("quanto_cpp")
    except (ImportError, KeyError, AttributeError):  # another quanto layout: it builds as it does
        return
    from pathlib import Path

    from ..kernels import build

    build.guarded_load(Path(ext.build_directory), "quanto_cpp", lambda: ext.lib)


def tensors_of(obj) -> list[torch.Tensor]:
    """The plain tensors behind `obj`: itself, the inner tensors of a tensor subclass (through
    `__tensor_flatten__`, recursively: quanto's `WeightQBitsTensor` -> `PackedTensor` -> uint8),
    the tensors of a tuple / list / dict (HQQ's `(codes, meta)`)."""
    if obj is None:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_of(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_of(item)]
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for name in names for t in tensors_of(getattr(obj, name))]
        return [obj]
    return []


def cache_nbytes(cache) -> int:
    """Bytes a `QuantizedCache` holds: the storages of its quantized keys and values (codes, scales,
    zeros / shifts) and of its dense residual keys and values, each storage counted once."""
    tensors = []
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            tensors += tensors_of(getattr(layer, name, None))
    return storage_nbytes(*tensors)
