"""LongBench (v1), English tasks: local JSONL files in LongBench's schema, official prompts and metrics.

A sample line is LongBench's schema: `{"input", "context", "answers": [...], "length", "dataset",
"language", "all_classes", "_id"}`. Files are read from `<folder>/<task>.jsonl` (the layout of
LongBench's `data/` folder); `load_from_hub` reads the same rows through `datasets` where the Hub
is reachable.

Prompts and generation budgets are LongBench's `dataset2prompt.json` / `dataset2maxlen.json`. A
prompt longer than the requested length is cut in the middle (LongBench keeps the first and last
halves), so it is exactly `length` tokens; shorter prompts keep their own length. trec, triviaqa
and samsum are scored on the first line of the prediction, as LongBench's `eval.py` does.
"""

from __future__ import annotations

import json
from pathlib import Path

from .samples import Sample, Segments

# task: (metric, max_new_tokens, prompt)
TASKS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": (
        "qa_f1",
        128,
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "qasper": (
        "qa_f1",
        128,
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        'single phrase or sentence if possible. If the question cannot be answered based on the information in the '
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    ),
    "multifieldqa_en": (
        "qa_f1",
        64,
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    **{
        name: (
            "qa_f1",
            32,
            "Answer the question based on the given passages. Only give me the answer and do not output any other "
            "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
            "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        )
        for name in ("hotpotqa", "2wikimqa", "musique")
    },
    "gov_report": (
        "rouge_l",
        512,
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    ),
    "qmsum": (
        "rouge_l",
        512,
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    ),
    "multi_news": (
        "rouge_l",
        512,
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
    ),
    "trec": (
        "classification",
        64,
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    ),
    "triviaqa": (
        "qa_f1",
        32,
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
    ),
    "samsum": (
        "rouge_l",
        128,
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    ),
    "passage_count": (
        "count",
        32,
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    ),
    "passage_retrieval_en": (
        "retrieval",
        32,
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.'
        "\n\nThe answer is: ",
    ),
    "lcc": ("code_sim", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("code_sim", 64, "Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum")
REQUIRED_FIELDS = ("input", "context", "answers")


def task_name(name: str) -> str:
    """'longbench/hotpotqa' -> 'hotpotqa' (CLI task names carry the prefix)."""
    return name.split("/", 1)[1] if name.startswith("longbench/") else name


def read_rows(folder: Path, task: str) -> list[dict]:
    """Rows of `<folder>/<task>.jsonl`, each checked for LongBench's fields."""
    path = Path(folder) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no LongBench file {path} (expected <folder>/<task>.jsonl in LongBench's schema)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing or not isinstance(row["answers"], list) or not row["answers"]:
            raise ValueError(f"{path}:{number}: needs {list(REQUIRED_FIELDS)} with a non-empty 'answers' list; missing {missing}")
        rows.append(row)
    return rows


def load_from_hub(task: str) -> list[dict]:  # pragma: no cover - needs the Hub
    """The test split of THUDM/LongBench's `task` through `datasets` (only where the Hub is reachable)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ImportError("reading LongBench from the Hub needs the datasets package (pip install datasets)") from exc
    return list(load_dataset("THUDM/LongBench", task, split="test"))


def generate(task: str, tokenizer, length: int, n: int, folder: Path | None) -> list[Sample]:
    """The first `n` rows of LongBench task `task` as samples of at most `length` tokens."""
    task = task_name(task)
    if task not in TASKS:
        raise ValueError(f"unknown LongBench task {task!r}: expected one of {list(TASKS)}")
    metric, max_new, template = TASKS[task]
    rows = read_rows(folder, task) if folder is not None else load_from_hub(task)
    if len(rows) < n:
        raise ValueError(f"LongBench {task} has {len(rows)} rows, fewer than n={n}")
    seg = Segments(tokenizer)
    samples = []
    for index, row in enumerate(rows[:n]):
        prompt = template.format(context=row["context"], input=row["input"])
        ids = seg.prefix_ids + list(tokenizer(prompt, add_special_tokens=False).input_ids)
        if len(ids) > length:  # LongBench: keep the first and the last halves
            half = length // 2
            ids = ids[:half] + ids[len(ids) - (length - half) :]
        extra = {"id": row.get("_id")}
        if metric == "classification":
            extra["metric_args"] = {"all_classes": row.get("all_classes")}
        samples.append(
            Sample(f"longbench/{task}", index, ids, [str(a) for a in row["answers"]], metric, max_new,
                   first_line=task in FIRST_LINE_TASKS, extra=extra)
        )
    return samples
