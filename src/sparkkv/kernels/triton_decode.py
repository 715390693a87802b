"""Split-KV decode attention over SparK-packed keys, in Triton: the kernel, its reference, its benchmark.

Status: verified against the PyTorch reference under `TRITON_INTERPRET=1` on CPU (tests/test_triton.py);
not yet validated or timed on a GPU, so the cache only uses it when `SPARKKV_TRITON=1` is set.

Design (kernels.md): grid over (batch * kv-head, split); each program walks a slice of tokens a block
at a time, rebuilds the block's dense key tile in registers (channel rank = cumsum of the keep bits,
kept values gathered by rank, pruned channels `+-scale_t * chan_c`), runs one `tl.dot` against all
query rows sharing the kv-head (GQA group x query length, padded to 16), keeps an online softmax,
and writes per-split partials `(max, sum, acc)`; a small PyTorch step merges the splits by
log-sum-exp. The rebuild is paid once per kv-head, not per query head.

    TRITON_INTERPRET=1 python -m sparkkv.kernels.triton_decode --check     # CPU, small shapes
    python -m sparkkv.kernels.triton_decode --bench                        # GPU timing vs dense
"""

from __future__ import annotations

import math

import torch

from ..packed import PackedTensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (pip install sparkkv[gpu])
    triton = None


if triton is not None:

    @triton.jit
    def _packed_decode_kernel(
        q_ptr, vals_ptr, keep_ptr, sign_ptr, scale_ptr, chan_ptr, v_ptr, bias_ptr,
        m_out_ptr, l_out_ptr, acc_out_ptr,
        S, M, tokens_per_split, sm_scale,
        T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SIGN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CHAN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows_m = tl.arange(0, BLOCK_M)
        chans = tl.arange(0, D)
        dv = tl.arange(0, DV)
        q = tl.load(q_ptr + bh * M * D + rows_m[:, None] * D + chans[None, :], mask=rows_m[:, None] < M, other=0.0)
        if HAS_CHAN:
            chan = tl.load(chan_ptr + bh * D + chans)
        else:
            chan = tl.full((D,), 1.0, tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DV), tl.float32)
        start = split * tokens_per_split
        byte_of = chans // 8
        bit_of = chans % 8
        for offset in range(0, tokens_per_split, BLOCK_N):  # tokens_per_split is a multiple of BLOCK_N
            toks = start + offset + tl.arange(0, BLOCK_N)
            valid = toks < S
            row = bh * S + toks
            keep_bytes = tl.load(keep_ptr + row[:, None] * (D // 8) + byte_of[None, :], mask=valid[:, None], other=0)
            kept = ((keep_bytes >> bit_of[None, :]) & 1) != 0
            rank = tl.cumsum(kept.to(tl.int32), axis=1) - 1
            k_tile = tl.load(vals_ptr + row[:, None] * T + rank, mask=kept & valid[:, None], other=0.0).to(tl.float32)
            if HAS_SIGN:
                sign_bytes = tl.load(sign_ptr + row[:, None] * (D // 8) + byte_of[None, :], mask=valid[:, None], other=0)
                sgn = tl.where(((sign_bytes >> bit_of[None, :]) & 1) != 0, 1.0, -1.0)
                fill = sgn * chan[None, :]
                if HAS_SCALE:
                    sc = tl.load(scale_ptr + row, mask=valid, other=0.0).to(tl.float32)
                    fill = fill * sc[:, None]
                k_tile = tl.where(kept, k_tile, fill)
            logits = tl.dot(q, tl.trans(k_tile)) * sm_scale  # [BLOCK_M, BLOCK_N]
            if HAS_BIAS:
                bias = tl.load(bias_ptr + row, mask=valid, other=0.0)
                logits = logits + bias[None, :]
            logits = tl.where(valid[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far
            p = tl.exp(logits - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v_tile = tl.load(v_ptr + row[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v_tile)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = (bh * n_splits + split) * BLOCK_M + rows_m
        tl.store(m_out_ptr + out, m_i)
        tl.store(l_out_ptr + out, l_i)
        tl.store(acc_out_ptr + out[:, None] * DV + dv[None, :], acc)


def supports(packed: PackedTensor, values: torch.Tensor) -> bool:
    """Fixed T, no explicit fill, dense values, power-of-two head dims (tl.arange needs them)."""
    d, dv = packed.shape[-1], values.shape[-1]
    pow2 = lambda x: x >= 16 and (x & (x - 1)) == 0  # noqa: E731
    return triton is not None and packed.fixed_t is not None and packed.fill is None and pow2(d) and pow2(dv)


def can_serve(keys, values) -> str | None:
    """None when `decode_partials` handles this (keys, values) pair, else the reason."""
    if not isinstance(keys, PackedTensor):
        return "the Triton kernel reads SparK-packed keys only"
    if not isinstance(values, torch.Tensor):
        return "the Triton kernel reads dense values only"
    if not supports(keys, values):
        return "the Triton kernel needs fixed T, no explicit fill, and power-of-two head dims >= 16"
    return None


def decode_partials(query_rows, keys, values, scaling, bias=None):
    """Online-softmax partials over one (packed keys, dense values) pair; `bias [B, 1 or H, S]`."""
    if bias is not None:
        bias = bias.expand(query_rows.shape[0], query_rows.shape[1], -1)
    return packed_decode_partials(query_rows, keys, values, scaling, bias)


def packed_decode_partials(
    query_rows: torch.Tensor,
    packed: PackedTensor,
    values: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    splits: int | None = None,
    block_n: int = 32,
):
    """Per-split online-softmax partials for query rows `[B, H, M, D]` over one packed chunk.

    Returns `(m, l, acc)`: float32 `[B, H, splits, M]`, `[B, H, splits, M]`, `[B, H, splits, M, Dv]`
    (max logit, sum of exp, unnormalised output). `bias [B, H, S]` is added to the logits.
    """
    b, h, m, d = query_rows.shape
    s, dv = packed.shape[2], values.shape[-1]
    block_m = max(16, triton.next_power_of_2(m))
    if splits is None:
        splits = max(1, min(64, math.ceil(s / 1024)))
    tokens_per_split = math.ceil(max(s, 1) / splits / block_n) * block_n
    splits = max(1, math.ceil(max(s, 1) / tokens_per_split))
    device = query_rows.device
    m_out = torch.empty(b * h * splits * block_m, dtype=torch.float32, device=device)
    l_out = torch.empty_like(m_out)
    acc_out = torch.empty(b * h * splits * block_m * dv, dtype=torch.float32, device=device)
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    _packed_decode_kernel[(b * h, splits)](
        query_rows.float().contiguous(), packed.vals, packed.keep,
        packed.sign if packed.sign is not None else packed.keep,
        packed.scale if packed.scale is not None else dummy,
        packed.chan if packed.chan is not None else dummy,
        values.contiguous(), bias.float().contiguous() if bias is not None else dummy,
        m_out, l_out, acc_out,
        s, m, tokens_per_split, scaling,
        T=packed.fixed_t, D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SIGN=packed.sign is not None, HAS_SCALE=packed.scale is not None,
        HAS_CHAN=packed.chan is not None, HAS_BIAS=bias is not None,
    )
    shape = (b, h, splits, block_m)
    return (
        m_out.view(shape)[..., :m],
        l_out.view(shape)[..., :m],
        acc_out.view(*shape, dv)[..., :m, :],
    )


def merge_partials(parts) -> torch.Tensor:
    """Log-sum-exp merge of `(m, l, acc)` partials along their split axis (dim 2) -> `[B, H, M, Dv]`."""
    m = torch.cat([p[0] for p in parts], dim=2)
    l = torch.cat([p[1] for p in parts], dim=2)
    acc = torch.cat([p[2] for p in parts], dim=2)
    m_max = m.amax(dim=2, keepdim=True)
    m_max = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_max)  # splits that saw nothing have m = -inf -> weight 0
    return (acc * w.unsqueeze(-1)).sum(2) / (l * w).sum(2).clamp_min(1e-30).unsqueeze(-1)


def dense_partials(query_rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, bias=None):
    """The same partials for a dense chunk (the recent tail), in PyTorch: one split."""
    logits = torch.matmul(query_rows.float(), keys.float().transpose(-1, -2)) * scaling
    if bias is not None:
        logits = logits + bias.float().unsqueeze(2)
    m = logits.amax(-1)
    p = torch.exp(logits - m.unsqueeze(-1))
    return m.unsqueeze(2), p.sum(-1).unsqueeze(2), torch.matmul(p, values.float()).unsqueeze(2)


def reference_decode(query_rows, packed: PackedTensor, values, scaling, bias=None) -> torch.Tensor:
    """Plain PyTorch: rebuild dense keys (recovered entries unrounded, as in the kernel), softmax
    attention in float32 -> `[B, H, M, Dv]`."""
    logits = torch.matmul(query_rows.float(), packed.dense(torch.float32).transpose(-1, -2)) * scaling
    if bias is not None:
        logits = logits + bias.float().unsqueeze(2)
    return torch.matmul(logits.softmax(-1), values.float())


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    from ..config import SparKConfig
    from ..method import compress_keys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="correctness on small shapes (works under TRITON_INTERPRET=1)")
    parser.add_argument("--bench", action="store_true", help="GPU timing vs dense attention")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    args = parser.parse_args(argv)
    if triton is None:
        raise SystemExit("triton is not installed (pip install 'sparkkv[gpu]')")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if args.check or not args.bench:
        for ratio in (0.5, 0.8):
            keys = torch.randn(2, 2, 77, 64, device=device)
            packed = compress_keys(keys, torch.randn(2, 8, 8, 64, device=device), SparKConfig(key_prune_ratio=ratio))
            values = torch.randn(2, 2, 77, 64, device=device)
            q = torch.randn(2, 2, 4, 64, device=device)
            got = merge_partials([packed_decode_partials(q, packed, values, 0.125, splits=3)])
            ref = reference_decode(q, packed, values, 0.125)
            print(f"ratio {ratio}: rel err {((got - ref).norm() / ref.norm()).item():.2e}")
    if args.bench:
        from triton.testing import do_bench

        h, g, d = 8, 4, 128
        for s in args.contexts:
            keys = torch.randn(1, h, s, d, device=device, dtype=torch.bfloat16)
            values = torch.randn(1, h, s, d, device=device, dtype=torch.bfloat16)
            packed = compress_keys(keys, torch.randn(1, h * g, 32, d, device=device), SparKConfig(key_prune_ratio=0.8))
            q = torch.randn(1, h * g, 1, d, device=device, dtype=torch.bfloat16)
            qr = q.view(1, h, g, d)
            dense_ms = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True), return_mode="median")
            packed_ms = do_bench(lambda: merge_partials([packed_decode_partials(qr, packed, values, d**-0.5)]), return_mode="median")
            print(f"S={s}: dense sdpa {dense_ms:.3f} ms | packed k0.8 {packed_ms:.3f} ms ({packed_ms / dense_ms:.2f}x)")


if __name__ == "__main__":
    main()
