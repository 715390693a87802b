"""Prefill compression, the pipeline of one layer at the end of its prefill forward:

    window query norms (the key packer's `fit`)  ->  which prompt tokens stay (a sliding layer's
    window, or token eviction on a full-attention layer)  ->  pack keys and values (the packers)
    ->  blocks (a sliding layer's prompt in `block_size` blocks, so it expires a block at a time)

`PrefillInputs` is what it reads from the prefill forward. Nothing here keeps state: the layer
(`cache.SparKLayer`) owns the packers and stores the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import masks
from .config import SparKConfig
from .eviction import evict
from .store import Block


# ---------------------------------------------------------------------------------------------
# what prefill compression reads
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
            valid=masks.query_valid(mask, query.shape[2], s, b),
            scaling=scaling,
        )


def finite_rows(query: torch.Tensor) -> torch.Tensor:
    """bool `[B, n]`: query rows finite in every head and channel. A non-finite query poisons its
    own attention output only (as in SDPA); it takes no part in scoring channels or tokens."""
    return torch.isfinite(query).all(dim=-1).all(dim=1)


def compress_prompt(inputs: PrefillInputs, config: SparKConfig, spec, keys_packer, values_packer) -> tuple[list[Block], dict]:
    """The blocks a layer of type `spec` (`cache.LayerSpec`) stores for this prompt, and its stats
    (`prompt_tokens`, `kept_tokens`). `keys_packer` / `values_packer`: the layer's (`policies`)."""
    b, h, s, _ = inputs.keys.shape
    query = inputs.queries
    w = min(config.window_size, s)
    if config.prunes_key_channels and w > query.shape[2]:
        raise ValueError(f"window_size={config.window_size} needs more prefill queries than were recorded ({query.shape[2]})")
    rows_valid = finite_rows(query)  # [B, n]: the recorded query rows that may score
    if inputs.valid is not None:
        rows_valid = rows_valid & inputs.valid[:, s - query.shape[2] :]
    keys_packer.fit(query[:, :, -w:], rows_valid[:, -w:], h)
    keys, values, start, positions, token_mask = _prompt_tokens(inputs, config, spec, rows_valid)
    block = Block(keys_packer.pack(keys, 0, token_mask), values_packer.pack(values, token_mask), start, positions)
    # sliding layers expire a block at a time: one window-long block would stay whole until its
    # last token leaves the window, holding up to twice the window
    blocks = block.split(config.block_size) if spec.attention_type != "full_attention" else [block]
    return blocks, {"prompt_tokens": s, "kept_tokens": keys.shape[2]}


def _prompt_tokens(inputs: PrefillInputs, config: SparKConfig, spec, rows_valid: torch.Tensor):
    """What a layer keeps of the prompt: `(keys, values, start, positions, token_mask)`. Sliding /
    chunked layers keep what the next query can see; full-attention layers evict if the method
    says so. `token_mask` marks the real (non-padding, non-filler) tokens."""
    keys, values, valid = inputs.keys, inputs.values, inputs.valid
    if spec.attention_type != "full_attention":
        first = spec.first_needed(keys.shape[2])
        if first:  # only the window (or chunk) the next query can see
            keys, values = keys[:, :, first:], values[:, :, first:]
            valid = None if valid is None else valid[:, first:]
        return keys, values, first, None, valid
    if config.eviction is not None:
        keys, values, positions, token_mask = evict(config, inputs, rows_valid, spec.full_index, spec.num_full)
        return keys, values, 0, positions, token_mask
    return keys, values, 0, None, valid
