"""Quantized storage: integer codes of 8, 4 or 2 bits, really packed, with a scale (and a zero) per group.

A `QuantizedTensor` stands for a `[B, H, S, N]` tensor (dense keys or values, or the `vals` field of
a packed chunk: SparK's kept key values, pruned values, ThinK's kept columns). It stores:

    codes  uint8 [B, H, S, ceil(N * bits / 8)]: element n of a row is bits `(n * bits) % 8 ...` of
           byte `(n * bits) // 8` (little-endian inside the byte: for 4 bits the low nibble is the
           even element; for 2 bits, element n sits at bit 2 * (n % 4)). Rows are byte-aligned, so
           a kernel reads one token's codes at `row * ceil(N * bits / 8)`.
    scale  per group, float16 (bfloat16 for bfloat16 models: their range), shape below
    zero   per group, same dtype and shape, or None (symmetric codes, below)
    axis   how groups are laid out:
             "row"    `group` consecutive elements of one token:  scale [B, H, S, ceil(N / group)]
             "token"  `group` consecutive tokens of one element:  scale [B, H, ceil((offset + S) / group), N]
                      (KIVI's per-channel key quantization); token s is in group `(offset + s) // group`,
                      `offset` < group being where the tensor starts inside its first group, so a
                      slice along the sequence keeps its groups exactly.
             "channel" `group` consecutive tokens of one *channel* of the owner's `width`-channel rows:
                      scale [B, H, ceil((offset + S) / group), width], token groups as for "token".
                      Element n of token s belongs to channel `channels[b, h, s, n]`, which the owner
                      knows and passes in (SparK's kept key values: `packed.PackedTensor` reads each
                      kept value's channel off its mask, ascending within a row). So a kept value is
                      scaled by its channel's range over the group, not by its row's: a token's kept
                      channels differ in size, and one scale per row left the small ones few levels.
                      Symmetric codes only.

A code `c` in [0, 2^bits - 1] is dequantized as `c * scale + zero`; without a stored zero the codes
are symmetric "mid-rise" levels `(c - (2^bits - 1) / 2) * scale` (no level at 0: SparK's kept key
values are the salient entries, never near zero, and 2 bits keep four levels instead of three).
Quantization is round-to-nearest over each group's range: asymmetric `[min, max]`, or symmetric
`[-max|x|, max|x|]`. `nbytes` counts the storages (codes, scale, zero).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .tensors import compact, horner_bytes, storage_nbytes

BITS = (8, 4, 2)
AXES = ("row", "token", "channel")


def quant_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-group scale and zero: bfloat16 for bfloat16 models (same range), else float16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int `[..., N]` codes in [0, 2^bits) -> uint8 `[..., ceil(N * bits / 8)]` (module docstring)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    n = codes.shape[-1]
    c = codes.to(torch.uint8)
    if n % per:
        c = torch.nn.functional.pad(c, (0, (-n) % per))
    return horner_bytes(c.reshape(*c.shape[:-1], c.shape[-1] // per, per), 1 << bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 `[..., ceil(n * bits / 8)]` -> uint8 codes `[..., n]`."""
    if bits == 8:
        return packed[..., :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))[..., :n]


def _group_view(x: torch.Tensor, axis: str, group: int, offset: int = 0) -> torch.Tensor:
    """`x [B, H, S, N]` -> its groups on the last axis: `[B, H, S, G, group]` ("row") or
    `[B, H, G, N, group]` ("token", the first group starting `offset` tokens before the tensor).
    Partial groups are padded by repeating their edge element, which changes no group statistic."""
    b, h, s, n = x.shape
    if axis == "row":
        pad = (-n) % group
        if pad:
            x = torch.nn.functional.pad(x.reshape(b * h * s, 1, n), (0, pad), mode="replicate").reshape(b, h, s, n + pad)
        return x.reshape(b, h, s, -1, group)
    back = (-(offset + s)) % group
    t = x.transpose(2, 3)  # [B, H, N, S]
    if offset or back:
        t = torch.nn.functional.pad(t.reshape(b * h, n, s), (offset, back), mode="replicate").reshape(b, h, n, -1)
    return t.reshape(b, h, n, -1, group).transpose(2, 3)  # [B, H, G, N, group]


def _ungroup(g: torch.Tensor, axis: str, shape, offset: int = 0) -> torch.Tensor:
    b, h, s, n = shape
    if axis == "row":
        return g.reshape(b, h, s, -1)[..., :n]
    return g.transpose(3, 4).reshape(b, h, -1, n)[:, :, offset : offset + s]


# Entries that take no part in a group's statistics (padding, filler slots: `valid` False) count as
# 0 in a symmetric group's max |x| (no group's maximum is below 0), and as this sentinel in an
# asymmetric group's min and max (no real key or value is this large, and `_masked` skips it).
_HIDDEN = 3.0e38


def _valid_view(valid: torch.Tensor, shape) -> torch.Tensor:
    """bool `[B, S]` or `[B, H, S]` -> broadcastable to `shape [B, H, S, N]`."""
    b, h, s, _ = shape
    v = valid if valid.dim() == 3 else valid.unsqueeze(1)
    return v.expand(b, h, s).unsqueeze(-1)


def _masked(g: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce` (amin / amax) over the last axis of a group view, skipping hidden entries; 0 for a
    group with no real entry."""
    hidden = g == _HIDDEN
    fill = float("inf") if reduce is torch.amin else float("-inf")
    out = reduce(torch.where(hidden, torch.full_like(g, fill), g), -1)
    return torch.where(hidden.all(-1), torch.zeros_like(out), out)


def _finite_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Rounded codes clamped to `[0, levels]`. A non-finite entry makes its group's statistics
    non-finite, so it spreads over its group on reading (as NaN/inf spread in attention); its code
    is arbitrary."""
    return codes.nan_to_num(nan=0.0, posinf=levels, neginf=0.0).clamp_(0, levels)


def _expand(stat: torch.Tensor, axis: str, shape, group: int, offset: int = 0,
            channels: torch.Tensor | None = None) -> torch.Tensor:
    """A per-group statistic broadcast to every element of `shape [B, H, S, N]` (axis "channel":
    picked by each element's channel, `channels [B, H, S, N]`)."""
    b, h, s, n = shape
    if axis == "row":
        return stat.repeat_interleave(group, dim=-1)[..., :n]
    per_token = stat.repeat_interleave(group, dim=2)[:, :, offset : offset + s]
    return per_token if axis == "token" else per_token.gather(-1, channels)


@dataclass
class QuantizedTensor:
    """A `[B, H, S, N]` tensor as packed integer codes with per-group scales (module docstring)."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype  # what `dense()` returns by default (the model dtype)
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int
    axis: str = "row"
    offset: int = 0  # axes "token" and "channel": the first token's place in its group
    width: int = 0  # axis "channel": channels per row of the owner (the scales' last dim)

    def __post_init__(self) -> None:
        self.shape = tuple(int(x) for x in self.shape)
        self.codes, self.scale, self.zero = compact(self.codes), compact(self.scale), compact(self.zero)

    @classmethod
    def quantize(cls, x: torch.Tensor, bits: int, group: int, axis: str = "row", symmetric: bool = False,
                 valid: torch.Tensor | None = None, channels: torch.Tensor | None = None,
                 width: int = 0) -> "QuantizedTensor":
        """Round `x [B, H, S, N]` to `bits`-bit codes, one scale (and zero, unless `symmetric`) per
        group of `group` elements along `axis`. Statistics are computed in float32.

        Axes "token" and "channel": groups end at the last token (the first group is the partial
        one), and `valid` (bool `[B, S]` or `[B, H, S]`, True = a real token) keeps padding and
        filler slots out of the statistics, so every row of a left-padded batch is quantized as it
        would be alone (its real tokens fall into the same groups). Axis "channel" needs
        `channels` (int64 `[B, H, S, N]`, each element's channel in `[0, width)`) and `symmetric`."""
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if axis == "channel" and (channels is None or channels.shape != x.shape or width < 1 or not symmetric):
            raise ValueError("axis 'channel' needs symmetric codes, `channels` shaped like x and `width` >= 1")
        levels = (1 << bits) - 1
        sdtype = quant_scale_dtype(x.dtype)
        big, eps = torch.finfo(sdtype).max, torch.finfo(sdtype).eps  # statistics beyond the range saturate
        offset = (-x.shape[2]) % group if axis != "row" else 0
        xf = x.float()
        hide = axis != "row" and valid is not None
        # The stored zero is rounded down and the scale up (by one unit of the scale dtype's precision),
        # so every element's code lies in [0, 2^bits - 1] and its error stays within half a step.
        sym_scale = lambda amax: (2 * amax / levels * (1 + eps)).clamp(max=big).to(sdtype)  # noqa: E731
        sym_codes = lambda v, s: torch.round(v / torch.where(s > 0, s, 1.0) + levels / 2)  # noqa: E731
        if symmetric:  # group statistic: max |x|, hidden entries as 0 (a NaN still spreads over its group)
            a = xf.abs()
            if hide:
                a = torch.where(_valid_view(valid, x.shape), a, 0.0)
            if axis == "channel":  # each value at its channel; channels a row does not keep are 0 too
                b, h, s, _ = x.shape
                a = torch.zeros((b, h, s, width), dtype=torch.float32, device=x.device).scatter_(-1, channels, a)
                scale = sym_scale(_group_view(a, "token", group, offset).amax(-1))
                codes = sym_codes(xf, _expand(scale.float(), axis, x.shape, group, offset, channels))
                return cls(tuple(x.shape), x.dtype, pack_codes(_finite_codes(codes, levels), bits), scale, None, bits,
                           group, axis, offset, width)
            scale = sym_scale(_group_view(a, axis, group, offset).amax(-1))
            codes = sym_codes(_group_view(xf, axis, group, offset), scale.float().unsqueeze(-1))
            zero = None
        else:
            g = _group_view(torch.where(_valid_view(valid, x.shape), xf, _HIDDEN) if hide else xf, axis, group, offset)
            stat = _masked if hide else (lambda t, reduce: reduce(t, -1))
            lo = stat(g, torch.amin)
            zero = (lo - lo.abs() * eps).clamp(-big, big).to(sdtype)
            scale = ((stat(g, torch.amax) - zero.float()) / levels * (1 + eps)).clamp(max=big).to(sdtype)
            s = scale.float().unsqueeze(-1)
            codes = torch.round((g - zero.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0))
        codes = _ungroup(_finite_codes(codes, levels), axis, x.shape, offset)
        return cls(tuple(x.shape), x.dtype, pack_codes(codes, bits), scale, zero, bits, group, axis, offset)

    # --- reading ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    @property
    def nbytes(self) -> int:
        return storage_nbytes(*self.tensors())

    def int_codes(self) -> torch.Tensor:
        """uint8 `[B, H, S, N]`: the codes, one per element."""
        return unpack_codes(self.codes, self.bits, self.shape[-1])

    def dense(self, dtype: torch.dtype | None = None, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized `[B, H, S, N]` tensor, computed in float32 and returned in `dtype`
        (default: the stored model dtype). Axis "channel": `channels` as given to `quantize`."""
        if self.axis == "channel" and channels is None:
            raise ValueError("codes with per-channel scales are read with their elements' channels (axis 'channel')")
        c = self.int_codes().float()
        scale = _expand(self.scale.float(), self.axis, self.shape, self.group, self.offset, channels)
        if self.zero is None:
            out = (c - ((1 << self.bits) - 1) / 2) * scale
        else:
            out = c * scale + _expand(self.zero.float(), self.axis, self.shape, self.group, self.offset)
        return out.to(dtype or self.dtype)

    def kept_per_row(self) -> torch.Tensor:
        b, h, s, n = self.shape
        return torch.full((b, h, s), n, dtype=torch.int64, device=self.codes.device)

    # --- structural operations -------------------------------------------------------------
    def slice_seq(self, start: int, stop: int) -> "QuantizedTensor":
        """Tokens `start:stop` (a compact copy; groups along tokens are kept exactly)."""
        codes = self.codes[:, :, start:stop].contiguous().clone()
        shape = (*self.shape[:2], codes.shape[2], self.shape[3])
        if self.axis == "row":
            cut = lambda t: None if t is None else t[:, :, start:stop].contiguous().clone()  # noqa: E731
            return replace(self, shape=shape, codes=codes, scale=cut(self.scale), zero=cut(self.zero))
        first, last = (self.offset + start) // self.group, (self.offset + max(stop, start + 1) - 1) // self.group
        cut = lambda t: None if t is None else t[:, :, first : last + 1].contiguous().clone()  # noqa: E731
        return replace(self, shape=shape, codes=codes, scale=cut(self.scale), zero=cut(self.zero),
                       offset=(self.offset + start) % self.group)

    def index_batch(self, index: torch.Tensor) -> "QuantizedTensor":
        index = index.to(self.codes.device)
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return replace(self, shape=(len(index), *self.shape[1:]), codes=pick(self.codes), scale=pick(self.scale),
                       zero=pick(self.zero))

    def to(self, device) -> "QuantizedTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero))
