"""RULER's synthetic tasks, generated offline from a seed at an exact length in the model's tokenizer.

Task definitions follow RULER's `scripts/synthetic.yaml`, prompts its `constants.py` (the "base"
model template: the task template followed by its answer prefix, no chat markup):

| task | haystack | key | value | needles (k / v / q) | metric |
|---|---|---|---|---|---|
| niah_single_1 | noise | word | 7-digit number | 1 / 1 / 1 | string_match_all |
| niah_single_2 | essay | word | number | 1 / 1 / 1 | string_match_all |
| niah_single_3 | essay | word | uuid | 1 / 1 / 1 | string_match_all |
| niah_multikey_1 | essay | word | number | 4 / 1 / 1 | string_match_all |
| niah_multikey_2 | needles | word | number | 1 / 1 / 1 | string_match_all |
| niah_multikey_3 | needles | uuid | uuid | 1 / 1 / 1 | string_match_all |
| niah_multivalue | essay | word | number | 1 / 4 / 1 | string_match_all |
| niah_multiquery | essay | word | number | 4 / 1 / 4 | string_match_all |
| vt | noise | 1 chain of 4 hops, `VAR ABCDE = 12345` | | | string_match_all |
| cwe | numbered word list, 10 common words (x30 / uncommon x3; x6 / x1 below 4096 tokens) | | | | string_match_all |
| fwe | coded words drawn with Zipf alpha 2, the top one replaced by dots | | | | string_match_all |
| qa_1 / qa_2 | SQuAD / HotpotQA documents from local JSON files | | | | string_match_part |

"noise" is RULER's repeated "The grass is green. ..." haystack; "essay" reads a text file
(`Sources.haystack`, a JSON `{"text": ...}` such as the Paul Graham essays RULER bundles, or a
plain text file); "needles" is a haystack of distractor needles with random keys.

Exact length: the prompt is `[tokenizer prefix] + head + context + tail` (tail = question + answer
prefix), every piece tokenized on its own, and the context gets exactly the tokens left: haystacks
are cut to the token; list-shaped contexts (cwe, fwe, qa) take the most items that fit and the
remaining few tokens are newline tokens after the head. Needles go at sentence boundaries (essay)
or between lines, at RULER's depths (40 evenly spaced percentages, drawn at random).

Differences from RULER, on purpose: the words for keys and cwe come from a built-in list (RULER
draws from the `wonderwords` package's lists); vt and cwe have no in-context example (RULER prepends
one generated example); lengths are exact instead of "at most". Sample `i` of a task depends only on
`(task, length, seed, i)` and the tokenizer.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

from .samples import Sample, Segments

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
    " The special magic {type_v} for {query} mentioned in the provided text are"
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query} Answer:"
)

# Built-in word lists (keys of the niah needles, words of cwe).
ADJECTIVES = (
    "abandoned able absurd acidic adorable agreeable alert ancient angry anxious aquatic arrogant average "
    "awful bashful bitter blushing bored brave bright broad bumpy busy calm careful cheerful chilly clever "
    "cloudy clumsy colossal cool crooked crowded cruel curious damaged damp dazzling delightful dizzy dusty "
    "eager early elegant empty enchanted energetic enormous evil excited fancy fearless fierce filthy foolish "
    "fragile frail friendly frozen funny fuzzy gentle giant glamorous gleaming glorious graceful greasy grumpy "
    "handsome happy harsh hollow homely hungry icy illegal immense innocent itchy jealous jolly juicy kind "
    "large lazy little lively lonely loud lucky magnificent massive mighty misty modern muddy mysterious "
    "narrow nervous noisy obedient odd orange plain polite powerful precious prickly proud puzzled quaint "
    "quiet rapid rare rich rotten rough round rusty scary selfish shaggy shiny silent silly sleepy slimy "
    "smooth sparkling spicy splendid spotty steady sticky stormy strange striped sturdy swift tame tender "
    "thoughtful tiny tough ugly uneven unusual upset useful vast victorious vivid wandering wealthy weary "
    "whispering wicked wide wild witty wooden worried yellow young zany zealous"
).split()
NOUNS = (
    "acorn actor airport album anchor angle apple apron arch army arrow artist attic bakery balloon banana "
    "barber basket battle beach beard bee bell bicycle blanket boat bonnet book bottle bracelet branch bread "
    "brick bridge broom bucket buffalo butter button cabin cactus camera candle canoe canyon carpet castle "
    "cattle cellar chair chalk cheese cherry chimney circus clock cloud coat coffee comet compass cook "
    "cottage crayon crown cup curtain cushion desert diamond dinosaur doctor dragon drawer drum eagle elbow "
    "elevator engine envelope falcon farmer feather fence fiddle flag flower forest fountain garden giraffe "
    "glove goat guitar hammer harbor helmet hill honey horse island jacket jelly kettle kitchen kite ladder "
    "lake lamp lantern lemon library lighthouse lion magnet mailbox map marble meadow mirror monkey mountain "
    "needle nest ocean orchard owl paddle painter parrot pebble pencil piano pillow pirate planet pocket "
    "pond potato puppet quilt rabbit railway ribbon river rocket saddle sailor scarf shovel skate sled "
    "spoon squirrel stable statue stove sugar sunflower swamp table teapot temple thunder tiger tower "
    "tractor trumpet tunnel umbrella valley violin wagon walrus window wizard yacht zebra"
).split()
WORDS = sorted(set(ADJECTIVES) | set(NOUNS))


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # "noise", "essay" or "needles"
    type_k: str  # "words" or "uuids"
    type_v: str  # "numbers" or "uuids"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahSpec("needles", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needles", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_k=4, num_q=4),
}
# tokens_to_generate of RULER's constants.py
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
TASKS = (*NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2")


@dataclass(frozen=True)
class Sources:
    """Local files the tasks read (None where not given)."""

    haystack: Path | None = None  # essay haystack: JSON {"text": ...} or plain text
    squad: Path | None = None  # SQuAD v2 dev JSON (qa_1)
    hotpotqa: Path | None = None  # HotpotQA dev JSON (qa_2)


def needs(task: str) -> str | None:
    """The `Sources` field a task reads, or None."""
    if task in NIAH and NIAH[task].haystack == "essay":
        return "haystack"
    return {"qa_1": "squad", "qa_2": "hotpotqa"}.get(task)


def generate(task: str, tokenizer, length: int, n: int, seed: int, sources: Sources = Sources()) -> list[Sample]:
    """`n` samples of RULER task `task`, each exactly `length` tokens in `tokenizer`."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: expected one of {list(TASKS)}")
    field_name = needs(task)
    if field_name and getattr(sources, field_name) is None:
        raise ValueError(f"task {task!r} needs a {field_name} file (see `sparkkv eval --help`)")
    seg = Segments(tokenizer)
    samples = []
    for index in range(n):
        rng = random.Random(f"sparkkv-ruler:{task}:{length}:{seed}:{index}")
        if task in NIAH:
            ids, refs, extra = _niah(NIAH[task], seg, length, rng, sources)
            budget = MAX_NEW_TOKENS["niah"]
        else:
            ids, refs, extra = _BUILDERS[task](seg, length, rng, sources)
            budget = MAX_NEW_TOKENS[task]
        if len(ids) != length:  # the builders guarantee it; a failure here is a bug, not bad input
            raise AssertionError(f"{task}: built {len(ids)} tokens instead of {length}")
        metric = "string_match_part" if task.startswith("qa_") else "string_match_all"
        samples.append(Sample(task, index, ids, refs, metric, budget, extra=extra))
    return samples


# --- assembling a prompt of exact length --------------------------------------------------------


def _split(template: str, **fields) -> tuple[str, str]:
    head, tail = template.split("{context}")
    return head.format(**fields), tail.format(**fields)


def _room(seg: Segments, head: str, tail: str, length: int) -> int:
    room = length - len(seg.prefix_ids) - len(seg.ids(head)) - len(seg.ids(tail))
    if room < 16:
        raise ValueError(f"length {length} leaves {room} tokens for the context: use a longer length")
    return room


def _assemble(seg: Segments, head: str, context: list[int], tail: str, length: int) -> list[int]:
    """prefix + head + filler + context + tail, filler = newline tokens up to `length` exactly."""
    fixed = len(seg.prefix_ids) + len(seg.ids(head)) + len(context) + len(seg.ids(tail))
    if fixed > length:
        raise AssertionError(f"context overflows: {fixed} > {length}")
    # one token that reads as blank where the tokenizer has one (a word-level tokenizer may not)
    pad = next((ids[:1] for ids in (seg.ids("\n"), seg.ids(" "), seg.ids(".")) if ids), None)
    if pad is None and fixed < length:
        raise ValueError("the tokenizer encodes none of '\\n', ' ', '.': cannot pad a prompt to an exact length")
    filler = (pad or []) * (length - fixed)
    return seg.prefix_ids + seg.ids(head) + filler + context + seg.ids(tail)


def _largest(fits, low: int, high: int) -> int:
    """Largest k in [low, high] with fits(k) (fits is monotone: True then False), or low - 1."""
    best = low - 1
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


# --- haystacks ------------------------------------------------------------------------------------

_ESSAY_CACHE: dict[tuple, tuple[list[int], list[int]]] = {}


def read_text(path: Path) -> str:
    """A haystack/text file: JSON `{"text": ...}` or plain text."""
    raw = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"{path}: expected a JSON object with a 'text' string")
        return data["text"]
    return raw


def _essay(seg: Segments, path: Path, tokens: int) -> tuple[list[int], list[int]]:
    """The first `tokens` tokens of the essay file and the sentence boundaries among them."""
    key = (id(seg.tokenizer), str(path))
    ids, bounds = _ESSAY_CACHE.get(key, ([], []))
    if len(ids) < tokens:
        text = " ".join(read_text(path).split())  # RULER squeezes whitespace
        chars = max(8 * tokens, 20000)
        while True:
            ids = list(seg.tokenizer(text[:chars], add_special_tokens=False).input_ids)
            if len(ids) > tokens or chars >= len(text):
                break
            chars *= 2
        if len(ids) < tokens:
            raise ValueError(f"haystack file {path} holds {len(ids)} tokens, fewer than the {tokens} needed")
        pieces = seg.tokenizer.convert_ids_to_tokens(ids)
        bounds = [i + 1 for i, p in enumerate(pieces) if p and p.rstrip()[-1:] in (".", "!", "?")]
        _ESSAY_CACHE[key] = (ids, bounds)
    # the cut end is a boundary only if a sentence ends there (else a needle at depth 100 would split a sentence)
    return ids[:tokens], [0] + [b for b in bounds if b <= tokens]


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(spec: NiahSpec, seg: Segments, length: int, rng: random.Random, sources: Sources):
    num_k = max(spec.num_k, spec.num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        key = _random_value(spec.type_k, rng)
        while key in keys:
            key = _random_value(spec.type_k, rng)
        keys.append(key)
        values.append([_random_value(spec.type_v, rng) for _ in range(spec.num_v)])
        needles += [NEEDLE.format(type_v=spec.type_v, key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(num_k), spec.num_q)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, type_v = NIAH_TEMPLATE, spec.type_v
    if spec.num_q * spec.num_v == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = type_v[:-1]
    head, tail = _split(template, type_v=type_v, query=query)
    room = _room(seg, head, tail, length)

    if spec.haystack == "essay":
        needle_ids = [seg.ids(" " + t) for t in needles]
        hay, bounds = _essay(seg, sources.haystack, room - sum(map(len, needle_ids)))
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        cuts = [bounds[min(len(bounds) - 1, int(len(bounds) * d / 100))] for d in depths]
    else:
        needle_ids = [seg.ids(t + "\n") for t in needles]
        hay_tokens = room - sum(map(len, needle_ids))
        lines: list[list[int]] = []
        total = 0
        while total < hay_tokens:
            if spec.haystack == "noise":
                line = seg.ids(NOISE + "\n")
            else:  # distractor needles with fresh keys
                key = _random_value(spec.type_k, rng)
                line = seg.ids(NEEDLE.format(type_v=spec.type_v, key=key, value=_random_value(spec.type_v, rng)) + "\n")
            lines.append(line)
            total += len(line)
        hay = [t for line in lines for t in line][:hay_tokens]
        bounds = [0]
        for line in lines:
            bounds.append(min(hay_tokens, bounds[-1] + len(line)))
        cuts = sorted(rng.sample(bounds[:-1] if len(bounds) > len(needles) else bounds, len(needles)))
        depths = [round(100 * c / max(1, hay_tokens)) for c in cuts]
    context, start = [], 0
    for cut, ids in zip(cuts, needle_ids):
        context += hay[start:cut] + ids
        start = cut
    context += hay[start:]
    return _assemble(seg, head, context, tail, length), answers, {"depths": depths, "query": query}


# --- variable tracking, common / frequent words, QA ------------------------------------------------


def _vt(seg: Segments, length: int, rng: random.Random, sources: Sources, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    head, tail = _split(VT_TEMPLATE, query=value, num_v=hops + 1)
    room = _room(seg, head, tail, length)
    chain_ids = [seg.ids(c + "\n") for c in chain]
    noise = seg.ids(NOISE + "\n")
    hay_tokens = room - sum(map(len, chain_ids))
    lines = (hay_tokens + len(noise) - 1) // len(noise)
    slots = sorted(rng.sample(range(lines + 1), len(chain)))
    hay = (noise * lines)[:hay_tokens]
    context, start = [], 0
    for slot, ids in zip(slots, chain_ids):
        cut = min(hay_tokens, slot * len(noise))
        context += hay[start:cut] + ids
        start = cut
    context += hay[start:]
    return _assemble(seg, head, context, tail, length), names, {"value": value}


def _cwe(seg: Segments, length: int, rng: random.Random, sources: Sources):
    common_reps, uncommon_reps = (6, 1) if length < 4096 else (30, 3)
    pool = WORDS[:]
    rng.shuffle(pool)
    head, tail = _split(CWE_TEMPLATE)
    room = _room(seg, head, tail, length)
    order_seed = rng.random()

    def context(num_words: int) -> list[int]:
        chosen = pool[:num_words]
        words = chosen[:10] * common_reps + chosen[10:] * uncommon_reps
        random.Random(order_seed).shuffle(words)
        return seg.ids(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words)))

    best = _largest(lambda k: len(context(k)) <= room, 10, len(pool))
    if best < 10:
        raise ValueError(f"length {length} is too short for cwe's 10 common words")
    return _assemble(seg, head, context(best), tail, length), pool[:10], {"num_words": best}


def _fwe(seg: Segments, length: int, rng: random.Random, sources: Sources, alpha: float = 2.0):
    vocab_size = max(8, length // 50)
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = "..."  # RULER: the most frequent "word" is noise
    zeta = sum(k**-alpha for k in range(1, 100000))
    head, tail = _split(FWE_TEMPLATE)
    room = _room(seg, head, tail, length)
    order_seed = rng.random()

    def context(num_words: int) -> list[int]:
        counts = [int(num_words * k**-alpha / zeta) for k in range(1, len(vocab) + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(words)
        return seg.ids(" " + " ".join(words))

    best = _largest(lambda k: len(context(k)) <= room, 1, 2 * length)
    if best < 20:
        raise ValueError(f"length {length} is too short for fwe")
    return _assemble(seg, head, context(best), tail, length), vocab[1:4], {"num_words": best}


_QA_CACHE: dict[str, tuple[list[dict], list[str]]] = {}


def read_squad(path: Path) -> tuple[list[dict], list[str]]:
    """SQuAD (v2) JSON -> answerable questions `{"query", "outputs", "context": [doc ids]}` and documents."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [
        {"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]], "context": [index[p["context"]]]}
        for d in data["data"]
        for p in d["paragraphs"]
        for qa in p["qas"]
        if not qa.get("is_impossible") and qa["answers"]
    ]
    return qas, docs


def read_hotpotqa(path: Path) -> tuple[list[dict], list[str]]:
    """HotpotQA JSON (list of {question, answer, context: [[title, sentences]]}) -> questions and documents."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    doc_text = lambda t, s: f"{t}\n{''.join(s)}"  # noqa: E731
    docs = sorted({doc_text(t, s) for d in data for t, s in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]], "context": [index[doc_text(t, s)] for t, s in d["context"]]} for d in data]
    return qas, docs


def _qa(seg: Segments, length: int, rng: random.Random, sources: Sources, which: str):
    path = getattr(sources, which)
    key = f"{which}:{path}"
    if key not in _QA_CACHE:
        _QA_CACHE[key] = (read_squad if which == "squad" else read_hotpotqa)(path)
    qas, docs = _QA_CACHE[key]
    if not qas:
        raise ValueError(f"{path} holds no answerable question")
    qa = qas[rng.randrange(len(qas))]
    others = [i for i in range(len(docs)) if i not in qa["context"]]
    rng.shuffle(others)
    head, tail = _split(QA_TEMPLATE, query=qa["query"])
    room = _room(seg, head, tail, length)
    order_seed = rng.random()

    def context(num_docs: int) -> list[int]:
        chosen = qa["context"] + others[: max(0, num_docs - len(qa["context"]))]
        random.Random(order_seed).shuffle(chosen)
        return seg.ids("\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen)))

    best = _largest(lambda k: len(context(k)) <= room, len(qa["context"]), len(docs))
    if best < len(qa["context"]):
        raise ValueError(f"length {length} is too short for the gold documents of a {which} question")
    return _assemble(seg, head, context(best), tail, length), qa["outputs"], {"num_docs": best}


_BUILDERS = {
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
    "qa_1": lambda seg, length, rng, src: _qa(seg, length, rng, src, "squad"),
    "qa_2": lambda seg, length, rng, src: _qa(seg, length, rng, src, "hotpotqa"),
}
