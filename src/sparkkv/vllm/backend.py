"""The SparK attention backend for vLLM (v1): `AttentionBackend` + metadata builder + `AttentionImpl`.

Selected with `attention_backend="CUSTOM"` (`--attention-backend CUSTOM`); `sparkkv.vllm.register`
registers this class for the CUSTOM slot. Pages hold fixed-size per-token records (`records.py`).

One forward of one layer, per request `r` of the batch (query tokens `q_r [L, Hq, D]`, new keys and
values `k_r, v_r [L, Hkv, D]`, `P = seq_len - L` tokens already in the pages):

1. Attention. The step's own L tokens are attended densely (they are in hand, as the transformers
   path attends a prefill densely and its dense tail); the P earlier tokens are read from the
   records of the request's pages (block table), rebuilt by the library (`PackedTensor`). Pages are
   grouped into runs of equal header `qn` (one run unless chunks or prefix caching mixed queries),
   each run one `PackedTensor` with its own `chan`.
   Paths (`SparKConfig.attention_backend`): "torch" rebuilds the keys and values densely in float32
   and computes float32 softmax partials (the reference); "cpu" calls the fused C++ kernel
   `sparkkv.kernels.cpu.decode_partials` per run over the gathered per-field tensors and merges the
   partials with the step's own tokens by log-sum-exp; "triton" does the same with the Triton
   kernel (CUDA only, untested: no GPU here); "auto" is "cpu" on CPU tensors when the kernel builds,
   else "torch".
2. Write. The step's keys are compressed with `sparkkv.compress_keys` and written with the values
   into their slots (slot mapping). A prefill step (the request is still in its prompt) scores with
   `qn = window_query_norm(last window_size queries of the step)`; a decode step uses the `qn` of
   the page holding its previous token. A token written into a page that already holds tokens uses
   that page's header `qn`, so every page stays self-contained.
3. Recent tokens (`vllm_recent_tokens` W, default 16). Each request's last W generated tokens are
   also kept exactly (keys and values, model dtype) in a per-layer ring (`Recent`), keyed by the
   request's first page. Attention reads the stored tokens `[0, P - c)` from the records and the
   ring's `c` tokens `[P - c, P)` densely (with the step's own tokens), so a request attends as the
   transformers path does with a dense tail of recent generated tokens. The records still hold every
   token: a ring that is missing or not current (`end != P`) is simply not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..method import window_query_norm
from .records import RecordLayout
from . import settings as _settings

from vllm.v1.attention.backend import (  # noqa: E402  (vLLM is an optional dependency of sparkkv)
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout  # noqa: E402

log = logging.getLogger(__name__)


def layout_for_spec(spec: AttentionSpec) -> RecordLayout:
    """The record layout of a layer whose stock spec is `spec` (heads, head size, dtype, block size)."""
    return RecordLayout.create(_settings.current().config, spec.num_kv_heads, spec.head_size, spec.block_size,
                               spec.dtype, spec.head_size_v)


class SparKAttentionBackend(AttentionBackend):
    """SparK-packed KV pages. `get_name()` is "CUSTOM": vLLM pickles the backend by enum name."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True  # compression needs the step's queries
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["SparKAttentionImpl"]:
        return SparKAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SparKMetadataBuilder"]:
        return SparKMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One head slot per token whose content is the token's records for every KV head, and a
        page padded to `RecordLayout.page_bytes` (regions + header): vLLM then sizes its block count
        from SparK's page, so the capacity in tokens grows by the byte ratio."""
        from dataclasses import replace

        if spec.state_content_bytes is not None:
            return spec
        layout = layout_for_spec(spec)
        item = spec.dtype.itemsize
        content = -(-layout.record_bytes * layout.num_kv_heads // item) * item
        page = max(layout.page_bytes, content * spec.block_size)
        page = -(-page // 16) * 16
        return replace(spec, num_head_slots=1, state_content_bytes=content, page_size_padded=page)


@dataclass
class SparKMetadata:
    """What one forward needs, on the host: per-request query starts `[R + 1]`, sequence lengths
    `[R]` (tokens after this step), whether each request is still in its prompt; the block table
    `[R, max_blocks]` and slot mapping `[num_tokens]` as vLLM gives them."""

    num_actual_tokens: int
    num_reqs: int
    query_start_loc: list[int]
    seq_lens: list[int]
    prefilling: list[bool] | None
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class SparKMetadataBuilder(AttentionMetadataBuilder[SparKMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> SparKMetadata:
        m = common_attn_metadata
        r = m.num_reqs
        prefilling = None if m.is_prefilling is None else [bool(x) for x in m.is_prefilling[:r].tolist()]
        return SparKMetadata(
            num_actual_tokens=m.num_actual_tokens, num_reqs=r,
            query_start_loc=[int(x) for x in m.query_start_loc_cpu[: r + 1].tolist()],
            seq_lens=[int(x) for x in m.seq_lens[:r].tolist()],
            prefilling=prefilling, block_table=m.block_table_tensor, slot_mapping=m.slot_mapping)


def _pages(kv_cache: torch.Tensor, page_bytes: int) -> torch.Tensor:
    """vLLM's per-layer view `[num_blocks, 1, block_size, C]` -> uint8 `[num_blocks, page_bytes]`
    over the same memory (the header lies in the page padding, outside vLLM's view)."""
    u8 = kv_cache.view(torch.uint8)
    stride = u8.stride(0)
    if stride < page_bytes:
        raise RuntimeError(f"sparkkv.vllm: KV pages of {stride} bytes cannot hold SparK pages of {page_bytes} bytes")
    return torch.as_strided(u8, (u8.shape[0], page_bytes), (stride, 1), u8.storage_offset())


class Recent:
    """Exact copies of one request's last `W` generated tokens, for one layer: `k [W, Hkv, D]`,
    `v [W, Hkv, Dv]` in the model dtype, a ring (slot `i % W` holds the ring's `i`-th token, so its
    first `filled` slots are the valid ones; attention does not depend on the order of its tokens).
    `end` is the sequence length the ring is current with; `filled` its valid slots (<= W)."""

    def __init__(self, capacity: int, end: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        self.k = like_k.new_empty(capacity, *like_k.shape[1:])
        self.v = like_v.new_empty(capacity, *like_v.shape[1:])
        self.end = end
        self.written = 0

    @property
    def filled(self) -> int:
        return min(self.k.shape[0], self.written)

    def push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the step's tokens `k [L, Hkv, D]`, `v [L, Hkv, Dv]` (only the last W are kept)."""
        w, n = self.k.shape[0], k.shape[0]
        for i in range(max(0, n - w), n):
            slot = (self.written + i) % w
            self.k[slot], self.v[slot] = k[i], v[i]
        self.written += n
        self.end += n


class SparKAttentionImpl(AttentionImpl[SparKMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **unused) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append(f"sliding windows ({sliding_window})")
        if logits_soft_cap:
            problems.append("logit soft-capping")
        if sinks is not None:
            problems.append("attention sinks")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("KV sharing between layers")
        if kv_cache_dtype != "auto":
            problems.append(f"kv_cache_dtype={kv_cache_dtype!r} (SparK records store the model dtype)")
        if problems:
            raise NotImplementedError("sparkkv.vllm: the SparK backend does not serve " + ", ".join(problems))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.settings = _settings.current()
        self.config = self.settings.config
        self._layout: RecordLayout | None = None
        self._path: str | None = None
        self._chan_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recent_tokens = self.settings.recent_tokens
        self._recent: dict[int, Recent] = {}  # first page of a request -> its ring
        _warm_kernels(self.config)

    # --- setup --------------------------------------------------------------------------------
    def _layout_for(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> RecordLayout:
        block_size = kv_cache.shape[2]
        if self._layout is None or self._layout.block_size != block_size:
            self._layout = RecordLayout.create(self.config, self.num_kv_heads, self.head_size, block_size, dtype)
        return self._layout

    def _attention_path(self, device: torch.device) -> str:
        if self._path is None:
            want = self.config.attention_backend
            if want == "auto":
                want = "torch"
                if device.type == "cpu":
                    from ..kernels import cpu

                    want = "cpu" if cpu.unavailable_reason() is None else "torch"
                elif device.type == "cuda":
                    want = "triton"
            if want == "cpu":
                from ..kernels import cpu

                reason = cpu.unavailable_reason()
                if reason:
                    raise RuntimeError(f"sparkkv.vllm: attention_backend='cpu' but the CPU kernel is unavailable: {reason}")
            self._path = want
            log.info("sparkkv.vllm: attention path %s", want)
        return self._path

    # --- forward --------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: SparKMetadata | None, output: torch.Tensor | None = None, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """query `[T, Hq, D]`, key / value `[T, Hkv, D]`, kv_cache vLLM's per-layer page view,
        output `[T, Hq, Dv]` (written in place and returned)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparkkv.vllm: fused output quantization is not supported")
        if output is None:
            output = torch.empty(query.shape[0], self.num_heads, self.head_size, dtype=query.dtype, device=query.device)
        if attn_metadata is None:  # profiling / warm-up run
            return output
        layout = self._layout_for(kv_cache, key.dtype)
        pages = _pages(kv_cache, layout.page_bytes)
        out = output.view(-1, self.num_heads, self.head_size)
        m, bs = attn_metadata, layout.block_size
        singles, others, prefilling = [], [], {}
        for r in range(m.num_reqs):
            start, stop = m.query_start_loc[r], m.query_start_loc[r + 1]
            if stop <= start:
                continue
            length, seq = stop - start, m.seq_lens[r]
            prefilling[r] = m.prefilling[r] if m.prefilling is not None else (length > 1 or seq == length)
            (singles if length == 1 and seq > 1 and not prefilling[r] else others).append(r)
        recent = self._recent_rings(m, prefilling, key, value)
        path = self._attention_path(query.device)
        if singles and path != "torch":
            singles = self._decode_batch(layout, pages, m, singles, query, key, value, out, recent)
        for r in singles + others:
            start, stop = m.query_start_loc[r], m.query_start_loc[r + 1]
            length, seq = stop - start, m.seq_lens[r]
            prior = seq - length
            blocks = m.block_table[r, : -(-seq // bs)].long()
            q, k, v = query[start:stop], key[start:stop], value[start:stop]
            out[start:stop] = self._attend(layout, pages, blocks, prior, q, k, v, recent.get(r)).to(out.dtype)
            self._write(layout, pages, blocks, prior, q, k, v, m.slot_mapping[start:stop].long(), prefilling[r])
        for r, ring in recent.items():
            start, stop = m.query_start_loc[r], m.query_start_loc[r + 1]
            ring.push(key[start:stop], value[start:stop])
        return output

    def _recent_rings(self, m: SparKMetadata, prefilling: dict[int, bool], key, value) -> dict[int, Recent]:
        """The ring of every decoding request of this step (request index -> `Recent`, current with
        its stored tokens). A prompt step drops its request's ring (a new request, or a recompute,
        starts clean); rings of requests not in this step are dropped (finished or preempted); a
        ring that is not current (`end` != the stored tokens) starts over from this step."""
        if not self.recent_tokens:
            return {}
        firsts = {r: int(m.block_table[r, 0]) for r in prefilling}
        live = set(firsts.values())
        for block in [b for b in self._recent if b not in live]:
            del self._recent[block]
        out = {}
        for r, first in firsts.items():
            if prefilling[r]:
                self._recent.pop(first, None)
                continue
            start, stop = m.query_start_loc[r], m.query_start_loc[r + 1]
            prior = m.seq_lens[r] - (stop - start)
            ring = self._recent.get(first)
            if ring is None or ring.end != prior:
                ring = self._recent[first] = Recent(self.recent_tokens, prior, key, value)
            out[r] = ring
        return out

    def _decode_batch(self, layout: RecordLayout, pages, m: SparKMetadata, reqs: list[int], query, key, value, out,
                      recent: dict[int, Recent]) -> list[int]:
        """One decode token for each request of `reqs`, all at once: one fused-kernel call with one
        batch item per page, reading the pages in place through the block table (the C++ kernel) or
        from one gather of them (an `index_select` per field, for Triton) (pages padded to
        the longest request; slots past a request's stored tokens and the tokens its ring holds masked
        by the bias), one dense partial over the rings and the new tokens, a log-sum-exp merge, one
        `compress_keys` call for the new keys. Returns the requests it could not take (pages with
        more than one header `qn`), which go through the per-request path."""
        bs, h, g = layout.block_size, self.num_kv_heads, self.group
        dev = query.device
        tok = torch.tensor([m.query_start_loc[r] for r in reqs], device=dev)
        priors = [m.seq_lens[r] - 1 for r in reqs]
        nb = -(-max(priors) // bs)
        table = m.block_table[torch.tensor(reqs, device=m.block_table.device), :nb].long().to(dev)
        chan = None
        if layout.key_codec == "spark":
            used = torch.arange(nb, device=dev).unsqueeze(0) < torch.tensor([-(-p // bs) for p in priors], device=dev).unsqueeze(1)
            hdr = layout.header(pages)[table]  # [R, nb, H, D]
            first = hdr[:, 0]
            mixed = ((hdr != first.unsqueeze(1)).flatten(2).any(-1) & used).any(-1)  # several runs
            if bool(mixed.any()):
                keep = [i for i in range(len(reqs)) if not bool(mixed[i])]
                rest = [reqs[i] for i in range(len(reqs)) if bool(mixed[i])]
                return rest + (self._decode_batch(layout, pages, m, [reqs[i] for i in keep], query, key, value, out, recent)
                               if keep else [])
            chan = self._chan(layout, table[:, 0], first)
        # one kernel batch item per page (R * nb items of bs tokens; no transposing copy of the pages),
        # each item's partials then merged per request with the exact tokens' by log-sum-exp
        n_req = len(reqs)
        chan_items = None if chan is None else chan.repeat_interleave(nb, 0)
        if self._path == "cpu":  # the C++ kernel reads the pages in place, through the block table
            keys, values = layout.page_operands(pages, chan_items)
            in_place = dict(pages=pages, block_ids=table.reshape(-1))
        else:
            fields = layout.gather_pages(pages, table.reshape(-1))
            keys, values, in_place = layout.keys_operand(fields, chan_items), layout.values_operand(fields), {}
        rings = [recent.get(r) for r in reqs]
        filled = [ring.filled if ring is not None else 0 for ring in rings]
        from_records = torch.tensor([p - c for p, c in zip(priors, filled)], device=dev)
        position = torch.arange(nb * bs, device=dev).view(1, nb, bs)
        bias = torch.zeros(n_req, nb, bs, device=dev)
        bias.masked_fill_(position >= from_records.view(-1, 1, 1), float("-inf"))
        q, k, v = query[tok], key[tok], value[tok]  # [R, Hq, D], [R, Hkv, D]
        rows = q.view(n_req, h, g, -1)  # [R, Hkv, G, D]
        if self._path == "triton":
            from ..kernels.triton_decode import decode_partials
        else:
            from ..kernels.cpu import decode_partials
        from ..kernels.reference import merge_partials

        pm, pl, pacc = decode_partials(rows.repeat_interleave(nb, 0), keys, values, self.scale, bias=bias.view(n_req * nb, 1, bs),
                                       **in_place)
        sp = pm.shape[2]  # [R * nb, H, sp, G] -> [R, H, nb * sp, G]
        part = tuple(x.view(n_req, nb, h, sp, *x.shape[3:]).transpose(1, 2).reshape(n_req, h, nb * sp, *x.shape[3:])
                     for x in (pm, pl, pacc))
        # the exact tokens: each request's ring (slots past `filled` masked) and its new token
        w = max(filled)
        dk = torch.zeros(n_req, w + 1, h, k.shape[-1], dtype=k.dtype, device=dev)
        dv = torch.zeros(n_req, w + 1, h, v.shape[-1], dtype=v.dtype, device=dev)
        dk[:, w], dv[:, w] = k, v
        for i, (ring, c) in enumerate(zip(rings, filled)):
            if c:
                dk[i, :c], dv[i, :c] = ring.k[:c], ring.v[:c]
        visible = torch.arange(w + 1, device=dev).view(1, -1) < torch.tensor(filled, device=dev).view(-1, 1)
        visible[:, w] = True
        if self._path == "cpu":  # the same kernel over the dense exact tokens: one call, not ~15 small ops (Triton: never run, kept as it was)
            own_bias = torch.zeros(n_req, 1, w + 1, device=dev).masked_fill_(~visible.view(n_req, 1, w + 1), float("-inf"))
            own = decode_partials(rows, dk.transpose(1, 2), dv.transpose(1, 2), self.scale, bias=own_bias, splits=1)
        else:
            own = _dense_partials(rows, dk.transpose(1, 2), dv.transpose(1, 2), self.scale, visible.view(n_req, 1, 1, w + 1))
        res = merge_partials([part, own])  # [R, H, G, Dv]
        out[tok] = res.reshape(len(reqs), self.num_heads, -1).to(out.dtype)
        # write: each token compressed with the qn of its request's previous page (decode rule)
        slots = m.slot_mapping[tok].long().to(dev)
        page_idx, offsets = slots // bs, slots % bs
        if layout.key_codec == "dense":
            layout.write(pages, page_idx, offsets, {**layout.encode_keys(k, None), **layout.encode_values(v, rows=True)}, slices=False)
            return []
        prev = table[torch.arange(len(reqs), device=dev), torch.tensor([(p - 1) // bs for p in priors], device=dev)]
        headers = layout.header(pages)
        qn = headers[prev].clone()  # [R, H, D]
        headers[page_idx] = qn  # a token opening a page gives it its request's qn (same value otherwise)
        layout.write(pages, page_idx, offsets, {**layout.encode_keys(k, qn), **layout.encode_values(v, rows=True)}, slices=False)
        return []

    def _chan(self, layout: RecordLayout, first_blocks: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        """`layout.chan(qn)` `[R, H, D]` for requests whose first page is `first_blocks [R]`, from a
        small per-layer cache keyed by that page (checked against its header `qn`, so a reused page
        recomputes)."""
        cache = self._chan_cache
        rows, missing = [], []
        for i, block in enumerate(first_blocks.tolist()):
            hit = cache.get(block)
            if hit is not None and torch.equal(hit[0], qn[i]):
                rows.append(hit[1])
            else:
                rows.append(None)
                missing.append(i)
        if missing:
            fresh = layout.chan(qn[missing])
            if len(cache) > 4096:
                cache.clear()
            for j, i in enumerate(missing):
                cache[int(first_blocks[i])] = (qn[i].clone(), fresh[j])
                rows[i] = fresh[j]
        return torch.stack(rows)

    # --- write ----------------------------------------------------------------------------------
    def _write(self, layout: RecordLayout, pages, blocks, prior: int, q, k, v, slots, prefilling: bool) -> None:
        """Compress and store the step's tokens (see the module docstring for which `qn` each uses)."""
        bs = layout.block_size
        page_idx, offsets = slots // bs, slots % bs
        if layout.key_codec == "dense":
            layout.write(pages, page_idx, offsets, {**layout.encode_keys(k, None), **layout.encode_values(v)})
            return
        headers = layout.header(pages)
        if prefilling:
            w = min(self.config.window_size, q.shape[0])
            step_qn = window_query_norm(q[-w:].transpose(0, 1).unsqueeze(0), self.num_kv_heads)[0]
        else:
            step_qn = headers[blocks[(prior - 1) // bs]].clone()
        fields = layout.encode_values(v)
        # tokens in a page that already held tokens keep that page's qn; the rest open new pages
        old = torch.zeros(k.shape[0], dtype=torch.bool, device=k.device)
        if int(offsets[0]) > 0:
            old = page_idx == page_idx[0]
        groups = []
        if bool(old.any()):
            groups.append((old, headers[page_idx[0]].clone()))
        if not bool(old.all()):
            new = ~old
            fresh = torch.unique(page_idx[new])
            headers[fresh] = step_qn
            groups.append((new, step_qn))
        for mask, qn in groups:
            key_fields = layout.encode_keys(k[mask], qn)
            layout.write(pages, page_idx[mask], offsets[mask], {**key_fields, **{n: t[mask] for n, t in fields.items()}})

    # --- attention ------------------------------------------------------------------------------
    def _runs(self, layout: RecordLayout, pages, blocks, prior: int):
        """The `prior` stored tokens of the request as `(keys operand, values operand)` runs of pages
        with one header `qn` each (keys `PackedTensor [1, H, S_run, D]`, values dense or packed)."""
        bs = layout.block_size
        nblk = -(-prior // bs)
        used = blocks[:nblk]
        if layout.key_codec == "dense":
            f = layout.gather(pages, used, prior)
            return [(layout.keys_operand(f, None), layout.values_operand(f))]
        qn = layout.header(pages)[used]  # [P, H, D]
        same = (qn[1:] == qn[:-1]).flatten(1).all(1) if nblk > 1 else torch.ones(0, dtype=torch.bool, device=qn.device)
        cuts = [0] + [i + 1 for i in torch.nonzero(~same).flatten().tolist()] + [nblk]
        runs = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            length = min(prior, b * bs) - a * bs
            f = layout.gather(pages, used[a:b], length)
            runs.append((layout.keys_operand(f, layout.chan(qn[a])), layout.values_operand(f)))
        return runs

    def _attend(self, layout: RecordLayout, pages, blocks, prior: int, q, k, v, ring: Recent | None = None) -> torch.Tensor:
        """Attention of the step's queries `q [L, Hq, D]` over the `prior` stored tokens and the
        step's own `k, v [L, Hkv, D]` (causal) -> `[L, Hq, Dv]` float32. With nothing stored yet (a
        whole prompt) it is a dense causal prefill: on the CPU paths with AVX-512 vLLM's own CPU attention kernel
        (`_stock_prompt_attention`, what stock CPU_ATTN runs on prompts; output in the model dtype),
        otherwise float32 SDPA. The last `ring.filled` stored tokens are read from `ring` (exact)
        instead of their records."""
        length, hq, d = q.shape
        h, g = self.num_kv_heads, self.group
        # query rows of a GQA group: [1, Hkv, G * L, D], row index = g * L + i
        rows = q.reshape(length, h, g, d).permute(1, 2, 0, 3).reshape(1, h, g * length, d)
        path = self._attention_path(q.device)
        if not prior:  # a whole prompt (or its first chunk): causal attention over the step's own tokens
            if path == "cpu" and _stock_prompt_preferred() and _stock_prompt_serves(q):
                return _stock_prompt_attention(q, k, v, self.scale)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0).float(), k.transpose(0, 1).unsqueeze(0).float(),
                v.transpose(0, 1).unsqueeze(0).float(), is_causal=True, scale=self.scale, enable_gqa=g > 1)
            return o[0].transpose(0, 1)
        c = ring.filled if ring is not None else 0
        runs = self._runs(layout, pages, blocks, prior - c) if prior > c else []
        # exact tokens: the ring's c (seen by every row) then the step's own L (causal: row g * L + i sees 0..i)
        ek = torch.cat([ring.k[:c], k]) if c else k
        ev = torch.cat([ring.v[:c], v]) if c else v
        i = torch.arange(length, device=q.device).repeat(g)  # row -> its token index
        visible = torch.arange(c + length, device=q.device).unsqueeze(0) <= (i + c).unsqueeze(1)  # [G*L, c+L]
        own = _dense_partials(rows, ek.transpose(0, 1).unsqueeze(0), ev.transpose(0, 1).unsqueeze(0), self.scale, visible)
        if path == "torch":
            parts = [_reference_partials(rows, kk, vv, self.scale) for kk, vv in runs]
        else:
            if path == "triton":
                from ..kernels.triton_decode import decode_partials
            else:
                from ..kernels.cpu import decode_partials
            parts = [decode_partials(rows, kk, vv, self.scale) for kk, vv in runs]
        from ..kernels.reference import merge_partials

        merged = merge_partials(parts + [own])  # [1, Hkv, G * L, Dv]
        return merged[0].reshape(h, g, length, -1).permute(2, 0, 1, 3).reshape(length, hq, -1)


def _warm_kernels(config) -> None:
    """Build (or load) sparkkv's C++ kernels while the model is constructed: a first build takes about
    a minute, and inside a forward it would count against vLLM's execute_model timeout (300 s)."""
    if config.attention_backend not in ("auto", "cpu"):
        return
    from ..kernels import cpu, cpu_compress

    cpu.load()
    cpu_compress.available()


_STOCK_PROMPT_BLOCK = 128  # tokens per page of the scratch cache (vLLM's CPU kernel: a multiple of 32)


def _stock_prompt_preferred() -> bool:
    """Whether the prompt goes through vLLM's CPU kernel rather than float32 SDPA: only where PyTorch
    runs with AVX-512 (AMX CPUs included). Measured on a 2,048-token SmolLM2 prompt, one core, per
    layer: Zen 4 with AVX-512, vLLM's kernel 61 ms against SDPA 81 ms; an EPYC with AVX2 only, vLLM's
    kernel (isa "vec") 323 ms against SDPA 185-225 ms (docs/vllm.md)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _stock_prompt_serves(q: torch.Tensor) -> bool:
    """Whether vLLM's CPU attention kernel takes this prompt: a CPU tensor of a dtype and head size
    CPU_ATTN serves, and a vLLM build that has the op (the CPU build)."""
    if q.device.type != "cpu":
        return False
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
        torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018  (absent outside the CPU build)
    except (ImportError, AttributeError, RuntimeError):
        return False
    return q.dtype in CPUAttentionBackend.supported_dtypes and q.shape[-1] in CPUAttentionBackend.get_supported_head_sizes()


def _stock_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one whole prompt, `q [L, Hq, D]`, `k, v [L, Hkv, D]` -> `[L, Hq, D]` in
    q's dtype, by vLLM's own CPU kernel (`cpu_attention_with_kv_cache`, the ISA CPU_ATTN would pick):
    the prompt's keys and values are written into a scratch dense cache of
    `ceil(L / _STOCK_PROMPT_BLOCK)` pages by vLLM's `cpu_attn_reshape_and_cache` (so the kernel's
    layout stays vLLM's), then attended as one request. A prompt's own tokens are dense in hand, so
    SparK changes nothing here; where this is used instead of SDPA, and why: `_stock_prompt_preferred`."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    length, hq, d = q.shape
    h, bs = k.shape[1], _STOCK_PROMPT_BLOCK
    isa = _get_attn_isa(q.dtype, bs, d)
    nb = -(-length // bs)
    cache = torch.zeros(nb, h, 2 * bs, d, dtype=q.dtype)  # CPU_ATTN's page: keys then values, per head
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(length), isa)
    starts = torch.tensor([0, length], dtype=torch.int32)
    lengths = torch.tensor([length], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=lengths, dtype=q.dtype, query_start_loc=starts,
        causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=starts, seq_lens=lengths,
        scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=torch.arange(nb, dtype=torch.int32).view(1, nb), softcap=0.0, scheduler_metadata=meta, s_aux=None)
    return out


def _dense_partials(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible=None):
    """Float32 partials `(m, l, acc)` of query rows `[B, H, M, D]` over dense `k [B, H, S, D]`,
    `v [B, H, S, Dv]`, with one split (axis 2): m, l `[B, H, 1, M]`, acc `[B, H, 1, M, Dv]`.
    `visible` (bool, broadcast to `[B, H, M, S]`) masks keys out; a row that sees none gets m = -inf."""
    logits = torch.matmul(rows.float(), k.float().transpose(-1, -2)) * scale  # [B, H, M, S]
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    m = logits.amax(-1)
    p = torch.exp(logits - torch.where(torch.isinf(m), torch.zeros_like(m), m).unsqueeze(-1))
    return m.unsqueeze(2), p.sum(-1).unsqueeze(2), torch.matmul(p, v.float()).unsqueeze(2)


def _reference_partials(rows: torch.Tensor, keys, values, scale: float):
    """Float32 partials of every query row over one run (the reference path): keys and values
    rebuilt densely by the library (`PackedTensor.dense(torch.float32)`)."""
    kd = keys.dense(torch.float32) if hasattr(keys, "dense") else keys.float()
    vd = values.dense(torch.float32) if hasattr(values, "dense") else values.float()
    return _dense_partials(rows, kd, vd, scale)
