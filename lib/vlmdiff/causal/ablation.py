"""Feature ablation and steering: is a spatial feature causally used? (paper 5.3, App. D)

Ablation projects the feature's unit decoder direction v out of the output of decoder block L,
`y ← y − (yᵀv) v`, at text positions only (every real token that is not an image token: BOS,
chat markers, question, answer position); image positions stay untouched. Steering adds `α v`
at the same positions instead. Both go through `vlmdiff.hooks.replace_layer_output`.

Evaluation. VSR captions become yes/no questions (by default the world's own form: "The red
circle is left of the blue square." -> "is the red circle left of the blue square?"); the
answer is correct when the logit of the label's word ("yes"/"no") beats the other's at the
answer position (a two-way choice, as VSR is scored), and the probability of the correct
answer is its softmax probability over the whole vocabulary. General VQA: the yes/no questions
of D_base, scored the same way. Each feature is evaluated on a relation-specific VSR subset:
every VSR row whose relation is among those that dominate its top-activating VSR samples.
Seeds vary the control features (random features of the same layer, alive on D_base) and the
subsets (a `subset_fraction` sample of the relation subset and a `vqa_samples` sample of VQA).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vlmdiff.causal.context import CausalContext, feature_label
from vlmdiff.causal.tables import RUN_COLUMNS, write_ablation_tables
from vlmdiff.files import write_netcdf
from vlmdiff.hooks import Replace, replace_layer_output
from vlmdiff.inputs import prompt_span, row_batches
from vlmdiff.logs import Log, progress_line

if TYPE_CHECKING:
    from datasets import Dataset


POSITIONS = ("text", "prompt")
_CAPTION = re.compile(r"^\s*the\s+(.+?)\s+is\s+(.+?)\s*\.?\s*$", re.IGNORECASE)


# ------------------------------------------------------------------------- interventions


def edit_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, positions: str
) -> torch.Tensor:
    """`[batch, seq]` mask of the edited tokens: `text` = every real non-image token, `prompt`
    = the text tokens after the image span."""
    if positions == "text":
        return attention_mask.bool() & (input_ids != image_token_id)
    if positions == "prompt":
        return prompt_span(input_ids, attention_mask, image_token_id)
    raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def project_out(direction: torch.Tensor, span: torch.Tensor) -> Replace:
    """`y ← y − (yᵀv) v` at the `span` positions, with v = `direction` normalised."""
    v = direction / direction.norm()

    def fn(h: torch.Tensor) -> torch.Tensor:
        vv = v.to(h)
        return h - (span[..., None].to(h) * (h @ vv)[..., None]) * vv

    return fn


def add_direction(direction: torch.Tensor, alpha: float, span: torch.Tensor) -> Replace:
    """`y ← y + α v` at the `span` positions, with v = `direction` normalised."""
    v = direction / direction.norm()

    def fn(h: torch.Tensor) -> torch.Tensor:
        return h + alpha * span[..., None].to(h) * v.to(h)

    return fn


Edit = Callable[[torch.Tensor], Replace]  # edited-positions mask -> replacement


def ablation(direction: torch.Tensor) -> Edit:
    return lambda span: project_out(direction, span)


# ------------------------------------------------------------------------- questions, scoring


def caption_question(caption: str, template: str = "{question}") -> str:
    """A VSR caption as a yes/no question. `template` may use `{question}` (the caption turned
    around: "The X is REL the Y." -> "is the X REL the Y?") and `{caption}`."""
    m = _CAPTION.match(caption)
    question = f"is the {m.group(1)} {m.group(2)}?" if m else f"{caption.rstrip('.')}?"
    return template.format(question=question, caption=caption)


@torch.no_grad()
def yes_no_scores(
    model: torch.nn.Module,
    processor: Any,
    ds: Dataset,
    rows: Sequence[int],
    answers: Sequence[str],
    *,
    layer: int = 0,
    edit: Edit | None = None,
    positions: str = "text",
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """For `rows` of `ds` (`question`, `image`) with correct answers `answers` ("yes"/"no"):
    whether the model picks the right one of the two, and its probability of the right one."""
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    correct = torch.tensor([yes if a == "yes" else no for a in answers], device=device)
    other = torch.tensor([no if a == "yes" else yes for a in answers], device=device)
    right, prob = [], []
    lo = 0
    image_id = model.config.image_token_id
    for inputs in row_batches(ds, rows, batch_size, model, processor, device):
        n = inputs["input_ids"].shape[0]
        fn = None
        if edit is not None:
            fn = edit(edit_positions(inputs["input_ids"], inputs["attention_mask"], image_id,
                                     positions))
        if fn is None:
            logits = model(**inputs, use_cache=False).logits
        else:
            with replace_layer_output(model, layer, fn):
                logits = model(**inputs, use_cache=False).logits
        last = inputs["attention_mask"].sum(1) - 1
        final = logits[torch.arange(n, device=device), last].float()
        c, o = correct[lo : lo + n], other[lo : lo + n]
        idx = torch.arange(n, device=device)
        right.append((final[idx, c] > final[idx, o]).cpu().numpy())
        prob.append(final.softmax(-1)[idx, c].cpu().numpy())
        lo += n
    if not right:
        return np.zeros(0, bool), np.zeros(0)
    return np.concatenate(right), np.concatenate(prob)


def vsr_split(vsr_path: str | Path, template: str) -> tuple[Dataset, list[str]]:
    """The VSR set with a `question` column made from its captions, and the right answers."""
    from vlmdiff.world.layouts import load_split

    vsr = load_split(vsr_path)
    questions = [caption_question(c, template) for c in vsr["caption"]]
    vsr = vsr.add_column("question", questions)
    return vsr, ["yes" if int(label) else "no" for label in vsr["label"]]


def relation_subset(
    relations: np.ndarray, top_rows: np.ndarray, min_share: float
) -> tuple[list[str], np.ndarray]:
    """The relations holding at least `min_share` of a feature's top VSR rows (always the most
    common one) and every VSR row with one of them."""
    if not len(top_rows):
        return [], np.zeros(0, np.int64)
    counts = pd.Series(relations[top_rows]).value_counts()
    shares = counts / counts.sum()
    chosen = [str(r) for r, s in shares.items() if s >= min_share] or [str(counts.index[0])]
    return chosen, np.flatnonzero(np.isin(relations, chosen))


# ------------------------------------------------------------------------- workflow jobs


def vsr_activations_job(
    *,
    vlm_dir: str | Path,
    vsr_path: str | Path,
    selected_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    contrast: str,
    max_features: int,
    template: str,
    batch_size: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> xr.DataArray:
    """The `vsr_activations` rule: `max_t h_f` over each VSR row's prompt tokens,
    `[feature, row]`, to `out["acts"]`. The caches hold no VSR, so the feature's SAE encodes
    the hooked block output here."""
    from vlmdiff.causal.context import feature_coords
    from vlmdiff.features.lexical import sample_maxima, unknown_words

    ctx = CausalContext(vlm_dir, selected_path, sae_dirs, contrast=contrast,
                        max_features=max_features, device=device, log=log)
    vsr, _ = vsr_split(vsr_path, template)
    for prompt, words in list(unknown_words(ctx.processor.tokenizer, vsr["question"]).items())[:5]:
        log(f"warning: VSR question {prompt!r}: {words} are not in the vocabulary")
    keys = ctx.keys()
    acts = np.zeros((len(keys), len(vsr)), np.float32)
    if keys:
        features: dict[int, list[int]] = {}
        for layer, f in keys:
            features.setdefault(layer, []).append(f)
        best = sample_maxima(ctx.model, ctx.processor, vsr.select_columns(["question", "image"]),
                             features, ctx.saes, batch_size=batch_size, device=ctx.device)
        for i, (layer, f) in enumerate(keys):
            acts[i] = best[layer][:, features[layer].index(f)]
        log(f"VSR activations of {len(keys)} feature(s) on {len(vsr)} rows; "
            f"rows firing per feature: {(acts > 0).sum(1).tolist()}")
    result = xr.DataArray(
        acts,
        dims=("feature", "row"),
        coords={**feature_coords(ctx), "row": np.arange(len(vsr))},
        name="vsr_max_activation",
        attrs={"template": template},
    )
    write_netcdf(result, out["acts"])
    return result


def top_vsr_rows(acts: xr.DataArray, feature: str, n: int) -> np.ndarray:
    """The feature's `n` top-activating VSR rows among those where it fires."""
    a = acts.sel(feature=feature).values
    order = np.argsort(-a, kind="stable")
    return order[a[order] > 0][:n]


def control_pool(features_path: str | Path, layer: int, exclude: Sequence[int]) -> np.ndarray:
    """Features of `layer` alive on D_base (`p_val > 0`), the feature itself excluded; all of
    the layer's features if none is alive."""
    table = pd.read_parquet(features_path, columns=["layer", "feature", "p_val"])
    table = table[(table["layer"] == layer) & ~table["feature"].isin(list(exclude))]
    alive = table[table["p_val"] > 0]
    return (alive if len(alive) else table)["feature"].to_numpy()


class _Evaluator:
    """Clean scores cached per row; edited scores computed on the rows asked."""

    def __init__(self, ctx: CausalContext, ds: Dataset, answers: Sequence[str], *,
                 positions: str, batch_size: int) -> None:
        self.ctx, self.ds, self.answers = ctx, ds, list(answers)
        self.positions, self.batch_size = positions, batch_size
        self._clean: dict[int, tuple[bool, float]] = {}

    def __call__(self, rows: np.ndarray, layer: int = 0, edit: Edit | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        if edit is None:
            todo = [int(r) for r in rows if int(r) not in self._clean]
            if todo:
                right, prob = self._score(todo, 0, None)
                self._clean.update(zip(todo, zip(right, prob, strict=True), strict=True))
            pairs = [self._clean[int(r)] for r in rows]
            return np.array([p[0] for p in pairs], bool), np.array([p[1] for p in pairs])
        return self._score(rows.tolist(), layer, edit)

    def _score(self, rows: Sequence[int], layer: int, edit: Edit | None):
        return yes_no_scores(
            self.ctx.model, self.ctx.processor, self.ds, rows,
            [self.answers[r] for r in rows], layer=layer, edit=edit,
            positions=self.positions, batch_size=self.batch_size, device=self.ctx.device,
        )


def vqa_yes_no(val_path: str | Path) -> tuple[Dataset, np.ndarray, list[str]]:
    """D_base, the rows of its yes/no questions, and every row's answer."""
    from vlmdiff.world.layouts import load_split

    val = load_split(val_path)
    answers = [a.lower() for a in val["multiple_choice_answer"]]
    rows = np.flatnonzero([a in ("yes", "no") for a in answers])
    return val, rows, answers


@dataclass(frozen=True)
class EvalInputs:
    """The files the ablation and steering jobs read (`sae_dirs`: layer -> SAE folder)."""

    vlm_dir: str | Path
    vsr_path: str | Path
    val_path: str | Path
    selected_path: str | Path
    features_path: str | Path
    sae_dirs: Mapping[int, str | Path]
    vsr_acts_path: str | Path


@dataclass(frozen=True)
class EvalSettings:
    """Which features, how VSR is asked, where the edit goes (the `causal.ablation` keys)."""

    contrast: str
    max_features: int
    template: str
    top_vsr: int
    min_relation_share: float
    positions: str
    batch_size: int
    device: str


def eval_setup(
    inputs: Mapping[str, Any], params: Mapping[str, Any]
) -> tuple[EvalInputs, EvalSettings]:
    """`EvalInputs` and `EvalSettings` from the named inputs and params that the ablation and
    steering rules share, as plain mappings (a script passes `dict(snakemake.input.items())`)."""
    a = params["ablation"]
    files = EvalInputs(
        vlm_dir=inputs["vlm"],
        vsr_path=inputs["vsr"],
        val_path=inputs["val"],
        selected_path=inputs["selected"],
        features_path=inputs["features"],
        sae_dirs=dict(zip(params["layers"], list(inputs["saes"]), strict=True)),
        vsr_acts_path=inputs["acts"],
    )
    settings = EvalSettings(
        contrast=params["contrast"],
        max_features=params["max_features"],
        template=params["template"],
        top_vsr=a["top_vsr"],
        min_relation_share=a["min_relation_share"],
        positions=a["positions"],
        batch_size=a["batch_size"],
        device=params["device"],
    )
    return files, settings


class _EvalSetup:
    """The VLM and features, VSR as questions, D_base's yes/no pool, the VSR activations."""

    def __init__(self, inputs: EvalInputs, cfg: EvalSettings, log: Log) -> None:
        self.cfg = cfg
        self.ctx = CausalContext(inputs.vlm_dir, inputs.selected_path,
                                 {int(k): v for k, v in inputs.sae_dirs.items()},
                                 contrast=cfg.contrast, max_features=cfg.max_features,
                                 device=cfg.device, log=log)
        self.vsr, self.vsr_answers = vsr_split(inputs.vsr_path, cfg.template)
        self.val, self.vqa_pool, self.vqa_answers = vqa_yes_no(inputs.val_path)
        self.relations = np.asarray(self.vsr["relation"])
        self.acts = xr.load_dataarray(inputs.vsr_acts_path)
        self.features_path = inputs.features_path
        log(f"VSR: {len(self.vsr)} rows; VQA yes/no pool: {len(self.vqa_pool)} of "
            f"{len(self.val)} D_base rows")

    def subset(self, label: str) -> tuple[list[str], np.ndarray]:
        """The feature's relations and its relation-specific VSR rows."""
        top = top_vsr_rows(self.acts, label, self.cfg.top_vsr)
        return relation_subset(self.relations, top, self.cfg.min_relation_share)

    def evaluator(self, on: str) -> _Evaluator:
        ds, answers = (self.vsr, self.vsr_answers) if on == "vsr" else (self.val,
                                                                         self.vqa_answers)
        return _Evaluator(self.ctx, ds, answers, positions=self.cfg.positions,
                          batch_size=self.cfg.batch_size)


def ablation_job(
    *,
    inputs: EvalInputs,
    settings: EvalSettings,
    vqa_samples: int,
    subset_fraction: float,
    n_controls: int,
    seeds: Sequence[int],
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `ablation` rule. One row per (feature, seed): accuracy and probability with and
    without the ablation on the relation-specific VSR subset and on VQA yes/no, and the same
    for random controls; the runs and tables 1 and 2 to `out` (`write_ablation_tables`)."""
    setup = _EvalSetup(inputs, settings, log)
    ctx, vqa_pool = setup.ctx, setup.vqa_pool
    eval_vsr, eval_vqa = setup.evaluator("vsr"), setup.evaluator("vqa")
    rows_out = []
    start = time.perf_counter()
    odds = dict(zip(ctx.labels(), ctx.features.get("odds_ratio", pd.Series(
        [np.nan] * len(ctx.features))).to_numpy(), strict=True))
    for i, (layer, f) in enumerate(ctx.keys()):
        label = feature_label(layer, f)
        rels, subset = setup.subset(label)
        pool = control_pool(inputs.features_path, layer, [f])
        if not len(subset):
            log(f"warning: {label} fires on no VSR row; no relation subset, skipped")
            continue
        edit = ablation(ctx.directions[(layer, f)])
        for seed in seeds:
            rng = np.random.default_rng([seed, layer, f])
            n_vsr = max(1, math.ceil(subset_fraction * len(subset)))
            vsr_rows = np.sort(rng.choice(subset, size=n_vsr, replace=False))
            vqa_rows = np.sort(rng.choice(vqa_pool, size=min(vqa_samples, len(vqa_pool)),
                                          replace=False))
            controls = rng.choice(pool, size=min(n_controls, len(pool)), replace=False)
            base_vsr, base_p = eval_vsr(vsr_rows)
            base_vqa, _ = eval_vqa(vqa_rows)
            abl_vsr, abl_p = eval_vsr(vsr_rows, layer, edit)
            abl_vqa, _ = eval_vqa(vqa_rows, layer, edit)
            ctrl_vsr, ctrl_vqa = [], []
            sae = ctx.saes[layer]
            for c in controls:
                c_edit = ablation(sae.feature_directions()[int(c)].float())
                ctrl_vsr.append(eval_vsr(vsr_rows, layer, c_edit)[0].mean() - base_vsr.mean())
                ctrl_vqa.append(eval_vqa(vqa_rows, layer, c_edit)[0].mean() - base_vqa.mean())
            rows_out.append({
                "feature": label, "layer": layer, "feature_index": f, "seed": seed,
                "vsr_relations": ", ".join(rels), "n_vsr": len(vsr_rows), "n_vqa": len(vqa_rows),
                "vsr_acc": base_vsr.mean(), "vsr_acc_ablated": abl_vsr.mean(),
                "vsr_prob": base_p.mean(), "vsr_prob_ablated": abl_p.mean(),
                "vqa_acc": base_vqa.mean(), "vqa_acc_ablated": abl_vqa.mean(),
                "d_vsr_acc": 100 * (abl_vsr.mean() - base_vsr.mean()),
                "d_vsr_prob": abl_p.mean() - base_p.mean(),
                "d_vqa_acc": 100 * (abl_vqa.mean() - base_vqa.mean()),
                "d_ctrl": 100 * float(np.mean(ctrl_vsr)) if ctrl_vsr else np.nan,
                "d_ctrl_vqa": 100 * float(np.mean(ctrl_vqa)) if ctrl_vqa else np.nan,
                "controls": " ".join(str(int(c)) for c in controls),
                "vsr_or": odds.get(label, np.nan),
            })
        log(progress_line("ablation, features", i + 1, len(ctx.features), start))
    runs = pd.DataFrame(rows_out, columns=RUN_COLUMNS)
    write_ablation_tables(runs, out, settings.contrast)
    return runs


