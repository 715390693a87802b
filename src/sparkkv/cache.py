"""`SparKCache`: a transformers `Cache` whose layers store the KV cache compressed.

Life of one layer (`SparKLayer`):
  prefill  `update` receives the prompt's dense K/V and hands them to the `"sparkkv"` attention
           function (attention.py) on the `CacheHandle`; it runs ordinary dense attention on them,
           then calls `compress_prefill` with a `PrefillInputs` (the model's own last query rows and
           the mask): the layer evicts tokens if the method says so, stores the survivors as one
           block of chunks (its key and value packers, `policies.py`) and drops the dense prompt.
  decode   `update` appends the new tokens to a small dense tail and hands attention a snapshot of
           what is stored (the handle's blocks; attention reads them with `ops.attend`), then
           moves storage on: with `compress_decode`, whenever the tail holds more than
           `block_size` tokens its oldest `block_size` become one more block, packed with the
           statistics of prefill; sliding layers drop what no later query can see.
Data flows one way: attention.py -> this module -> policies / store -> method / packed; attention
reads a snapshot through `ops`, and nothing here calls back into attention.

Layer types follow the model (`layer_specs`: its config's `layer_types`, `sliding_window`,
`attention_chunk_size`, as transformers' `DynamicCache` reads them). A full-attention layer keeps
every token. A sliding-window layer keeps what the next query can see: blocks whose tokens have all
left the window are dropped, so it holds at most `window - 1` tokens plus less than one block. A
chunked-attention layer drops the blocks of finished attention chunks. Sliding and chunked layers
are compressed like full ones (the channel policy applies), but never evicted: their window
already bounds them (docs/design.md).

Positions stay logical: `get_seq_length()` counts every token seen, evicted or expired ones
included, so RoPE positions and masks are those of the full sequence. A block knows the logical
position of each of its tokens (a start, or an int32 tensor after eviction) to look masks up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import masks, ops
from .config import SparKConfig
from .packed import storage_nbytes
from .policies import check_head_dim_for, key_packer, value_packer
from .prefill import PrefillInputs, compress_prompt
from .store import Block, BlockStore

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the handle the attention function receives
# ---------------------------------------------------------------------------------------------
_MISUSE = (
    "a SparKCache was used by an attention function other than 'sparkkv'. Load the model with "
    "attn_implementation='sparkkv' (after `import sparkkv`), e.g. "
    "AutoModelForCausalLM.from_pretrained(path, attn_implementation='sparkkv') or "
    "model.set_attn_implementation('sparkkv'). Models whose attention does not go through "
    "transformers' AttentionInterface cannot use a SparKCache; if the model was loaded with 'sparkkv', "
    "its attention code uses the cache's output itself: sparkkv.check_model_class(model) names the reason."
)


class CacheHandle:
    """What `SparKCache.update` returns in place of key/value tensors: one forward's view of a layer.

    prompt   the dense `(keys, values)` `[B, Hkv, S, D]` of a prefill forward (the attention
             function runs dense attention over them, then calls `layer.compress_prefill`); None later
    blocks   what the layer stored when this forward's tokens arrived (`store.Block`s, the dense tail
             last): the attention of this forward reads them through `attend`, whatever the layer
             does next; layers that reuse this layer's keys and values (KV sharing, Gemma 3n) read the
             same snapshot
    seen     logical tokens up to and including this forward's

    Only the `"sparkkv"` attention function knows what to do with it; any other code that treats it
    as a tensor gets a `TypeError` explaining how to load the model.
    """

    __slots__ = ("layer", "cache", "prompt", "blocks", "seen")

    def __init__(self, layer, prompt=None, blocks=None, seen: int = 0) -> None:
        self.layer = layer
        self.cache = None
        self.prompt = prompt
        self.blocks = blocks
        self.seen = seen

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, sinks: torch.Tensor | None = None):
        """Attention output `[B, q, Hq, Dv]` of `query [B, Hq, q, D]` over the snapshot."""
        return self.layer.attend_blocks(self.blocks, self.seen, query, mask, scaling, sinks)

    def __getattr__(self, name):
        raise TypeError(f"{_MISUSE} (attribute {name!r} was requested from the cache handle)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{_MISUSE} (torch function {getattr(func, '__name__', func)} got a cache handle)")

    def __repr__(self) -> str:
        return f"CacheHandle(layer={self.layer.layer_idx})"


# ---------------------------------------------------------------------------------------------
# layer types
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """What kind of attention a layer serves.

    attention_type: "full_attention", "sliding_attention" (a query at position i sees keys
        i - window < j <= i) or "chunked_attention" (keys of its own chunk of `window` tokens).
    full_index / num_full: the layer's index among the model's full-attention layers and their
        count (PyramidKV's depth schedule); None for other layer types or when unknown.
    """

    attention_type: str = "full_attention"
    window: int | None = None
    full_index: int | None = None
    num_full: int | None = None

    def first_needed(self, next_position: int) -> int:
        """The oldest logical position a query at `next_position` (or later) can attend to."""
        if self.attention_type == "sliding_attention":
            return max(0, next_position - self.window + 1)
        if self.attention_type == "chunked_attention":
            return (next_position // self.window) * self.window
        return 0

    def dense_tokens(self, seen: int) -> int:
        """Tokens transformers' `DynamicCache` keeps for this layer after `seen` tokens (its sliding
        layers keep `window - 1`; it treats chunked layers as sliding)."""
        return seen if self.attention_type == "full_attention" else min(seen, self.window - 1)


def layer_specs(model_config) -> list[LayerSpec]:
    """One `LayerSpec` per decoder layer of a transformers config (its text config for
    multimodal models), read the way `DynamicCache(config=...)` reads it."""
    config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if window is not None else "chunked_attention" if chunk is not None else "full_attention"
        types = [kind] * n
    full = [i for i, t in enumerate(types) if t not in ("sliding_attention", "chunked_attention")]
    specs = []
    for i, kind in enumerate(types):
        if kind == "sliding_attention" and window:
            specs.append(LayerSpec("sliding_attention", int(window)))
        elif kind == "chunked_attention" and (chunk or window):
            specs.append(LayerSpec("chunked_attention", int(chunk or window)))
        else:
            specs.append(LayerSpec("full_attention", None, full.index(i) if i in full else None, len(full)))
    return specs


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------
def _from_store(name: str, doc: str) -> property:
    """A read-only layer attribute that is its `BlockStore`'s."""
    return property(lambda layer: getattr(layer.store, name), doc=doc)


def _chunked_prefill_error(config: SparKConfig, seen: int, q_len: int) -> ValueError:
    return ValueError(
        f"a SparKCache with token eviction ({config.name}) compressed its prompt at the first forward "
        f"({seen} tokens), and now {q_len} more tokens arrive before any generated one: this is "
        "chunked prefill (generate(..., prefill_chunk_size=N)), whose later chunks the token budget would skip. "
        "Prefill the prompt in one forward (prefill_chunk_size=None; the prefill is dense SDPA either way), "
        "or, if these tokens are meant to follow a finished prompt uncompressed by eviction, call "
        "cache.end_prompt() before this forward"
    )


class SparKLayer(CacheLayerMixin):
    """One attention layer's compressed cache (see the module docstring): a `BlockStore`, the
    key and value packers of the config, and the layer type's window rules (`LayerSpec`)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, config: SparKConfig, layer_idx: int, spec: LayerSpec | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.spec = spec or LayerSpec()
        self.record_past = False  # transformers' rollback protocol: keep expired tokens until `crop`
        self._clear()

    def _clear(self) -> None:
        self.store = BlockStore()
        self.keys_packer = self.values_packer = None  # chosen at prefill, when the layer type is known
        self.prefilled = False
        self.prompt_open = False  # prefilled, and neither a one-token forward nor a crop since (chunked prefill)
        self.stats: dict = {}
        self.backend_report = ops.BackendReport(self.config.attention_backend)
        self.is_initialized = False

    # --- the CacheLayerMixin contract --------------------------------------------------------
    @property
    def is_sliding(self) -> bool:
        return self.spec.attention_type != "full_attention"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim_for(self.config, key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens' dense K/V `[B, Hkv, q, D]`. Returns a `CacheHandle` twice (the
        attention function reads this forward's view of the layer through it; it is not a tensor),
        then, after prefill, moves storage on (`_advance`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_not_a_prompt_chunk(key_states.shape[2])
        self.store.append(key_states, value_states)
        if not self.prefilled:
            handle = CacheHandle(self, prompt=(self.store.tail_keys, self.store.tail_values), seen=self.store.seen)
        else:
            handle = CacheHandle(self, blocks=self.store.parts(), seen=self.store.seen)
            self._advance()
        return handle, handle

    def _check_not_a_prompt_chunk(self, q_len: int) -> None:
        """Refuse the second chunk of a chunked prefill (transformers' `generate(..., prefill_chunk_size=N)`)
        on a layer that evicts: the token budget was applied to the first chunk, and later chunks
        would be stored without it. A forward of one token, a crop or `end_prompt()` closes the prompt."""
        if q_len == 1:
            self.prompt_open = False
        if self.prompt_open and q_len > 1 and self.config.eviction is not None and not self.is_sliding:
            raise _chunked_prefill_error(self.config, self.store.seen, q_len)

    def end_prompt(self) -> None:
        """The prompt is complete: later multi-token forwards are appended like generated tokens."""
        self.prompt_open = False

    def get_seq_length(self) -> int:
        return self.store.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """Masks cover every logical position (blocks look their columns up by position)."""
        if isinstance(query_length, torch.Tensor):  # older 5.x releases (5.0 does) pass cache_position
            query_length = query_length.shape[0]
        return self.store.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the same contract's name in transformers < 5.2

    def reset(self) -> None:
        self._clear()

    def activate_past_recording(self) -> None:
        self.record_past = True

    def offload(self):
        raise NotImplementedError("SparKCache does not support offloading (its packed layers stay on their device)")

    prefetch = offload

    # --- what the layer holds (`store`: blocks, the dense tail, the logical token count) --------
    seen = _from_store("seen", "logical tokens seen (evicted and expired ones included)")
    blocks = _from_store("blocks", "stored blocks, oldest first")
    tail_keys = _from_store("tail_keys", "dense recent keys [B, Hkv, S_tail, D], or None")
    tail_values = _from_store("tail_values", "dense recent values, or None")
    tail_len = _from_store("tail_len", "tokens in the dense tail")
    stored_tokens = _from_store("stored_tokens", "tokens physically stored (per kv-head)")

    @property
    def key_chunks(self) -> list:
        return [block.keys for block in self.store.blocks]

    @property
    def qn(self) -> torch.Tensor | None:
        """float32 `[B, Hkv, D]` window query norms (SparK, ThinK), or None."""
        return None if self.keys_packer is None else self.keys_packer.qn

    @property
    def think_channels(self) -> torch.Tensor | None:
        """int16 `[B, Hkv, T]`: ThinK's kept channels, or None."""
        return getattr(self.keys_packer, "channels", None)

    def tensors(self) -> list[torch.Tensor]:
        return self.store.tensors() + ([] if self.keys_packer is None else self.keys_packer.tensors())

    @property
    def nbytes(self) -> int:
        """Bytes this layer's tensors really hold (shared storages, like the per-head `chan`, once)."""
        return storage_nbytes(*self.tensors())

    # --- prefill ----------------------------------------------------------------------------
    @property
    def prefill_rows(self) -> int:
        """How many of the last prompt queries `compress_prefill` reads."""
        config = self.config
        return max(config.window_size, config.eviction_window if config.eviction else 0)

    def compress_prefill(self, inputs: PrefillInputs) -> None:
        """End of prefill: keep what this layer type needs, evict tokens (full-attention layers,
        if the method says so), then store the survivors compressed (`prefill.compress_prompt`).
        A fresh layer takes the prompt from `inputs` (so a layer can be prefilled without a model)."""
        if not self.is_initialized:
            self.update(inputs.keys, inputs.values)
        windowed = self.is_sliding
        self.keys_packer = key_packer(self.config, self.layer_idx, windowed)
        self.values_packer = value_packer(self.config, windowed)
        blocks, self.stats = compress_prompt(inputs, self.config, self.spec, self.keys_packer, self.values_packer)
        self.store.replace_tail(blocks)
        self.prefilled = self.prompt_open = True

    # --- decode -----------------------------------------------------------------------------
    def _advance(self) -> None:
        """After a forward's tokens arrived: pack the tail's oldest blocks (`compress_decode`) and
        drop what no later query can see (sliding / chunked layers)."""
        size = self.config.block_size
        while self.config.compress_decode and self.store.tail_len > size:
            like = self.store.blocks[0].keys if self.store.blocks else None
            keys, values, start = self.store.pop_tail(size)
            self.store.blocks.append(Block(self.keys_packer.pack(keys, start, like=like), self.values_packer.pack(values), start))
        self._expire()

    def _expire(self, rollback_point: bool = False) -> None:
        """Sliding / chunked layers: drop what neither the current query nor a later one can see
        (the current one too: with KV sharing, other layers of the same forward still read this
        layer). While recording the past for a rollback, only at a rollback point (`crop`), as
        transformers' sliding layers do."""
        if not self.is_sliding or (self.record_past and not rollback_point):
            return
        self.store.drop_before(self.spec.first_needed(max(self.store.seen - 1, 0)))

    def attend_blocks(self, blocks: list[Block], seen: int, query: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output `[B, q, Hq, Dv]` of `query [B, Hq, q, D]` (the last q of `seen` tokens)
        over `blocks`; `mask`: transformers' mask for this forward (`masks.block_parts`). Reads only."""
        parts = masks.block_parts(blocks, mask, seen, query.shape[2], query.shape[0], self.spec)
        backend = ops.backend(self.config.attention_backend, query.device)
        return ops.attend(query, parts, scaling, backend, sinks, self.backend_report)

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, sinks: torch.Tensor | None = None):
        """Attention of `query [B, Hq, q, D]`, the newest q tokens' queries, over what is stored now."""
        return self.attend_blocks(self.store.parts(), self.store.seen, query, mask, scaling, sinks)

    # --- cache operations -------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers >= 5.x convention: a negative
        count). A positive value is the older convention, the length to crop to. 0 removes nothing
        (a sliding layer that was recording the past then drops what is out of its window).

        Works through the dense tail and the blocks. After eviction the prompt block holds a
        different set of tokens per head, so cropping into it raises `NotImplementedError`.
        Cropping a sliding layer back to where its window needs tokens it already dropped raises
        `RuntimeError` (call `cache.activate_past_recording()` first, as transformers does).
        """
        if not self.is_initialized:
            return
        seen = self.store.seen
        n = max(seen - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove, 0)
        if n > seen:
            raise ValueError(f"cannot crop {n} tokens from a layer holding {seen}")
        if n == seen:  # everything: the next forward is a new prefill
            record_past = self.record_past
            self._clear()
            self.record_past = record_past
            return
        self.prompt_open = False
        if n:
            needed_from = self.spec.first_needed(seen - n) if self.is_sliding else None
            self.store.remove_last(n, needed_from, self.spec.attention_type)
        self._expire(rollback_point=True)

    def _index_batch(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.store.index_batch(index)
        if self.keys_packer is not None:
            self.keys_packer.index_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(torch.arange(self.store.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._index_batch(indices)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
class SparKCache(Cache):
    """A transformers `Cache` that stores the KV cache compressed with SparK (or a baseline).

    Pass it to a model loaded with `attn_implementation="sparkkv"`:

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparkkv")
        cache = sparkkv.SparKCache(sparkkv.SparKConfig(key_prune_ratio=0.8))
        model.generate(**inputs, **{sparkkv.CACHE_KWARG: cache})   # `cache=` (>= 5.24) or `past_key_values=`

    Layer types (full / sliding / chunked attention) are read from the model config at the first
    forward, or from `model_config` when given. One cache serves one generation (one prompt
    batch); build a new one per request (or `reset()` it).
    """

    def __init__(self, config: SparKConfig | None = None, model_config=None, **overrides) -> None:
        if config is None:
            config = SparKConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, SparKConfig):
            raise TypeError(f"config must be a SparKConfig, got {type(config).__name__}")
        super().__init__(layers=[])
        self.config = config
        self.specs: list[LayerSpec] | None = None
        if model_config is not None:
            self.bind(model_config)

    def bind(self, model_config) -> None:
        """Read the layer types from the model config (done by the attention function at the
        first forward when the cache was built without one)."""
        self.specs = layer_specs(model_config)
        for layer in self.layers:
            if layer.layer_idx < len(self.specs):
                layer.spec = self.specs[layer.layer_idx]

    def _new_layer(self, idx: int) -> SparKLayer:
        spec = self.specs[idx] if self.specs is not None and idx < len(self.specs) else None
        return SparKLayer(self.config, idx, spec)

    def layer(self, layer_idx: int) -> SparKLayer:
        """Layer `layer_idx`, created (with the layers before it) if it does not exist yet."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        handle, _ = self.layer(layer_idx).update(key_states, value_states)
        handle.cache = self
        return handle, handle

    def end_prompt(self) -> None:
        """Declare the prompt complete: later multi-token forwards (a question appended after a
        compressed context) are appended like generated tokens, not refused as chunked prefill.
        A one-token forward or a crop does the same implicitly."""
        for layer in self.layers:
            layer.end_prompt()

    def compress_prefill(self, layer_idx: int, inputs: PrefillInputs) -> None:
        """Prefill layer `layer_idx` from `inputs` without a model (benchmarks, `PrefillCapture`)."""
        self.layer(layer_idx).compress_prefill(inputs)

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold, all layers (each storage counted once)."""
        return storage_nbytes(*[t for layer in self.layers for t in layer.tensors()])

    def nbytes_by_layer_type(self) -> dict[str, int]:
        """Bytes held per attention type ("full_attention", "sliding_attention", ...)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.spec.attention_type] = out.get(layer.spec.attention_type, 0) + layer.nbytes
        return out

    def layer_stats(self) -> list[dict]:
        """Per-layer statistics (see `sparkkv.stats`)."""
        from .stats import layer_stats

        return [layer_stats(layer) for layer in self.layers]


class CaptureLayer(SparKLayer):
    """A dense layer that also keeps what its prefill compression read (`PrefillCapture`)."""

    def __init__(self, layer_idx: int, spec: LayerSpec | None, max_queries: int) -> None:
        super().__init__(SparKConfig(method="dense"), layer_idx, spec)
        self.max_queries = max_queries
        self.recorded: PrefillInputs | None = None

    @property
    def prefill_rows(self) -> int:
        return self.max_queries

    def compress_prefill(self, inputs: PrefillInputs) -> None:
        self.recorded = inputs
        super().compress_prefill(inputs)


class PrefillCapture(SparKCache):
    """A dense cache that records what compression needs, so one prefill serves many configurations.

    Prefill attention is dense for every configuration (compression happens at the end of each
    layer's prefill), so a grid of methods can share one prefill exactly:

        capture = sparkkv.PrefillCapture()
        out = model(input_ids, attention_mask=mask, **{sparkkv.CACHE_KWARG: capture})   # one dense prefill
        cache = capture.compress(SparKConfig(method="snapkv+spark", token_budget=512))
        # `cache` is what SparKCache(config) would hold after prefilling input_ids; decode with it.

    `max_queries` is how many last prompt queries are kept per layer: it bounds the `window_size`
    and `eviction_window` a later `compress` may use. `compress` may be called many times; every
    cache it returns is independent (they share the recorded dense tensors, which no cache
    modifies in place).
    """

    def __init__(self, max_queries: int = 256, model_config=None) -> None:
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be an int >= 1, got {max_queries!r}")
        self.max_queries = max_queries
        super().__init__(SparKConfig(method="dense"), model_config=model_config)

    def _new_layer(self, idx: int) -> CaptureLayer:
        spec = self.specs[idx] if self.specs is not None and idx < len(self.specs) else None
        return CaptureLayer(idx, spec, self.max_queries)

    @property
    def recorded(self) -> dict[int, PrefillInputs]:
        """layer index -> what its prefill compression read."""
        return {layer.layer_idx: layer.recorded for layer in self.layers if layer.recorded is not None}

    def compress(self, config: SparKConfig | None) -> SparKCache:
        """A new `SparKCache` for `config` (None = dense), prefilled from the recorded prefill."""
        if config is None:
            config = SparKConfig(method="dense")
        if not isinstance(config, SparKConfig):
            raise TypeError(f"config must be a SparKConfig or None, got {type(config).__name__}")
        recorded = self.recorded
        if not self.layers or any(layer.layer_idx not in recorded for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress needs a prefill first: run model(input_ids, cache=capture)")
        if any(layer.seen != recorded[layer.layer_idx].keys.shape[2] for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress must be called right after the prefill (the capture was decoded further)")
        cache = SparKCache(config)
        cache.specs = self.specs
        for layer in self.layers:
            new = cache._new_layer(layer.layer_idx)
            new.compress_prefill(recorded[layer.layer_idx])
            new.end_prompt()  # the recorded prompt is complete
            cache.layers.append(new)
        return cache
