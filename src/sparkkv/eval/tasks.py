"""Every task `sparkkv eval` knows, by name, and what each one needs.

    RULER        niah_single_1 ... qa_2             (`sparkkv.eval.ruler`; essay haystack / QA files)
    LongBench    longbench/<task>                   (`sparkkv.eval.longbench`; a folder of JSONL files)
    perplexity   perplexity                         (windows of a text file: `length` tokens prefilled
                                                     into the cache under test, the next `ppl_tokens`
                                                     decoded one at a time and scored)
    testbed      passkey, multikey, kv_retrieval,   (`sparkkv.testbed`; only with `--model testbed`,
                 variable_tracking, common_words     whose word-level tokenizer they are written in)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import longbench, ruler
from .samples import Sample, Segments

TESTBED_TASKS = ("passkey", "multikey", "kv_retrieval", "variable_tracking", "common_words")
TASK_NAMES = (*ruler.TASKS, *(f"longbench/{t}" for t in longbench.TASKS), "perplexity", *TESTBED_TASKS)


@dataclass(frozen=True)
class TaskInputs:
    """Files and numbers the tasks read. None = not given."""

    haystack: Path | None = None  # RULER essay haystack (JSON {"text": ...} or plain text)
    squad: Path | None = None  # RULER qa_1
    hotpotqa: Path | None = None  # RULER qa_2
    longbench: Path | None = None  # folder of LongBench <task>.jsonl files
    text: Path | None = None  # perplexity text file
    ppl_tokens: int = 64  # perplexity: tokens scored after each prefilled window

    def ruler_sources(self) -> ruler.Sources:
        return ruler.Sources(haystack=self.haystack, squad=self.squad, hotpotqa=self.hotpotqa)


def check_task(name: str, testbed_model: bool) -> None:
    """ValueError naming the task and the allowed names if `name` is unknown or needs the other model."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}")
    if testbed_model and name not in TESTBED_TASKS:
        raise ValueError(f"task {name!r} needs a real model; the testbed model runs only {', '.join(TESTBED_TASKS)}")
    if not testbed_model and name in TESTBED_TASKS:
        raise ValueError(f"task {name!r} is written in the testbed's own vocabulary: use --model testbed")


def needed_input(name: str) -> str | None:
    """The `TaskInputs` field that task `name` cannot run without, or None."""
    if name in ruler.TASKS:
        return ruler.needs(name)
    if name == "perplexity":
        return "text"
    return None  # LongBench falls back to the Hub; the testbed generates its own text


def generate(name: str, tokenizer, length: int, n: int, seed: int, inputs: TaskInputs) -> list[Sample]:
    """`n` samples of task `name` at `length` prompt tokens in `tokenizer`."""
    if name in ruler.TASKS:
        return ruler.generate(name, tokenizer, length, n, seed, inputs.ruler_sources())
    if name.startswith("longbench/"):
        return longbench.generate(name, tokenizer, length, n, inputs.longbench)
    if name == "perplexity":
        return perplexity_windows(tokenizer, inputs.text, length, inputs.ppl_tokens, n)
    if name in TESTBED_TASKS:
        return _testbed(name, tokenizer, length, n, seed)
    raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}")


def perplexity_windows(tokenizer, path: Path, length: int, scored: int, n: int) -> list[Sample]:
    """`n` consecutive, non-overlapping windows of the text: `length` prompt tokens, `scored` targets."""
    text = ruler.read_text(path)
    seg = Segments(tokenizer)
    need = n * (length + scored)
    ids = list(tokenizer(text[: max(8 * need, 20000)], add_special_tokens=False).input_ids)
    if len(ids) < need:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if len(ids) < need:
        raise ValueError(f"{path} holds {len(ids)} tokens: too few for n={n} windows of {length}+{scored} tokens")
    samples = []
    for i in range(n):
        start = i * (length + scored)
        prompt = seg.prefix_ids + ids[start + len(seg.prefix_ids) : start + length]
        targets = ids[start + length : start + length + scored]
        samples.append(Sample("perplexity", i, prompt, [], "perplexity", 0, target_ids=targets, extra={"offset": start}))
    return samples


def _testbed(name: str, tokenizer, length: int, n: int, seed: int) -> list[Sample]:
    from ..testbed import generate_samples

    samples = []
    for s in generate_samples(name, n, length, seed):
        ids = list(tokenizer(s["prompt"]).input_ids)
        samples.append(
            Sample(name, s["index"], ids, [s["answer"]], "testbed", s["answer_tokens"],
                   extra={"metric_args": {"task": name}, "depth": s["depth"]})
        )
    return samples
