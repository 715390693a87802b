"""RULER generators: exact lengths, seeds, needle placement, answers, metrics."""

import json
import random
import re

import pytest

from conftest import ROOT, SHARED_DATA
from realmodel import smollm2
from sparkkv.eval import metrics, ruler
from sparkkv.testbed import load_model

FIXTURES = ROOT / "tests" / "fixtures" / "ruler"
ESSAYS = SHARED_DATA / "text" / "paul_graham_essays.json"


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    """An essay-like haystack file (JSON {"text": ...}) made from random sentences."""
    rng = random.Random(0)
    sentences = [
        f"The {rng.choice(ruler.ADJECTIVES)} {rng.choice(ruler.NOUNS)} met a {rng.choice(ruler.ADJECTIVES)} "
        f"{rng.choice(ruler.NOUNS)} near the {rng.choice(ruler.NOUNS)}{rng.choice('.!?')}"
        for _ in range(3000)
    ]
    path = tmp_path_factory.mktemp("hay") / "essays.json"
    path.write_text(json.dumps({"text": " ".join(sentences)}))
    return path


@pytest.fixture(scope="module")
def testbed_tokenizer():
    return load_model()[1]


def sources(haystack):
    return ruler.Sources(haystack=haystack, squad=FIXTURES / "squad.json", hotpotqa=FIXTURES / "hotpotqa.json")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_exact_length_every_task_real_tokenizer(task, haystack):
    _, tok = smollm2()
    length = random.Random(task).choice([700, 1001, 1537])
    for sample in ruler.generate(task, tok, length, 3, seed=11, sources=sources(haystack)):
        assert len(sample.input_ids) == length
        assert sample.references and all(isinstance(r, str) and r for r in sample.references)
        assert sample.metric == ("string_match_part" if task.startswith("qa_") else "string_match_all")


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_exact_length_other_tokenizer(task, testbed_tokenizer, haystack):
    # the testbed tokenizer adds a <bos> and knows few of these words: lengths stay exact
    for length in (300, 513):
        sample = ruler.generate(task, testbed_tokenizer, length, 1, seed=0, sources=sources(haystack))[0]
        assert len(sample.input_ids) == length
        assert sample.input_ids[0] == testbed_tokenizer.bos_token_id


def test_seeds_are_deterministic_and_distinct(haystack):
    _, tok = smollm2()
    a = ruler.generate("niah_single_2", tok, 800, 4, seed=3, sources=sources(haystack))
    b = ruler.generate("niah_single_2", tok, 800, 4, seed=3, sources=sources(haystack))
    c = ruler.generate("niah_single_2", tok, 800, 4, seed=4, sources=sources(haystack))
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.references for s in a] != [s.references for s in c]
    assert len({tuple(s.input_ids) for s in a}) == 4  # samples of one seed differ
    # sample i does not depend on n
    assert ruler.generate("niah_single_2", tok, 800, 2, seed=3, sources=sources(haystack))[1].input_ids == a[1].input_ids


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"])
def test_needles_placement_and_answers(task, haystack):
    _, tok = smollm2()
    spec = ruler.NIAH[task]
    for sample in ruler.generate(task, tok, 1200, 3, seed=5, sources=sources(haystack)):
        text = _decode(tok, sample.input_ids)
        needles = re.findall(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.", text)
        query = sample.extra["query"]
        asked = query.replace(", and ", ", ").split(", ")
        assert len(asked) == spec.num_q
        by_key = {}
        for key, value in needles:
            by_key.setdefault(key, []).append(value)
        # every reference is the value of a needle whose key is asked, and every such value is a reference
        assert sorted(sample.references) == sorted(v for k in asked for v in by_key[k])
        if spec.haystack != "needles":
            assert len(needles) == max(spec.num_k, spec.num_q) * spec.num_v
        else:  # distractor needles with other keys
            assert len(needles) > 10 and all(len(by_key[k]) == spec.num_v for k in asked)
        # the question names the asked keys after the context
        assert text.rindex(asked[0]) > max(text.index(f"for {k} is:") for k in asked)
        # the needles sit where the recorded depths say (fraction of the context, 10 % tolerance)
        if spec.haystack == "essay":
            head = len(tok(text[: text.index("\n") + 1]).input_ids)
            context = len(sample.input_ids) - head
            positions = sorted(
                len(tok(text[: m.start()]).input_ids) - head for m in re.finditer("One of the special magic", text)
            )
            for pos, depth in zip(positions, sample.extra["depths"]):
                assert abs(pos / context - depth / 100) < 0.1
        for ref in sample.references:
            assert metrics.score(sample.metric, f" {ref}.", [ref]) == 1.0


def test_essay_needles_sit_at_sentence_boundaries(haystack):
    _, tok = smollm2()
    for sample in ruler.generate("niah_multivalue", tok, 900, 3, seed=1, sources=sources(haystack)):
        text = _decode(tok, sample.input_ids)
        for m in re.finditer(r" ?One of the special magic", text):
            before = text[: m.start()].rstrip()
            assert before.endswith((".", "!", "?", "\n")) or before.endswith("afterwards."), before[-40:]


def test_vt_cwe_fwe_answers_are_in_the_prompt(haystack):
    _, tok = smollm2()
    vt = ruler.generate("vt", tok, 900, 1, seed=2, sources=sources(haystack))[0]
    text = _decode(tok, vt.input_ids)
    names = vt.references
    assert f"VAR {names[0]} = {vt.extra['value']}" in text
    assert all(f"VAR {names[i + 1]} = VAR {names[i]}" in text for i in range(len(names) - 1))
    cwe = ruler.generate("cwe", tok, 1500, 1, seed=2, sources=sources(haystack))[0]
    listed = re.findall(r"\d+\. (\S+)", _decode(tok, cwe.input_ids))
    counts = {w: listed.count(w) for w in set(listed)}
    assert all(counts[w] == 6 for w in cwe.references)  # below 4096 tokens: 6 repeats, uncommon words once
    assert max(c for w, c in counts.items() if w not in cwe.references) == 1
    fwe = ruler.generate("fwe", tok, 1500, 1, seed=2, sources=sources(haystack))[0]
    words = _decode(tok, fwe.input_ids).split("coded words. ", 1)[1].split("\nQuestion")[0].split()
    ranked = sorted(set(words), key=lambda w: -words.count(w))
    assert ranked[0] == "..." and ranked[1:4] == fwe.references


def test_qa_uses_gold_documents():
    _, tok = smollm2()
    for sample in ruler.generate("qa_1", tok, 400, 4, seed=0, sources=ruler.Sources(squad=FIXTURES / "squad.json")):
        assert sample.references in (["Paris"], ["Mount Fuji"])
        gold = "Paris. It was finished" if sample.references == ["Paris"] else "highest mountain in Japan"
        assert gold in _decode(tok, sample.input_ids)
    sample = ruler.generate("qa_2", tok, 400, 1, seed=0, sources=ruler.Sources(hotpotqa=FIXTURES / "hotpotqa.json"))[0]
    assert sample.metric == "string_match_part"


def test_generator_errors(haystack):
    _, tok = smollm2()
    with pytest.raises(ValueError, match="needs a haystack file"):
        ruler.generate("niah_single_2", tok, 1000, 1, 0)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate("niah_single_9", tok, 1000, 1, 0)
    with pytest.raises(ValueError, match="leaves .* tokens for the context"):
        ruler.generate("niah_single_1", tok, 60, 1, 0)


@pytest.mark.skipif(not ESSAYS.is_file(), reason=f"{ESSAYS} is absent (shared data)")
def test_real_essays_haystack_exact_length():
    _, tok = smollm2()
    sample = ruler.generate("niah_single_2", tok, 4096, 1, seed=0, sources=ruler.Sources(haystack=ESSAYS))[0]
    assert len(sample.input_ids) == 4096
    assert "July 2010" in _decode(tok, sample.input_ids[:60])  # RULER starts the haystack at the first essay
