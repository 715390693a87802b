"""`SparKCache`: a transformers `Cache` whose layers store the KV cache compressed.

Life of one layer (`SparKLayer`):
  prefill  `update` receives the prompt's dense K/V. The `"sparkkv"` attention function
           (attention.py) runs ordinary dense attention on them, then hands the layer a
           `PrefillInputs` (the model's own last query rows and the mask): `compress_prefill`
           evicts tokens if the method says so, stores the survivors as one block of chunks
           (`packed.py`: SparK-packed keys, ThinK columns, or dense) and drops the dense prompt.
  decode   new tokens enter a small dense tail; attention (`ops.attend`) reads every block plus
           the tail. With `compress_decode`, whenever the tail holds more than `block_size` tokens,
           its oldest `block_size` become one more block, packed with the query norms of prefill.

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

from . import ops
from .config import SparKConfig
from .eviction import evict_tokens, resolve_budgets
from .method import check_head_dim, compress_keys, compress_values, think_keep_mask, window_query_norm
from .packed import ColumnPackedTensor, DenseChunk, compact, storage_nbytes

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the handle the attention function receives
# ---------------------------------------------------------------------------------------------
_MISUSE = (
    "a SparKCache was used by an attention function other than 'sparkkv'. Load the model with "
    "attn_implementation='sparkkv' (after `import sparkkv`), e.g. "
    "AutoModelForCausalLM.from_pretrained(path, attn_implementation='sparkkv') or "
    "model.set_attn_implementation('sparkkv'). Models whose attention does not go through "
    "transformers' AttentionInterface cannot use a SparKCache."
)


class CacheHandle:
    """What `SparKCache.update` returns in place of key/value tensors.

    Only the `"sparkkv"` attention function knows what to do with it; any other code that
    treats it as a tensor gets a `TypeError` explaining how to load the model.
    """

    __slots__ = ("layer", "cache")

    def __init__(self, layer, cache=None) -> None:
        self.layer = layer
        self.cache = cache

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
# what a layer stores
# ---------------------------------------------------------------------------------------------
@dataclass
class PrefillInputs:
    """What compressing one layer at the end of prefill needs from the prefill forward.

    keys, values `[B, Hkv, S, D]`: the dense prompt. queries `[B, Hq, n, D]`: the last n prompt
    queries (after RoPE and the model's own query norm). mask_rows `[B, 1 or Hkv, n, S]`: the
    prefill mask's last n rows (bool, True = attend, or additive), None for plain causal.
    valid `[B, S]` bool: the non-padding prompt tokens, None when there is no padding mask.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    mask_rows: torch.Tensor | None
    valid: torch.Tensor | None
    scaling: float

    @classmethod
    def from_forward(cls, keys, values, query, mask, scaling: float, rows: int) -> "PrefillInputs":
        """From a prefill forward: `query [B, Hq, S, D]`, its mask `[B, 1 or H, S, S]` or None."""
        b, _, s, _ = keys.shape
        n = min(rows, query.shape[2])
        return cls(
            keys=keys,
            values=values,
            queries=query[:, :, -n:].contiguous() if n < query.shape[2] else query,
            mask_rows=None if mask is None else mask[:, :, -n:, :],
            valid=_query_valid(mask, query.shape[2], s, b),
            scaling=scaling,
        )


def _query_valid(mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """bool `[B, q]`: which query rows are real tokens. A query attends to itself iff it is not
    padding, so this is the diagonal of the (prefill) mask. None when there is no mask."""
    if mask is None:
        return None
    diag = mask[:, 0, torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)]
    valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return valid.expand(batch, q_len)


@dataclass
class Block:
    """Stored tokens: a key chunk and a value chunk over the same tokens, and their logical
    positions: `start, start + 1, ...`, or `positions` int32 `[B, Hkv, S]` (ascending) after
    eviction kept different tokens per head."""

    keys: object  # packed.Chunk
    values: object
    start: int = 0
    positions: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.seq_len

    @property
    def last_position(self) -> int:
        if self.positions is not None:
            return int(self.positions.max()) if self.positions.numel() else -1
        return self.start + self.seq_len - 1

    def tensors(self) -> list[torch.Tensor]:
        held = self.keys.tensors() + self.values.tensors()
        return held + ([self.positions] if self.positions is not None else [])

    def slice_seq(self, start: int, stop: int) -> "Block":
        return Block(
            self.keys.slice_seq(start, stop),
            self.values.slice_seq(start, stop),
            self.start + start,
            None if self.positions is None else compact(self.positions[..., start:stop]),
        )

    def index_batch(self, index: torch.Tensor) -> "Block":
        positions = None if self.positions is None else self.positions.index_select(0, index.to(self.positions.device))
        return Block(self.keys.index_batch(index), self.values.index_batch(index), self.start, positions)

    def mask(self, mask: torch.Tensor | None, seen: int, q_len: int, batch: int) -> torch.Tensor | None:
        """This block's columns of the logical mask: `[B, 1 or H, q, S]` bool (True = attend).

        `mask` is transformers' mask for this forward, `[B or 1, 1 or H, q, L]` whose last column
        is the logical position `seen - 1` (the newest query token), or None: plain causal.
        """
        s = self.seq_len
        if mask is None:
            device = self.keys.tensors()[0].device
            if q_len == 1 and self.positions is None:
                return None
            q_pos = torch.arange(seen - q_len, seen, device=device).view(1, 1, q_len, 1)
            pos = self._positions(device).unsqueeze(2)
            visible = (pos <= q_pos) & (pos >= 0)  # filler slots (position -1) are never visible
            return visible.expand(batch, visible.shape[1], q_len, s)
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask.expand(batch, *mask.shape[1:])
        offset = seen - mask.shape[-1]  # logical position of the mask's first column
        if self.positions is None:
            lo, hi = self.start - offset, self.start + s - offset
            if lo >= 0:
                return mask[..., lo:hi]
            visible = mask[..., max(lo, 0) : max(hi, 0)]  # columns before the mask's first are invisible
            hidden = torch.zeros(*mask.shape[:-1], min(-lo, s), dtype=torch.bool, device=mask.device)
            return torch.cat([hidden, visible], dim=-1)
        h = self.positions.shape[1]
        cols = self.positions.long() - offset
        inside = cols >= 0
        picked = mask.expand(batch, h, q_len, mask.shape[-1]).gather(
            -1, cols.clamp_min(0).unsqueeze(2).expand(batch, h, q_len, s)
        )
        return picked & inside.unsqueeze(2)

    def _positions(self, device) -> torch.Tensor:
        """int64 `[B or 1, H or 1, S]`."""
        if self.positions is not None:
            return self.positions.long()
        return torch.arange(self.start, self.start + self.seq_len, device=device).view(1, 1, -1)


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------
class SparKLayer(CacheLayerMixin):
    """One attention layer's compressed cache. See the module docstring."""

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
        self.blocks: list[Block] = []  # compressed tokens, oldest first
        self.tail_keys: torch.Tensor | None = None  # dense recent tokens [B, H, S_tail, D]
        self.tail_values: torch.Tensor | None = None
        self.qn: torch.Tensor | None = None  # [B, H, D] float32 window query norms (SparK, ThinK)
        self.think_channels: torch.Tensor | None = None  # int16 [B, H, T], ThinK's kept channels
        self.seen = 0  # logical tokens seen (evicted and expired ones included)
        self.prefilled = False
        self.stats: dict = {}
        self.backend = None
        self.backend_report = ops.BackendReport(self.config.attention_backend)
        self.is_initialized = False

    # --- the CacheLayerMixin contract --------------------------------------------------------
    @property
    def is_sliding(self) -> bool:
        return self.spec.attention_type != "full_attention"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim(key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens' dense K/V to the tail. Returns a `CacheHandle` twice (the
        attention function reads the layer through it; it is not a tensor)."""
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
        """Masks cover every logical position (blocks look their columns up by position)."""
        if isinstance(query_length, torch.Tensor):  # older 5.x releases (5.0 does) pass cache_position
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

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

    # --- sizes ------------------------------------------------------------------------------
    @property
    def tail_len(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    @property
    def stored_tokens(self) -> int:
        """Tokens physically stored (per kv-head)."""
        return sum(block.seq_len for block in self.blocks) + self.tail_len

    def tensors(self) -> list[torch.Tensor]:
        held = [t for block in self.blocks for t in block.tensors()]
        return held + [t for t in (self.tail_keys, self.tail_values, self.qn, self.think_channels) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes this layer's tensors really hold (shared storages, like the per-head `chan`, once)."""
        return storage_nbytes(*self.tensors())

    @property
    def key_chunks(self) -> list:
        return [block.keys for block in self.blocks]

    @property
    def value_chunks(self) -> list:
        return [block.values for block in self.blocks]

    # --- attention --------------------------------------------------------------------------
    @property
    def needs_prefill(self) -> bool:
        """True until the first forward has been compressed (the attention function then runs
        dense attention over `prompt()` and calls `compress_prefill`)."""
        return not self.prefilled

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense K/V of the prefill forward `[B, H, S, D]`."""
        return self.tail_keys, self.tail_values

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, sinks: torch.Tensor | None = None):
        """Attention output `[B, q, Hq, Dv]` of `query [B, Hq, q, D]` (the new tokens' queries) over
        every stored token; `mask`: transformers' mask for this forward (see `Block.mask`)."""
        if self.backend is None:
            self.backend = ops.resolve_backend(self.config.attention_backend, query.device)
        b, q_len = query.shape[0], query.shape[2]
        blocks = self.blocks + ([self._tail_block()] if self.tail_len else [])
        parts = [(blk.keys, blk.values, blk.mask(mask, self.seen, q_len, b)) for blk in blocks]
        out = ops.attend(query, parts, scaling, self.backend, sinks, self.backend_report)
        del parts, blocks
        if self.config.compress_decode:
            self._compress_tail()
        self._expire()
        return out

    def _tail_block(self) -> Block:
        return Block(DenseChunk(self.tail_keys), DenseChunk(self.tail_values), self.seen - self.tail_len)

    # --- compression ------------------------------------------------------------------------
    def compress_prefill(self, inputs: PrefillInputs) -> None:
        """End of prefill: keep what this layer type needs, evict tokens (full-attention layers,
        if the method says so), then store the survivors compressed."""
        config = self.config
        keys, values = inputs.keys, inputs.values
        b, h, s, _ = keys.shape
        query, valid = inputs.queries, inputs.valid
        first = self.spec.first_needed(self.seen)
        w = min(config.window_size, s)
        if config.channel_policy in ("spark", "think") and w > query.shape[2]:
            raise ValueError(f"window_size={config.window_size} needs more prefill queries than were recorded ({query.shape[2]})")
        rows_valid = _finite_rows(query)  # [B, n]: the recorded query rows that may score
        if valid is not None:
            rows_valid = rows_valid & valid[:, s - query.shape[2] :]
        if config.channel_policy in ("spark", "think") and (config.compress_sliding or not self.is_sliding):
            self.qn = window_query_norm(query[:, :, -w:], h, rows_valid[:, -w:])
        start, positions = 0, None
        if self.is_sliding:
            if first:  # only the window (or chunk) the next query can see
                keys, values = keys[:, :, first:], values[:, :, first:]
                valid = None if valid is None else valid[:, first:]
                start = first
        elif config.eviction is not None:
            if query.shape[2] < min(config.eviction_window, s):
                raise ValueError(f"eviction_window={config.eviction_window} needs more prefill queries than were recorded ({query.shape[2]})")
            budget = resolve_budgets(config, s, valid, self.spec.full_index, self.spec.num_full)
            keys, values, positions = evict_tokens(
                config, keys, values, query, inputs.mask_rows, budget, inputs.scaling, valid, rows_valid
            )
            if positions.shape[-1] == s and bool((positions == torch.arange(s, device=positions.device)).all()):
                positions = None  # nothing evicted
        token_mask = None  # real tokens of what is stored (padding and filler slots excluded)
        if positions is not None:
            real = torch.ones(b, s, dtype=torch.bool, device=keys.device) if valid is None else valid
            p = positions.long()
            token_mask = real.unsqueeze(1).expand(b, h, s).gather(-1, p.clamp_min(0)) & (p >= 0)
        elif valid is not None:
            token_mask = valid
        positions = None if positions is None else positions.to(torch.int32)
        block = Block(self._pack_keys(keys, token_mask), self._pack_values(values, token_mask), start, positions)
        self.blocks = [block]
        if self.is_sliding and block.seq_len > config.block_size:
            # expire a block at a time: one window-long block would stay whole until its last token
            # leaves the window, holding up to twice the window
            size = config.block_size
            self.blocks = [block.slice_seq(i, min(i + size, block.seq_len)) for i in range(0, block.seq_len, size)]
        self.tail_keys = self.tail_values = None
        self.prefilled = True
        self.stats = {"prompt_tokens": s, "kept_tokens": keys.shape[2]}

    def _pack_keys(self, keys: torch.Tensor, token_mask: torch.Tensor | None = None):
        """Keys as a chunk, by the channel policy: SparK (per token), ThinK (per head), or dense.
        `token_mask` (`[B, S]` or `[B, H, S]` bool) marks real tokens (ThinK's channel statistics
        skip padding)."""
        config = self.config
        if self.is_sliding and not config.compress_sliding:
            return DenseChunk(keys)
        if config.channel_policy == "spark":
            # Seeded per layer and per block, so sampled recoveries are reproducible.
            seed = (config.seed + 7919 * self.layer_idx + 104729 * (self.seen - self.tail_len)) % 2**63
            generator = torch.Generator().manual_seed(seed)
            packed = compress_keys(keys, None, config, qn=self.qn, generator=generator)
            first = self.blocks[0].keys if self.blocks else None
            if first is not None and packed.chan is not None and torch.equal(first.chan, packed.chan):
                packed.chan = first.chan  # one per-head vector for all chunks, not one per block
            return packed
        if config.channel_policy == "think":
            if self.think_channels is None:  # chosen once, from the prompt, for all tokens
                idx = think_keep_mask(keys, self.qn.pow(2), config.key_prune_ratio, token_mask)
                self.think_channels = idx.to(torch.int16)
            return ColumnPackedTensor.from_dense(keys, self.think_channels)
        return DenseChunk(keys)

    def _pack_values(self, values: torch.Tensor, token_mask: torch.Tensor | None = None):
        if self.config.value_prune_ratio > 0 and (self.config.compress_sliding or not self.is_sliding):
            return compress_values(values, self.config.value_prune_ratio, token_mask=token_mask)
        return DenseChunk(values)

    def _compress_tail(self) -> None:
        block = self.config.block_size
        while self.tail_len > block:
            keys, values = self.tail_keys[:, :, :block], self.tail_values[:, :, :block]
            start = self.seen - self.tail_len
            self.blocks.append(Block(self._pack_keys(keys), self._pack_values(values), start))
            self.tail_keys = compact(self.tail_keys[:, :, block:])
            self.tail_values = compact(self.tail_values[:, :, block:])

    def _expire(self, rollback_point: bool = False) -> None:
        """Sliding / chunked layers: drop what no later query can see. While recording the past
        for a rollback, only at a rollback point (`crop`), as transformers' sliding layers do."""
        if not self.is_sliding or (self.record_past and not rollback_point):
            return
        first = self.spec.first_needed(self.seen)
        while self.blocks and self.blocks[0].last_position < first:
            self.blocks.pop(0)
        tail_start = self.seen - self.tail_len
        if self.tail_len and tail_start < first:
            self.tail_keys = compact(self.tail_keys[:, :, first - tail_start :])
            self.tail_values = compact(self.tail_values[:, :, first - tail_start :])

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
        n = self.seen - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        n = max(n, 0)
        if n > self.seen:
            raise ValueError(f"cannot crop {n} tokens from a layer holding {self.seen}")
        if n == self.seen:  # everything: the next forward is a new prefill
            record_past = self.record_past
            self._clear()
            self.record_past = record_past
            return
        if n:
            self._remove_last(n)
        self._expire(rollback_point=True)

    def _remove_last(self, n: int) -> None:
        new_seen = self.seen - n
        for block in self.blocks:
            if block.positions is not None and block.last_position >= new_seen:
                raise NotImplementedError(
                    f"crop of {n} tokens reaches into the evicted prompt (tokens were kept per head; "
                    f"only tokens after position {block.last_position} can be cropped)"
                )
        if self.is_sliding:
            stored_from = self.blocks[0].start if self.blocks else self.seen - self.tail_len
            if stored_from > self.spec.first_needed(new_seen):
                raise RuntimeError(
                    f"cannot crop {n} tokens: this {self.spec.attention_type} layer already dropped tokens the "
                    "cropped cache needs; call cache.activate_past_recording() before decoding to keep them for a rollback"
                )
        from_tail = min(n, self.tail_len)
        if from_tail:
            keep = self.tail_len - from_tail
            self.tail_keys = compact(self.tail_keys[:, :, :keep])
            self.tail_values = compact(self.tail_values[:, :, :keep])
        n -= from_tail
        while n:
            block = self.blocks[-1]
            if n >= block.seq_len:
                self.blocks.pop()
                n -= block.seq_len
            else:
                self.blocks[-1] = block.slice_seq(0, block.seq_len - n)
                n = 0
        self.seen = new_seen

    def _index_batch(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.blocks = [block.index_batch(index) for block in self.blocks]
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys.index_select(0, index)
            self.tail_values = self.tail_values.index_select(0, index)
        if self.qn is not None:
            self.qn = self.qn.index_select(0, index)
        if self.think_channels is not None:
            self.think_channels = self.think_channels.index_select(0, index)

    def _batch_size(self) -> int:
        if self.tail_keys is not None:
            return self.tail_keys.shape[0]
        return self.blocks[0].keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(torch.arange(self._batch_size()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._index_batch(indices)


def _finite_rows(query: torch.Tensor) -> torch.Tensor:
    """bool `[B, n]`: query rows finite in every head and channel. A non-finite query poisons its
    own attention output only (as in SDPA); it takes no part in scoring channels or tokens."""
    return torch.isfinite(query).all(dim=-1).all(dim=1)


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

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        self.layers[layer_idx].update(key_states, value_states)
        handle = CacheHandle(self.layers[layer_idx], self)
        return handle, handle

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
        super().__init__(SparKConfig(method="dense"), model_config=model_config)
        self.max_queries = max_queries
        self.recorded: dict[int, PrefillInputs] = {}

    def record(self, layer_idx: int, inputs: PrefillInputs) -> None:
        self.recorded[layer_idx] = inputs

    def compress(self, config: SparKConfig | None) -> SparKCache:
        """A new `SparKCache` for `config` (None = dense), prefilled from the recorded prefill."""
        if config is None:
            config = SparKConfig(method="dense")
        if not isinstance(config, SparKConfig):
            raise TypeError(f"config must be a SparKConfig or None, got {type(config).__name__}")
        if not self.layers or any(layer.layer_idx not in self.recorded for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress needs a prefill first: run model(input_ids, cache=capture)")
        if any(layer.seen != self.recorded[layer.layer_idx].keys.shape[2] for layer in self.layers):
            raise RuntimeError("PrefillCapture.compress must be called right after the prefill (the capture was decoded further)")
        cache = SparKCache(config)
        cache.specs = self.specs
        for layer in self.layers:
            new = cache._new_layer(layer.layer_idx)
            inputs = self.recorded[layer.layer_idx]
            new.update(inputs.keys, inputs.values)
            new.compress_prefill(inputs)
            cache.layers.append(new)
        return cache
