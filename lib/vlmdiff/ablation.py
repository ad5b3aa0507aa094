"""Feature ablation and steering: is a spatial feature causally used? (paper 5.3, App. D)

Ablation projects the feature's unit decoder direction v out of the output of decoder block L,
`y ← y − (yᵀv) v`, at text positions only (every real token that is not an image token: BOS,
chat markers, question, answer position); image positions stay untouched. Steering adds `α v`
at the same positions instead. Both go through `vlmdiff.splice.replace_layer_output`.

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

from vlmdiff.attribution import CausalContext, feature_label, row_batches
from vlmdiff.lexical import prompt_span
from vlmdiff.logs import progress_line
from vlmdiff.splice import Replace, replace_layer_output

if TYPE_CHECKING:
    from datasets import Dataset

Log = Callable[[str], None]
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


def steering(direction: torch.Tensor, alpha: float) -> Edit:
    return lambda span: add_direction(direction, alpha, span)


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
    from vlmdiff.data import load_split

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


def vsr_activation_job(
    vlm_dir: str | Path,
    vsr_path: str | Path,
    selected_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    *,
    contrast: str,
    max_features: int,
    template: str,
    batch_size: int,
    device: str,
    log: Log = print,
) -> xr.DataArray:
    """`max_t h_f` over each VSR row's prompt tokens, `[feature, row]`: the caches hold no VSR,
    so the feature's SAE encodes the hooked block output here."""
    from vlmdiff.attribution import feature_coords
    from vlmdiff.lexical import sample_maxima, unknown_words

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
    return xr.DataArray(
        acts,
        dims=("feature", "row"),
        coords={**feature_coords(ctx), "row": np.arange(len(vsr))},
        name="vsr_max_activation",
        attrs={"template": template},
    )


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
    from vlmdiff.data import load_split

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


def eval_config(inp: Any, params: Any) -> tuple[EvalInputs, EvalSettings]:
    """`EvalInputs` and `EvalSettings` from a Snakemake job's `input` and `params`
    (`layers`, `contrast`, `max_features`, `template`, `ablation`, `device`)."""
    a = params.ablation
    inputs = EvalInputs(inp.vlm, inp.vsr, inp.val, inp.selected, inp.features,
                        dict(zip(params.layers, inp.saes, strict=True)), inp.acts)
    cfg = EvalSettings(params.contrast, params.max_features, params.template, a["top_vsr"],
                       a["min_relation_share"], a["positions"], a["batch_size"], params.device)
    return inputs, cfg


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
    inputs: EvalInputs,
    cfg: EvalSettings,
    *,
    vqa_samples: int,
    subset_fraction: float,
    n_controls: int,
    seeds: Sequence[int],
    log: Log = print,
) -> pd.DataFrame:
    """One row per (feature, seed): accuracy and probability with and without the ablation on
    the relation-specific VSR subset and on VQA yes/no, and the same for random controls."""
    setup = _EvalSetup(inputs, cfg, log)
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
    return pd.DataFrame(rows_out, columns=RUN_COLUMNS)


RUN_COLUMNS = [
    "feature", "layer", "feature_index", "seed", "vsr_relations", "n_vsr", "n_vqa", "vsr_acc",
    "vsr_acc_ablated", "vsr_prob", "vsr_prob_ablated", "vqa_acc", "vqa_acc_ablated",
    "d_vsr_acc", "d_vsr_prob", "d_vqa_acc", "d_ctrl", "d_ctrl_vqa", "controls", "vsr_or",
]
METRICS = ["d_vsr_acc", "d_vsr_prob", "d_vqa_acc", "d_ctrl", "d_ctrl_vqa"]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread (std over seeds) per feature, ranked by Δ VSR accuracy (worst first)."""
    keys = ["feature", "layer", "feature_index", "vsr_relations", "vsr_or"]
    cols = [*keys, "n_vsr", "n_vqa", "n_seeds"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_std"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    grouped = runs.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(
        n_vsr=("n_vsr", "mean"), n_vqa=("n_vqa", "mean"), n_seeds=("seed", "nunique"),
        **{f"{m}_mean": (m, "mean") for m in METRICS},
        **{f"{m}_std": (m, lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0)
           for m in METRICS},
    ).reset_index()
    return out.sort_values("d_vsr_acc_mean", kind="stable").reset_index(drop=True)[cols]


TABLE1 = {
    "Layer": "layer", "Feature": "feature_index", "Δ VSR Acc": "d_vsr_acc",
    "Δ VQA Acc": "d_vqa_acc", "Δ Ctrl": "d_ctrl", "VSR Relations": "vsr_relations",
    "VSR OR": "vsr_or",
}
TABLE2 = {
    "Layer": "layer", "Feature": "feature_index", "Δ VSR Acc": "d_vsr_acc",
    "Δ VSR Prob": "d_vsr_prob", "Δ VQA Acc": "d_vqa_acc", "Δ Ctrl": "d_ctrl",
    "Δ Ctrl (VQA)": "d_ctrl_vqa", "VSR OR": "vsr_or", "#Samples": "n_vsr",
    "VSR Relations": "vsr_relations",
}


def paper_table(summary: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Display table: `mean ± std` strings for the metrics (points; probability as is)."""
    out = {}
    for name, col in columns.items():
        if col in METRICS:
            digits = 3 if col == "d_vsr_prob" else 2
            out[name] = [f"{m:.{digits}f} ± {s:.{digits}f}"
                         for m, s in zip(summary[f"{col}_mean"], summary[f"{col}_std"],
                                         strict=True)]
        elif col == "vsr_or":
            out[name] = [f"{v:.2f}" for v in summary[col]]
        elif col == "n_vsr":
            out[name] = [str(int(round(v))) for v in summary[col]]
        else:
            out[name] = summary[col].astype(str).tolist()
    return pd.DataFrame(out, columns=list(columns))


def markdown(table: pd.DataFrame, caption: str, empty_note: str) -> str:
    """A GitHub Markdown table with a caption line (the note instead of rows when empty)."""
    lines = [f"**{caption}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    if table.empty:
        lines += ["", empty_note]
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str, label: str, empty_note: str) -> str:
    """A booktabs LaTeX table (`±` and `Δ` as math)."""

    def esc(s: str) -> str:
        s = str(s).replace("&", r"\&").replace("%", r"\%").replace("#", r"\#").replace("_", r"\_")
        return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")

    spec = "l" * len(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}",
             r"\toprule", " & ".join(esc(c) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.itertuples(index=False):
        lines.append(" & ".join(esc(v) for v in row) + r" \\")
    if table.empty:
        lines.append(rf"\multicolumn{{{len(table.columns)}}}{{l}}{{{esc(empty_note)}}} \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}",
              rf"\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


EMPTY_NOTE = ("EMPTY: no selected feature to ablate (tables/selected_features has no row of "
              "this contrast, or no feature fired on VSR); see tables/feature_sets.csv")


def steering_job(
    inputs: EvalInputs,
    cfg: EvalSettings,
    *,
    vqa_samples: int,
    alphas: Sequence[float],
    seed: int,
    log: Log = print,
) -> pd.DataFrame:
    """Flip rate of the yes/no answer when `α·s·v` is added at the edited positions, where s
    is the mean norm of the block-L output there (so α is relative to the residual's size), on
    the relation subset and on VQA yes/no; a random same-layer feature as the control."""
    setup = _EvalSetup(inputs, cfg, log)
    ctx, vqa_pool = setup.ctx, setup.vqa_pool
    rng = np.random.default_rng(seed)
    vqa_rows = np.sort(rng.choice(vqa_pool, size=min(vqa_samples, len(vqa_pool)), replace=False))
    rows_out = []
    start = time.perf_counter()
    for i, (layer, f) in enumerate(ctx.keys()):
        label = feature_label(layer, f)
        rels, subset = setup.subset(label)
        if not len(subset):
            log(f"warning: {label} fires on no VSR row; skipped")
            continue
        pool = control_pool(inputs.features_path, layer, [f])
        control = int(np.random.default_rng([seed, layer, f]).choice(pool))
        scale = residual_norm(ctx, setup.vsr, subset, layer, cfg.positions, cfg.batch_size)
        sets = {
            "VSR relation subset": ("vsr", subset, ctx.directions[(layer, f)]),
            "VQA yes/no": ("vqa", vqa_rows, ctx.directions[(layer, f)]),
            "VSR relation subset, random feature": (
                "vsr", subset, ctx.saes[layer].feature_directions()[control].float()),
        }
        for name, (on, rows, direction) in sets.items():
            ev = setup.evaluator(on)
            base, _ = ev(rows)
            for alpha in alphas:
                right, _ = ev(rows, layer, steering(direction, float(alpha) * scale))
                rows_out.append({
                    "feature": label, "layer": layer, "feature_index": f, "eval_set": name,
                    "alpha": float(alpha), "residual_norm": scale, "n": len(rows),
                    "flip_rate": float(np.mean(right != base)),
                    "accuracy": float(right.mean()), "accuracy_unsteered": float(base.mean()),
                    "vsr_relations": ", ".join(rels),
                    "control_feature": control if "random" in name else -1,
                })
        log(progress_line("steering, features", i + 1, len(ctx.features), start))
    cols = ["feature", "layer", "feature_index", "eval_set", "alpha", "residual_norm", "n",
            "flip_rate", "accuracy", "accuracy_unsteered", "vsr_relations", "control_feature"]
    return pd.DataFrame(rows_out, columns=cols)


@torch.no_grad()
def residual_norm(ctx: CausalContext, ds: Dataset, rows: np.ndarray, layer: int,
                  positions: str, batch_size: int) -> float:
    """Mean norm of the block-`layer` output at the edited positions of `rows`."""
    total, count = 0.0, 0
    image_id = ctx.model.config.image_token_id
    seen: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen["h"] = h
        return h

    for inputs in row_batches(ds, rows, batch_size, ctx.model, ctx.processor, ctx.device):
        span = edit_positions(inputs["input_ids"], inputs["attention_mask"], image_id, positions)
        with replace_layer_output(ctx.model, layer, grab):
            ctx.model.model(**inputs, use_cache=False)
        norms = seen["h"].float().norm(dim=-1)[span]
        total += float(norms.sum())
        count += int(norms.numel())
    return total / max(count, 1)


def write_ablation_tables(runs: pd.DataFrame, out: Mapping[str, str | Path], contrast: str) -> None:
    """Tables 1 and 2 (CSV with mean and std columns, Markdown, LaTeX) from the per-seed runs.

    `out` has keys `runs`, `table1_{csv,md,tex}` and `table2_{csv,md,tex}`."""
    from vlmdiff.files import atomic_path, write_table

    summary = summarise(runs)
    write_table(runs, out["runs"])
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique())) if len(runs) else "none"
    captions = {
        "table1": f"Top ablated {contrast} SAE features ranked by VSR accuracy drop (points, "
        f"mean ± std over seeds {seeds}); Δ Ctrl: same-layer random features; VSR OR: odds "
        "ratio under the distribution shift.",
        "table2": f"Full ablation results for the {contrast} features (mean ± std over seeds "
        f"{seeds}): accuracy drops in points, probability of the correct answer as is, "
        "number of VSR samples per seed, relation-specific VSR subsets.",
    }
    for name, columns in (("table1", TABLE1), ("table2", TABLE2)):
        cols = ["feature", "layer", "feature_index", "vsr_relations", "vsr_or", "n_vsr",
                "n_vqa", "n_seeds"] if name == "table2" else ["feature", "layer",
                                                                "feature_index", "vsr_relations",
                                                                "vsr_or", "n_seeds"]
        metrics = [c for c in summary.columns
                   if c not in cols and c.rsplit("_", 1)[0] in columns.values()]
        write_table(summary[cols + metrics], out[f"{name}_csv"])
        shown = paper_table(summary, columns)
        texts = {
            "md": markdown(shown, captions[name], EMPTY_NOTE),
            "tex": latex(shown, captions[name], f"tab:{name}_ablation", EMPTY_NOTE),
        }
        for ext, text in texts.items():
            with atomic_path(out[f"{name}_{ext}"]) as tmp:
                tmp.write_text(text, encoding="utf-8")
