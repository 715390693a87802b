"""RULER needles through vLLM, on exactly the samples `sparkkv eval` builds, for comparison with the
transformers path.

    python -m sparkkv.vllm.needles --n 20 --length 2048 --configs stock k0.8 [--task niah_single_2]
        [--engine '{"enable_prefix_caching": true}'] [--sparkkv '{"vllm_chunked_prefill": true}']
        [--haystack FILE] [--json FILE] [--compare TRANSFORMERS_OUT_DIR]

Samples come from `sparkkv.eval.tasks.generate` with the model's tokenizer (same task, length, n and
seed as `sparkkv eval`), are sent as token ids, decoded greedily for the task's budget and scored with
`sparkkv.eval.metrics.score`, as the transformers runner scores them. Each configuration runs in its
own engine process. `--compare DIR` reads the per-sample scores of a `sparkkv eval --out DIR` run and
prints, per configuration, both accuracies and the samples on which they differ. Configuration names
as in `sparkkv.vllm.bench` ("stock", "fp8", "dense", "k0.8", "k0.8v0.5").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench import ESSAYS, config_fields, engine_kwargs


def _samples(tokenizer, task: str, length: int, n: int, seed: int, haystack: Path):
    from ..eval import tasks

    return tasks.generate(task, tokenizer, length, n, seed, tasks.TaskInputs(haystack=haystack))


def run_one(name: str, args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..eval import metrics
    from .models import vllm_model_dir

    fields = config_fields(name)
    engine = json.loads(args.engine)
    kw = {**engine_kwargs(name), **engine}
    if fields is not None:
        kw["additional_config"] = {"sparkkv": {**fields, **json.loads(args.sparkkv)}}
    base = {"enforce_eager": True, "max_model_len": args.length + 128, "seed": 0,
            "max_num_batched_tokens": max(args.length + 128, 4096)}
    llm = LLM(model=str(vllm_model_dir()), **{**base, **kw})
    samples = _samples(llm.get_tokenizer(), args.task, args.length, args.n, args.seed, Path(args.haystack))
    start = time.perf_counter()
    rows = []
    for s in samples:  # one at a time: batch composition changes greedy output (stock's too)
        out = llm.generate([TokensPrompt(prompt_token_ids=s.input_ids)],
                           SamplingParams(max_tokens=s.max_new_tokens, temperature=0), use_tqdm=False)[0].outputs[0]
        score = metrics.score(s.metric, out.text, s.references, **s.extra.get("metric_args", {}))
        rows.append({"index": s.index, "score": score, "prediction": out.text, "references": s.references})
    return {"config": name, "fields": fields, "engine": engine, "sparkkv_options": json.loads(args.sparkkv),
            "task": args.task, "length": args.length, "n": args.n, "seed": args.seed,
            "accuracy": sum(r["score"] for r in rows) / len(rows), "samples": rows, "seconds": time.perf_counter() - start}


def transformers_scores(folder: Path, task: str, length: int) -> dict[str, dict[int, float]]:
    """Per-sample scores of a `sparkkv eval --out folder` run: config label -> sample index -> score."""
    out: dict[str, dict[int, float]] = {}
    path = folder / "samples.jsonl"
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("task") != task or row.get("length") != length:
            continue
        out.setdefault(row["method"], {})[int(row["index"])] = float(row["score"])
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparkkv.vllm.needles", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="niah_single_2")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default=str(ESSAYS))
    p.add_argument("--configs", nargs="+", default=["stock", "k0.8"])
    p.add_argument("--engine", default="{}", help="extra LLM(...) arguments as JSON")
    p.add_argument("--sparkkv", default="{}", help="extra additional_config['sparkkv'] fields as JSON (SparK rows)")
    p.add_argument("--json", default=None)
    p.add_argument("--compare", default=None, help="a `sparkkv eval --out` folder to compare with, sample by sample")
    p.add_argument("--label", nargs="+", default=None,
                   help="with --compare: the eval method label of each configuration, e.g. dense 'spark k0.8'")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.one:
        Path(args.out).write_text(json.dumps(run_one(args.one, args)))
        return []
    rows = []
    for name in args.configs:
        config_fields(name)
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "sparkkv.vllm.needles", "--one", name, "--out", str(out), "--task", args.task,
                   "--length", str(args.length), "--n", str(args.n), "--seed", str(args.seed), "--haystack", args.haystack,
                   "--engine", args.engine, "--sparkkv", args.sparkkv]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode or not out.is_file():
                tail = "\n".join(line for line in (done.stdout + done.stderr).strip().splitlines() if "Error" in line or "error" in line)[-3000:]
                raise RuntimeError(f"configuration {name} failed (exit {done.returncode}):\n{tail}")
            rows.append(json.loads(out.read_text()))
        if args.json:  # after every row: an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
        r = rows[-1]
        print(f"{args.task} {args.length} n={args.n} {name} engine={args.engine} sparkkv={args.sparkkv}: "
              f"accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
    if args.compare:
        ref = transformers_scores(Path(args.compare), args.task, args.length)
        labels = args.label or [("dense" if r["fields"] is None or r["config"] == "dense" else f"spark k{r['fields']['key_prune_ratio']:g}") for r in rows]
        for r, label in zip(rows, labels):
            mine = {s["index"]: s["score"] for s in r["samples"]}
            theirs = ref.get(label, {})
            common = sorted(set(mine) & set(theirs))
            if not common:
                print(f"{r['config']}: no samples of '{label}' in {args.compare}")
                continue
            a = sum(mine[i] for i in common) / len(common)
            b = sum(theirs[i] for i in common) / len(common)
            differ = [i for i in common if mine[i] != theirs[i]]
            print(f"{r['config']} vs transformers '{label}' on {len(common)} samples: vLLM {a:.3f}, transformers {b:.3f}, "
                  f"difference {a - b:+.3f}; samples that differ: {differ}")
    return rows


if __name__ == "__main__":
    main()
