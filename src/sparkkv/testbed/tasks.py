"""RULER-like synthetic long-context tasks, generated from a seed at any context length.

A task instance is a *document* (instructions, haystack sentences and needles) followed by a
*question*; the model must continue the prompt with the answer. All words come from the closed
vocabulary in :mod:`sparkkv.testbed.vocab`, and one word is one token of the shipped tokenizer, so
lengths are exact: ``len(tokenizer(prompt).input_ids) == context_tokens`` (the count includes the
``<bos>`` token the tokenizer prepends).

Tasks (see ``docs/testbed.md`` for an example of each):

``passkey``
    One needle "The pass key is 583 ..." hidden in the haystack; answer: the number.
``multikey``
    Four needles "The special number for <name> <number> ." with different names; one name is
    asked; the three others are distractors. Answer: its number.
``kv_retrieval``
    The context is one long dictionary "<name> <number> , ..." (up to 1,000 entries; longer
    contexts put filler sentences before it); one key is asked. Answer: its number.

In ``multikey`` and ``kv_retrieval`` the value directly follows its key and the question ends with
the key (which occurs only once in the question), so retrieval is one induction step (find the
earlier occurrence of the key, copy the token after it), the simplest form of the retrieval.
``variable_tracking``
    Two chains of four assignments "var a = 583 ." "var b = a ." ... scattered in the haystack; the
    question asks for every variable that holds a given number. Answer: the names of that chain in
    assignment order (space separated); scored by recall.
``common_words``
    A list of words in which three words appear many times (about 6 % of the list each) and the
    others at most half as often; answer: the three most common words (order of first appearance);
    scored by recall.

Seeds: ``generate_samples`` accepts seeds in ``[0, TRAIN_SEED_START)``; training draws its
sequences only from seeds ``>= TRAIN_SEED_START`` (see :func:`training_sequence`), so evaluation
samples are never training samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import haystack, vocab

TASKS = ("passkey", "multikey", "kv_retrieval", "variable_tracking", "common_words")
MULTI_ANSWER_TASKS = ("variable_tracking", "common_words")

MIN_CONTEXT_TOKENS = 128
MAX_CONTEXT_TOKENS = 32768
TRAIN_SEED_START = 1_000_000_000  # seeds >= this are reserved for training sequences

# Difficulty of the evaluation samples (training varies these around the same values).
MULTIKEY_NEEDLES = 4
VT_CHAINS = 2
VT_CHAIN_LENGTH = 4
CW_TOP = 3
CW_COMMON_FRACTION = 0.06


def _words(text: str) -> list[str]:
    return text.split(" ")


@dataclass
class Instance:
    """A document and its questions: ``qas[i] = (question words, answer words)``."""

    document: list[str]
    qas: list[tuple[list[str], list[str]]]
    depth: float | None = None  # relative position of the first asked needle in the document


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------
PASSKEY_INTRO = _words("There is a pass key hidden in the text below . Remember it .")
PASSKEY_QUESTION = _words("What is the pass key ? The pass key is")
MULTIKEY_INTRO = _words("Some names have a special number hidden in the text below . Remember them .")
KV_INTRO = _words("Here is a dictionary of keys and values :")
VT_INTRO = _words("Read the text below carefully . Remember the value of each var .")
CW_INTRO = _words("Here is a list of words :")
CW_QUESTION = _words("What are the three most common words in the list above ? Answer :")


def _passkey_needle(value: str) -> list[str]:
    return _words(f"The pass key is {value} . Remember it . {value} is the pass key .")


def _multikey_needle(key: str, value: str) -> list[str]:
    return _words(f"The special number for {key} {value} .")


def _multikey_question(key: str) -> list[str]:
    return _words(f"What is the special number of the name below ? The special number for {key}")


def _kv_question(key: str) -> list[str]:
    return _words(f"What is the value of the key below in the dictionary ? {key}")


def _vt_question(value: str) -> list[str]:
    return _words(f"Find all variables that are assigned the value {value} . Answer :")


# Question lengths do not depend on the key / value (both are single words).
QUESTION_TOKENS = {
    "passkey": len(PASSKEY_QUESTION),
    "multikey": len(_multikey_question("x")),
    "kv_retrieval": len(_kv_question("x")),
    "variable_tracking": len(_vt_question("x")),
    "common_words": len(CW_QUESTION),
}


# --------------------------------------------------------------------------------------------------
# Builders: each fills exactly ``n_doc`` document words and asks ``n_queries`` questions.
# --------------------------------------------------------------------------------------------------
def _fill(rng: random.Random, n_doc: int, fixed: int, needles: list[list[str]]) -> list[str]:
    n_hay = n_doc - fixed - sum(map(len, needles))
    if n_hay < 0 or 0 < n_hay < haystack.MIN_SENTENCE:
        raise ValueError(f"a document of {n_doc} tokens is too short for this task instance")
    return haystack.insert_needles(rng, haystack.sentences(rng, n_hay), needles)


def _build_passkey(rng: random.Random, n_doc: int, n_queries: int = 1) -> Instance:
    value = rng.choice(vocab.NUMBERS)
    body = _fill(rng, n_doc, len(PASSKEY_INTRO), [_passkey_needle(value)])
    doc = PASSKEY_INTRO + body
    depth = doc.index(value) / len(doc)
    return Instance(doc, [(list(PASSKEY_QUESTION), [value])] * n_queries, depth)


def _build_multikey(rng: random.Random, n_doc: int, n_queries: int = 1, needles: int = MULTIKEY_NEEDLES) -> Instance:
    keys = rng.sample(vocab.NAMES, needles)
    values = rng.sample(vocab.NUMBERS, needles)
    body = _fill(rng, n_doc, len(MULTIKEY_INTRO), [_multikey_needle(k, v) for k, v in zip(keys, values)])
    doc = MULTIKEY_INTRO + body
    asked = rng.sample(range(needles), n_queries)
    qas = [(_multikey_question(keys[i]), [values[i]]) for i in asked]
    depth = doc.index(keys[asked[0]]) / len(doc)
    return Instance(doc, qas, depth)


def _build_kv(rng: random.Random, n_doc: int, n_queries: int = 1) -> Instance:
    room = n_doc - len(KV_INTRO)
    pairs = min(room // 3, len(vocab.NAMES))
    filler = room - 3 * pairs
    if 0 < filler < haystack.MIN_SENTENCE:
        pairs -= 1
        filler += 3
    if pairs < max(2, n_queries):
        raise ValueError(f"a document of {n_doc} tokens is too short for this task instance")
    keys = rng.sample(vocab.NAMES, pairs)
    values = [rng.choice(vocab.NUMBERS) for _ in keys]
    doc = [w for s in haystack.sentences(rng, filler) for w in s] + list(KV_INTRO)
    start = len(doc)
    for i, (k, v) in enumerate(zip(keys, values)):
        doc += [k, v, "." if i == pairs - 1 else ","]
    asked = rng.sample(range(pairs), n_queries)
    qas = [(_kv_question(keys[i]), [values[i]]) for i in asked]
    depth = (start + 3 * asked[0]) / len(doc)
    return Instance(doc, qas, depth)


def _build_vt(
    rng: random.Random, n_doc: int, n_queries: int = 1, chains: int = VT_CHAINS, length: int = VT_CHAIN_LENGTH
) -> Instance:
    names = rng.sample(vocab.NAMES, chains * length)
    values = rng.sample(vocab.NUMBERS, chains)
    statements: list[list[list[str]]] = []
    for c in range(chains):
        chain = names[c * length : (c + 1) * length]
        stmts = [["var", chain[0], "=", values[c], "."]]
        stmts += [["var", chain[j], "=", chain[j - 1], "."] for j in range(1, length)]
        statements.append(stmts)
    # Interleave the chains at random, keeping each chain in assignment order.
    order = [c for c in range(chains) for _ in range(length)]
    rng.shuffle(order)
    cursor = [0] * chains
    needles = []
    for c in order:
        needles.append(statements[c][cursor[c]])
        cursor[c] += 1
    doc = VT_INTRO + _fill(rng, n_doc, len(VT_INTRO), needles)
    asked = rng.sample(range(chains), n_queries)
    qas = [(_vt_question(values[c]), names[c * length : (c + 1) * length]) for c in asked]
    return Instance(doc, qas)


def _build_cw(rng: random.Random, n_doc: int, n_queries: int = 1) -> Instance:
    n_list = n_doc - len(CW_INTRO) - 1
    common_count = max(4, round(n_list * CW_COMMON_FRACTION))
    cap = max(1, common_count // 2)
    pool = list(dict.fromkeys(vocab.NOUNS))
    rng.shuffle(pool)
    common, others = pool[:CW_TOP], pool[CW_TOP:]
    rest = n_list - CW_TOP * common_count
    if rest < 0 or rest > cap * len(others):
        raise ValueError(f"a document of {n_doc} tokens does not fit this task instance")
    counts = dict.fromkeys(others, 0)
    items = [w for w in common for _ in range(common_count)]
    for _ in range(rest):
        word = rng.choice(others)
        while counts[word] >= cap:
            word = rng.choice(others)
        counts[word] += 1
        items.append(word)
    rng.shuffle(items)
    answer = sorted(common, key=items.index)
    doc = CW_INTRO + items + ["."]
    return Instance(doc, [(list(CW_QUESTION), answer)] * n_queries)


_BUILDERS = {
    "passkey": _build_passkey,
    "multikey": _build_multikey,
    "kv_retrieval": _build_kv,
    "variable_tracking": _build_vt,
    "common_words": _build_cw,
}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _rng(task: str, context_tokens: int, seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    return random.Random(f"sparkkv-testbed:{task}:{context_tokens}:{seed}:{index}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer in [{low}, {high}]")


def check_task(task: str) -> None:
    """Raise ``ValueError`` naming the allowed tasks if ``task`` is not one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def generate_samples(task: str, n: int, context_tokens: int, seed: int) -> list[dict]:
    """Generate ``n`` deterministic samples of ``task`` whose prompts are ``context_tokens`` tokens long.

    Args:
        task: one of :data:`TASKS`.
        n: number of samples, ``1 <= n <= 1_000_000``.
        context_tokens: exact prompt length in tokens of the shipped tokenizer, counting the
            ``<bos>`` token it prepends; ``MIN_CONTEXT_TOKENS <= context_tokens <= MAX_CONTEXT_TOKENS``.
        seed: evaluation seed, ``0 <= seed < TRAIN_SEED_START`` (larger seeds are reserved for
            training). Sample ``i`` depends only on ``(task, context_tokens, seed, i)``.

    Returns:
        A list of dicts with keys ``task``, ``prompt`` (str), ``answer`` (str, space-separated words),
        ``answer_tokens`` (int), ``context_tokens``, ``seed``, ``index`` and ``depth`` (relative
        position of the asked needle, ``None`` for tasks without a single needle).
    """
    check_task(task)
    _check_int("n", n, 1, 1_000_000)
    _check_int("context_tokens", context_tokens, MIN_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS)
    _check_int("seed", seed, 0, TRAIN_SEED_START - 1)
    return [_sample(task, context_tokens, seed, i) for i in range(n)]


def _sample(task: str, context_tokens: int, seed: int, index: int) -> dict:
    rng = _rng(task, context_tokens, seed, index)
    n_doc = context_tokens - 1 - QUESTION_TOKENS[task]
    inst = _BUILDERS[task](rng, n_doc)
    question, answer = inst.qas[0]
    return {
        "task": task,
        "prompt": " ".join(inst.document + question),
        "answer": " ".join(answer),
        "answer_tokens": len(answer),
        "context_tokens": context_tokens,
        "seed": seed,
        "index": index,
        "depth": inst.depth,
    }


def score(task: str, prediction: str, answer: str) -> float:
    """Score a generated continuation against the reference answer, in ``[0, 1]``.

    Single-answer tasks: exact match of the first ``len(answer.split())`` words of the prediction
    (whatever the model generates after the answer is ignored). Multi-answer tasks
    (:data:`MULTI_ANSWER_TASKS`): recall, the fraction of the answer's words found among the
    prediction's words (order-insensitive).
    """
    check_task(task)
    expected = answer.split()
    if not expected:
        raise ValueError("answer is empty")
    got = prediction.split()
    if task in MULTI_ANSWER_TASKS:
        found = set(got)
        return sum(w in found for w in set(expected)) / len(set(expected))
    return float(got[: len(expected)] == expected)


# --------------------------------------------------------------------------------------------------
# Training sequences
# --------------------------------------------------------------------------------------------------
def training_sequence(task: str, seq_len: int, seed: int, index: int, n_queries: int = 1, **options) -> tuple[list[str], list[bool]]:
    """One training sequence of exactly ``seq_len`` tokens and its answer mask.

    Layout: ``<bos> document question_1 answer_1 <eos> question_2 answer_2 <eos> ...``. The first
    question comes right after the document exactly as in an evaluation prompt; further questions
    (other keys of the same document) give denser supervision. The mask is ``True`` on the answer
    words and the ``<eos>`` after them. ``seed`` must be ``>= TRAIN_SEED_START`` and ``options``
    are forwarded to the task builder (``needles`` for multikey, ``chains``/``length`` for
    variable tracking).
    """
    check_task(task)
    if seed < TRAIN_SEED_START:
        raise ValueError(f"training seed {seed} is an evaluation seed: expected >= {TRAIN_SEED_START}")
    rng = _rng(task, seq_len, seed, index)
    answer_len = {"variable_tracking": options.get("length", VT_CHAIN_LENGTH), "common_words": CW_TOP}.get(task, 1)
    qa_len = n_queries * (QUESTION_TOKENS[task] + answer_len + 1)
    inst = _BUILDERS[task](rng, seq_len - 1 - qa_len, n_queries, **options)
    words = [vocab.BOS, *inst.document]
    mask = [False] * len(words)
    for question, answer in inst.qas:
        words += question + answer + [vocab.EOS]
        mask += [False] * len(question) + [True] * (len(answer) + 1)
    assert len(words) == seq_len, (task, len(words), seq_len)
    return words, mask
