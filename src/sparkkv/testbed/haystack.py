"""Haystack text: natural-looking filler sentences from a tiny grammar, with exact token counts.

Every sentence is a list of words (one word = one token of the testbed tokenizer). Punctuation is a
separate word, so ``" ".join(words)`` is the text and ``len(words)`` its token count.
"""

from __future__ import annotations

import random

from . import vocab

MIN_SENTENCE = 4  # the shortest sentence: "The cat slept ."


def _noun_phrase(rng: random.Random, determiner: str, adjectives: int) -> list[str]:
    return [determiner, *rng.sample(vocab.ADJECTIVES, adjectives), rng.choice(vocab.NOUNS)]


def random_sentence(rng: random.Random) -> list[str]:
    """One sentence of 4 to 8 words from one of four templates."""
    kind = rng.randrange(4)
    adj = rng.random() < 0.5
    subject = _noun_phrase(rng, rng.choice(vocab.STARTERS), int(adj))
    if kind == 0:
        obj = _noun_phrase(rng, rng.choice(vocab.DETERMINERS), int(rng.random() < 0.5))
        return [*subject, rng.choice(vocab.VERBS_TRANSITIVE), *obj, "."]
    if kind == 1:
        place = [rng.choice(vocab.PREPOSITIONS), "the", rng.choice(vocab.PLACES)]
        return [*subject, rng.choice(vocab.VERBS_INTRANSITIVE), *place, "."]
    if kind == 2:
        return [*subject, rng.choice(vocab.ADVERBS), rng.choice(vocab.VERBS_INTRANSITIVE), "."]
    return [*subject, rng.choice(vocab.VERBS_INTRANSITIVE), "."]


def exact_sentence(rng: random.Random, n: int) -> list[str]:
    """One sentence of exactly ``n >= 4`` words: subject, verb, then adverb / place phrases."""
    if n < MIN_SENTENCE:
        raise ValueError(f"a sentence needs at least {MIN_SENTENCE} words, got n={n}")
    extra = n - MIN_SENTENCE
    places, rest = divmod(extra, 3)
    adverb = rest >= 1 and rng.random() < 0.5
    adjectives = rest - int(adverb)
    words = _noun_phrase(rng, rng.choice(vocab.STARTERS), adjectives)
    words.append(rng.choice(vocab.VERBS_INTRANSITIVE))
    if adverb:
        words.append(rng.choice(vocab.ADVERBS))
    for _ in range(places):
        words += [rng.choice(vocab.PREPOSITIONS), "the", rng.choice(vocab.PLACES)]
    words.append(".")
    return words


def sentences(rng: random.Random, n: int) -> list[list[str]]:
    """Sentences totalling exactly ``n`` words (``n == 0`` or ``n >= 4``)."""
    if n == 0:
        return []
    if n < MIN_SENTENCE:
        raise ValueError(f"a haystack of n={n} words cannot be filled (need 0 or >= {MIN_SENTENCE})")
    out: list[list[str]] = []
    remaining = n
    while remaining >= 16:
        sentence = random_sentence(rng)
        out.append(sentence)
        remaining -= len(sentence)
    out.append(exact_sentence(rng, remaining))
    return out


def insert_needles(rng: random.Random, hay: list[list[str]], needles: list[list[str]]) -> list[str]:
    """Insert ``needles`` (in the given order) at random sentence boundaries and flatten to words."""
    slots = sorted(rng.randint(0, len(hay)) for _ in needles)
    words: list[str] = []
    k = 0
    for i in range(len(hay) + 1):
        while k < len(needles) and slots[k] == i:
            words += needles[k]
            k += 1
        if i < len(hay):
            words += hay[i]
    return words
