"""Stock vLLM vs SparK in vLLM, side by side, at the same KV-cache memory.

    python -m sparkkv.vllm.bench [--requests 32] [--prompt-tokens 2048] [--new-tokens 128]
                                 [--dense-requests 8.5 | --kv-bytes N] [--configs stock k0.8 k0.8v0.8]
                                 [--json FILE]
    sparkkv bench vllm                       # the same with the defaults

Every configuration runs in its own process (a fresh engine), with the same model (SmolLM2-135M-Instruct,
`sparkkv.vllm.models.vllm_model_dir`), the same KV-cache bytes (`kv_cache_memory_bytes`; by default room
for `--dense-requests` stock requests of prompt + new tokens) and the same offline workload: `--requests`
prompts of exactly `--prompt-tokens` tokens (windows of the essays haystack, or random ids without it),
greedy, `--new-tokens` tokens each (EOS ignored), all submitted at once. Reported per configuration: the
KV-cache size in tokens vLLM reports (blocks x block size), the ratio to stock, how many requests fit at
once (blocks / blocks per request), the workload's wall time and output tokens per second.
Engines run eagerly (`enforce_eager=True`) in every row. Configuration names: "stock" (CPU_ATTN),
"fp8" (CPU_ATTN with vLLM's fp8 KV cache, `kv_cache_dtype="fp8"`; needs AVX-512 or AMX),
"k<ratio>" (SparK keys), "k<ratio>v<ratio>" (SparK keys and pruned values), either with a "vq<bits>"
suffix (values quantized to 8, 4 or 2 bits: "k0.8vq4"), "dense" (the plugin with dense records: its
own overhead).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
ESSAYS = Path(os.environ.get("SPARKKV_DATA", "/work/shared/data")) / "text" / "paul_graham_essays.json"


STOCK = {"stock": {}, "fp8": {"kv_cache_dtype": "fp8"}}
"""Stock vLLM rows (CPU_ATTN) and their LLM(...) arguments: "fp8" is vLLM's own quantized KV cache
(needs AVX-512 or AMX on CPU), the baseline a vLLM user would pick instead of a plugin."""


def config_fields(name: str) -> dict | None:
    """"stock" / "fp8" -> None; "dense" -> {"method": "dense"}; "k0.8" / "k0.8v0.5" -> SparKConfig fields."""
    if name in STOCK:
        return None
    if name == "dense":
        return {"method": "dense"}
    m = re.fullmatch(r"k([0-9.]+)(?:v([0-9.]+))?(?:vq([0-9]+))?", name)
    if not m:
        raise ValueError(f"unknown configuration {name!r}: expected stock, fp8, dense, k<ratio>, k<ratio>v<ratio>, "
                         "optionally followed by vq<value bits> (k0.8vq4)")
    fields = {"key_prune_ratio": float(m.group(1))}
    if m.group(2):
        fields["value_prune_ratio"] = float(m.group(2))
    if m.group(3):
        fields["value_bits"] = int(m.group(3))
    return fields


def engine_kwargs(name: str) -> dict:
    """The LLM(...) arguments of configuration `name` (besides model, lengths and KV memory)."""
    fields = config_fields(name)
    if fields is None:
        return dict(STOCK[name])
    return {"attention_backend": "CUSTOM", "additional_config": {"sparkkv": fields}}


def _prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    if ESSAYS.is_file():
        data = json.loads(ESSAYS.read_text())
        text = data["text"] if isinstance(data, dict) else "\n\n".join(d["text"] if isinstance(d, dict) else str(d) for d in data)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
        return [ids[s : s + length] for s in starts]
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


def run_one(name: str, args) -> dict:
    """One configuration in this process (called in a child process by `main`)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .models import vllm_model_dir

    fields = config_fields(name)
    kw = engine_kwargs(name)
    max_len = args.prompt_tokens + args.new_tokens + 16
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kw["kv_cache_memory_bytes"] = args.kv_bytes
    start = time.perf_counter()
    llm = LLM(model=str(vllm_model_dir()), enforce_eager=True, max_model_len=max_len, seed=0,
              max_num_seqs=args.requests, max_num_batched_tokens=max(max_len, 4096), **kw)
    load_s = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    blocks, block_size = int(cache.num_gpu_blocks), int(cache.block_size)
    prompts = _prompts(llm.get_tokenizer(), args.requests, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    # warm-up (first-call costs, the sparkkv kernels' build when not cached): one short request
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:64])], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    per_request = math.ceil((args.prompt_tokens + args.new_tokens) / block_size)
    return {"config": name, "fields": fields, "kv_tokens": blocks * block_size, "blocks": blocks, "block_size": block_size,
            "fit_at_once": blocks // per_request, "wall_s": wall, "output_tokens": new, "output_tok_s": new / wall,
            "load_s": load_s, "requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "kv_bytes": None if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else args.kv_bytes,
            "kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}


def dense_kv_bytes(requests: float, tokens: int, block_size: int = 128) -> int:
    """KV bytes for `requests` stock requests of `tokens` tokens, SmolLM2-135M geometry, bf16:
    30 layers x 3 KV heads x (64 + 64) x 2 bytes per token, whole blocks of `block_size`."""
    per_block = 30 * 3 * 128 * 2 * block_size
    return int(requests * math.ceil(tokens / block_size) * per_block)


def format_rows(rows: list[dict]) -> str:
    base = next((r for r in rows if r["config"] == "stock"), rows[0])
    head = f"{'config':<10} {'KV tokens':>10} {'vs stock':>8} {'fit at once':>11} {'wall s':>8} {'vs stock':>8} {'out tok/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<10} {r['kv_tokens']:>10,} {r['kv_tokens'] / base['kv_tokens']:>7.3f}x {r['fit_at_once']:>11} "
                     f"{r['wall_s']:>8.1f} {r['wall_s'] / base['wall_s']:>7.3f}x {r['output_tok_s']:>9.1f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparkkv.vllm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dense-requests", type=float, default=8.5,
                   help="KV memory = room for this many stock requests (default 8.5: at most 8 at once)")
    p.add_argument("--kv-bytes", type=int, default=None, help="KV memory in bytes (overrides --dense-requests)")
    p.add_argument("--configs", nargs="+", default=["stock", "k0.8"])
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    for name in args.configs:
        config_fields(name)  # bad names fail before any engine starts
    if args.kv_bytes is None:
        args.kv_bytes = dense_kv_bytes(args.dense_requests, args.prompt_tokens + args.new_tokens)
    if args.one:
        Path(args.out).write_text(json.dumps(run_one(args.one, args)))
        return []
    rows = []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "sparkkv.vllm.bench", "--one", name, "--out", str(out),
                   "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens), "--kv-bytes", str(args.kv_bytes)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode or not out.is_file():
                tail = "\n".join(line for line in (done.stdout + done.stderr).strip().splitlines() if "Error" in line or "error" in line)[-3000:]
                raise RuntimeError(f"configuration {name} failed (exit {done.returncode}):\n{tail}")
            rows.append(json.loads(out.read_text()))
        if args.json:  # after every row: an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"{name}: {rows[-1]['kv_tokens']:,} KV tokens, {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    memory = f"VLLM_CPU_KVCACHE_SPACE={space} GiB" if space else f"kv_cache_memory_bytes={args.kv_bytes:,}"
    print(f"SmolLM2-135M-Instruct, bf16, {memory}; {args.requests} requests x {args.prompt_tokens} prompt tokens, "
          f"{args.new_tokens} new tokens each (greedy, EOS ignored), enforce_eager\n")
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
