"""RULER and LongBench metrics, and the LongBench loader, on hand-made fixtures with hand-computed scores."""

import pytest

from conftest import ROOT
from sparkkv.eval import longbench, metrics

FIXTURES = ROOT / "tests" / "fixtures" / "longbench"


def test_ruler_string_matches():
    refs = ["1234567", "7654321"]
    assert metrics.score("string_match_all", " 1234567 and 7654321.", refs) == 1.0
    assert metrics.score("string_match_all", " 1234567 only", refs) == 0.5
    assert metrics.score("string_match_all", "nothing", refs) == 0.0
    assert metrics.score("string_match_part", " 7654321", refs) == 1.0
    assert metrics.score("string_match_part", "nothing", refs) == 0.0
    assert metrics.score("string_match_all", "The ANSWER is Paris", ["paris"]) == 1.0  # case-insensitive


@pytest.mark.parametrize(
    "metric, prediction, references, kwargs, expected",
    [
        # normalised: pred [cat, sat, on, mat], ref [cat, on, mat]: P 3/4, R 1 -> F1 = 6/7
        ("qa_f1", "The cat sat on the mat.", ["a cat on mat"], {}, 6 / 7),
        ("qa_f1", "dog", ["a cat on mat", "the dog"], {}, 1.0),  # max over references
        ("qa_f1", "unrelated words", ["cat"], {}, 0.0),
        # LCS "the cat on the mat" = 5 words: P 5/6, R 5/5 -> F = 10/11
        ("rouge_l", "the cat sat on the mat", ["the cat on the mat"], {}, 10 / 11),
        # found classes [Location, Person]; the answer is one of two -> 1/2
        ("classification", "Location or Person", ["Location"], {"all_classes": ["Location", "Person", "Number"]}, 0.5),
        ("classification", "Number", ["Location"], {"all_classes": ["Location", "Person", "Number"]}, 0.0),
        # numbers [3, 12], one is the asked paragraph -> 1/2
        ("retrieval", "Paragraph 3 or Paragraph 12", ["Paragraph 3"], {}, 0.5),
        ("retrieval", "no idea", ["Paragraph 3"], {}, 0.0),
        # numbers [4, 5] -> 1/2
        ("count", "There are 4 paragraphs, not 5", ["4"], {}, 0.5),
        # first line without ` # //: "x = foo(1)"; Indel distance 2 over 20 characters -> 0.9
        ("code_sim", "```python\n# comment\nx = foo(1)\ny = 2", ["x = foo(2)"], {}, 0.9),
    ],
)
def test_longbench_metrics_hand_computed(metric, prediction, references, kwargs, expected):
    assert metrics.score(metric, prediction, references, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.score("bleu", "x", ["y"])
    with pytest.raises(ValueError, match="references is empty"):
        metrics.score("qa_f1", "x", [])
    with pytest.raises(ValueError, match="all_classes"):
        metrics.score("classification", "x", ["y"])


class _WordTokenizer:
    """One token per character: lengths are easy to reason about."""

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()


def test_longbench_loader_prompt_truncation_and_scores():
    tok = _WordTokenizer()
    samples = longbench.generate("longbench/hotpotqa", tok, 10_000, 2, FIXTURES)
    assert [s.references for s in samples] == [["the cat"], ["in the barn", "barn"]]
    assert samples[0].metric == "qa_f1" and samples[0].max_new_tokens == 32
    prompt = "".join(chr(i) for i in samples[0].input_ids[1:])
    assert prompt.startswith("Answer the question based on the given passages.")
    assert "The cat sat on the mat." in prompt and prompt.endswith("Question: Which animal sat on the mat?\nAnswer:")
    assert samples[0].input_ids[0] == 1  # the tokenizer's BOS is kept
    # a length below the prompt keeps the first and the last halves, exactly `length` tokens
    short = longbench.generate("longbench/hotpotqa", tok, 101, 1, FIXTURES)[0]
    full = samples[0].input_ids
    assert len(short.input_ids) == 101
    assert short.input_ids == full[:50] + full[len(full) - 51 :]
    trec = longbench.generate("longbench/trec", tok, 10_000, 1, FIXTURES)[0]
    assert trec.first_line and trec.extra["metric_args"]["all_classes"] == ["Location", "Person", "Number"]
    assert metrics.score(trec.metric, "Location", trec.references, **trec.extra["metric_args"]) == 1.0


def test_longbench_loader_errors():
    tok = _WordTokenizer()
    with pytest.raises(FileNotFoundError, match="qmsum.jsonl"):
        longbench.generate("longbench/qmsum", tok, 1000, 1, FIXTURES)
    with pytest.raises(ValueError, match="fewer than n=5"):
        longbench.generate("longbench/hotpotqa", tok, 1000, 5, FIXTURES)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench.generate("longbench/dureader", tok, 1000, 1, FIXTURES)
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        longbench.read_rows(FIXTURES, "broken")
