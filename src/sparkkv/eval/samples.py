"""`Sample`: one evaluation prompt as exact token ids, with what to score it against.

Prompts are assembled from separately tokenized text segments (`Segments`) so their length in the
model's own tokenizer is exact: a generator decides how many haystack tokens fit, never how many
characters. The model sees the concatenation of the segments' token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One prompt.

    input_ids: the prompt's token ids (1-D list, the tokenizer's own BOS included when it adds one).
    references: reference answers (generation tasks); empty for perplexity.
    metric: a name in `sparkkv.eval.metrics.METRICS`, or "perplexity".
    max_new_tokens: generation budget (RULER's / LongBench's per-task value unless overridden).
    target_ids: perplexity only: the tokens scored after the prompt (teacher-forced).
    first_line: score only the first line of the prediction (LongBench's trec/triviaqa/samsum).
    extra: metadata (needle depths, ...) and, under "metric_args", the metric's keyword arguments
        (LongBench classification's `all_classes`).
    """

    task: str
    index: int
    input_ids: list[int]
    references: list[str] = field(default_factory=list)
    metric: str = "string_match_all"
    max_new_tokens: int = 32
    target_ids: list[int] | None = None
    first_line: bool = False
    extra: dict = field(default_factory=dict)


class Segments:
    """Token-id cache for text pieces in one tokenizer (no special tokens added)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        probe = tokenizer("a", add_special_tokens=True).input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        # what the tokenizer adds around a sequence (e.g. a BOS id), kept at the very start
        self.prefix_ids: list[int] = probe[: len(probe) - len(plain)] if probe[-len(plain):] == plain else []

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self._cache[text]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
