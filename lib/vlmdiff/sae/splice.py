"""Splice evaluation: the VLM's next-token loss when an SAE's reconstruction replaces a layer.

Reported as SAELens does: CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where
CE_zero zero-ablates the layer's output, and the KL divergence from the clean next-token
distribution, on held-out VQA prompts with their answers. Loss and KL are taken where the
model predicts the answer and its end (`targets="answer"`, the tokens a LLaVA-style VLM is
trained on) or every text token of prompt and answer (`"text"`); image positions never count.
A VLM trained on answers only need not predict its questions' words at all: the toy default's
clean CE on them is above that of a uniform guess, which makes "loss recovered" meaningless.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset

from vlmdiff.files import write_table
from vlmdiff.hooks import Replace, replace_layer_output, sae_replacement
from vlmdiff.inputs import encode_eval_batch, eval_texts
from vlmdiff.sae.topk import TopKSAE

TARGETS: tuple[str, ...] = ("answer", "text")


def answer_lengths(processor, rows: Mapping[str, list]) -> list[int]:
    """Tokens of each row's answer and EOS: the full text's tokens after the longest prefix it
    shares with its prompt's (a token merged across the boundary counts as answer). The image
    placeholder expands alike in both, so text-only tokenization counts the same."""
    tok = processor.tokenizer
    prompts, answers = eval_texts(tok, rows)
    out = []
    for p, a in zip(prompts, answers, strict=True):
        full = tok(p + a, add_special_tokens=False).input_ids
        prompt = tok(p, add_special_tokens=False).input_ids
        shared = next((i for i, (x, y) in enumerate(zip(full, prompt, strict=False))
                       if x != y),
                      min(len(full), len(prompt)))
        out.append(len(full) - shared)
    return out


def _targets(
    batch: Mapping[str, torch.Tensor], image_token_id: int, answer_len: Sequence[int] | None = None
) -> torch.Tensor:
    """Mask [batch, seq-1]: position t counts when token t+1 is a real, non-image token, and
    with `answer_len` (per row) one of the row's last `answer_len` real tokens."""
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    mask = attn[:, 1:] & (ids[:, 1:] != image_token_id)
    if answer_len is None:
        return mask
    length = attn.sum(1, keepdim=True)  # right padded: real tokens are [0, length)
    first = length - torch.as_tensor(list(answer_len), device=ids.device)[:, None]
    nxt = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    return mask & (nxt >= first)


def loss_recovered(ce_zero: float, ce_spliced: float, ce_clean: float) -> float:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean); NaN when zero ablation is no worse than
    the clean model, where the ratio measures nothing."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if gap > 0 else float("nan")


@torch.no_grad()
def _loss_sums(
    model: torch.nn.Module,
    processor,
    ds: Dataset,
    runs: Callable[[dict[str, torch.Tensor]], Mapping[tuple[int, str], Replace]],
    device: torch.device,
    batch_size: int,
    log: Callable[[str], None],
    what: str,
    targets: str = "answer",
) -> tuple[dict[tuple[int, str], float], int]:
    """Summed CE of the clean run (key (-1, "clean")) and of each run `runs(batch)` names as
    (layer, kind) -> replacement of that layer's output, plus KL(clean || run) as (layer,
    kind + "_kl"), over the `targets` positions of every batch; and the number of those."""
    if targets not in TARGETS:
        raise ValueError(f"sae.splice.targets must be one of {list(TARGETS)}, got {targets!r}")
    image_id = model.config.image_token_id
    sums: dict[tuple[int, str], float] = {}
    n_tokens = 0
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        batch = {k: v.to(device) for k, v in encode_eval_batch(processor, rows).items()}
        lengths = answer_lengths(processor, rows) if targets == "answer" else None
        mask = _targets(batch, image_id, lengths)
        labels = batch["input_ids"][:, 1:]
        n_tokens += int(mask.sum())
        clean = model(**batch).logits[:, :-1].float()
        clean_logp = clean.log_softmax(-1)
        _add(sums, (-1, "clean"), _ce(clean, labels, mask))
        for (layer, kind), fn in runs(batch).items():
            with replace_layer_output(model, layer, fn):
                out = model(**batch).logits[:, :-1].float()
            _add(sums, (layer, kind), _ce(out, labels, mask))
            kl = F.kl_div(out.log_softmax(-1), clean_logp, log_target=True, reduction="none")
            _add(sums, (layer, f"{kind}_kl"), float(kl.sum(-1)[mask].sum()))
        log(f"{what}: {min(start + batch_size, len(ds))}/{len(ds)} samples")
    return sums, n_tokens


def zero_ablation_metrics(
    model: torch.nn.Module,
    processor,
    ds: Dataset,
    layers: Sequence[int],
    device: torch.device,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    targets: str = "answer",
) -> pd.DataFrame:
    """Per layer: CE clean and with the layer's output zero-ablated, the two ends of CE loss
    recovered. They do not depend on the SAE, so one table serves every regime."""
    sums, n_tokens = _loss_sums(
        model, processor, ds, lambda batch: {(layer, "zero"): torch.zeros_like for layer in layers},
        device, batch_size, log, "splice baseline", targets,
    )
    return pd.DataFrame(
        [
            {"layer": layer, "ce_clean": sums[(-1, "clean")] / n_tokens,
             "ce_zero_ablation": sums[(layer, "zero")] / n_tokens, "n_tokens": n_tokens}
            for layer in layers
        ]
    )


def splice_metrics(
    model: torch.nn.Module,
    processor,
    ds: Dataset,
    saes: Mapping[int, TopKSAE],
    span_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    device: torch.device,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    baseline: pd.DataFrame | None = None,
    targets: str = "answer",
) -> pd.DataFrame:
    """Per layer: CE clean / zero-ablated / spliced, CE loss recovered, and KL(clean || spliced).

    `span_of(input_ids, attention_mask)` picks the tokens whose output is replaced (None = all).
    `baseline` (`zero_ablation_metrics` on the same samples) saves the zero-ablated runs; it
    must cover every layer of `saes` and agree on the clean loss.
    """

    def runs(batch: dict[str, torch.Tensor]) -> dict[tuple[int, str], Replace]:
        span = span_of(batch["input_ids"], batch["attention_mask"])
        out: dict[tuple[int, str], Replace] = {}
        for layer, sae in saes.items():
            if baseline is None:
                out[(layer, "zero")] = torch.zeros_like
            out[(layer, "sae")] = sae_replacement(sae, span)
        return out

    sums, n_tokens = _loss_sums(
        model, processor, ds, runs, device, batch_size, log, "splice eval", targets
    )
    ce_clean = sums[(-1, "clean")] / n_tokens
    if baseline is None:
        ce_zero = {layer: sums[(layer, "zero")] / n_tokens for layer in saes}
    else:
        ce_zero = _baseline_zero(baseline, list(saes), ce_clean, n_tokens)
    rows_out = []
    for layer in saes:
        ce_sae = sums[(layer, "sae")] / n_tokens
        rows_out.append(
            {
                "layer": layer,
                "ce_clean": ce_clean,
                "ce_zero_ablation": ce_zero[layer],
                "ce_spliced": ce_sae,
                "ce_loss_recovered": loss_recovered(ce_zero[layer], ce_sae, ce_clean),
                "kl": sums[(layer, "sae_kl")] / n_tokens,
                "n_tokens": n_tokens,
            }
        )
    table = pd.DataFrame(rows_out)
    if table["ce_loss_recovered"].isna().any():
        log(f"splice eval: zero ablation is no worse than the clean model ({targets} targets: "
            f"clean CE {ce_clean:.3f}); CE loss recovered is left empty, see ce_spliced and kl")
    return table


def _baseline_zero(
    baseline: pd.DataFrame, layers: Sequence[int], ce_clean: float, n_tokens: int
) -> dict[int, float]:
    """The baseline's zero-ablated CE per layer, after checking it was measured on these samples."""
    missing = sorted(set(layers) - set(baseline["layer"]))
    if missing:
        raise ValueError(f"splice baseline has no zero-ablation row for layer(s) {missing}")
    same = (baseline["n_tokens"] == n_tokens).all() and np.allclose(
        baseline["ce_clean"], ce_clean, rtol=1e-4, atol=1e-6
    )
    if not same:
        raise ValueError(
            f"splice baseline was measured on other samples or another model: clean CE "
            f"{baseline['ce_clean'].iloc[0]:.6f} on {baseline['n_tokens'].iloc[0]} tokens, "
            f"here {ce_clean:.6f} on {n_tokens}"
        )
    return dict(zip(baseline["layer"], baseline["ce_zero_ablation"], strict=True))


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


def _load_eval(vlm_dir: str, val_path: str, samples: int, seed: int, device: str):
    """The VLM on its device and the held-out sample of `val` every splice job scores."""
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.world.layouts import load_split

    dev = resolve_device(device)
    model, processor = load_vlm(vlm_dir, dev)
    val = load_split(val_path)
    return model, processor, val.shuffle(seed=seed).select(range(min(samples, len(val)))), dev


def splice_baseline_job(
    *,
    vlm_dir: str,
    val_path: str,
    layers: Sequence[int],
    samples: int,
    batch_size: int,
    seed: int,
    device: str,
    targets: str = "answer",
    out: Mapping[str, str],
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The `splice_baseline` rule: `zero_ablation_metrics` on the splice sample of `val`, once
    for all regimes, to `out["table"]`."""
    model, processor, val, dev = _load_eval(vlm_dir, val_path, samples, seed, device)
    table = zero_ablation_metrics(model, processor, val, layers, dev, batch_size, log, targets)
    write_table(table, out["table"])
    return table


def splice_eval_job(
    *,
    vlm_dir: str,
    val_path: str,
    sae_dirs: Mapping[int, str],
    regime: str,
    samples: int,
    batch_size: int,
    seed: int,
    device: str,
    baseline_path: str | None = None,
    targets: str = "answer",
    out: Mapping[str, str],
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The `splice_eval` rule: the VLM, a held-out sample of `val` and the regime's SAEs;
    splice metrics (the zero-ablated losses from `baseline_path`, a `splice_baseline_job`
    table, when given) to `out["table"]`."""
    model, processor, val, dev = _load_eval(vlm_dir, val_path, samples, seed, device)
    saes = {layer: TopKSAE.load(path, device=dev) for layer, path in sae_dirs.items()}
    baseline = None if baseline_path is None else pd.read_csv(baseline_path)
    table = splice_metrics(
        model, processor, val, saes, regime_span(regime, model.config.image_token_id), dev,
        batch_size, log, baseline, targets,
    )
    table = table.assign(regime=regime)
    write_table(table, out["table"])
    return table
