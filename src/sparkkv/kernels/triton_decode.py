"""Split-KV decode attention over SparK-packed and quantized keys AND values, in Triton: the kernel and its benchmark.

Status: verified against the float64 reference under `TRITON_INTERPRET=1` on CPU tensors
(tests/test_triton.py). It has not yet run on a GPU: `--bench` checks correctness on the GPU first,
then times it; run it in a session that has one.

Design (the CPU kernel's, kernels/cpu_decode.cpp, on a GPU): grid over (batch * kv-head, split);
each program walks its slice of tokens BLOCK_N at a time and, per block, rebuilds the dense key
tile in registers (channel rank = cumsum of the keep bits, kept values gathered by rank, pruned
channels `(+-1) * scale_t * chan_c` from whichever fields are stored), runs one `tl.dot` against
all query rows of the kv-head (GQA group x query length, padded to 16), keeps an online softmax,
rebuilds the value tile the same way and accumulates `tl.dot(P, V)`; it writes per-split
partials `(m, l, acc)` that `reference.merge_partials` merges with other chunks by log-sum-exp.
Fixed T reads row r's values at `r * T`; variable T (top-p / grouped selections) reads a row
offset table computed here from the keep masks. Dense keys or values use the same kernel.
Ternary mask codes (`pack_trits`) are read digit by digit (`byte // 3^(c % 5) % 3`); quantized
values (`quant.QuantizedTensor`: dense operands, or a packed operand's kept values) are dequantized
in the tile (`code * scale + zero`, or mid-rise `(code - mid) * scale`), never rebuilt in memory.
On a GPU the tiles meet in `tl.dot` in the 16-bit storage dtype (float32 accumulation); under the
interpreter in float32 (its bf16 dot is broken).

    TRITON_INTERPRET=1 python -m sparkkv.kernels.triton_decode --check     # CPU, small shapes
    python -m sparkkv.kernels.triton_decode --bench                        # GPU: check, then time
                                                    # (packed, trits + 4-bit, plain 4-/2-bit rows)
"""

from __future__ import annotations

import math
import os

import torch

from . import operands
from .reference import merge_partials, reference_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (pip install sparkkv[gpu])
    triton = None

__all__ = ["can_serve", "decode_partials", "merge_partials"]

if triton is not None:

    @triton.jit
    def _stored(vals_ptr, start, codes_ptr, qs_ptr, qz_ptr, q_group, q_offset, q_groups, bh, toks, row, j, sj, mask,
                N: tl.constexpr, SW: tl.constexpr, QBITS: tl.constexpr, QTOKEN: tl.constexpr, QZERO: tl.constexpr,
                QMID: tl.constexpr):
        """float32 `[BLOCK_N, *]`: the `j`-th stored value of every row (0 where `mask` is False):
        raw values from `vals_ptr + start`, or `QBITS`-bit codes of rows of `N` codes dequantized
        with their group's scale (and zero): groups of `q_group` elements of a row, or (`QTOKEN`) of
        `q_group` tokens of statistic column `sj` of `SW` (the element, or for per-channel scales its
        channel), token t in group `(q_offset + t) // q_group`."""
        if QBITS == 0:
            tile = tl.load(vals_ptr + start[:, None] + j, mask=mask, other=0.0).to(tl.float32)
        else:
            bit = j * QBITS
            byte = tl.load(codes_ptr + row[:, None].to(tl.int64) * ((N * QBITS + 7) // 8) + bit // 8, mask=mask, other=0)
            code = ((byte.to(tl.int32) >> (bit % 8)) & ((1 << QBITS) - 1)).to(tl.float32)
            if QTOKEN:
                group = (q_offset + toks) // q_group
                stat = (bh * q_groups + group)[:, None].to(tl.int64) * SW + sj
            else:
                stat = row[:, None].to(tl.int64) * q_groups + j // q_group
            scale = tl.load(qs_ptr + stat, mask=mask, other=0.0).to(tl.float32)
            if QZERO:
                tile = code * scale + tl.load(qz_ptr + stat, mask=mask, other=0.0).to(tl.float32)
            else:
                tile = (code - QMID) * scale
            tile = tl.where(mask, tile, 0.0)
        return tile

    @triton.jit
    def _tile(vals_ptr, keep_ptr, sign_ptr, scale_ptr, chan_ptr, off_ptr, codes_ptr, qs_ptr, qz_ptr,
              q_group, q_offset, q_groups, bh, toks, row, valid, chans,
              D: tl.constexpr, T: tl.constexpr, PACKED: tl.constexpr, TRITS: tl.constexpr,
              SIGN: tl.constexpr, SCALE: tl.constexpr, CHAN: tl.constexpr,
              QBITS: tl.constexpr, QTOKEN: tl.constexpr, QZERO: tl.constexpr, QMID: tl.constexpr, QCHAN: tl.constexpr):
        """float32 `[BLOCK_N, D_PAD]` tile of rows `row` (dense, or packed rebuilt; raw or
        dequantized values); padded channels (>= D) and invalid rows are 0."""
        cmask = chans < D
        if PACKED:
            inside = valid[:, None] & cmask[None, :]
            if TRITS:  # digit c % 5 of byte c // 5: 0 kept, 1 pruned negative, 2 pruned positive
                code = tl.load(keep_ptr + row[:, None] * ((D + 4) // 5) + (chans // 5)[None, :], mask=inside, other=0)
                r5 = chans % 5
                pow3 = tl.where(r5 == 0, 1, tl.where(r5 == 1, 3, tl.where(r5 == 2, 9, tl.where(r5 == 3, 27, 81))))
                digit = (code.to(tl.int32) // pow3[None, :]) % 3
                kept = (digit == 0) & inside
                positive = digit == 2
            else:
                keep_bytes = tl.load(keep_ptr + row[:, None] * (D // 8) + (chans // 8)[None, :], mask=inside, other=0)
                kept = ((keep_bytes >> (chans % 8)[None, :]) & 1) != 0
            rank = tl.cumsum(kept.to(tl.int32), axis=1) - 1
            if T >= 0:
                start = row.to(tl.int64) * T
            else:
                start = tl.load(off_ptr + row, mask=valid, other=0)
            if QCHAN:  # a kept value's statistics are its channel's
                tile = _stored(vals_ptr, start, codes_ptr, qs_ptr, qz_ptr, q_group, q_offset, q_groups, bh, toks, row,
                               rank, chans[None, :], kept, T, D, QBITS, QTOKEN, QZERO, QMID)
            else:
                tile = _stored(vals_ptr, start, codes_ptr, qs_ptr, qz_ptr, q_group, q_offset, q_groups, bh, toks, row,
                               rank, rank, kept, T, T, QBITS, QTOKEN, QZERO, QMID)
            if SIGN or SCALE or CHAN:
                fill = tl.full(tile.shape, 1.0, tl.float32)
                if SIGN:
                    if TRITS:
                        fill = tl.where(positive, 1.0, -1.0)
                    else:
                        sign_bytes = tl.load(sign_ptr + row[:, None] * (D // 8) + (chans // 8)[None, :], mask=inside, other=0)
                        fill = tl.where(((sign_bytes >> (chans % 8)[None, :]) & 1) != 0, 1.0, -1.0)
                if SCALE:
                    fill = fill * tl.load(scale_ptr + row, mask=valid, other=0.0).to(tl.float32)[:, None]
                if CHAN:
                    fill = fill * tl.load(chan_ptr + bh * D + chans, mask=cmask, other=0.0)[None, :]
                tile = tl.where(kept, tile, tl.where(cmask[None, :], fill, 0.0))
        else:
            tile = _stored(vals_ptr, row.to(tl.int64) * D, codes_ptr, qs_ptr, qz_ptr, q_group, q_offset, q_groups, bh,
                           toks, row, chans[None, :], chans[None, :], valid[:, None] & cmask[None, :], D, D, QBITS, QTOKEN,
                           QZERO, QMID)
        return tile

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_vals, k_keep, k_sign, k_scale, k_chan, k_off, k_codes, k_qs, k_qz, k_qgroup, k_qoffset, k_qgroups,
        v_vals, v_keep, v_sign, v_scale, v_chan, v_off, v_codes, v_qs, v_qz, v_qgroup, v_qoffset, v_qgroups,
        bias_ptr, m_out_ptr, l_out_ptr, acc_out_ptr,
        S, M, H, tokens_per_split, sm_scale, bias_b_stride, bias_h_stride,
        D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        K_PACKED: tl.constexpr, K_T: tl.constexpr, K_TRITS: tl.constexpr, K_SIGN: tl.constexpr, K_SCALE: tl.constexpr,
        K_CHAN: tl.constexpr, K_QBITS: tl.constexpr, K_QTOKEN: tl.constexpr, K_QZERO: tl.constexpr, K_QMID: tl.constexpr,
        K_QCHAN: tl.constexpr,
        V_PACKED: tl.constexpr, V_T: tl.constexpr, V_TRITS: tl.constexpr, V_SIGN: tl.constexpr, V_SCALE: tl.constexpr,
        V_CHAN: tl.constexpr, V_QBITS: tl.constexpr, V_QTOKEN: tl.constexpr, V_QZERO: tl.constexpr, V_QMID: tl.constexpr,
        V_QCHAN: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows_m = tl.arange(0, BLOCK_M)
        chans = tl.arange(0, D_PAD)
        dvs = tl.arange(0, DV_PAD)
        q = tl.load(q_ptr + bh * M * D + rows_m[:, None] * D + chans[None, :],
                    mask=(rows_m[:, None] < M) & (chans[None, :] < D), other=0.0)
        q = q.to(DOT_DTYPE)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DV_PAD), tl.float32)
        start = split * tokens_per_split
        bias_row = bias_ptr + (bh // H) * bias_b_stride + (bh % H) * bias_h_stride
        stop = tl.minimum(start + tokens_per_split, S)
        for offset in range(0, tokens_per_split, BLOCK_N):
            toks = start + offset + tl.arange(0, BLOCK_N)
            valid = toks < stop
            row = bh * S + toks
            k_tile = _tile(k_vals, k_keep, k_sign, k_scale, k_chan, k_off, k_codes, k_qs, k_qz, k_qgroup, k_qoffset,
                           k_qgroups, bh, toks, row, valid, chans, D, K_T, K_PACKED, K_TRITS, K_SIGN, K_SCALE, K_CHAN,
                           K_QBITS, K_QTOKEN, K_QZERO, K_QMID, K_QCHAN)
            logits = tl.dot(q, tl.trans(k_tile.to(DOT_DTYPE))) * sm_scale  # [BLOCK_M, BLOCK_N]
            if HAS_BIAS:
                logits = logits + tl.load(bias_row + toks, mask=valid, other=0.0)[None, :]
            logits = tl.where(valid[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every token so far masked
            p = tl.exp(logits - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v_tile = _tile(v_vals, v_keep, v_sign, v_scale, v_chan, v_off, v_codes, v_qs, v_qz, v_qgroup, v_qoffset,
                           v_qgroups, bh, toks, row, valid, dvs, DV, V_T, V_PACKED, V_TRITS, V_SIGN, V_SCALE, V_CHAN,
                           V_QBITS, V_QTOKEN, V_QZERO, V_QMID, V_QCHAN)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v_tile.to(DOT_DTYPE))
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = (bh * n_splits + split) * BLOCK_M + rows_m
        tl.store(m_out_ptr + out, m_i)
        tl.store(l_out_ptr + out, l_i)
        tl.store(acc_out_ptr + out[:, None] * DV_PAD + dvs[None, :], acc)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_ok(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def can_serve(keys, values) -> str | None:
    """None when `decode_partials` handles this (keys, values) operand pair, else the reason (one sentence)."""
    if triton is None:
        return "triton is not installed (pip install 'sparkkv[gpu]')"
    where = "Triton runs on CUDA tensors, or on CPU ones only under TRITON_INTERPRET=1"
    return operands.pair_problem(keys, values, _device_ok, where)


def _operand(x, dummy_f, dummy_i):
    """Kernel arguments and constexprs of one operand (`operands.fields`): fields, row offsets,
    codes and their statistics, group sizes; (PACKED, T, TRITS, SIGN, SCALE, CHAN, QBITS, QTOKEN,
    QZERO, QMID, QCHAN)."""
    f = operands.fields(x)
    t = f.fixed_t if f.fixed_t is not None else -1
    off = dummy_i
    if f.packed and f.fixed_t is None:  # variable T: row r's first value
        counts = f.source.kept_per_row().flatten()
        off = counts.cumsum(0) - counts
    mask = f.keep if f.keep is not None else f.trits if f.trits is not None else dummy_i
    pick = lambda v, dummy: dummy if v is None else v.contiguous()  # noqa: E731
    args = [pick(f.vals, dummy_f), mask, f.sign if f.sign is not None else mask, pick(f.scale, dummy_f),
            pick(f.chan, dummy_f), off, pick(f.codes, dummy_i), pick(f.qscale, dummy_f), pick(f.qzero, dummy_f),
            max(f.group, 1), f.offset, f.qscale.shape[2] if f.token_axis else 0]
    if f.quantized and not f.token_axis:
        args[-1] = f.qscale.shape[3]  # groups per row
    meta = (f.packed, t, f.trits is not None, f.signs, f.scale is not None, f.chan is not None, f.bits, f.token_axis,
            f.qzero is not None, ((1 << f.bits) - 1) / 2, f.channel_axis)
    return args, meta


def _meta(prefix: str, meta) -> dict:
    names = ("PACKED", "T", "TRITS", "SIGN", "SCALE", "CHAN", "QBITS", "QTOKEN", "QZERO", "QMID", "QCHAN")
    return {f"{prefix}_{name}": value for name, value in zip(names, meta)}


def decode_partials(query_rows, keys, values, scaling: float, bias=None, splits: int | None = None, *, block_n: int = 32):
    """Online-softmax partials of `query_rows [B, H, M, D]` over one (keys, values) chunk.

    keys / values: `PackedTensor` (fixed or variable T, no explicit fill; keep + sign bits or a
    ternary code; kept values raw or a `QuantizedTensor`), `QuantizedTensor` or dense `[B, H, S, D | Dv]`.
    bias: None or additive float32 `[B, H, S]` / `[B, 1, S]` (-inf = masked). splits: pieces of the
    sequence per (batch, kv-head) (default: about one per 1024 tokens, at most 64).
    Returns float32 `m [B, H, P, M]`, `l [B, H, P, M]`, `acc [B, H, P, M, Dv]` (see reference.py).
    """
    problem = can_serve(keys, values)
    if problem:
        raise ValueError(problem)
    b, h, m, d = query_rows.shape
    s, dv = keys.shape[2], values.shape[3]
    if tuple(keys.shape[:2]) != (b, h) or keys.shape[3] != d:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query rows {tuple(query_rows.shape)} in batch, heads or head_dim")
    if splits is None:
        splits = max(1, min(64, math.ceil(s / 1024)))
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    splits = min(splits, max(s, 1))
    tokens_per_split = math.ceil(max(s, 1) / splits)
    device = query_rows.device
    block_m = max(16, triton.next_power_of_2(m))
    d_pad, dv_pad = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    m_out = torch.empty(b * h * splits * block_m, dtype=torch.float32, device=device)
    l_out = torch.empty_like(m_out)
    acc_out = torch.empty(b * h * splits * block_m * dv_pad, dtype=torch.float32, device=device)
    dummy_f = torch.empty(1, dtype=torch.float32, device=device)
    dummy_i = torch.empty(1, dtype=torch.int64, device=device)
    bias_strides = (0, 0)
    if bias is not None:
        if bias.dim() != 3 or bias.shape[0] != b or bias.shape[1] not in (1, h) or bias.shape[2] != s:
            raise ValueError(f"bias must be [{b}, 1 or {h}, {s}], got shape {tuple(bias.shape)}")
        bias = bias.float().contiguous()
        bias_strides = (bias.stride(0), bias.stride(1) if bias.shape[1] == h else 0)
    k_fields, k_meta = _operand(keys, dummy_f, dummy_i)
    v_fields, v_meta = _operand(values, dummy_f, dummy_i)
    storage = keys.dtype if keys.dtype == values.dtype else torch.float32
    dot_dtype = tl.float32 if (device.type != "cuda" or storage == torch.float32) else (
        tl.bfloat16 if storage == torch.bfloat16 else tl.float16)
    _decode_kernel[(b * h, splits)](
        query_rows.float().contiguous(), *k_fields, *v_fields,
        bias if bias is not None else dummy_f, m_out, l_out, acc_out,
        s, m, h, tokens_per_split, scaling, *bias_strides,
        D=d, DV=dv, D_PAD=d_pad, DV_PAD=dv_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        **_meta("K", k_meta), **_meta("V", v_meta),
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype,
    )
    shape = (b, h, splits, block_m)
    return (
        m_out.view(shape)[..., :m],
        l_out.view(shape)[..., :m],
        acc_out.view(*shape, dv_pad)[..., :m, :dv],
    )


# -------------------------------------------------------------------------------------------------
# check and benchmark
# -------------------------------------------------------------------------------------------------
def _quantized_pairs(keys, values, window):
    """(name, keys, values) of the quantized configurations: SparK k0.8 + trits + 4-bit kept keys +
    4-bit values, and plain 4-bit / 2-bit (keys per channel over 64 tokens, values per 64 channels)."""
    from ..config import SparKConfig
    from ..method import compress_keys
    from ..quant import QuantizedTensor

    k80 = compress_keys(keys, window, SparKConfig(key_prune_ratio=0.8)).with_trits()
    out = [("K0.8 trits kq4 + vq4", k80.with_quantized_vals(4, 64, symmetric=True, axis="channel"),
            QuantizedTensor.quantize(values, 4, 64, "row"))]
    for bits in (4, 2):
        out.append((f"plain kq{bits} + vq{bits}", QuantizedTensor.quantize(keys, bits, 64, "token"),
                    QuantizedTensor.quantize(values, bits, 64, "row")))
    return out


def _check(device) -> None:
    from ..config import SparKConfig
    from ..method import compress_keys, compress_values

    rel = lambda got, ref: ((got.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    for ratio in (0.5, 0.8):
        keys = torch.randn(2, 2, 77, 64, device=device)
        values = torch.randn(2, 2, 77, 64, device=device)
        packed = compress_keys(keys, torch.randn(2, 8, 8, 64, device=device), SparKConfig(key_prune_ratio=ratio))
        q = torch.randn(2, 2, 4, 64, device=device)
        for v in (values, compress_values(values, ratio)):
            got = merge_partials([decode_partials(q, packed, v, 0.125, splits=3)])
            ref = reference_attention(q, packed, v, 0.125)
            print(f"keys {ratio}, values {'dense' if v is values else ratio}: rel err {rel(got, ref):.2e}")
    for name, k, v in _quantized_pairs(keys, values, torch.randn(2, 8, 8, 64, device=device)):
        got = merge_partials([decode_partials(q, k, v, 0.125, splits=3)])
        print(f"{name}: rel err {rel(got, reference_attention(q, k, v, 0.125)):.2e}")


def _bench(contexts, batches, ratios) -> None:
    """CUDA-event timing (triton.testing.do_bench, median) against SDPA (and FlashAttention when
    installed) on dense K+V of the same shape; Llama-3-8B geometry, bf16, one query token."""
    from triton.testing import do_bench

    from ..config import SparKConfig
    from ..method import compress_keys, compress_values
    from ..packed import storage_nbytes

    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    h, g, d = 8, 4, 128
    scaling = d**-0.5
    nbytes = lambda *xs: sum(storage_nbytes(*([x] if isinstance(x, torch.Tensor) else x.tensors())) for x in xs)  # noqa: E731
    print(f"{'batch':>5} {'context':>8} {'path':<32} {'ms':>8} {'GB':>7} {'GB/s':>7} {'speedup vs sdpa':>16} {'rel err':>8}")
    for b in batches:
        for s in contexts:
            keys = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
            values = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(b, h * g, 1, d, device="cuda", dtype=torch.bfloat16)
            qg = q.view(b, h, g, d)
            rows = [("sdpa (dense K+V)", lambda: torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, scale=scaling, enable_gqa=True), (keys, values), None)]
            if flash_attn_with_kvcache is not None:
                qf, kf, vf = q.transpose(1, 2), keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
                rows.append(("flash-attn (dense K+V)", lambda: flash_attn_with_kvcache(qf, kf, vf, softmax_scale=scaling),
                             (keys, values), None))
            rows.append(("triton, dense K+V", lambda: merge_partials([decode_partials(qg, keys, values, scaling)]),
                         (keys, values), (keys, values)))
            window = torch.randn(b, h * g, 32, d, device="cuda")
            for ratio in ratios:
                packed = compress_keys(keys, window, SparKConfig(key_prune_ratio=ratio))
                pv = compress_values(values, ratio)
                for name, v in ((f"triton, K{ratio:g} + dense V", values), (f"triton, K{ratio:g} + V{ratio:g}", pv)):
                    rows.append((name, (lambda k=packed, v=v: merge_partials([decode_partials(qg, k, v, scaling)])),
                                 (packed, v), (packed, v)))
            for name, k, v in _quantized_pairs(keys, values, window):
                rows.append((f"triton, {name}", (lambda k=k, v=v: merge_partials([decode_partials(qg, k, v, scaling)])),
                             (k, v), (k, v)))
            base = None
            for name, fn, operands, pair in rows:
                err = ""
                if pair is not None:  # correctness on the GPU before timing (4 heads' worth suffices)
                    ref = reference_attention(qg.float(), pair[0], pair[1], scaling, dtype=torch.float32)
                    err = f"{((fn().float() - ref).norm() / ref.norm()).item():.1e}"
                ms = do_bench(fn, return_mode="median")
                base = base or ms
                gb = nbytes(*operands) / 1e9
                print(f"{b:>5} {s:>8} {name:<32} {ms:>8.3f} {gb:>7.2f} {gb / ms * 1e3:>7.0f} {base / ms:>15.2f}x {err:>8}")
            del keys, values, rows
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="correctness on small shapes (works under TRITON_INTERPRET=1)")
    parser.add_argument("--bench", action="store_true", help="GPU: correctness, then timing vs dense attention")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    args = parser.parse_args(argv)
    if triton is None:
        raise SystemExit("triton is not installed (pip install 'sparkkv[gpu]')")
    device = "cpu" if _interpreting() else "cuda"
    if args.check or not args.bench:
        _check(device)
    if args.bench:
        if device != "cuda" or not torch.cuda.is_available():
            raise SystemExit("--bench needs a CUDA GPU (and TRITON_INTERPRET unset)")
        _bench(args.contexts, args.batches, args.ratios)


if __name__ == "__main__":
    main()
