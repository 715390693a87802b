"""`SparKCache`: a transformers `Cache` whose layers store prompt keys packed (SparK).

Life of one layer (`SparKLayer`):
  prefill  `update` appends the prompt's dense K/V; the `"sparkkv"` attention function runs
           ordinary dense attention, then calls `compress_prefill` with the model's own query
           states: the last `window_size` queries score the channels, the keys are packed
           (and tokens evicted first, if the method says so) and the dense keys are dropped.
  decode   new tokens enter a small dense tail; attention reads the packed chunks (rebuilt one
           at a time, transiently) plus the tail. With `compress_decode`, whenever the tail
           holds more than `block_size` tokens its oldest `block_size` are packed with the
           query norms stored at prefill.

Positions stay logical: `get_seq_length()` counts every token seen, evicted ones included, so
RoPE positions and masks are those of the full sequence. A layer that evicted tokens keeps
the logical position of every stored token to look up the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attention import CacheHandle, grouped_attention
from .config import SparKConfig
from .eviction import evict_tokens, resolve_budget
from .method import check_head_dim, compress_keys, compress_values, think_keep_mask, window_query_norm
from .packed import ColumnPackedTensor, storage_nbytes

logger = logging.getLogger(__name__)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy unless `t` already owns exactly its storage (views pin their base)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone()


def _tensors(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else x.tensors()


def _query_valid(mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """bool `[B, q]`: which query rows are real tokens. A query attends to itself iff it is not
    padding, so this is the diagonal of the (prefill) mask. None when there is no mask."""
    if mask is None:
        return None
    diag = mask[:, 0, torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)]
    valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return valid.expand(batch, q_len)


@dataclass
class PrefillInputs:
    """What compressing one layer at the end of prefill needs from the prefill forward.

    keys, values `[B, Hkv, S, D]` (dense, the whole prompt); queries `[B, Hq, n, D]`, the last n
    prompt queries (after RoPE and the model's query norm); mask_rows `[B, 1 or Hkv, n, S]`, the
    prefill mask's last n rows (bool or additive), or None for plain causal; valid `[B, S]` bool,
    the non-padding prompt tokens, or None; num_layers: the model's layer count (PyramidKV).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    mask_rows: torch.Tensor | None
    valid: torch.Tensor | None
    scaling: float
    num_layers: int | None

    @classmethod
    def from_forward(cls, layer, query, mask, scaling, num_layers, rows: int) -> "PrefillInputs":
        keys, values = layer.tail_keys, layer.tail_values
        b, _, s, _ = keys.shape
        n = min(rows, query.shape[2])
        return cls(
            keys=keys,
            values=values,
            queries=query[:, :, -n:].contiguous() if n < query.shape[2] else query,
            mask_rows=None if mask is None else mask[:, :, -n:, :],
            valid=_query_valid(mask, query.shape[2], s, b),
            scaling=scaling,
            num_layers=num_layers,
        )


class SparKLayer(CacheLayerMixin):
    """One attention layer's packed cache. See the module docstring."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, config: SparKConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.key_chunks: list = []  # packed keys of compressed tokens, oldest first
        self.value_chunks: list = []  # their values: dense tensors, or PackedTensor when pruned
        self.tail_keys: torch.Tensor | None = None  # dense recent tokens [B, H, S_tail, D]
        self.tail_values: torch.Tensor | None = None
        self.qn: torch.Tensor | None = None  # [B, H, D] window query norms (float32)
        self.positions: torch.Tensor | None = None  # int32 [B, H, S_chunks] logical positions; None = contiguous
        self.think_channels: torch.Tensor | None = None  # [B, H, T] ThinK's kept channels
        self.seen = 0  # logical tokens seen (evicted included)
        self.prefilled = False
        self.stats: dict = {}
        self.record_window = 0  # PrefillCapture: keep this many last prefill query rows
        self.recorded: PrefillInputs | None = None

    # --- the CacheLayerMixin contract --------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim(key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.tail_keys is None:
            self.tail_keys, self.tail_values = key_states, value_states
        else:
            self.tail_keys = torch.cat([self.tail_keys, key_states], dim=2)
            self.tail_values = torch.cat([self.tail_values, value_states], dim=2)
        self.seen += key_states.shape[2]
        handle = CacheHandle(self)
        return handle, handle

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older 5.x releases (5.0 does) pass cache_position
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the same contract's name in transformers < 5.2

    def reset(self) -> None:
        record_window = self.record_window
        self.__init__(self.config, self.layer_idx)
        self.record_window = record_window

    def offload(self):
        raise NotImplementedError("SparKCache does not support offloading (its packed layers stay on their device)")

    prefetch = offload

    # --- sizes ------------------------------------------------------------------------------
    @property
    def tail_len(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    @property
    def stored_tokens(self) -> int:
        """Tokens physically stored (per kv-head), after eviction."""
        return sum(_seq_len(c) for c in self.key_chunks) + self.tail_len

    @property
    def nbytes(self) -> int:
        """Bytes this layer's tensors really hold."""
        held = [t for c in self.key_chunks + self.value_chunks for t in _tensors(c)]
        held += [self.tail_keys, self.tail_values, self.qn, self.positions, self.think_channels]
        return storage_nbytes(*held)  # shared tensors (the per-head `chan`) count once

    # --- attention --------------------------------------------------------------------------
    def attend(self, module, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, **kwargs) -> torch.Tensor:
        """Attention output `[B, q, Hq, D]` for `query [B, Hq, q, D]` (the new tokens' queries)."""
        q_len = query.shape[2]
        if self.config.channel_policy == "dense" or not self.prefilled:
            # Prefill (or no compression at all): the cache holds the dense K/V of every token.
            if self.key_chunks:
                raise RuntimeError("internal error: dense attention requested on a compressed layer")
            out, _ = sdpa_attention_forward(
                module, query, self.tail_keys, self.tail_values, mask, scaling=scaling, **kwargs
            )
            if self.record_window and self.recorded is None:
                num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
                self.recorded = PrefillInputs.from_forward(self, query, mask, scaling, num_layers, self.record_window)
            if self.config.channel_policy != "dense":
                num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
                self.compress_prefill(PrefillInputs.from_forward(self, query, mask, scaling, num_layers, query.shape[2]))
            return out
        chunks = list(zip(self.key_chunks, self.value_chunks))
        if self.tail_len:
            chunks.append((self.tail_keys, self.tail_values))
        out = grouped_attention(query, chunks, self._stored_mask(mask, q_len), scaling)
        del chunks
        if self.config.compress_decode:
            self._compress_tail()
        return out

    def _stored_mask(self, mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """The mask restricted to the stored tokens, in storage order: `[B, 1 or H, q, S_stored]`."""
        if self.positions is None:
            if mask is None:
                return None
            return mask[..., -self.seen :] if mask.shape[-1] != self.seen else mask
        b, h = self.positions.shape[:2]
        tail_pos = torch.arange(self.seen - self.tail_len, self.seen, device=self.positions.device, dtype=torch.int64)
        pos = torch.cat([self.positions.long(), tail_pos.expand(b, h, -1)], dim=-1)  # [B, H, S_stored]
        if mask is None:
            if q_len == 1:
                return None
            q_pos = torch.arange(self.seen - q_len, self.seen, device=pos.device)
            return pos.unsqueeze(2) <= q_pos.view(1, 1, q_len, 1)
        offset = mask.shape[-1] - self.seen  # masks are sized to the logical length
        mask = mask.expand(b, h, q_len, mask.shape[-1])
        return mask.gather(-1, (pos + offset).unsqueeze(2).expand(b, h, q_len, pos.shape[-1]))

    # --- compression ------------------------------------------------------------------------
    def compress_prefill(self, inputs: "PrefillInputs") -> None:
        """End of prefill: evict tokens (if the method says so), then pack the surviving keys."""
        config = self.config
        keys, values = inputs.keys, inputs.values
        b, h, s, _ = keys.shape
        query, valid_q = inputs.queries, inputs.valid
        if config.eviction is not None and query.shape[2] < min(config.eviction_window, s):
            raise ValueError(f"eviction_window={config.eviction_window} needs more prefill queries than were recorded ({query.shape[2]})")
        positions = None
        if config.eviction is not None:
            budget = resolve_budget(config, s, self.layer_idx, inputs.num_layers)
            keys, values, positions = evict_tokens(config, keys, values, query, inputs.mask_rows, budget, inputs.scaling, valid_q)
        w = min(config.window_size, s)
        if w > query.shape[2]:
            raise ValueError(f"window_size={config.window_size} needs more prefill queries than were recorded ({query.shape[2]})")
        window_mask = None if valid_q is None else valid_q[:, -w:]
        self.qn = window_query_norm(query[:, :, -w:], h, window_mask)
        self.key_chunks = [self._pack_keys(keys)]
        self.value_chunks = [self._pack_values(values)]
        self.positions = None if positions is None else positions.to(torch.int32).contiguous()
        self.tail_keys = self.tail_values = None
        self.prefilled = True
        self.stats = {"prompt_tokens": s, "kept_tokens": keys.shape[2]}

    def _pack_keys(self, keys: torch.Tensor):
        """Pack keys with the channel policy: SparK (per token), ThinK (per head), or none."""
        config = self.config
        if config.channel_policy == "spark":
            # Seeded per layer and per block, so sampled recoveries are reproducible.
            seed = config.seed + 7919 * self.layer_idx + 104729 * (self.seen - self.tail_len)
            generator = torch.Generator().manual_seed(seed)
            packed = compress_keys(keys, None, config, qn=self.qn, generator=generator)
            first = self.key_chunks[0] if self.key_chunks else None
            if first is not None and packed.chan is not None and torch.equal(first.chan, packed.chan):
                packed.chan = first.chan  # one per-head vector for all chunks, not one per block
            return packed
        if config.channel_policy == "think":
            if self.think_channels is None:  # chosen once, from the prompt, for all tokens
                self.think_channels = think_keep_mask(keys, self.qn.pow(2), config.key_prune_ratio)
            return ColumnPackedTensor.from_dense(keys, self.think_channels)
        return _own(keys)

    def _pack_values(self, values: torch.Tensor):
        if self.config.value_prune_ratio > 0:
            return compress_values(values, self.config.value_prune_ratio)
        return _own(values)

    def _compress_tail(self) -> None:
        block = self.config.block_size
        while self.tail_len > block:
            keys, values = self.tail_keys[:, :, :block], self.tail_values[:, :, :block]
            self.key_chunks.append(self._pack_keys(keys))
            self.value_chunks.append(self._pack_values(values))
            if self.positions is not None:
                start = self.seen - self.tail_len
                b, h = self.positions.shape[:2]
                new = torch.arange(start, start + block, dtype=torch.int32, device=self.positions.device)
                self.positions = torch.cat([self.positions, new.expand(b, h, block)], dim=-1)
            self.tail_keys = _own(self.tail_keys[:, :, block:])
            self.tail_values = _own(self.tail_values[:, :, block:])

    # --- cache operations -------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers' convention: a negative count).

        Works through the dense tail and the packed blocks; after eviction the prompt chunk holds a
        different set of tokens per head, so cropping into it raises `NotImplementedError`.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.seen:
            raise ValueError(f"cannot crop {n} tokens from a layer holding {self.seen}")
        if self.positions is not None:
            generated = self.tail_len + sum(_seq_len(c) for c in self.key_chunks[1:])
            if n > generated:
                raise NotImplementedError(
                    f"crop of {n} tokens reaches into the evicted prompt (only the last {generated} tokens can be cropped)"
                )
        self.seen -= n
        from_tail = min(n, self.tail_len)
        if from_tail:
            self.tail_keys = _own(self.tail_keys[:, :, : self.tail_len - from_tail])
            self.tail_values = _own(self.tail_values[:, :, : self.tail_len - from_tail])
        n -= from_tail
        if n and self.positions is not None:
            self.positions = _own(self.positions[..., : self.positions.shape[-1] - n])
        while n:
            k, v = self.key_chunks[-1], self.value_chunks[-1]
            length = _seq_len(k)
            if n >= length:
                self.key_chunks.pop(), self.value_chunks.pop()
                n -= length
                continue
            self.key_chunks[-1] = _slice_seq(k, 0, length - n)
            self.value_chunks[-1] = _slice_seq(v, 0, length - n)
            n = 0

    def _index_batch(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.key_chunks = [_index_batch(c, index) for c in self.key_chunks]
        self.value_chunks = [_index_batch(c, index) for c in self.value_chunks]
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys.index_select(0, index)
            self.tail_values = self.tail_values.index_select(0, index)
        if self.qn is not None:
            self.qn = self.qn.index_select(0, index)
        if self.think_channels is not None:
            self.think_channels = self.think_channels.index_select(0, index)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            batch = self.qn.shape[0] if self.qn is not None else self.tail_keys.shape[0]
            self._index_batch(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._index_batch(indices)


def _seq_len(x) -> int:
    return x.shape[2] if isinstance(x, torch.Tensor) else x.seq_len


def _slice_seq(x, start: int, stop: int):
    return _own(x[:, :, start:stop]) if isinstance(x, torch.Tensor) else x.slice_seq(start, stop)


def _index_batch(x, index: torch.Tensor):
    return x.index_select(0, index) if isinstance(x, torch.Tensor) else x.index_batch(index)


class SparKCache(Cache):
    """A transformers `Cache` that stores the KV cache compressed with SparK.

    Pass it as `past_key_values=` to a model loaded with `attn_implementation="sparkkv"`:

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparkkv")
        cache = sparkkv.SparKCache(sparkkv.SparKConfig(key_prune_ratio=0.8))
        model.generate(**inputs, past_key_values=cache)

    One cache serves one generation (one prompt batch); build a new one per request.
    """

    def __init__(self, config: SparKConfig | None = None, **overrides) -> None:
        if config is None:
            config = SparKConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, SparKConfig):
            raise TypeError(f"config must be a SparKConfig, got {type(config).__name__}")
        super().__init__(layers=[])
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(SparKLayer(self.config, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold, all layers."""
        return sum(layer.nbytes for layer in self.layers)

    def layer_stats(self) -> list[dict]:
        """Per-layer statistics (see `sparkkv.stats`)."""
        from .stats import layer_stats

        return [layer_stats(layer) for layer in self.layers]


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

    def __init__(self, max_queries: int = 256) -> None:
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be an int >= 1, got {max_queries!r}")
        super().__init__(SparKConfig(method="dense"))
        self.max_queries = max_queries

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            layer = SparKLayer(self.config, len(self.layers))
            layer.record_window = self.max_queries
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states)

    def compress(self, config: SparKConfig | None) -> SparKCache:
        """A new `SparKCache` for `config` (None = dense), prefilled from the recorded prefill."""
        if config is None:
            config = SparKConfig(method="dense")
        if not isinstance(config, SparKConfig):
            raise TypeError(f"config must be a SparKConfig or None, got {type(config).__name__}")
        if not self.layers or any(layer.recorded is None for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress needs a prefill first: run model(input_ids, past_key_values=capture)")
        if any(layer.seen != layer.recorded.keys.shape[2] for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress must be called right after the prefill (the capture was decoded further)")
        cache = SparKCache(config)
        for layer in self.layers:
            new = SparKLayer(config, layer.layer_idx)
            inputs = layer.recorded
            new.update(inputs.keys, inputs.values)
            if config.channel_policy != "dense":
                new.compress_prefill(inputs)
            cache.layers.append(new)
        return cache
