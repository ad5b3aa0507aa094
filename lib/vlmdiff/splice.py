"""Splice evaluation: the VLM's next-token loss when an SAE's reconstruction replaces a layer.

Reported as SAELens does: CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where
CE_zero zero-ablates the layer's output, and the KL divergence from the clean next-token
distribution. Loss and KL are taken at positions whose target is a text token (the question and
answer of a held-out VQA prompt), so image positions never count as predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset

from vlmdiff.models import language_layers
from vlmdiff.sae import TopKSAE
from vlmdiff.training import prompt_texts

Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def replace_layer_output(model: torch.nn.Module, layer: int, fn: Replace):
    """Replace decoder block `layer`'s hidden-state output by fn(output) while in the block."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = language_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replacement(sae: TopKSAE, span: torch.Tensor | None) -> Replace:
    """Reconstruct through the SAE, at every token or only where `span` [batch, seq] is True."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        recon = sae(h.reshape(-1, h.shape[-1]).to(sae.W_enc.dtype)).sae_out.reshape(h.shape)
        recon = recon.to(h.dtype)
        return recon if span is None else torch.where(span[..., None], recon, h)

    return fn


def encode_eval_batch(processor, rows: Mapping[str, list]) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS for each row, teacher-forced; right padded."""
    tok = processor.tokenizer
    texts = [
        p + " " + a + " " + tok.eos_token
        for p, a in zip(
            prompt_texts(tok, rows["question"], with_image=True),
            rows["multiple_choice_answer"],
            strict=True,
        )
    ]
    tok.padding_side = "right"
    return dict(processor(text=texts, images=rows["image"], return_tensors="pt", padding=True))


def _targets(batch: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """Mask [batch, seq-1]: position t counts when token t+1 is a real, non-image token."""
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    nxt = ids[:, 1:]
    return attn[:, 1:] & (nxt != image_token_id)


@torch.no_grad()
def splice_metrics(
    model: torch.nn.Module,
    processor,
    ds: Dataset,
    saes: Mapping[int, TopKSAE],
    span_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    device: torch.device,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Per layer: CE clean / zero-ablated / spliced, CE loss recovered, and KL(clean || spliced).

    `span_of(input_ids, attention_mask)` picks the tokens whose output is replaced (None = all).
    """
    image_id = model.config.image_token_id
    sums: dict[tuple[int, str], float] = {}
    n_tokens = 0
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        batch = {k: v.to(device) for k, v in encode_eval_batch(processor, rows).items()}
        mask = _targets(batch, image_id)
        labels = batch["input_ids"][:, 1:]
        n_tokens += int(mask.sum())
        clean = model(**batch).logits[:, :-1].float()
        clean_logp = clean.log_softmax(-1)
        _add(sums, (-1, "clean"), _ce(clean, labels, mask))
        span = span_of(batch["input_ids"], batch["attention_mask"])
        for layer, sae in saes.items():
            with replace_layer_output(model, layer, torch.zeros_like):
                zero = model(**batch).logits[:, :-1].float()
            with replace_layer_output(model, layer, sae_replacement(sae, span)):
                spliced = model(**batch).logits[:, :-1].float()
            _add(sums, (layer, "zero"), _ce(zero, labels, mask))
            _add(sums, (layer, "sae"), _ce(spliced, labels, mask))
            kl = F.kl_div(spliced.log_softmax(-1), clean_logp, log_target=True, reduction="none")
            _add(sums, (layer, "kl"), float(kl.sum(-1)[mask].sum()))
        log(f"splice eval: {min(start + batch_size, len(ds))}/{len(ds)} samples")
    ce_clean = sums[(-1, "clean")] / n_tokens
    rows_out = []
    for layer in saes:
        ce_zero = sums[(layer, "zero")] / n_tokens
        ce_sae = sums[(layer, "sae")] / n_tokens
        rows_out.append(
            {
                "layer": layer,
                "ce_clean": ce_clean,
                "ce_zero_ablation": ce_zero,
                "ce_spliced": ce_sae,
                "ce_loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
                "kl": sums[(layer, "kl")] / n_tokens,
                "n_tokens": n_tokens,
            }
        )
    return pd.DataFrame(rows_out)


def _ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return float(ce[mask].sum())


def _add(sums: dict, key: tuple[int, str], value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def regime_span(
    regime: str, image_token_id: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Tokens whose layer output the SAE replaces: its regime's span (random/full: every token).

    BOS (position 0; batches are right padded) is never replaced: caches drop it, so no SAE was
    trained on its outsized norm.
    """

    def span(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == image_token_id
        real = attention_mask.bool().clone()
        real[:, 0] = False
        if regime == "image":
            return is_image & real
        if regime == "text":
            return ~is_image & real
        return real

    return span


def splice_job(
    vlm_dir: str,
    val_path: str,
    sae_dirs: Mapping[int, str],
    regime: str,
    *,
    samples: int,
    batch_size: int,
    seed: int,
    device: str,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Load the VLM, a held-out sample of `val` and the regime's SAEs; return splice metrics."""
    from vlmdiff.data import load_split
    from vlmdiff.models import load_vlm, resolve_device

    dev = resolve_device(device)
    model, processor = load_vlm(vlm_dir, dev)
    val = load_split(val_path)
    val = val.shuffle(seed=seed).select(range(min(samples, len(val))))
    saes = {layer: TopKSAE.load(path, device=dev) for layer, path in sae_dirs.items()}
    table = splice_metrics(
        model, processor, val, saes, regime_span(regime, model.config.image_token_id), dev,
        batch_size, log,
    )
    return table.assign(regime=regime)
