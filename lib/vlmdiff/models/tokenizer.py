"""Word-level tokenizer for the shapes world, wrapped as a transformers fast tokenizer."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmdiff.inputs import ASSISTANT, CHAT_TEMPLATE, USER

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [UNK, PAD, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT]


def build_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level vocabulary on `texts` (+ `extra_words`, always kept)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    extra = " ".join(extra_words)
    tok.train_from_iterator(itertools.chain(texts, [extra]), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, USER, ASSISTANT]})
    fast.chat_template = CHAT_TEMPLATE
    return fast
