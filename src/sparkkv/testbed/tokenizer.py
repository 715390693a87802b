"""Word-level tokenizer over the closed testbed vocabulary.

One whitespace-separated word is one token (WordLevel model + WhitespaceSplit pre-tokenizer), the
tokenizer prepends ``<bos>`` to every sequence, and decoding joins tokens with single spaces, so for
every generated prompt ``tokenizer.decode(tokenizer(prompt).input_ids, skip_special_tokens=True) ==
prompt``. The shipped copy lives in ``testbed/model/`` next to the weights; this module rebuilds it
(``python -m sparkkv.testbed.train`` writes it).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import vocab
from .tasks import MAX_CONTEXT_TOKENS


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the testbed tokenizer (deterministic: ids follow :func:`vocab.all_words`)."""
    words = vocab.all_words()
    ids = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=vocab.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{vocab.BOS} $A",
        pair=f"{vocab.BOS} $A $B",
        special_tokens=[(vocab.BOS, ids[vocab.BOS])],
    )
    tok.add_special_tokens(list(vocab.SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=vocab.BOS,
        eos_token=vocab.EOS,
        pad_token=vocab.PAD,
        unk_token=vocab.UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_CONTEXT_TOKENS,
    )
