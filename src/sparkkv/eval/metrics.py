"""Scoring functions: RULER's string matches and LongBench v1's official metrics.

Every metric maps `(prediction: str, references: list[str])` to a score in [0, 1] for one sample;
a task's score is the mean over its samples (LongBench and RULER print that mean times 100).

RULER (its `scripts/eval/synthetic/constants.py`):
    string_match_all   fraction of the references found (case-insensitive substring) in the prediction
    string_match_part  1 if any reference is found in the prediction, else 0

LongBench v1 (its `metrics.py`; each takes the max over the references):
    qa_f1              token F1 after SQuAD normalisation (lowercase, drop punctuation and articles)
    rouge_l            ROUGE-L F-measure (the `rouge-score` package; LongBench uses the `rouge`
                       package's rouge-l "f" on whitespace tokens: see `rouge_l` for the difference)
    classification     1/k if the reference is among the k class names found in the prediction, else
                       (with no name found) 0
    retrieval          (found "Paragraph N" of the reference) / (all paragraph numbers in the prediction)
    count              (numbers in the prediction equal to the reference) / (all numbers in the prediction)
    code_sim           edit similarity of the first line that is not a comment / fence (rapidfuzz's
                       `fuzz.ratio` / 100; LongBench used fuzzywuzzy's, which rounds to an integer)

testbed                the offline testbed's scorer (`sparkkv.testbed.score`)
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable

# --- RULER --------------------------------------------------------------------------------------


def string_match_all(prediction: str, references: list[str], **_) -> float:
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str], **_) -> float:
    pred = prediction.lower()
    return float(max(ref.lower() in pred for ref in references))


# --- LongBench ------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: list[str], **_) -> float:
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in references)


_ROUGE = None


def rouge_l(prediction: str, references: list[str], **_) -> float:
    """ROUGE-L F-measure with `rouge-score` (its default tokenizer: lowercase alphanumeric words,
    no stemming). LongBench's `rouge` package splits on whitespace only, so punctuation glued to
    words can make its numbers differ slightly; the ranking of methods does not depend on it."""
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:  # pragma: no cover - the eval extra installs it
            raise ImportError("ROUGE-L needs the rouge-score package: pip install 'sparkkv[eval]'") from exc
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return max(_ROUGE.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def classification(prediction: str, references: list[str], all_classes: list[str] | None = None, **_) -> float:
    if not all_classes:
        raise ValueError("the classification metric needs the task's class names (all_classes)")
    best = 0.0
    for ref in references:
        found = [name for name in all_classes if name in prediction]
        found = [name for name in found if not (name in ref and name != ref)]  # a substring of the answer is not a miss
        best = max(best, 1.0 / len(found) if ref in found else 0.0)
    return best


def retrieval(prediction: str, references: list[str], **_) -> float:
    best = 0.0
    for ref in references:
        wanted = re.findall(r"Paragraph (\d+)", ref)
        numbers = re.findall(r"\d+", prediction)
        if wanted and numbers:
            best = max(best, sum(n == wanted[0] for n in numbers) / len(numbers))
    return best


def count(prediction: str, references: list[str], **_) -> float:
    best = 0.0
    for ref in references:
        numbers = re.findall(r"\d+", prediction)
        if numbers:
            best = max(best, sum(n == str(ref) for n in numbers) / len(numbers))
    return best


def code_sim(prediction: str, references: list[str], **_) -> float:
    from rapidfuzz import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return max(fuzz.ratio(line, ref) / 100 for ref in references)


def testbed(prediction: str, references: list[str], task: str = "", **_) -> float:
    """The offline testbed's own scorer (`sparkkv.testbed.score`): exact words or word recall."""
    from ..testbed import score as testbed_score

    return max(testbed_score(task, prediction, ref) for ref in references)


METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "count": count,
    "code_sim": code_sim,
    "testbed": testbed,
}


def score(metric: str, prediction: str, references: list[str], **extra) -> float:
    """Score one prediction with the named metric (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {list(METRICS)}")
    if not references:
        raise ValueError("references is empty: a sample needs at least one reference answer")
    return METRICS[metric](prediction, list(references), **extra)
