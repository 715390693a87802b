"""Storage policies: how a block of keys, and a block of values, becomes a stored chunk.

Chosen once per layer from the config (`key_packer`, `value_packer`); the layer calls them without
knowing which one it holds:

    packer.fit(window_queries [B, Hq, W, D], rows_valid [B, W])   at prefill: per-head statistics
    packer.pack(x [B, Hkv, S, D], first_token, token_mask) -> Chunk   every block, prompt and decode
    packer.tensors() / index_batch(index)                          what it holds (bytes, beam search)

Key packers: `SparKKeys` (per-token channel pruning with recovery, `method.py`), `ThinKKeys`
(one channel set per head, chosen on the prompt), `QuantizedKeys` (no channel policy, `key_bits <
16`: per-channel codes over groups of tokens, as KIVI), `DenseKeys` (eviction only, dense, or a
sliding layer with `compress_sliding=False`). SparK and ThinK quantize their kept values when
`key_bits < 16` (`quant.py`). Value packers: `PrunedValues` (`value_prune_ratio > 0`),
`QuantizedValues` (`value_bits < 16`: per-token codes), `DenseValues`; pruned values are quantized
too when `value_bits < 16`.
"""

from __future__ import annotations

import torch

from .config import SparKConfig
from .method import _compress_keys, _compress_values, check_head_dim, think_keep_mask, window_query_norm
from .packed import ColumnPackedTensor, DenseChunk
from .quant import QuantizedTensor


class DenseKeys:
    """Keys stored as they are."""

    bit_packed = False  # stores one bit per channel (head_dim must be a multiple of 8)

    def __init__(self, config: SparKConfig, layer_idx: int) -> None:
        self.config = config
        self.layer_idx = layer_idx
        self.qn: torch.Tensor | None = None  # [B, H, D] float32 window query norms (SparK, ThinK)

    def fit(self, window_queries: torch.Tensor, rows_valid: torch.Tensor | None, num_kv_heads: int) -> None:
        """Learn what packing needs from the prompt's last queries `[B, Hq, W, D]` (`rows_valid [B, W]`:
        the rows that may score); nothing, for dense keys."""

    def pack(self, keys: torch.Tensor, first_token: int, token_mask: torch.Tensor | None = None, like=None):
        """`keys [B, H, S, D]` of tokens from logical position `first_token` as a chunk.
        `token_mask` (`[B, S]` or `[B, H, S]` bool) marks real tokens; `like` is the layer's first
        stored key chunk (constant tensors equal to its own are shared with it)."""
        return DenseChunk(keys)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.qn is None else [self.qn]

    def index_batch(self, index: torch.Tensor) -> None:
        if self.qn is not None:
            self.qn = self.qn.index_select(0, index)

    def _fit_qn(self, window_queries: torch.Tensor, rows_valid: torch.Tensor | None, num_kv_heads: int) -> None:
        self.qn = window_query_norm(window_queries, num_kv_heads, rows_valid)


class SparKKeys(DenseKeys):
    """SparK: every token keeps its own most salient channels (`method._compress_keys`)."""

    bit_packed = True

    def fit(self, window_queries, rows_valid, num_kv_heads: int) -> None:
        self._fit_qn(window_queries, rows_valid, num_kv_heads)

    def pack(self, keys, first_token, token_mask=None, like=None):
        config = self.config
        # Seeded per layer and per block, so sampled recoveries are reproducible.
        seed = (config.seed + 7919 * self.layer_idx + 104729 * first_token) % 2**63
        packed = _compress_keys(keys, self.qn, config, torch.Generator().manual_seed(seed))
        if like is not None and packed.chan is not None and torch.equal(like.chan, packed.chan):
            packed.chan = like.chan  # one per-head vector for all chunks, not one per block
        if config.key_bits < 16:  # salient values: symmetric codes (no level at 0), scaled per channel
            packed = packed.with_quantized_vals(config.key_bits, config.quant_group_size, symmetric=True,
                                                axis="channel", valid=token_mask)
        if config.mask_format == "trits":  # after quantizing: its channels are read off the cheaper bit mask
            packed = packed.with_trits()
        return packed


class ThinKKeys(DenseKeys):
    """ThinK: one set of kept channels per (batch, kv-head), chosen once from the prompt."""

    def __init__(self, config: SparKConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.channels: torch.Tensor | None = None  # int16 [B, H, T]

    def fit(self, window_queries, rows_valid, num_kv_heads: int) -> None:
        self._fit_qn(window_queries, rows_valid, num_kv_heads)

    def pack(self, keys, first_token, token_mask=None, like=None):
        if self.channels is None:  # chosen once, from the prompt, for all tokens
            idx = think_keep_mask(keys, self.qn.pow(2), self.config.key_prune_ratio, token_mask)
            self.channels = idx.to(torch.int16)
        chunk = ColumnPackedTensor.from_dense(keys, self.channels)
        if self.config.key_bits < 16:
            chunk = chunk.with_quantized_vals(self.config.key_bits, self.config.quant_group_size, token_mask)
        return chunk

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([] if self.channels is None else [self.channels])

    def index_batch(self, index: torch.Tensor) -> None:
        super().index_batch(index)
        if self.channels is not None:
            self.channels = self.channels.index_select(0, index)


class QuantizedKeys(DenseKeys):
    """Keys as `key_bits`-bit codes, one scale and zero per channel and group of `quant_group_size`
    tokens (per-channel, as KIVI found essential for keys: a few channels carry outliers)."""

    def pack(self, keys, first_token, token_mask=None, like=None):
        return QuantizedTensor.quantize(keys, self.config.key_bits, self.config.quant_group_size, "token", valid=token_mask)


class DenseValues:
    """Values stored as they are."""

    bit_packed = False

    def __init__(self, config: SparKConfig) -> None:
        self.config = config

    def pack(self, values: torch.Tensor, token_mask: torch.Tensor | None = None):
        return DenseChunk(values)


class PrunedValues(DenseValues):
    """The lowest-scoring `floor(value_prune_ratio * D)` channels of every token, filled with its mean."""

    bit_packed = True

    def pack(self, values, token_mask=None):
        packed = _compress_values(values, self.config.value_prune_ratio, token_mask)
        if self.config.value_bits < 16:
            packed = packed.with_quantized_vals(self.config.value_bits, self.config.quant_group_size, symmetric=False)
        return packed


class QuantizedValues(DenseValues):
    """Values as `value_bits`-bit codes, one scale and zero per token and group of `quant_group_size` channels."""

    bit_packed = False

    def pack(self, values, token_mask=None):
        return QuantizedTensor.quantize(values, self.config.value_bits, self.config.quant_group_size, "row")


KEY_PACKERS = {"spark": SparKKeys, "think": ThinKKeys, "none": DenseKeys, "dense": DenseKeys}


def packs_bits(config: SparKConfig) -> bool:
    """Whether the configured packers store bit masks (one bit per channel, in bytes), so that the
    head dim must be a multiple of 8; methods that pack no bits (dense, eviction only, ThinK) take any."""
    return KEY_PACKERS[config.channel_policy].bit_packed or config.value_prune_ratio > 0


def check_head_dim_for(config: SparKConfig, d: int) -> None:
    """Refuse a head dim the configured packers cannot store (see `packs_bits`)."""
    if packs_bits(config):
        check_head_dim(d)


def key_packer(config: SparKConfig, layer_idx: int, windowed: bool = False) -> DenseKeys:
    """The key packer of a layer (`windowed`: a sliding or chunked layer, dense unless `compress_sliding`)."""
    if windowed and not config.compress_sliding:
        return DenseKeys(config, layer_idx)
    cls = KEY_PACKERS[config.channel_policy]
    if cls is DenseKeys and config.key_bits < 16:
        cls = QuantizedKeys
    return cls(config, layer_idx)


def value_packer(config: SparKConfig, windowed: bool = False) -> DenseValues:
    """The value packer of a layer."""
    if windowed and not config.compress_sliding:
        return DenseValues(config)
    if config.value_prune_ratio > 0:
        return PrunedValues(config)
    return QuantizedValues(config) if config.value_bits < 16 else DenseValues(config)
