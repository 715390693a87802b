"""`sparkkv` command line: eval, report, generate, demo, bench.

Every argument is checked before any model loads or any file is written; a bad one ends the
command with one line on stderr naming it, and exit code 2. Failures while working (a model that
cannot be fetched, ...) print one line and exit 1. `--debug` shows the traceback instead. An `--out`
folder that another run is writing (its lock is held) ends `eval` / `demo` at once with one line
naming that run's pid, and exit code 3 (BUSY): nothing is computed or written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .config import ATTENTION_BACKENDS

PROG = "sparkkv"
DEFAULT_MODEL = "smollm2-135m"
BUSY = 3  # exit code: the --out folder is locked by another live run


class UsageError(Exception):
    """A bad argument: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (not the usage block), exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(f"{self.prog}: error: {message}")


# --- argument types (each error names the value and the allowed range) ---------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _typed(fn, what: str):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = what
    return parse


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def _writable_file(text: str) -> Path:
    """A file path whose folder exists and is writable (checked before any work starts)."""
    import os

    path = Path(text).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file path")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {folder}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {folder}")
    return path


def _model_name(text: str) -> str:
    from .models import describe

    try:
        describe(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ratio(text: str) -> float:
    from .eval.grid import parse_ratio

    return _typed(parse_ratio, "ratio")(text)


def _budget(text: str):
    from .eval.grid import parse_budget

    return _typed(parse_budget, "budget")(text)


def _method(text: str) -> str:
    from .eval.grid import parse_method_name

    return _typed(parse_method_name, "method")(text)


def _bits(text: str) -> int:
    from .eval.grid import parse_bits

    return _typed(parse_bits, "bits")(text)


def _value_ratio(text: str) -> float:
    from .eval.grid import parse_value_ratio

    return _typed(parse_value_ratio, "value ratio")(text)


def _group_size(text: str) -> int:
    from .eval.grid import parse_group_size

    return _typed(parse_group_size, "group size")(text)


def _mask_format(text: str) -> str:
    from .eval.grid import parse_mask_format

    return _typed(parse_mask_format, "mask format")(text)


DTYPES = ("float32", "bfloat16", "float16")
LENGTH = _int_at_least(128)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--debug", action="store_true", help="show the full traceback when something fails")


def _model_args(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    p.add_argument(
        "--model",
        type=_model_name,
        default=default,
        help=f"registry name (smollm2-135m, testbed), local Hugging Face folder, .gguf file or Hub id (default {default})",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")


# --- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .eval.tasks import TASK_NAMES

    parser = _Parser(
        prog=PROG,
        description="SparK KV-cache compression for Hugging Face transformers: demo, evaluation and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="the real model: needle accuracy, perplexity change and KV bytes per method (a preset of eval)",
        description="Fetches SmolLM2-135M on first run (falls back to the testbed model if it cannot) and prints, "
        "for dense, SnapKV, SnapKV+SparK, SnapKV+ThinK, SparK and ThinK at key ratio 0.8, needle accuracy, "
        "perplexity change and the KV bytes each cache holds.",
    )
    p.add_argument("--n", type=_int_at_least(1), default=None, help="needle samples (default: the preset's)")
    p.add_argument("--lengths", "--context-tokens", dest="lengths", type=LENGTH, nargs="+", default=None,
                   help="context lengths in tokens (default: the preset's)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="sample seed (default 0)")
    p.add_argument("--out", type=Path, default=None, help="keep the records here (default: a temporary folder)")
    p.add_argument("--model", type=_model_name, default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    _common(p)

    p = sub.add_parser(
        "eval",
        help="a grid of methods x ratios x budgets x lengths x tasks: records, CSV, plots; resumable",
        description="Runs every task at every length with every configuration of the grid; one JSON record per "
        "finished cell is appended to OUT/records.jsonl, so a rerun skips finished cells and an interrupted run "
        "resumes (even one killed mid-write). Writes OUT/results.csv and PNG plots. One run at a time per OUT: "
        "another run writing it makes this one stop at once, naming its pid (exit code 3). Methods: dense, spark, "
        "think, none (no channel policy: with --key-bits/--value-bits below 16, plain quantization), snapkv, pyramidkv, "
        "streamingllm and <eviction>+<spark|think> such as snapkv+spark; and the quantized baselines quanto-int4, "
        "quanto-int2 (transformers' QuantizedCache, backend optimum-quanto) and hqq-int4, hqq-int2 (backend HQQ), "
        "at QuantizedCache's defaults (q_group_size 64, residual_length 128; pip install -e \".[quant]\" for quanto, \".[hqq]\" for HQQ). "
        "Every sparkkv method except dense is crossed with --key-bits x --value-bits x --value-ratios (spark only) x "
        "--quant-group-size (quantized configurations only) x --mask-format (trits: spark only); combinations "
        "SparKConfig refuses are left out.",
        epilog="tasks: " + ", ".join(TASK_NAMES),
    )
    _model_args(p)
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="task names (listed below)")
    p.add_argument("--methods", type=_method, nargs="+", default=["dense", "snapkv", "snapkv+spark", "snapkv+think"],
                   help="methods (default: dense snapkv snapkv+spark snapkv+think); the quantized baselines are "
                   "quanto-int4 quanto-int2 hqq-int4 hqq-int2")
    p.add_argument("--ratios", "--ratio", dest="ratios", type=_ratio, nargs="+", default=[0.5, 0.8],
                   help="key prune ratios in [0, 1) for spark/think methods (default 0.5 0.8)")
    p.add_argument("--budgets", "--budget", dest="budgets", type=_budget, nargs="+", default=[0.25],
                   help="token budgets of eviction methods: integer tokens or a fraction in (0, 1) (default 0.25)")
    p.add_argument("--key-bits", type=_bits, nargs="+", default=[16], metavar="BITS",
                   help="stored bits of the key values (SparK's kept values, ThinK's columns, dense keys): 16 (not "
                   "quantized), 8, 4, 2 (default 16)")
    p.add_argument("--value-bits", type=_bits, nargs="+", default=[16], metavar="BITS",
                   help="stored bits of the values (dense or pruned): 16, 8, 4, 2 (default 16)")
    p.add_argument("--value-ratios", type=_value_ratio, nargs="+", default=[0.0], metavar="RATIO",
                   help="value prune ratios in [0, 1), spark methods only (default 0: values not pruned)")
    p.add_argument("--quant-group-size", type=_group_size, nargs="+", default=[64], metavar="SIZE",
                   help="elements per quantization scale/zero group, multiples of 8 in [8, 1024] (default 64; "
                   "quantized sparkkv configurations only, the baselines keep QuantizedCache's 64)")
    p.add_argument("--mask-format", type=_mask_format, nargs="+", default=["bits"], metavar="FORMAT",
                   help="SparK's keep/sign mask: bits (2 bits per channel) or trits (1.6 bits, lossless); spark only "
                   "(default bits)")
    p.add_argument("--lengths", "--context-tokens", dest="lengths", type=LENGTH, nargs="+", default=[2048],
                   help="context lengths in tokens, >= 128 (default 2048)")
    p.add_argument("--n", type=_int_at_least(1), default=50, help="samples per cell (default 50)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="sample seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="results folder (created; reused to resume)")
    p.add_argument("--json", type=Path, default=None, help="also write this run's records to one JSON file")
    p.add_argument("--haystack", type=_existing_file, default=None,
                   help="essay haystack for RULER tasks: JSON {\"text\": ...} or a text file")
    p.add_argument("--squad", type=_existing_file, default=None, help="SQuAD v2 dev JSON (RULER qa_1)")
    p.add_argument("--hotpotqa", type=_existing_file, default=None, help="HotpotQA dev JSON (RULER qa_2)")
    p.add_argument("--longbench", type=_existing_dir, default=None,
                   help="folder of LongBench <task>.jsonl files (default: the Hub through `datasets`)")
    p.add_argument("--text", type=_existing_file, default=None, help="text file for the perplexity task")
    p.add_argument("--ppl-tokens", type=_int_at_least(1), default=64,
                   help="perplexity: tokens scored after each prefilled window (default 64)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="prompts prefilled together (default 4)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None,
                   help="cap every task's generation budget (default: each task's own)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _common(p)

    p = sub.add_parser("report", help="the table and plots of an eval folder again, from its records")
    p.add_argument("dir", type=_existing_dir, help="a folder written by `sparkkv eval --out`")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _common(p)

    p = sub.add_parser(
        "generate",
        help="generate with one cache configuration; prints the answer and the KV bytes held vs dense",
    )
    _model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=_existing_file, help="read the prompt from this file")
    p.add_argument("--method", type=_method, default="spark",
                   help="cache method (default spark; 'dense' for none; quanto-int4 / hqq-int2 ... for transformers' QuantizedCache)")
    p.add_argument("--key-prune-ratio", type=_ratio, default=0.8, help="key prune ratio in [0, 1) (default 0.8)")
    p.add_argument("--budget", type=_budget, default=None, help="token budget of an eviction method")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64, help="tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _common(p)

    p = sub.add_parser("bench", help="side-by-side benchmarks: bytes, methods (error vs dense), decode timing, hybrid models")
    p.add_argument("what", choices=["bytes", "methods", "decode", "hybrid", "compress", "vllm"],
                   help="which benchmark (vllm: stock vLLM vs the sparkkv plugin, `python -m sparkkv.vllm.bench --help`)")
    p.add_argument("--contexts", type=_int_at_least(64), nargs="+", default=[4096, 32768],
                   help="bytes/decode/hybrid/compress: context lengths in tokens, >= 64")
    p.add_argument("--kv-heads", type=_int_at_least(1), default=8)
    p.add_argument("--groups", type=_int_at_least(1), default=4, help="GQA group size (query heads per kv-head)")
    p.add_argument("--head-dim", type=_int_at_least(8), default=128, help="a multiple of 8 (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="decode: timed steps (median reported)")
    p.add_argument("--warmup", type=_int_at_least(0), default=3)
    p.add_argument("--backend", choices=ATTENTION_BACKENDS, default="auto", help="decode: attention_backend of the SparK rows")
    p.add_argument("--prefill-tokens", type=_int_at_least(0), default=4096,
                   help="decode: prompt of the prefill-overhead row (SmolLM2-135M geometry; 0 skips it)")
    p.add_argument("--json", type=_writable_file, default=None, help="decode: also write the rows to this JSON file")
    p.add_argument("--budget", type=_int_at_least(64), default=512, help="methods: token budget (default 512)")
    p.add_argument("--prompt-tokens", type=_int_at_least(64), default=2048, help="methods: prompt length (default 2048)")
    _common(p)
    return parser


# --- checks that need more than one argument --------------------------------------------------------


def _check_eval(args) -> None:
    from .eval import grid, records, tasks

    testbed = args.model == "testbed"
    for name in args.tasks:
        try:
            tasks.check_task(name, testbed)
        except ValueError as exc:
            raise UsageError(f"{PROG} eval: error: argument --tasks: {exc}") from None
        needed = tasks.needed_input(name)
        if needed and getattr(args, needed) is None:
            flag = "--" + needed.replace("_", "-")
            raise UsageError(f"{PROG} eval: error: task {name!r} needs {flag} PATH")
    quant = grid.Quantization(
        key_bits=tuple(dict.fromkeys(args.key_bits)), value_bits=tuple(dict.fromkeys(args.value_bits)),
        value_ratios=tuple(dict.fromkeys(args.value_ratios)), group_sizes=tuple(dict.fromkeys(args.quant_group_size)),
        mask_formats=tuple(dict.fromkeys(args.mask_format)),
    )
    try:
        args.configs = grid.build_grid(args.methods, args.ratios, args.budgets, quant)
        grid.check_fits(args.configs, args.lengths)
    except grid.NoConfiguration as exc:
        raise UsageError(f"{PROG} eval: error: argument --methods: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{PROG} eval: error: arguments --budgets/--lengths: {exc}") from None
    check_baselines(args.configs, "eval")
    _check_out(args.out, "eval")
    if args.json is not None:
        parent = args.json.expanduser().resolve().parent
        if args.json.is_dir() or not parent.is_dir():
            raise UsageError(f"{PROG} eval: error: argument --json: cannot write {args.json} ({parent} is not a folder)")


def check_baselines(configs, command: str) -> None:
    """A quantized baseline whose package is missing: one line naming the method and the install."""
    from .eval import baselines

    for config in configs:
        if baselines.is_baseline(config):
            reason = baselines.unavailable(config.backend)
            if reason is not None:
                raise UsageError(f"{PROG} {command}: error: argument --methods: {config.name}: {reason}")


def _check_out(out: Path | None, command: str) -> None:
    from .eval.records import check_out_dir

    if out is None:
        return
    try:
        check_out_dir(out)
    except ValueError as exc:
        raise UsageError(f"{PROG} {command}: error: argument {exc}") from None


def _check_generate(args) -> None:
    from .config import SparKConfig, parse_method
    from .eval import baselines

    baseline = baselines.parse(args.method)
    if baseline is not None:
        if args.budget is not None:
            raise UsageError(f"{PROG} generate: error: argument --budget: method {args.method!r} evicts no tokens")
        check_baselines([baseline], "generate")
    eviction, channel = (None, "baseline") if baseline is not None else parse_method(args.method)
    if eviction is None and args.budget is not None:
        raise UsageError(f"{PROG} generate: error: argument --budget: method {args.method!r} evicts no tokens")
    if eviction is not None and args.budget is None:
        raise UsageError(f"{PROG} generate: error: method {args.method!r} needs --budget")
    args.config = baseline
    if channel not in ("dense", "baseline"):
        try:
            args.config = SparKConfig(method=args.method, key_prune_ratio=args.key_prune_ratio, token_budget=args.budget)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{PROG} generate: error: {exc}") from None
    if args.prompt_file is not None:
        try:
            args.prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{PROG} generate: error: argument --prompt-file: cannot read {args.prompt_file} ({exc})") from None
    if not args.prompt.strip():
        raise UsageError(f"{PROG} generate: error: the prompt is empty")


def _check_demo(args) -> None:
    from .eval.demo import demo_configs
    from .eval.grid import check_fits

    if args.lengths:
        try:  # the testbed fallback keeps a quarter of the prompt: the stricter of the demo's budgets
            check_fits(demo_configs(budget=0.25), args.lengths)
        except ValueError as exc:
            raise UsageError(f"{PROG} demo: error: argument --lengths: {exc}") from None
    _check_out(args.out, "demo")


def _check_bench(args) -> None:
    if args.head_dim % 8:
        raise UsageError(f"{PROG} bench: error: argument --head-dim: must be a multiple of 8 (packed bit masks), got {args.head_dim}")
    if args.what == "methods" and args.budget > args.prompt_tokens:
        raise UsageError(f"{PROG} bench: error: argument --budget: must be at most --prompt-tokens={args.prompt_tokens}, got {args.budget}")


# --- commands ---------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)


def cmd_eval(args) -> None:
    from . import models
    from .eval.experiment import GridSpec, pending_units, run_grid
    from .eval.records import Store
    from .eval.tasks import TaskInputs

    inputs = TaskInputs(
        haystack=args.haystack, squad=args.squad, hotpotqa=args.hotpotqa, longbench=args.longbench,
        text=args.text, ppl_tokens=args.ppl_tokens,
    )
    spec = GridSpec(
        model=args.model, tasks=args.tasks, lengths=args.lengths, n=args.n, configs=args.configs, seed=args.seed,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, inputs=inputs,
    )

    def load():
        return models.load(args.model, dtype=_torch_dtype(args.dtype))

    with Store(args.out) as store:  # the folder's lock, held to the end (FolderBusy: exit code 3)
        # the model loads only if a sample must be computed (or, lazily, for a cell whose sample
        # lines an older version wrote); finished cells without a record are written from the file
        todo = pending_units(spec, store)
        model, tokenizer = load() if todo else (None, None)
        progress = _progress(todo, "eval (cell x sample)") if todo else None
        try:
            records = run_grid(spec, model, tokenizer, store, progress, load=load)
        finally:
            if progress is not None:
                progress.close()
        _print_report(records, args.out, plots=not args.no_plots)
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(records, indent=1, default=str))
        print(f"records written to {args.json}")


def _print_report(records: list[dict], folder: Path, plots: bool) -> None:
    from .eval import report

    print(report.describe(records) + "\n")
    print(report.pivot(records))
    print("\nPareto front of score vs KV bytes (bytes as a fraction of dense), per task and length:\n")
    print(report.front_table(records))
    print("\nWhat to pick under a byte budget (the best score measured within it):\n")
    print(report.pick_table(records))
    versus = report.baseline_table(records)
    if versus:
        print("\nThe QuantizedCache baselines against the best sparkkv configuration at no more bytes:\n")
        print(versus)
    print(f"\nrecords: {folder / 'records.jsonl'}; table: {folder / 'results.csv'}")
    if plots:
        for path in report.plot(records, folder):
            print(f"plot: {path}")


def cmd_report(args) -> None:
    from .eval.records import FolderBusy, FolderLock, read_records, write_csv

    try:
        read_records(args.dir)  # a folder with no records file: refused before the lock file is made
        lock, busy = FolderLock(args.dir), None
    except ValueError as exc:
        raise UsageError(f"{PROG} report: error: {exc}") from None
    except FolderBusy as exc:  # a running eval owns the table and the plots: print them, write nothing
        lock, busy = None, exc
    except OSError:  # a read-only folder: nothing can be writing it
        lock, busy = None, None
    try:
        records = read_records(args.dir)
        if not records:
            raise UsageError(f"{PROG} report: error: {args.dir} holds no finished cell yet")
        if busy is not None:
            who = f"pid {busy.pid}" if busy.pid is not None else "pid unknown"
            print(f"{PROG} report: note: {busy.folder} is being written by a sparkkv run ({who}): the table shows the "
                  "cells finished so far; results.csv and the plots are left to that run", file=sys.stderr)
            _print_report(records, args.dir, plots=False)
            return
        write_csv(records, args.dir / "results.csv")
        _print_report(records, args.dir, plots=not args.no_plots)
    finally:
        if lock is not None:
            lock.release()


def cmd_generate(args) -> None:
    import torch

    from . import CACHE_KWARG, SparKCache, SparKConfig, models
    from .eval.grid import check_fits
    from .eval.runner import dense_bytes_per_token

    model, tokenizer = models.load(args.model, dtype=_torch_dtype(args.dtype))
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{PROG} generate: error: argument --chat: model {args.model!r} has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    from .eval import baselines

    try:  # the prompt's length is known only now, in the model's tokenizer
        check_fits([args.config], [ids.shape[1]])
    except ValueError as exc:
        raise UsageError(f"{PROG} generate: error: argument --budget: {exc} (the prompt is {ids.shape[1]} tokens)") from None
    if baselines.is_baseline(args.config):
        from transformers.cache_utils import QuantizedCache

        c = args.config
        cache = QuantizedCache(backend=c.backend, config=model.config, nbits=c.nbits, q_group_size=c.q_group_size,
                               residual_length=c.residual_length)
    else:
        cache = SparKCache(args.config or SparKConfig(method="dense"))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             **{CACHE_KWARG: cache})
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    tokens = cache.get_seq_length()
    nbytes = baselines.cache_nbytes(cache) if baselines.is_baseline(args.config) else cache.nbytes
    dense = dense_bytes_per_token(model) * tokens
    name = "dense" if args.config is None else args.config.name
    print(f"KV cache ({name}): {nbytes:,} bytes held for {tokens} tokens; dense: {dense:,} bytes "
          f"({nbytes / dense:.3f} of dense)")


def cmd_demo(args) -> None:
    from .eval.demo import run_demo

    run_demo(model=args.model, n=args.n, lengths=args.lengths, seed=args.seed, out=args.out, progress=_progress)


def cmd_bench(args) -> None:
    import json

    import torch

    from .eval import bench

    if args.what == "vllm":  # its own options: python -m sparkkv.vllm.bench --help
        from .vllm.bench import main as vllm_bench

        vllm_bench([] if args.json is None else ["--json", str(args.json)])
        return
    dtype = _torch_dtype(args.dtype)
    if args.what == "methods":
        print(bench.methods_table(args.prompt_tokens, args.budget, dtype=dtype))
        return
    if args.what == "hybrid":
        config = bench.gemma3_geometry()
        for context in args.contexts:
            print(f"\nbytes held, Gemma-3 geometry (18 layers: 15 with a 512-token sliding window, 3 full; 1 kv-head, "
                  f"head_dim 256, {args.dtype}), {context}-token prompt + 3 decode steps\n")
            print(bench.format_table(bench.hybrid_table(config, context, dtype=dtype), bench.HYBRID_COLUMNS))
        return
    from .eval import bench_decode

    geometry = f"{args.kv_heads} kv-heads, GQA group {args.groups}, head_dim {args.head_dim}, {args.dtype}, {torch.get_num_threads()} threads"
    if args.what == "compress":
        from .kernels import cpu_compress

        if not cpu_compress.available():
            raise UsageError(f"{PROG} bench compress: error: the fused kernel cannot be built here ({cpu_compress.unavailable()})")
        rows = bench.compress_table(args.contexts, args.kv_heads, args.groups, args.head_dim, dtype)
        print(f"\nkey compression at key_prune_ratio 0.8, {geometry}, median of 5\n")
        print(bench.format_table(rows, bench.COMPRESS_COLUMNS))
        return
    if args.what == "bytes":
        for context in args.contexts:
            rows = bench.bytes_table(context, args.kv_heads, args.groups, args.head_dim, dtype)
            print(f"\nbytes held by one layer, {context} tokens, {geometry}\n")
            print(bench.format_table(rows, bench.BYTES_COLUMNS))
        return
    configs = [c.replace(attention_backend=args.backend) for c in bench_decode.CONFIGS]
    result = {"decode": [], "prefill": None, "threads": torch.get_num_threads()}
    for context in args.contexts:
        rows = bench_decode.decode_timing(context, args.kv_heads, args.groups, args.head_dim, dtype, args.steps, args.warmup, configs)
        result["decode"] += rows
        print(f"\ndecode step of one whole decoder layer (hidden {args.kv_heads * args.groups * args.head_dim}, MLP narrowed), "
              f"{context} tokens, {geometry}, median of {args.steps}\n")
        print(bench.format_table(rows, bench_decode.COLUMNS))
    if args.prefill_tokens:  # "prefill": the SparK row; "prefill_rows": every row of PREFILL_CONFIGS
        result["prefill_rows"] = [bench_decode.prefill_overhead(args.prefill_tokens, config=c) for c in bench_decode.PREFILL_CONFIGS]
        result["prefill"] = result["prefill_rows"][0]
        for p in result["prefill_rows"]:
            print(f"\nprefill, SmolLM2-135M geometry (random weights), {p['tokens']} tokens, {torch.get_num_threads()} threads: "
                  f"DynamicCache {p['dense_s']:.2f} s, {p['config']} {p['spark_s']:.2f} s ({p['ratio']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


COMMANDS = {"eval": (_check_eval, cmd_eval), "report": (None, cmd_report), "generate": (_check_generate, cmd_generate),
            "demo": (_check_demo, cmd_demo), "bench": (_check_bench, cmd_bench)}


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and check `argv` (no model loads, no file is written). Raises `UsageError`."""
    args = build_parser().parse_args(argv)
    check, _ = COMMANDS[args.command]
    if check is not None:
        check(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = parse(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: this command draws its own
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .eval.records import FolderBusy

    try:
        COMMANDS[args.command][1](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except FolderBusy as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return BUSY
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted (finished cells and samples are kept; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback, unless --debug
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG} {args.command}: {type(exc).__name__}: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
