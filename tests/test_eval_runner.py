"""The shared-prefill runner against direct per-configuration runs, and perplexity against a full forward."""

import pytest
import torch

from sparkkv import CACHE_KWARG, SparKCache, SparKConfig
from sparkkv.eval import runner, tasks
from sparkkv.eval.compare import perplexity
from sparkkv.eval.samples import Sample
from sparkkv.testbed import load_model

CONFIGS = {
    "dense": None,
    "spark": SparKConfig(key_prune_ratio=0.8),
    "think": SparKConfig(method="think", key_prune_ratio=0.5),
    "snapkv+spark": SparKConfig(method="snapkv+spark", key_prune_ratio=0.8, token_budget=0.5),
    "pyramidkv+think": SparKConfig(method="pyramidkv+think", key_prune_ratio=0.8, token_budget=100),
    "streamingllm": SparKConfig(method="streamingllm", token_budget=64),
}


@pytest.fixture(scope="module")
def testbed():
    model, tokenizer = load_model()
    return model, tokenizer


def _direct(model, tokenizer, sample: Sample, config, steps: int):
    """Greedy decode with a cache that prefilled the prompt itself (no sharing, batch 1)."""
    cache = SparKCache(config or SparKConfig(method="dense"))
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        logits = model(ids, **{CACHE_KWARG: cache}).logits[:, -1]
        nbytes = cache.nbytes
        out = []
        for _ in range(steps):
            token = logits.argmax(-1)
            if int(token) == tokenizer.eos_token_id:  # the runner stops a row at EOS
                break
            out.append(int(token))
            logits = model(token[:, None], **{CACHE_KWARG: cache}).logits[:, -1]
    return out, nbytes


def test_shared_prefill_equals_direct_runs(testbed, seed):
    model, tokenizer = testbed
    samples = tasks.generate("multikey", tokenizer, 201, 2, seed % 1000, tasks.TaskInputs())
    for s in samples:
        s.max_new_tokens = 4
        s.metric = "string_match_all"
        s.references = ["never generated"]  # no early stop: all 4 tokens are produced
    results = {}
    runner.run_batch(model, tokenizer, samples, CONFIGS, lambda name, r: results.setdefault(name, []).append(r))
    for name, config in CONFIGS.items():
        assert [r.index for r in results[name]] == [0, 1]
        for sample, result in zip(samples, results[name]):
            tokens, nbytes = _direct(model, tokenizer, sample, config, 4)
            assert result.prediction == tokenizer.decode(tokens, skip_special_tokens=True), name
            assert result.kv_bytes == nbytes, name
            assert result.prompt_tokens == 201 and result.tokens == len(tokens)


def test_dense_bytes_per_token_matches_a_dense_cache(testbed):
    model, tokenizer = testbed
    cache = SparKCache(SparKConfig(method="dense"))
    with torch.no_grad():
        model(torch.randint(5, 100, (2, 70)), **{CACHE_KWARG: cache})
    assert cache.nbytes == runner.dense_bytes_per_token(model) * 2 * 70


def test_perplexity_matches_a_full_forward_in_float64(testbed, seed):
    model, _ = testbed
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (1, 150), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    want = -torch.log_softmax(logits[99:-1], -1).gather(1, ids[0, 100:, None]).sum().item()
    got = perplexity(model, ids, None, 100)
    assert got["tokens"] == 50
    assert got["nll_sum"] == pytest.approx(want, rel=1e-4)
    # batched windows score each row as alone
    rows = [Sample("perplexity", i, ids[0, :100].tolist(), metric="perplexity", target_ids=ids[0, 100:].tolist()) for i in range(2)]
    results = []
    runner.run_batch(model, None, rows, {"dense": None}, lambda _n, r: results.append(r))
    assert [r.nll for r in results] == pytest.approx([got["nll_sum"]] * 2, rel=1e-5)
    compressed = perplexity(model, ids, SparKConfig(key_prune_ratio=0.8), 100)
    assert compressed["nll_sum"] != pytest.approx(want, rel=1e-6)  # compression changes something


def test_early_stop_rules():
    sample = Sample("t", 0, [1], ["123", "456"], "string_match_all", 20)
    assert not runner._finished(sample, " 123")
    assert runner._finished(sample, " 123 and 456")
    part = Sample("t", 0, [1], ["123", "456"], "string_match_part", 20)
    assert runner._finished(part, " 456")
    first = Sample("t", 0, [1], ["x"], "qa_f1", 20, first_line=True)
    assert not runner._finished(first, "\nabc") and runner._finished(first, "\nabc\nd")
    assert not runner._finished(Sample("t", 0, [1], ["x"], "rouge_l", 20), "x\ny")


def test_batches_group_equal_lengths():
    s = [Sample("t", i, [0] * n) for i, n in enumerate([5, 5, 5, 6, 6, 5])]
    assert [[x.index for x in b] for b in runner.batches(s, 2)] == [[0, 1], [2], [3, 4], [5]]
