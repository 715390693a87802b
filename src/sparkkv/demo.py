"""The offline demo (the README's main job).

Part 1 (accuracy): the small retrieval model shipped in `sparkkv.testbed`, on a few synthetic
long-context tasks, with dense, SnapKV, SnapKV+ThinK and SnapKV+SparK caches at 0.5 / 0.8 key
pruning and one token budget (25% of the context): accuracy and KV bytes per token side by side.

Part 2 (bytes and error at real geometry): a random-weight Llama-geometry model (head_dim 128,
GQA group 4, bf16) built from a config, a long random prompt prefilled with a dense cache and
with SparK caches at a few ratios, then teacher-forced decode steps: the bytes each cache really
holds and the error of attention outputs and logits against dense.
"""

from __future__ import annotations

import logging
import time

import torch

from .config import SparKConfig
from .evaluation import compare_decode

log = logging.getLogger(__name__)


def random_model(seed: int = 0, dtype=torch.bfloat16, layers: int = 2):
    """A small Llama-geometry model: 8 query heads, 2 kv heads (GQA 4), head_dim 128."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=1024,
        max_position_embeddings=8192,
        initializer_range=0.02,  # the transformers default
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sparkkv", dtype=dtype).eval()


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> a markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


BYTES_COLUMNS = [
    ("method", "method", ""),
    ("prefill_bytes", "cache bytes", ",d"),
    ("bytes_per_token", "bytes/token", ".0f"),
    ("vs_dense", "vs dense", ".3f"),
    ("attn_rel_err", "attn out rel err", ".4f"),
    ("logits_rel_err", "logits rel err", ".4f"),
    ("top1_agreement", "top-1 agree", ".2f"),
]


METHODS_COLUMNS = BYTES_COLUMNS[:5] + [
    ("attn_err_vs_base", "attn err vs snapkv", ".4f"),
    ("logits_rel_err", "logits rel err", ".4f"),
    ("logits_err_vs_base", "logits err vs snapkv", ".4f"),
]


def bytes_and_error_table(prompt_tokens: int = 2048, decode_steps: int = 16, seed: int = 0) -> str:
    model = random_model(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    continuation = torch.randint(0, model.config.vocab_size, (1, decode_steps), generator=gen)
    configs = [
        None,
        SparKConfig(key_prune_ratio=0.5),
        SparKConfig(key_prune_ratio=0.8),
        SparKConfig(key_prune_ratio=0.8, recovery="zero"),
        SparKConfig(key_prune_ratio=0.8, value_prune_ratio=0.5),
    ]
    rows = compare_decode(model, prompt, continuation, configs)
    for r in rows:
        r["vs_dense"] = r["prefill_bytes"] / rows[0]["prefill_bytes"]
    title = (
        f"Random Llama-geometry model (2 layers, 8 q-heads / 2 kv-heads, head_dim 128, bf16), "
        f"{prompt_tokens}-token prompt, {decode_steps} teacher-forced decode steps; bytes after prefill."
    )
    return title + "\n\n" + format_table(rows, BYTES_COLUMNS)


def methods_configs(budget: int | float, ratios=(0.5, 0.8)) -> list[SparKConfig | None]:
    """dense, eviction only, eviction + ThinK, eviction + SparK (mean and zero recovery), one budget."""
    configs: list[SparKConfig | None] = [None, SparKConfig(method="snapkv", token_budget=budget)]
    for ratio in ratios:
        configs.append(SparKConfig(method="snapkv+think", token_budget=budget, key_prune_ratio=ratio))
    for ratio in ratios:
        for recovery in ("mean", "zero"):
            configs.append(SparKConfig(method="snapkv+spark", token_budget=budget, key_prune_ratio=ratio, recovery=recovery))
    return configs


def methods_table(prompt_tokens: int = 2048, budget: int = 512, decode_steps: int = 16, seed: int = 0, dtype=torch.bfloat16) -> str:
    """Attention-output and logit error vs the full dense cache, at one token budget, with bytes."""
    model = random_model(seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    continuation = torch.randint(0, model.config.vocab_size, (1, decode_steps), generator=gen)
    configs = methods_configs(budget)
    rows = compare_decode(model, prompt, continuation, configs, base=configs[1])
    for r in rows:
        r["vs_dense"] = r["prefill_bytes"] / rows[0]["prefill_bytes"]
    title = (
        f"Random Llama-geometry model (2 layers, 8 q-heads / 2 kv-heads, head_dim 128, {str(dtype).split('.')[-1]}), "
        f"{prompt_tokens}-token prompt, token budget {budget}, {decode_steps} teacher-forced decode steps; "
        "errors against the full dense cache, and against SnapKV alone (same tokens, all channels)."
    )
    return title + "\n\n" + format_table(rows, METHODS_COLUMNS)


DEMO_TASKS = ("passkey", "multikey", "kv_retrieval")


def testbed_table(n: int, context_tokens: int, seed: int) -> str | None:
    """Part 1, or None when the shipped testbed model is missing."""
    from .accuracy import accuracy_rows, default_configs, pivot
    from .testbed import MODEL_DIR, load_model

    if not (MODEL_DIR / "model.safetensors").is_file():
        log.warning("no trained testbed model in %s: skipping the accuracy part", MODEL_DIR)
        return None
    model, tokenizer = load_model(attn_implementation="sparkkv")
    rows = accuracy_rows(model, tokenizer, default_configs(0.25), DEMO_TASKS, n, context_tokens, seed)
    title = (
        f"Testbed model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama trained on the "
        f"synthetic tasks), {n} fresh samples per task, {context_tokens}-token contexts, token budget 25% of the "
        "prompt; accuracy (exact match), then KV bytes per token held by the cache."
    )
    return title + "\n\n" + pivot(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="sparkkv demo", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="samples per task in part 1 (default 10)")
    parser.add_argument("--context-tokens", type=int, default=1024, help="context length in part 1 (default 1024)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length of part 2 (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompt_tokens < 64:
        parser.error(f"--prompt-tokens must be >= 64, got {args.prompt_tokens}")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    start = time.perf_counter()
    table = testbed_table(args.n, args.context_tokens, args.seed)
    if table is not None:
        print(table + "\n")
    print(bytes_and_error_table(args.prompt_tokens, seed=args.seed))
    print(f"\n(done in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
