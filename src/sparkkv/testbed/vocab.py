"""Closed vocabulary of the testbed: every word a generated prompt can contain.

The word lists below are the whole language of the synthetic tasks. The tokenizer is a word-level
tokenizer over exactly these words (see :mod:`sparkkv.testbed.tokenizer`), so every generated prompt
tokenizes without unknown tokens and one word is one token.

Three disjoint groups matter for retrieval:

* ``NUMBERS``: the values (``"100"`` ... ``"999"``), each a single token. Only needles and
  dictionary entries contain numbers; the haystack never does.
* ``NAMES``: pronounceable made-up words (``"bakor"``, ``"tilun"``, ...) used as keys and variable
  names, each a single token. They never occur in the haystack either.
* the grammar words, used by the haystack sentences and by the fixed question templates.

Changing any list changes the token ids of the shipped tokenizer and model: treat them as frozen.
"""

from __future__ import annotations

from itertools import product

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS

PUNCTUATION = (".", ",", "?", ":", "=")

# Sentence starters (capitalised) and determiners.
STARTERS = ("The", "A", "Every", "One", "Some", "That", "This", "Each", "No", "Another")
DETERMINERS = ("the", "a", "every", "one", "some", "that", "this", "each", "another", "my", "our", "his", "her")

ADJECTIVES = (
    "big", "small", "old", "young", "red", "blue", "green", "quiet", "loud", "happy", "tired", "bright",
    "dark", "warm", "cold", "tall", "short", "gentle", "busy", "lazy", "clever", "brave", "shy", "proud",
    "strange", "careful", "heavy", "light", "soft", "rough", "wooden", "silver", "golden", "ancient",
    "modern", "narrow", "wide", "calm", "wild", "friendly",
)

# Concrete nouns: haystack subjects/objects and the word pool of the common_words task.
NOUNS = (
    "cat", "dog", "bird", "horse", "farmer", "teacher", "doctor", "child", "girl", "boy", "baker",
    "sailor", "painter", "king", "queen", "fox", "rabbit", "student", "driver", "singer", "writer",
    "merchant", "soldier", "monk", "miner", "hunter", "cook", "nurse", "pilot", "judge", "apple",
    "bread", "book", "letter", "lamp", "chair", "table", "window", "door", "basket", "bottle", "coin",
    "ring", "hat", "coat", "boot", "rope", "stone", "shell", "flower", "tree", "leaf", "seed", "candle",
    "map", "key", "clock", "mirror", "cup", "plate", "knife", "spoon", "bell", "drum", "flute", "kite",
    "wagon", "boat", "ship", "train", "bicycle", "blanket", "pillow", "ladder", "hammer", "brush",
    "bucket", "feather", "ribbon", "carpet", "fence", "bridge", "tower", "cloud", "storm", "river",
    "mountain", "island", "forest", "meadow", "lantern", "compass", "anchor", "barrel", "cart", "shovel",
    "violin", "pencil", "paper", "jar", "nest", "owl", "wolf", "bear", "goat", "sheep", "cow", "duck",
    "frog", "mouse", "tiger", "lion", "camel", "whale", "crab", "turtle", "garden", "castle", "village",
)

PLACES = (
    "garden", "kitchen", "market", "village", "forest", "river", "harbor", "valley", "square", "library",
    "station", "school", "church", "meadow", "castle", "bakery", "workshop", "barn", "cellar", "hall",
    "park", "beach", "hill", "field", "road", "bridge", "tower", "cave", "farm", "city",
)

VERBS_TRANSITIVE = (
    "saw", "found", "carried", "painted", "bought", "sold", "lost", "cleaned", "fixed", "opened",
    "closed", "watched", "followed", "liked", "held", "pushed", "pulled", "dropped", "washed", "moved",
    "counted", "hid", "kept", "visited", "helped", "built", "drew", "chased", "called", "touched",
)
VERBS_INTRANSITIVE = (
    "slept", "laughed", "waited", "walked", "sang", "danced", "smiled", "worked", "rested", "ran",
    "jumped", "cried", "played", "listened", "shouted", "wandered", "arrived", "left", "stayed", "swam",
)
ADVERBS = (
    "quickly", "slowly", "quietly", "happily", "carefully", "early", "late", "often", "never", "always",
    "again", "today", "yesterday", "soon", "gladly", "suddenly", "calmly", "loudly", "rarely", "proudly",
)
PREPOSITIONS = ("in", "near", "behind", "under", "beside", "across", "through", "around", "inside", "outside")

# Words of the fixed instruction / question templates (sentence-initial capitalised variants included).
TEMPLATE_WORDS = (
    "There", "is", "a", "pass", "key", "hidden", "in", "the", "text", "below", "Remember", "it",
    "What", "The", "special", "number", "for", "some", "names", "are", "Find", "value", "of", "Here",
    "dictionary", "keys", "and", "values", "var", "Which", "variables", "have", "assigned", "to", "them",
    "Answer", "list", "words", "three", "most", "common", "Read", "following", "carefully", "above",
    "question", "Question", "each", "name", "has", "its", "own", "chain", "assignments", "that",
    "directly", "or", "through", "other", "Count", "how", "often", "word", "appears", "all",
)

NUMBERS = tuple(str(i) for i in range(100, 1000))


def _make_names() -> tuple[str, ...]:
    """1,000 made-up two-syllable names, deterministic and disjoint from every other word list."""
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
    vowels = ("a", "e", "i", "o", "u")
    codas = ("n", "r", "l", "k", "m", "t", "s", "x")
    syllables = [o + v for o, v in product(onsets, vowels)]  # 70 open syllables
    candidates = [a + b + c for a, b, c in product(syllables, syllables, codas)]  # 39,200 words
    # Take an evenly spread, deterministic subset so neighbouring names differ in several letters.
    step = len(candidates) // 1000
    taken = candidates[::step][:1000]
    return tuple(taken)


NAMES = _make_names()


def all_words() -> list[str]:
    """Every token of the vocabulary, special tokens first, without duplicates, in a fixed order."""
    seen: dict[str, None] = {}
    groups = (
        SPECIAL_TOKENS, PUNCTUATION, STARTERS, DETERMINERS, ADJECTIVES, NOUNS, PLACES, VERBS_TRANSITIVE,
        VERBS_INTRANSITIVE, ADVERBS, PREPOSITIONS, TEMPLATE_WORDS, NUMBERS, NAMES,
    )
    for group in groups:
        for word in group:
            seen.setdefault(word, None)
    return list(seen)


def _check_disjoint() -> None:
    """Keys, values and haystack words must not overlap (a name in the haystack would be a distractor)."""
    grammar = set(all_words()) - set(NAMES) - set(NUMBERS)
    assert not grammar & set(NAMES), "a made-up name collides with a grammar word"
    assert not grammar & set(NUMBERS), "a number collides with a grammar word"
    assert len(set(NAMES)) == len(NAMES) == 1000


_check_disjoint()
