"""Word-level tokenizer for the shapes world, wrapped as a transformers fast tokenizer."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
IMAGE_TOKEN = "<image>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [UNK, PAD, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT]

# Message content may be a string or a list of {"type": "image"} / {"type": "text"} items, the
# form LlavaProcessor.apply_chat_template passes; both render to the same token sequence.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|> ' }}{% else %}{{ '<|assistant|> ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + eos_token }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


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


def user_prompt(question: str, with_image: bool, context: str | None = None) -> list[dict]:
    """Chat messages for one question, with the image (VLM) or a text context (LM) before it."""
    content: list[dict] = []
    if with_image:
        content.append({"type": "image"})
    if context:
        content.append({"type": "text", "text": context + " "})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]
