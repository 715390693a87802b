"""The SparK page: fixed-size per-token records in one vLLM KV-cache page, declared in one place.

vLLM gives every attention layer a KV cache of `num_blocks` pages; a page holds `block_size` tokens
of every KV head of the layer. This module fixes what a page of the SparK backend holds and how to
read and write it. Everything else in `sparkkv.vllm` goes through `RecordLayout`.

Page = field regions, then a header (byte offsets are multiples of 16); each region is head-major,
`[H, block_size, elems]`:

    region  k_vals   [H, block_size, T]     model dtype   kept key values, ascending channels
    region  k_keep   [H, block_size, D/8]   uint8         bit c%8 of byte c//8: channel c kept
    region  k_sign   [H, block_size, D/8]   uint8         bit set: pruned entry positive (recovery mean/constant)
    region  k_scale  [H, block_size]        scale dtype   recovery magnitude sqrt(a_t) (recovery mean)
    region  v        [H, block_size, Dv]    model dtype   the value (value codec "dense"), or
    region  v_vals / v_keep / v_scale                     pruned values (codec "pruned": compress_values)
    region  v_codes / v_qscale / v_qzero                  `value_bits`-bit codes of the value (codec "quant")
                                                          or of the pruned values' kept entries (codec
                                                          "pruned+quant", with v_keep / v_scale): uint8
                                                          codes `[ceil(N * bits / 8)]`, a scale and zero per
                                                          group of `quant_group_size` channels of the token
                                                          (`quant.QuantizedTensor`, axis "row": per token,
                                                          so one record holds all of it); v_scale is then
                                                          bfloat16, as beside any quantized kept values
                                                          (`packed.scale_dtype`)
    header  qn       [H, D]                 float32       the query norms every key of this page was compressed with

(`method="dense"` stores region `k [H, block_size, D]` instead of the four key regions.)
A token's record is its row of every region (one row per KV head): `record_bytes` per (token, KV
head) is fixed, so the page holds exactly `block_size` tokens and the header costs `H * D * 4` bytes per page.

The header makes a page self-contained: `chan = 1/sqrt(qn)` (the recovery factor) and the scale of
every key in the page were computed from the same `qn`, so a page shared by prefix caching decodes the
same in every request that reads it. `qn` is written by the first write into a page; later tokens
written into the same page are compressed with the `qn` already there (see `backend.py`).

Field-major, head-major regions make per-field reads cheap: a page's region is one contiguous
`[H, block_size, elems]` array, so the fused C++ kernel reads every page where it lies, one batch item
per page, through the block ids (`page_operands`: views of page 0 that the kernel moves to each
page); the Triton path gathers the same chunks with one `index_select` per field (`gather_pages`), and
the per-request path transposes them once into `PackedTensor`'s `[H, S, X]` (`gather`).

Value codecs ("dense", "pruned", "quant", "pruned+quant", picked by `_value_codec`): each has its
regions in `_value_fields`, its encoder in `encode_values` and its reader in `values_operand`; nothing
else reads value bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparKConfig
from ..method import _check_finite, _compress_keys, _compress_values, compress_keys, compress_values
from ..packed import PackedTensor, scale_dtype
from ..quant import QuantizedTensor

_ALIGN = 16
KEY_CODECS = ("spark", "dense")
VALUE_CODECS = ("dense", "pruned", "quant", "pruned+quant")


@dataclass(frozen=True)
class Region:
    """One field of the page: `[H, block_size, elems]` of `dtype` starting at byte `offset`."""

    name: str
    dtype: torch.dtype
    elems: int
    offset: int
    nbytes: int


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class RecordLayout:
    """Where every field of a SparK page lives, for one layer geometry and configuration.

    num_kv_heads `H`, head_dim `D` (keys), head_dim_v `Dv`, block_size tokens per page, dtype the model
    dtype of stored values. Built with `RecordLayout.create(config, ...)`.
    """

    config: SparKConfig
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    block_size: int
    dtype: torch.dtype
    key_codec: str
    value_codec: str
    kept: int  # T, key channels stored per token
    kept_v: int  # value channels stored per token (Dv for dense values)
    regions: tuple[Region, ...]
    header_offset: int
    page_bytes: int

    @classmethod
    def create(cls, config: SparKConfig, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               head_dim_v: int | None = None) -> "RecordLayout":
        check_config(config)
        dv = head_dim if head_dim_v is None else head_dim_v
        if head_dim % 8 or dv % 8:
            raise ValueError(f"head_dim {head_dim} / {dv}: sparkkv packs one bit per channel, so head dims must be multiples of 8")
        key_codec = "dense" if config.channel_policy == "dense" else "spark"
        value_codec = _value_codec(config)
        t, tv = _kept_counts(config, key_codec, num_kv_heads, head_dim, dv)
        sdt = scale_dtype(dtype)
        fields: list[tuple[str, torch.dtype, int]] = []
        if key_codec == "dense":
            fields.append(("k", dtype, head_dim))
        else:
            fields += [("k_vals", dtype, t), ("k_keep", torch.uint8, head_dim // 8)]
            if config.recovery in ("mean", "constant"):
                fields.append(("k_sign", torch.uint8, head_dim // 8))
            if config.recovery == "mean":
                fields.append(("k_scale", sdt, 1))
        fields += _value_fields(config, dtype, dv, tv)
        regions, offset = [], 0
        for name, dt, elems in fields:
            nbytes = block_size * num_kv_heads * elems * dt.itemsize
            regions.append(Region(name, dt, elems, offset, nbytes))
            offset += _align(nbytes)
        header_offset = offset
        page_bytes = _align(offset + (num_kv_heads * head_dim * 4 if key_codec == "spark" else 0))
        return cls(config, num_kv_heads, head_dim, dv, block_size, dtype, key_codec, value_codec, t,
                   tv if config.value_prune_ratio > 0 else dv, tuple(regions), header_offset, page_bytes)

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def record_bytes(self) -> int:
        """Bytes of one token's record for one KV head (all regions, no header, no alignment)."""
        return sum(r.elems * r.dtype.itemsize for r in self.regions)

    @property
    def header_bytes(self) -> int:
        return self.page_bytes - self.header_offset

    @property
    def dense_token_bytes(self) -> int:
        """What stock vLLM stores per token and KV head: K and V in the model dtype."""
        return (self.head_dim + self.head_dim_v) * self.dtype.itemsize

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    # --- views over raw pages ------------------------------------------------------------------
    def field(self, pages: torch.Tensor, name: str) -> torch.Tensor:
        """`pages` uint8 `[P, >= page_bytes]` -> view `[P, block_size, H, elems]` of field `name` (token
        first, for writing; the memory is head-major)."""
        r = self.region(name)
        raw = pages[:, r.offset : r.offset + r.nbytes]
        return raw.view(r.dtype).view(pages.shape[0], self.num_kv_heads, self.block_size, r.elems).transpose(1, 2)

    def _take(self, pages: torch.Tensor, r: Region, block_ids: torch.Tensor) -> torch.Tensor:
        """Region `r` of pages `block_ids [N]` (int64) -> uint8 `[N, H, block_size, elems * itemsize]`
        (one copy of whole per-page chunks)."""
        raw = pages[:, r.offset : r.offset + r.nbytes]
        # pages are not one contiguous tensor (vLLM's page stride), so index_select copies element by
        # element: move the widest integer that divides the region's bytes, offset and page stride
        wide = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                    if (r.nbytes | r.offset | pages.stride(0) | pages.storage_offset()) % t.itemsize == 0)
        x = torch.index_select(raw.view(wide), 0, block_ids).view(torch.uint8)
        return x.view(block_ids.shape[0], self.num_kv_heads, self.block_size, -1)

    def header(self, pages: torch.Tensor) -> torch.Tensor:
        """`pages` uint8 `[P, >= page_bytes]` -> view float32 `[P, H, D]` of the pages' `qn`."""
        raw = pages[:, self.header_offset : self.header_offset + self.num_kv_heads * self.head_dim * 4]
        return raw.view(torch.float32).view(pages.shape[0], self.num_kv_heads, self.head_dim)

    # --- encode ----------------------------------------------------------------------------------
    def encode_keys(self, keys: torch.Tensor, qn: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Keys `[N, H, D]` compressed with `qn` float32 `[H, D]` (one for all N tokens) or `[N, H, D]`
        (one per token: decode steps of N requests) -> field name -> `[N, H, elems]`.

        Runs the library's SparK (`method._compress_keys`, the core of `sparkkv.compress_keys`, as the
        transformers cache calls it), after the one check the records need: keys and qn finite
        (`method._check_finite`), since a record outlives its request in a reused page; the rest of
        `compress_keys`' argument checks hold by construction here. This module only places fields."""
        _check_finite("keys", keys)
        if self.key_codec == "dense":
            return {"k": keys.to(self.dtype)}
        _check_finite("qn", qn)
        if qn.dim() == 3:  # batch of one-token rows: [N, H, 1, D]
            packed = _compress_keys(keys.to(self.dtype).unsqueeze(2), qn.float(), self.config)
            row = lambda t: t[:, :, 0]  # noqa: E731
        else:
            packed = _compress_keys(keys.to(self.dtype).transpose(0, 1).unsqueeze(0), qn.unsqueeze(0).float(), self.config)
            row = lambda t: t[0].transpose(0, 1)  # noqa: E731
        out = {"k_vals": row(packed.vals), "k_keep": row(packed.keep)}
        if "k_sign" in self._names:
            out["k_sign"] = row(packed.sign)
        if "k_scale" in self._names:
            out["k_scale"] = row(packed.scale.unsqueeze(-1))
        return out

    def encode_values(self, values: torch.Tensor, rows: bool = False) -> dict[str, torch.Tensor]:
        """Values `[N, H, Dv]` -> field name -> `[N, H, elems]`: dense, quantized per token
        (`QuantizedTensor.quantize`, axis "row"), or `method._compress_values` (`sparkkv.compress_values`'
        core, after the finite check; its statistics see the
        N tokens as one sequence, or each token alone when `rows`: the decode tokens of N requests),
        its kept values then quantized as the library's value packer does (`policies.py`)."""
        v = values.to(self.dtype)
        _check_finite("values", v)
        if self.value_codec == "dense":
            return {"v": v}
        config = self.config
        seq = (lambda t: t.unsqueeze(2)) if rows else (lambda t: t.transpose(0, 1).unsqueeze(0))  # noqa: E731
        row = (lambda t: t[:, :, 0]) if rows else (lambda t: t[0].transpose(0, 1))  # noqa: E731
        if self.value_codec == "quant":
            q = QuantizedTensor.quantize(seq(v), config.value_bits, config.quant_group_size, "row")
            return {"v_codes": row(q.codes), "v_qscale": row(q.scale), "v_qzero": row(q.zero)}
        packed = _compress_values(seq(v), config.value_prune_ratio)
        if self.value_codec == "pruned+quant":
            packed = packed.with_quantized_vals(config.value_bits, config.quant_group_size, symmetric=False)
        out = {"v_keep": row(packed.keep), "v_scale": row(packed.scale.unsqueeze(-1))}
        if self.value_codec == "pruned":
            return {"v_vals": row(packed.vals), **out}
        q = packed.vals
        return {"v_codes": row(q.codes), "v_qscale": row(q.scale), "v_qzero": row(q.zero), **out}

    def write(self, pages: torch.Tensor, page_idx: torch.Tensor, offsets: torch.Tensor, fields: dict[str, torch.Tensor],
              slices: bool = True) -> None:
        """Write records: token i goes to page `page_idx[i]`, slot `offsets[i]` (int64 `[N]`).
        Tokens that fill consecutive slots of one page (a prompt) are copied as slices; `slices=False`
        skips looking for them (one token per request: a batched decode step)."""
        n = page_idx.shape[0]
        if slices and n > 8:
            cuts = torch.nonzero((page_idx[1:] != page_idx[:-1]) | (offsets[1:] != offsets[:-1] + 1)).flatten() + 1
            bounds = [0] + cuts.tolist() + [n]
            if len(bounds) - 1 <= n // 8:
                pi, off = page_idx.tolist(), offsets.tolist()
                for name, value in fields.items():
                    view, value = self.field(pages, name), value.to(self.region(name).dtype)
                    for a, b in zip(bounds[:-1], bounds[1:]):
                        view[pi[a], off[a] : off[a] + b - a] = value[a:b]
                return
        for name, value in fields.items():
            self.field(pages, name)[page_idx, offsets] = value.to(self.region(name).dtype)

    @property
    def _names(self) -> set[str]:
        return {r.name for r in self.regions}

    # --- decode -----------------------------------------------------------------------------------
    def gather(self, pages: torch.Tensor, block_ids: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The first `length` tokens held by pages `block_ids` (in order): field -> `[H, length, elems]`
        (contiguous copies, the per-field tensors `PackedTensor` and the kernels take)."""
        out = {}
        n, h = block_ids.shape[0], self.num_kv_heads
        for r in self.regions:
            x = self._take(pages, r, block_ids).transpose(0, 1).reshape(h, n * self.block_size, -1)
            out[r.name] = x[:, :length].contiguous().view(r.dtype)
        return out

    def gather_pages(self, pages: torch.Tensor, block_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pages `block_ids [N]` (int64) as N items of `block_size` tokens each: field ->
        `[N, H, block_size, elems]`, one `index_select` copy per field (no transpose: a region is
        head-major). The decode kernel takes these directly, one batch item per page; slots a page
        does not hold yet carry whatever the page holds there, for the caller to mask (a bias of
        -inf). They are finite: vLLM zero-fills the KV memory and only `encode_keys` / `encode_values`
        output (of inputs they checked finite) is ever written."""
        return {r.name: self._take(pages, r, block_ids).view(r.dtype) for r in self.regions}

    def page_operands(self, pages: torch.Tensor, chan: torch.Tensor | None):
        """The keys and values of page 0 of `pages`, in place, as the fused CPU kernel reads them with
        `block_ids` (`kernels.cpu.decode_partials(..., pages=pages, block_ids=...)`): `operands.Fields`
        whose tensors are views `[1, H, block_size, elems]` of page 0 (no copy; `PackedTensor` would
        compact them), `chan` float32 `[R, H, D]` (one per kernel batch item) or None. Describes the
        same operands as `keys_operand` / `values_operand` over `gather_pages` (tested)."""
        from ..kernels.operands import Fields

        h, bs, dev = self.num_kv_heads, self.block_size, pages.device
        f = {}
        for r in self.regions:
            raw = pages[0, r.offset : r.offset + r.nbytes]
            f[r.name] = raw.view(r.dtype).view(1, h, bs, r.elems)
        if self.key_codec == "dense":
            keys = Fields((1, h, bs, self.head_dim), self.dtype, dev, None, vals=f["k"], fixed_t=self.head_dim)
        else:
            keys = Fields((1, h, bs, self.head_dim), self.dtype, dev, None, vals=f["k_vals"], fixed_t=self.kept,
                          keep=f["k_keep"], sign=f.get("k_sign"), chan=chan,
                          scale=f["k_scale"].view(1, h, bs) if "k_scale" in f else None)
        shape = (1, h, bs, self.head_dim_v)
        if self.value_codec == "dense":
            return keys, Fields(shape, self.dtype, dev, None, vals=f["v"], fixed_t=self.head_dim_v)
        config = self.config
        quant = {}
        if config.value_bits < 16:
            quant = dict(codes=f["v_codes"], qscale=f["v_qscale"], qzero=f["v_qzero"], bits=config.value_bits,
                         group=config.quant_group_size)
        if self.value_codec == "quant":
            return keys, Fields(shape, self.dtype, dev, None, fixed_t=self.head_dim_v, **quant)
        pruned = dict(keep=f["v_keep"], scale=f["v_scale"].view(1, h, bs), fixed_t=self.kept_v)
        return keys, Fields(shape, self.dtype, dev, None, vals=f.get("v_vals"), **pruned, **quant)

    def keys_operand(self, fields: dict[str, torch.Tensor], chan: torch.Tensor | None):
        """Per-field tensors from `gather` (`[H, S, e]`) or `gather_pages` (`[R, H, S, e]`) -> the keys
        as `PackedTensor [R, H, S, D]` (R = 1 for `gather`; dense `[R, H, S, D]` for `method="dense"`).
        `chan` float32 `[H, D]` or `[R, H, D]`: the pages' recovery factor."""
        f = {n: t if t.dim() == 4 else t.unsqueeze(0) for n, t in fields.items()}
        if self.key_codec == "dense":
            return f["k"]
        b, _, s, _ = f["k_vals"].shape
        if chan is not None and chan.dim() == 2:
            chan = chan.unsqueeze(0)
        return PackedTensor(
            shape=(b, self.num_kv_heads, s, self.head_dim), dtype=self.dtype, vals=f["k_vals"], keep=f["k_keep"],
            sign=f.get("k_sign"), scale=f["k_scale"].squeeze(-1) if "k_scale" in f else None, chan=chan)

    def values_operand(self, fields: dict[str, torch.Tensor]):
        """Per-field tensors from `gather` / `gather_pages` -> the values as dense `[R, H, S, Dv]`,
        `QuantizedTensor` (codec "quant") or `PackedTensor` (kept values raw or quantized)."""
        f = {n: t if t.dim() == 4 else t.unsqueeze(0) for n, t in fields.items()}
        if self.value_codec == "dense":
            return f["v"]
        b, _, s, _ = f["v_keep" if self.config.value_prune_ratio > 0 else "v_codes"].shape
        vals = None
        if self.config.value_bits < 16:
            vals = QuantizedTensor(shape=(b, self.num_kv_heads, s, self.kept_v), dtype=self.dtype, codes=f["v_codes"],
                                   scale=f["v_qscale"], zero=f["v_qzero"], bits=self.config.value_bits,
                                   group=self.config.quant_group_size)
            if self.value_codec == "quant":
                return vals
        return PackedTensor(shape=(b, self.num_kv_heads, s, self.head_dim_v), dtype=self.dtype,
                            vals=f["v_vals"] if vals is None else vals, keep=f["v_keep"], scale=f["v_scale"].squeeze(-1))

    def chan(self, qn: torch.Tensor) -> torch.Tensor | None:
        """The recovery factor float32 `[H, D]` (or `[R, H, D]`) for keys compressed with `qn [H, D]`
        (or `[R, H, D]`); None when the recovery stores none. Taken from the library: the `chan` field `compress_keys` returns."""
        if self.key_codec == "dense" or self.config.recovery == "zero":
            return None
        batched = qn.dim() == 3
        qn = qn if batched else qn.unsqueeze(0)
        probe = torch.ones(qn.shape[0], self.num_kv_heads, 1, self.head_dim, dtype=torch.float32, device=qn.device)
        chan = compress_keys(probe, None, self.config, qn=qn.float()).chan
        return chan if batched else chan[0]


def _kept_counts(config: SparKConfig, key_codec: str, h: int, d: int, dv: int) -> tuple[int, int]:
    """Key and value channels the library keeps per token, read off one probe compression (so the
    count is the library's rule, not a copy of it)."""
    t = d
    if key_codec == "spark":
        probe = torch.randn(1, h, 1, d, generator=torch.Generator().manual_seed(0))
        t = compress_keys(probe, None, config, qn=torch.ones(1, h, d)).vals.shape[-1]
    tv = dv
    if config.value_prune_ratio > 0:
        tv = compress_values(torch.randn(1, h, 1, dv, generator=torch.Generator().manual_seed(0)), config.value_prune_ratio).vals.shape[-1]
    return t, tv


def _value_codec(config: SparKConfig) -> str:
    """The value codec a configuration stores: "dense", "pruned", "quant" or "pruned+quant"."""
    quant = config.value_bits < 16
    if config.value_prune_ratio > 0:
        return "pruned+quant" if quant else "pruned"
    return "quant" if quant else "dense"


def _value_fields(config: SparKConfig, dtype: torch.dtype, dv: int, tv: int) -> list[tuple[str, torch.dtype, int]]:
    """The value regions of `_value_codec(config)`: the quantized ones' sizes and dtypes read off one
    probe `QuantizedTensor` (the library's code layout, not a copy of it)."""
    pruned = config.value_prune_ratio > 0
    n = tv if pruned else dv
    if config.value_bits < 16:
        q = QuantizedTensor.quantize(torch.zeros(1, 1, 1, n, dtype=dtype), config.value_bits, config.quant_group_size, "row")
        fields = [("v_codes", q.codes.dtype, q.codes.shape[-1]), ("v_qscale", q.scale.dtype, q.scale.shape[-1]),
                  ("v_qzero", q.zero.dtype, q.zero.shape[-1])]
    else:
        fields = [("v_vals" if pruned else "v", dtype, n)]
    if pruned:
        fields += [("v_keep", torch.uint8, dv // 8), ("v_scale", scale_dtype(dtype, quantized=config.value_bits < 16), 1)]
    return fields


def check_config(config: SparKConfig) -> None:
    """ValueError (one line, naming the field) for configurations fixed-size records cannot store."""
    if config.eviction is not None:
        raise ValueError(f"sparkkv.vllm: method={config.method!r} evicts tokens; the vLLM backend stores every token "
                         "(allowed methods: 'spark', 'dense')")
    if config.key_bits < 16:
        raise ValueError(f"sparkkv.vllm: key_bits={config.key_bits}: SparK's kept key values are quantized with one scale "
                         "per channel and group of quant_group_size tokens, which a one-token record cannot hold; "
                         "the vLLM backend stores keys at key_bits=16 (value_bits 8, 4 or 2 are served)")
    if config.mask_format != "bits":
        raise ValueError(f"sparkkv.vllm: mask_format={config.mask_format!r} is not served by the vLLM backend "
                         "(allowed: 'bits')")
    if config.channel_policy not in ("spark", "dense"):
        raise ValueError(f"sparkkv.vllm: method={config.method!r} is not served by the vLLM backend (allowed: 'spark', 'dense')")
    if config.channel_policy == "spark":
        if config.selection != "ratio":
            raise ValueError(f"sparkkv.vllm: selection={config.selection!r} keeps a variable number of channels per token; "
                             "fixed-size records need selection='ratio'")
        if config.recovery not in ("mean", "zero", "constant"):
            raise ValueError(f"sparkkv.vllm: recovery={config.recovery!r} stores one value per pruned entry; "
                             "allowed: 'mean', 'zero', 'constant'")
