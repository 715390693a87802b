"""Accuracy of compression configurations on the offline testbed tasks, with the bytes they hold.

    sparkkv eval --n 200 --context-tokens 1024 --budget 0.25 --json results.json

For every task and configuration: greedy generation on `n` fresh samples (seeds the testbed model
never saw in training), each with a fresh cache; accuracy is the task's scorer averaged over the
samples; "KV bytes/token" is what the cache holds after generation divided by the tokens it has
seen (all layers, K and V). Configurations are named as in `SparKConfig.name`, and the JSON result
file stores each configuration's full `SparKConfig` fields next to its numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .config import SparKConfig
from .evaluation import cache_nbytes, make_cache


def default_configs(budget: int | float = 0.25, ratios=(0.5, 0.8)) -> list[SparKConfig | None]:
    """dense, SnapKV, SnapKV+ThinK and SnapKV+SparK at each ratio, one token budget."""
    configs: list[SparKConfig | None] = [None, SparKConfig(method="snapkv", token_budget=budget)]
    configs += [SparKConfig(method="snapkv+think", token_budget=budget, key_prune_ratio=r) for r in ratios]
    configs += [SparKConfig(method="snapkv+spark", token_budget=budget, key_prune_ratio=r) for r in ratios]
    return configs


def accuracy_rows(model, tokenizer, configs, tasks, n: int, context_tokens: int, seed: int, progress=None) -> list[dict]:
    """One row per (task, configuration): accuracy and KV bytes per token."""
    from .testbed import evaluate

    rows = []
    for task in tasks:
        for config in configs:
            caches = []

            def factory(config=config):
                caches.append(make_cache(model, config))
                return caches[-1]

            start = time.perf_counter()
            result = evaluate(model, tokenizer, task, n, context_tokens, seed, cache_factory=factory)
            per_token = [cache_nbytes(c) / c.get_seq_length() for c in caches if c.get_seq_length()]
            rows.append(
                {
                    "task": task,
                    "method": "dense" if config is None else config.name,
                    "config": None if config is None else config.to_dict(),
                    "accuracy": result["accuracy"],
                    "n": result["n"],
                    "kv_bytes_per_token": sum(per_token) / max(1, len(per_token)),
                    "seconds": time.perf_counter() - start,
                }
            )
            if progress is not None:
                progress.update(1)
    dense = {r["task"]: r["kv_bytes_per_token"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["vs_dense"] = r["kv_bytes_per_token"] / dense[r["task"]] if r["task"] in dense else float("nan")
    return rows


def pivot(rows: list[dict]) -> str:
    """Accuracy as a task x method table (methods as columns), plus a bytes row."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    acc = {(r["task"], r["method"]): r["accuracy"] for r in rows}
    head = "| task | " + " | ".join(methods) + " |"
    rule = "|---" * (len(methods) + 1) + "|"
    body = [f"| {t} | " + " | ".join(f"{acc[(t, m)]:.3f}" for m in methods) + " |" for t in tasks]
    mean_bytes = {m: sum(r["kv_bytes_per_token"] for r in rows if r["method"] == m) / len(tasks) for m in methods}
    body.append("| KV bytes/token | " + " | ".join(f"{mean_bytes[m]:.0f}" for m in methods) + " |")
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> None:
    from .testbed import TASKS, load_model

    parser = argparse.ArgumentParser(prog="sparkkv eval", description="accuracy on the offline testbed tasks")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"tasks (default: all of {list(TASKS)})")
    parser.add_argument("--n", type=int, default=50, help="samples per task (default 50)")
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.25, help="token budget: a fraction in (0, 1) or a token count")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8], help="key prune ratios")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (the testbed keeps these apart from training seeds)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    budget: int | float = args.budget if args.budget < 1 else int(args.budget)
    try:
        configs = default_configs(budget, tuple(args.ratios))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(attn_implementation="sparkkv")
    try:
        from tqdm import tqdm

        progress = tqdm(total=len(args.tasks) * len(configs), desc="task x method")
    except ImportError:
        progress = None
    rows = accuracy_rows(model, tokenizer, configs, args.tasks, args.n, args.context_tokens, args.seed, progress)
    if progress is not None:
        progress.close()
    print(f"\n{args.n} samples per task, {args.context_tokens}-token contexts, token budget {budget}\n")
    print(pivot(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        print(f"\nrows written to {args.json}")


if __name__ == "__main__":
    main()
