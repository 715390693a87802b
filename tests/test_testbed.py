"""Tests of the offline testbed: task generators, scorer, tokenizer and the shipped model."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from sparkkv import testbed
from sparkkv.testbed import TASKS, generate_samples, score, tasks, vocab
from sparkkv.testbed.tokenizer import build_tokenizer

HAS_MODEL = (testbed.MODEL_DIR / "model.safetensors").is_file()
TRAIN_CONTEXT = 1024  # context length the shipped model was trained at


@pytest.fixture(scope="module")
def tokenizer():
    if (testbed.MODEL_DIR / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(testbed.MODEL_DIR, local_files_only=True)
    return build_tokenizer()


# --------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed(task):
    a = generate_samples(task, 3, 256, seed=5)
    b = generate_samples(task, 3, 256, seed=5)
    c = generate_samples(task, 3, 256, seed=6)
    assert a == b
    assert [s["prompt"] for s in a] != [s["prompt"] for s in c]
    assert len({s["prompt"] for s in a}) == 3  # samples of one call differ too
    for s in a:
        assert s["task"] == task and isinstance(s["prompt"], str) and isinstance(s["answer"], str)


def test_tasks_tuple():
    assert TASKS == ("passkey", "multikey", "kv_retrieval", "variable_tracking", "common_words")


def _answer_is_recoverable(task: str, prompt: str, answer: str) -> bool:
    """Solve the sample by reading the prompt (independent of the generator's internals)."""
    if task == "passkey":
        return f"The pass key is {answer} ." in prompt and len(set(re.findall(r"pass key is (\d+)", prompt))) == 1
    if task == "multikey":
        key = prompt.split()[-1]
        return re.findall(rf"The special number for {key} (\d+) \.", prompt) == [answer]
    if task == "kv_retrieval":
        key = prompt.split()[-1]
        return re.findall(rf"(?:^|[,.:] ){key} (\d+) [,.]", prompt) == [answer]
    if task == "variable_tracking":
        value = re.search(r"assigned the value (\d+) \. Answer :$", prompt).group(1)
        assignments = dict(re.findall(r"var (\w+) = (\w+) \.", prompt))
        holders, frontier = [], value
        while True:
            nxt = [name for name, src in assignments.items() if src == frontier]
            if not nxt:
                break
            holders += nxt
            frontier = nxt[0]
        return holders == answer.split()
    if task == "common_words":
        words = prompt.split(" : ", 1)[1].split(" . What are", 1)[0].split()
        counts = Counter(words).most_common()
        top = {w for w, _ in counts[:3]}
        return top == set(answer.split()) and counts[2][1] > counts[3][1]
    raise AssertionError(task)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_tokens", [128, 700, 2048])
def test_answer_recoverable_and_length_exact(task, context_tokens, tokenizer):
    for s in generate_samples(task, 4, context_tokens, seed=11):
        assert _answer_is_recoverable(task, s["prompt"], s["answer"]), s
        ids = tokenizer(s["prompt"]).input_ids
        assert len(ids) == context_tokens  # exact, counting <bos>
        assert len(tokenizer(" " + s["answer"], add_special_tokens=False).input_ids) == s["answer_tokens"]


def test_needle_depth_varies():
    depths = [s["depth"] for s in generate_samples("passkey", 40, 512, seed=3)]
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_long_kv_context_still_exact(tokenizer):
    s = generate_samples("kv_retrieval", 1, 6000, seed=0)[0]  # more tokens than 1,000 dictionary entries
    assert len(tokenizer(s["prompt"]).input_ids) == 6000
    assert _answer_is_recoverable("kv_retrieval", s["prompt"], s["answer"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "nope"}, "unknown task 'nope'.*passkey"),
        ({"n": 0}, r"n=0 .*\[1, "),
        ({"n": 2.5}, r"n=2.5 "),
        ({"context_tokens": 127}, r"context_tokens=127 .*\[128, 32768\]"),
        ({"context_tokens": 40000}, r"context_tokens=40000 .*\[128, 32768\]"),
        ({"context_tokens": True}, r"context_tokens=True"),
        ({"seed": -1}, r"seed=-1 .*\[0, 999999999\]"),
        ({"seed": tasks.TRAIN_SEED_START}, r"seed=1000000000 "),
    ],
)
def test_argument_validation(kwargs, match):
    args = {"task": "passkey", "n": 1, "context_tokens": 256, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_samples(**args)


# --------------------------------------------------------------------------------------------------
# Scorer and training sequences
# --------------------------------------------------------------------------------------------------
def test_score():
    assert score("passkey", " 583", "583") == 1.0
    assert score("passkey", "583 . What", "583") == 1.0
    assert score("passkey", "584", "583") == 0.0
    assert score("kv_retrieval", "", "583") == 0.0
    assert score("variable_tracking", "bakor tilun", "bakor tilun kemar fodem") == 0.5
    assert score("variable_tracking", "fodem kemar tilun bakor", "bakor tilun kemar fodem") == 1.0
    assert score("common_words", "cat dog", "cat dog bird") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown task"):
        score("bogus", "1", "1")
    for task in TASKS:
        for s in generate_samples(task, 2, 200, seed=1):
            assert score(task, s["answer"], s["answer"]) == 1.0


def test_training_sequences_exact_and_disjoint_from_eval_seeds():
    for task in TASKS:
        words, mask = tasks.training_sequence(task, 512, tasks.TRAIN_SEED_START, 0, n_queries=1)
        assert len(words) == len(mask) == 512
        assert words[0] == vocab.BOS and words[-1] == vocab.EOS and mask[-1]
    with pytest.raises(ValueError, match="evaluation seed"):
        tasks.training_sequence("passkey", 512, 0, 0)


def _attention_loss_reference(attentions, ids):
    """Plain loops in float64: the definition in `train.attention_loss`'s docstring."""
    from sparkkv.testbed.train import INDUCTION_HEAD, PREV_HEAD

    prev = attentions[PREV_HEAD[0]][:, PREV_HEAD[1]].double()
    ind = attentions[INDUCTION_HEAD[0]][:, INDUCTION_HEAD[1]].double()
    batch, seq = ids.shape
    prev_terms, ind_terms = [], []
    for b in range(batch):
        for i in range(1, seq):
            prev_terms.append(-torch.log(prev[b, i, i - 1].clamp_min(1e-6)))
        for i in range(seq):
            if ids[b, i] < len(vocab.SPECIAL_TOKENS):
                continue
            js = [j for j in range(1, i + 1) if ids[b, j - 1] == ids[b, i]]
            if js:
                ind_terms.append(-torch.log(sum(ind[b, i, j] for j in js).clamp_min(1e-6)))
    return torch.stack(prev_terms).mean(), torch.stack(ind_terms).mean()


@pytest.mark.parametrize("seq", [7, 16, 33])
def test_attention_supervision_loss_matches_reference(seq):
    from sparkkv.testbed.train import attention_loss

    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, 12, (3, seq), generator=gen)  # small alphabet: many repeats, some specials
    attentions = []
    for _ in range(2):
        logits = torch.randn(3, 2, seq, seq, generator=gen).masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
        attentions.append(logits.softmax(-1))
    got = attention_loss(tuple(attentions), ids)
    want = _attention_loss_reference(attentions, ids)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-6)


def test_attention_supervision_loss_is_small_for_the_target_circuit():
    from sparkkv.testbed.train import attention_loss

    ids = torch.tensor([[1, 10, 20, 11, 21, 11, 21, 10, 20]])  # <bos> k v k' v' k' v' k v
    seq = ids.shape[1]
    prev = torch.zeros(1, 1, seq, seq)
    prev[0, 0, 0, 0] = 1
    prev[0, 0, torch.arange(1, seq), torch.arange(seq - 1)] = 1
    ind = torch.zeros(1, 1, seq, seq)
    for i in range(seq):
        js = [j for j in range(1, i + 1) if ids[0, j - 1] == ids[0, i]]
        for j in js or [0]:
            ind[0, 0, i, j] = 1 / len(js or [0])
    prev_loss, ind_loss = attention_loss((prev, ind), ids)
    assert prev_loss < 1e-6 and ind_loss < 1e-6
    uniform = torch.ones(seq, seq).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 1, seq, seq)
    prev_loss, ind_loss = attention_loss((uniform, uniform), ids)
    assert prev_loss > 0.5 and ind_loss > 0.5


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_tokenizer_round_trip(task, tokenizer):
    for s in generate_samples(task, 3, 512, seed=2):
        ids = tokenizer(s["prompt"]).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == s["prompt"]


def test_shipped_tokenizer_matches_vocabulary(tokenizer):
    words = vocab.all_words()
    assert len(tokenizer) == len(words) < 4000
    assert [tokenizer.convert_tokens_to_ids(w) for w in words] == list(range(len(words)))
    for name in ("pad", "bos", "eos", "unk"):
        assert getattr(tokenizer, f"{name}_token") == f"<{name}>"


# --------------------------------------------------------------------------------------------------
# Shipped model
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MODEL, reason=f"no trained model in {testbed.MODEL_DIR} (run python -m sparkkv.testbed.train)")
def test_shipped_model_solves_passkey():
    torch.set_num_threads(2)
    model, tok = testbed.load_model()
    cfg = model.config
    assert next(model.parameters()).dtype == torch.float32
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.head_dim >= 64
    assert cfg.max_position_embeddings >= TRAIN_CONTEXT
    calls = []

    def factory():
        from transformers import DynamicCache

        calls.append(1)
        return DynamicCache(config=cfg)

    result = testbed.evaluate(model, tok, "passkey", 5, TRAIN_CONTEXT, seed=424242, cache_factory=factory)
    assert result["n"] == 5 and len(calls) == 5
    assert result["accuracy"] >= 0.8, result["predictions"]


@pytest.mark.skipif(not HAS_MODEL, reason=f"no trained model in {testbed.MODEL_DIR} (run python -m sparkkv.testbed.train)")
def test_load_model_forwards_kwargs():
    model, _ = testbed.load_model(dtype=torch.bfloat16, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


@pytest.mark.skipif(not HAS_MODEL, reason=f"no trained model in {testbed.MODEL_DIR} (run python -m sparkkv.testbed.train)")
@pytest.mark.parametrize("task", ["multikey", "kv_retrieval"])
def test_shipped_model_retrieves_by_key(task):
    """The induction circuit is there: the asked key's value among several (multikey: 4, kv: ~330)."""
    torch.set_num_threads(2)
    model, tok = testbed.load_model()
    result = testbed.evaluate(model, tok, task, 5, TRAIN_CONTEXT, seed=424242)
    assert result["accuracy"] >= 0.8, result["predictions"]


@pytest.mark.skipif(not HAS_MODEL, reason=f"no trained model in {testbed.MODEL_DIR} (run python -m sparkkv.testbed.train)")
def test_accuracy_rows_and_table(tmp_path):
    from sparkkv.eval.experiment import GridSpec, run_grid
    from sparkkv.eval.grid import build_grid
    from sparkkv.eval.records import Store
    from sparkkv.eval.report import pivot

    model, tok = testbed.load_model()
    configs = build_grid(["dense", "snapkv", "snapkv+think", "snapkv+spark"], [0.8], [0.25])
    rows = run_grid(GridSpec("testbed", ["passkey"], [256], 2, configs, seed=5), model, tok, Store(tmp_path))
    assert len(rows) == 4 and rows[0]["method"] == "dense"
    assert [r["config"]["method"] for r in rows[1:]] == ["snapkv", "snapkv+think", "snapkv+spark"]
    by = {r["method"]: r for r in rows}
    dense = rows[0]
    assert dense["kv_vs_dense"] == 1.0 and all(0 <= r["score"] <= 1 for r in rows)
    # eviction to 25% of the prompt and channel pruning really shrink what the cache holds
    assert all(r["kv_vs_dense"] < 0.4 for r in rows[1:]), by
    assert rows[3]["kv_bytes_per_token"] < rows[1]["kv_bytes_per_token"]
    table = pivot(rows)
    assert table.count("\n") == 5 and "passkey" in table and "KV bytes/token" in table


@pytest.mark.skipif(not HAS_MODEL, reason=f"no trained model in {testbed.MODEL_DIR} (run python -m sparkkv.testbed.train)")
def test_docs_testbed_example_runs():
    from conftest import ROOT

    block = (ROOT / "docs" / "testbed.md").read_text()
    code = re.search(r"```python\n(.*?)\n```", block, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/testbed.md example", "exec"), namespace)
    assert namespace["cache"].nbytes > 0
