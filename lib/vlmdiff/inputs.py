"""Rows to model inputs: the chat template and prompts, corpus and VQA encoding, collation,
prompt spans and row batches.

Every stage that feeds a model (training, caches, splice, the lexical filter, the causal jobs)
encodes its rows here, so each sees exactly the format the models were trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmdiff.logs import Log

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import LlavaProcessor, PreTrainedTokenizerFast


USER, ASSISTANT = "<|user|>", "<|assistant|>"

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


def user_prompt(question: str, with_image: bool, context: str | None = None) -> list[dict]:
    """Chat messages for one question, with the image (VLM) or a text context (LM) before it."""
    content: list[dict] = []
    if with_image:
        content.append({"type": "image"})
    if context:
        content.append({"type": "text", "text": context + " "})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


IGNORE = -100


@dataclass
class Encoded:
    """Token sequences with per-token labels, plus optional images as float16 pixel values and,
    for VQA conversations, the dataset row each answer token answers (-1 elsewhere)."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pixel_values: torch.Tensor | None = None
    answer_rows: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: Sequence[int]) -> Encoded:
        """The sequences `idx` (their images and answer rows with them)."""
        pick = [int(i) for i in idx]
        return Encoded(
            [self.input_ids[i] for i in pick], [self.labels[i] for i in pick],
            None if self.pixel_values is None else self.pixel_values[torch.as_tensor(pick, dtype=torch.long)],
            None if self.answer_rows is None else [self.answer_rows[i] for i in pick],
        )

    def answers_of(self, keep: np.ndarray) -> Encoded:
        """The same sequences with the loss on the answers of the rows where `keep` holds only."""
        if self.answer_rows is None:
            raise ValueError("these sequences do not record which row each answer belongs to")
        keep_t = torch.as_tensor(np.append(np.asarray(keep, dtype=bool), False))  # row -1: no
        labels = [torch.where(keep_t[rows], lab, IGNORE)
                  for lab, rows in zip(self.labels, self.answer_rows, strict=True)]
        return Encoded(self.input_ids, labels, self.pixel_values, self.answer_rows)


def encode_corpus(
    tokenizer: PreTrainedTokenizerFast, corpus: Dataset, max_len: int, loss_on: str = "answers"
) -> Encoded:
    """Each scene as one chat: description + first question, then further question turns.

    `loss_on="answers"` puts the loss on the answers (and their EOS) only: the descriptions are
    random draws, so their tokens teach little beyond the format while diluting the answers'
    gradient; `"all"` puts it on every token.
    """
    if loss_on not in ("answers", "all"):
        raise ValueError(f"lm.train.loss_on must be 'answers' or 'all', got {loss_on!r}")
    assistant = tokenizer.convert_tokens_to_ids(ASSISTANT)
    ids, labels = [], []
    for row in corpus:
        messages: list[dict] = []
        for i, (q, a) in enumerate(zip(row["questions"], row["answers"], strict=True)):
            context = row["description"] if i == 0 else None
            messages += user_prompt(q, with_image=False, context=context)
            messages.append({"role": "assistant", "content": a})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        t = tokenizer(text, add_special_tokens=False).input_ids[:max_len]
        ids.append(torch.tensor(t))
        labels.append(
            torch.tensor(_answer_labels(t, assistant, tokenizer.eos_token_id) if loss_on == "answers" else t)
        )
    return Encoded(ids, labels)


def prompt_texts(
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    with_image: bool,
    contexts: Sequence[str] | None = None,
) -> list[str]:
    """Chat-formatted prompts ending where the assistant's answer starts; `contexts` (e.g. a
    scene's description) go before each question, as in LM pretraining."""
    contexts = contexts if contexts is not None else [None] * len(questions)
    return [
        tokenizer.apply_chat_template(
            user_prompt(q, with_image=with_image, context=c),
            tokenize=False,
            add_generation_prompt=True,
        )
        for q, c in zip(questions, contexts, strict=True)
    ]


def encode_vqa(
    processor: LlavaProcessor, ds: Dataset, chunk: int = 512, log: Log | None = None
) -> Encoded:
    """One conversation per image: the image, then each of its questions as a user turn and
    its answer as an assistant turn (LLaVA's multi-turn format; the LM was pretrained the same
    way on descriptions). The loss falls on the answers and their EOS only.

    Consecutive rows with the same `image_id` form one conversation; without that column each
    row is its own.
    """
    groups = image_groups(ds["image_id"] if "image_id" in ds.column_names else range(len(ds)))
    # read the text columns once: indexing `ds[column]` inside the loop re-reads the column
    questions, answers = list(ds["question"]), list(ds["multiple_choice_answer"])
    parts = []
    for start in range(0, len(groups), chunk):
        part = groups[start : start + chunk]
        parts.append(encode_conversations(
            processor, [ds[a]["image"] for a, _ in part], [questions[a:b] for a, b in part],
            [answers[a:b] for a, b in part], first_rows=[a for a, _ in part],
        ))
        if log:
            log(f"encoded {min(start + chunk, len(groups))}/{len(groups)} conversations")
    return Encoded(
        [t for e in parts for t in e.input_ids], [t for e in parts for t in e.labels],
        torch.cat([e.pixel_values for e in parts]), [t for e in parts for t in e.answer_rows],
    )


def encode_conversations(
    processor: LlavaProcessor,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    first_rows: Sequence[int] | None = None,
) -> Encoded:
    """`encode_vqa` for conversations given directly: image i with the turns `questions[i]` /
    `answers[i]`, whose answers are rows `first_rows[i]`, `first_rows[i] + 1`, ... (by default
    numbered on from 0 across the conversations)."""
    tok = processor.tokenizer
    assistant = tok.convert_tokens_to_ids(ASSISTANT)
    if first_rows is None:
        first_rows = np.cumsum([0, *map(len, questions)])[:-1].tolist()
    texts = [tok.apply_chat_template(conversation_messages(q, a), tokenize=False)
             for q, a in zip(questions, answers, strict=True)]
    batch = processor(text=texts, images=list(images), padding=False)
    ids, labels, rows = [], [], []
    for seq, first in zip(batch["input_ids"], first_rows, strict=True):
        seq_t = torch.as_tensor(seq)
        turn = torch.as_tensor(_answer_turns(seq, assistant, tok.eos_token_id))
        ids.append(seq_t)
        labels.append(torch.where(turn >= 0, seq_t, IGNORE))
        rows.append(torch.where(turn >= 0, turn + first, -1))
    pixels = torch.as_tensor(np.stack(batch["pixel_values"]), dtype=torch.float16)
    return Encoded(ids, labels, pixels, rows)


def _answer_turns(seq: Sequence[int], assistant: int, eos: int) -> list[int]:
    """Which answer (0, 1, ...) each token is part of: the tokens after each assistant tag up
    to and including its EOS; -1 elsewhere."""
    out, turn, inside = [], -1, False
    for prev, tok_id in zip([None, *seq[:-1]], seq, strict=True):
        if prev == assistant:
            inside, turn = True, turn + 1
        out.append(turn if inside else -1)
        if tok_id == eos:
            inside = False
    return out


def _answer_labels(seq: Sequence[int], assistant: int, eos: int) -> list[int]:
    """Token ids after each assistant tag up to and including its EOS; IGNORE elsewhere."""
    return [t if turn >= 0 else IGNORE for t, turn in zip(seq, _answer_turns(seq, assistant, eos), strict=True)]


def image_groups(image_ids: Sequence) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive rows that share an image."""
    bounds, start = [], 0
    ids = list(image_ids)
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            bounds.append((start, i))
            start = i
    return bounds


def conversation_messages(questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """Chat messages of a conversation about one image: the image in the first user turn."""
    messages: list[dict] = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        messages += user_prompt(q, with_image=i == 0)
        messages.append({"role": "assistant", "content": a})
    return messages


def collate(data: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(data.input_ids[i]) for i in idx)
    input_ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(idx), length), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(data.input_ids[i])
        input_ids[row, :n] = data.input_ids[i]
        labels[row, :n] = data.labels[i]
        attention[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if data.pixel_values is not None:
        out["pixel_values"] = data.pixel_values[torch.as_tensor(idx)].float()
    return out


MODES = ("vqa", "text")
TEXT_SOURCES = ("questions", "corpus")

COLUMNS = {
    ("vqa", "questions"): ("question", "image"),
    ("text", "questions"): ("question",),
    ("text", "corpus"): ("description", "questions", "answers"),
}


def encode_rows(
    ds: Dataset,
    lo: int,
    hi: int,
    *,
    mode: str,
    text_source: str = "questions",
    processor: Any = None,
    tokenizer: Any = None,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for rows `[lo, hi)` of `ds`, right-padded, formatted as in training."""
    tok = tokenizer if tokenizer is not None else processor.tokenizer
    ds = ds.select_columns(list(COLUMNS[mode, text_source]))
    if text_source == "corpus":
        enc = encode_corpus(tok, ds.select(range(lo, hi)), max_len)
        batch = collate(enc, range(len(enc)), tok.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows = ds[lo:hi]
    texts = prompt_texts(tok, rows["question"], with_image=mode == "vqa")
    if mode == "vqa":
        batch = processor(
            text=texts,
            images=rows["image"],
            return_tensors="pt",
            padding=True,
            padding_side="right",
        )
        keys = ("input_ids", "attention_mask", "pixel_values")
    else:
        batch = tok(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        )
        keys = ("input_ids", "attention_mask")
    return {key: batch[key] for key in keys}


def prompt_span(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """`[batch, seq]` mask of real tokens after each row's last image token (right padding)."""
    is_image = input_ids == image_token_id
    position = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_image = torch.where(is_image, position, torch.full_like(position, -1)).amax(dim=1)
    return attention_mask.bool() & ~is_image & (position > last_image[:, None])


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def row_batches(ds: Dataset, rows: Sequence[int], batch_size: int, model: torch.nn.Module,
                processor: Any, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs for `ds`'s `rows` (VQA prompts with their images), `batch_size` at a time."""
    sub = ds.select([int(r) for r in rows])
    for lo in range(0, len(sub), batch_size):
        hi = min(lo + batch_size, len(sub))
        yield to_device(encode_rows(sub, lo, hi, mode="vqa", processor=processor), device, model.dtype)


def eval_texts(tok, rows: Mapping[str, list]) -> tuple[list[str], list[str]]:
    prompts = prompt_texts(tok, rows["question"], with_image=True)
    answers = [" " + a + " " + tok.eos_token for a in rows["multiple_choice_answer"]]
    return prompts, answers


def encode_eval_batch(processor, rows: Mapping[str, list]) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS for each row, teacher-forced; right padded."""
    tok = processor.tokenizer
    prompts, answers = eval_texts(tok, rows)
    tok.padding_side = "right"
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    return dict(processor(text=texts, images=rows["image"], return_tensors="pt", padding=True))
