"""What one attention layer holds: blocks of stored chunks, a dense tail of recent tokens, and the
logical token count. No policy lives here (which tokens, which channels, when to compress: the
layer decides, `cache.SparKLayer`); this is the bookkeeping every layer type shares.

    Block       a key chunk and a value chunk (`packed.Chunk`) over the same tokens, and their
                logical positions: `start, start + 1, ...`, or int32 `[B, Hkv, S]` after eviction
                kept different tokens per head (-1 marks a filler slot, hidden by every mask)
    BlockStore  blocks (oldest first) + the dense tail `[B, Hkv, S_tail, D]` + `seen`, the logical
                tokens seen (evicted and expired ones included)

Chunks are never modified in place: every operation builds new tensors, so a snapshot of the
blocks (what one forward's attention reads, `BlockStore.parts`) stays valid while the store moves on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packed import DenseChunk, compact, storage_nbytes


@dataclass
class Block:
    """Stored tokens: a key chunk, a value chunk, and their logical positions (module docstring)."""

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

    @property
    def device(self) -> torch.device:
        return self.keys.tensors()[0].device

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

    def split(self, size: int) -> list["Block"]:
        """Consecutive blocks of at most `size` tokens."""
        if self.seq_len <= size:
            return [self]
        return [self.slice_seq(i, min(i + size, self.seq_len)) for i in range(0, self.seq_len, size)]

    def index_batch(self, index: torch.Tensor) -> "Block":
        positions = None if self.positions is None else self.positions.index_select(0, index.to(self.positions.device))
        return Block(self.keys.index_batch(index), self.values.index_batch(index), self.start, positions)


class BlockStore:
    """Blocks + dense tail + `seen` (module docstring)."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []  # compressed tokens, oldest first
        self.tail_keys: torch.Tensor | None = None  # dense recent tokens [B, H, S_tail, D]
        self.tail_values: torch.Tensor | None = None
        self.seen = 0

    # --- sizes ------------------------------------------------------------------------------
    @property
    def tail_len(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    @property
    def tail_start(self) -> int:
        """Logical position of the tail's first token."""
        return self.seen - self.tail_len

    @property
    def stored_tokens(self) -> int:
        """Tokens physically stored (per kv-head)."""
        return sum(block.seq_len for block in self.blocks) + self.tail_len

    @property
    def batch_size(self) -> int:
        return self.tail_keys.shape[0] if self.tail_keys is not None else self.blocks[0].keys.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        held = [t for block in self.blocks for t in block.tensors()]
        return held + [t for t in (self.tail_keys, self.tail_values) if t is not None]

    @property
    def nbytes(self) -> int:
        return storage_nbytes(*self.tensors())

    # --- reading ----------------------------------------------------------------------------
    def parts(self) -> list[Block]:
        """Every stored token as blocks, the dense tail last: what attention reads now."""
        if not self.tail_len:
            return list(self.blocks)
        return self.blocks + [Block(DenseChunk(self.tail_keys), DenseChunk(self.tail_values), self.tail_start)]

    # --- writing ----------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New tokens' dense K/V `[B, H, q, D]` join the tail."""
        if self.tail_keys is None:
            self.tail_keys, self.tail_values = keys, values
        else:
            self.tail_keys = torch.cat([self.tail_keys, keys], dim=2)
            self.tail_values = torch.cat([self.tail_values, values], dim=2)
        self.seen += keys.shape[2]

    def replace_tail(self, blocks: list[Block]) -> None:
        """The tail (the dense prompt) becomes `blocks`: what prefill kept of it."""
        self.blocks = blocks
        self.tail_keys = self.tail_values = None

    def pop_tail(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Remove the tail's oldest `n` tokens; returns their keys, values and first position."""
        start = self.tail_start
        keys, values = self.tail_keys[:, :, :n], self.tail_values[:, :, :n]
        self.tail_keys = compact(self.tail_keys[:, :, n:])
        self.tail_values = compact(self.tail_values[:, :, n:])
        return keys, values, start

    def drop_before(self, first: int) -> None:
        """Drop blocks whose tokens all lie before logical position `first`, and tail tokens before it."""
        while self.blocks and self.blocks[0].last_position < first:
            self.blocks.pop(0)
        if self.tail_len and self.tail_start < first:
            drop = first - self.tail_start
            self.tail_keys = compact(self.tail_keys[:, :, drop:])
            self.tail_values = compact(self.tail_values[:, :, drop:])

    def remove_last(self, n: int, needed_from: int | None = None, kind: str = "sliding_attention") -> None:
        """Remove the last `n` tokens, through the tail and then the blocks (a block is sliced).

        Raises `NotImplementedError` when they reach into a block whose tokens were kept per head
        (after eviction), and `RuntimeError` when the cropped cache would need tokens from
        `needed_from` on (a sliding or chunked layer's window, `kind`) that were already dropped."""
        new_seen = self.seen - n
        for block in self.blocks:
            if block.positions is not None and block.last_position >= new_seen:
                raise NotImplementedError(
                    f"crop of {n} tokens reaches into the evicted prompt (tokens were kept per head; "
                    f"only tokens after position {block.last_position} can be cropped)"
                )
        if needed_from is not None and self.first_stored() > needed_from:
            raise RuntimeError(
                f"cannot crop {n} tokens: this {kind} layer already dropped tokens the cropped cache needs; "
                "call cache.activate_past_recording() before decoding to keep them for a rollback"
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

    def first_stored(self) -> int:
        """Logical position of the oldest stored token."""
        return self.blocks[0].start if self.blocks else self.tail_start

    def index_batch(self, index: torch.Tensor) -> None:
        """Rows of the batch in the order of `index` (may repeat: beam search)."""
        self.blocks = [block.index_batch(index) for block in self.blocks]
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys.index_select(0, index)
            self.tail_values = self.tail_values.index_select(0, index)
