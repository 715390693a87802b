"""sparkkv: SparK channel-pruned KV cache for Hugging Face transformers.

Importing the package registers the `"sparkkv"` attention function (and its mask function)
with transformers, so `attn_implementation="sparkkv"` works in `from_pretrained`/`from_config`.

    import sparkkv
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparkkv")
    cache = sparkkv.SparKCache(sparkkv.SparKConfig(key_prune_ratio=0.8))
    out = model.generate(**inputs, **{sparkkv.CACHE_KWARG: cache})  # `cache=` on transformers >= 5.24
"""

import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import sparkkv_attention_forward
from .cache import PrefillCapture, SparKCache, SparKLayer
from .compat import UnsupportedModelError, check_model_class, sparkkv_mask
from .config import ATTN_IMPLEMENTATION, SparKConfig
from .method import compress_keys, compress_values
from .packed import ColumnPackedTensor, PackedTensor
from .quant import QuantizedTensor


# transformers 5.24 renamed the cache argument of `forward`/`generate` from `past_key_values` to
# `cache` (the old name warns, and goes away from `forward` in 5.40); older 5.x only know the old
# name. `model(ids, **{sparkkv.CACHE_KWARG: cache})` works on every supported release.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"

# The attention function accepts SDPA's boolean masks (True = attend), so it reuses SDPA's mask;
# the mask function also refuses models a SparKCache cannot serve, at their first forward.
AttentionInterface.register(ATTN_IMPLEMENTATION, sparkkv_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparkkv_mask)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CACHE_KWARG",
    "ColumnPackedTensor",
    "PackedTensor",
    "PrefillCapture",
    "QuantizedTensor",
    "SparKCache",
    "SparKConfig",
    "SparKLayer",
    "UnsupportedModelError",
    "check_model_class",
    "compress_keys",
    "compress_values",
]
__version__ = "0.1.0"

# The heavier subpackages load on first use, so `import sparkkv` stays light and
# `sparkkv.models.load(...)` still works after a plain `import sparkkv`.
_LAZY_SUBPACKAGES = ("eval", "models", "testbed")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
