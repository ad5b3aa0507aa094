"""Feature dashboards: one static HTML page per feature with evidence (the described ones and
every other member of the spatial and OCR sets), an index, and a sortable table of every
adapted feature (`features.html`).

A page holds the feature's statistics row (features table), the histogram of its activation
over D_base with its firing density, its top logit effects, its top-activating samples and
samples from each activation quantile with the picture, the feature's own activation drawn
over it and the prompt tokens shaded by activation, the OVERLAY heat maps, the attribution top
heads and the ablation row (table 2) where the causal stage scored it, and for the described
ones the RAW and OVERLAY descriptions with their F1, detection and fuzzing scores and
classifications of the held-out positives, random and hard negatives. Pictures are copied
beside the pages, so the folder opens from disk.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import escape

from vlmdiff.files import atomic_dir
from vlmdiff.interp.autointerp import VARIANTS, read_records
from vlmdiff.interp.evidence import FeatureEvidence, Sample, read_evidence
from vlmdiff.interp.feature_index import FILE as FEATURES_PAGE
from vlmdiff.interp.feature_index import features_page
from vlmdiff.logs import Log

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.samples { display: flex; flex-wrap: wrap; gap: 1em; }
.sample { border: 1px solid #ddd; padding: 0.5em; width: 30em; }
.sample img { width: 144px; height: 144px; image-rendering: pixelated; margin-right: 4px; }
.tok { padding: 0 2px; border-radius: 3px; }
.muted { color: #777; font-size: 0.85em; }
.ok { color: #176317; } .failed { color: #b00; } .skipped { color: #777; }
"""

PAGE = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ ev.label }} – feature dashboard</title>
<style>{{ style }}</style></head><body>
<p><a href="index.html">← all features</a>{% if report %} · <a href="../report.html">report</a>{% endif %}</p>
<h1>Feature {{ ev.label }}</h1>
<p>Layer {{ ev.layer }}, feature {{ ev.feature }}; {{ ev.contrast }} contrast, rank {{ ev.rank }}.</p>
{% if neuronpedia %}<p>The base SAE's feature {{ ev.feature }} (where this adapted feature started) on Neuronpedia: <a href="{{ neuronpedia }}">{{ neuronpedia }}</a></p>{% endif %}

<h2>Descriptions (auto-interp)</h2>
{% if not ev.described %}<p class="muted">Not described: a member of the {{ ev.sets|join(" and ") }} set{{ "s" if ev.sets|length > 1 }} outside the described ones (autointerp.max_features per contrast, best rank first).</p>{% else %}
<div style="overflow-x: auto"><table><tr><th>variant</th><th>status</th><th>description</th><th>F1</th><th>detection</th>
<th>fuzzing</th><th>detection / fuzzing (random negatives)</th><th>detection / fuzzing (hard negatives)</th><th>precision</th>
<th>recall</th><th>model</th><th>evidence seen</th><th>tokens (prompt / completion)</th></tr>
{% for v, r in records.items() %}<tr><td>{{ v|upper }}</td>
<td class="{{ r.status }}">{{ r.status }}{% if r.error %}: {{ r.error }}{% endif %}</td>
<td>{{ r.description or "–" }}</td><td>{{ fmt(r.f1) }}</td><td>{{ fmt(r.detection) }}</td>
<td>{{ fmt(r.fuzzing) }}</td><td>{{ fmt(r.detection_random) }} / {{ fmt(r.fuzzing_random) }}</td>
<td>{{ fmt(r.detection_hard) }} / {{ fmt(r.fuzzing_hard) }}</td><td>{{ fmt(r.precision) }}</td>
<td>{{ fmt(r.recall) }}</td><td>{{ r.model }}</td><td>{{ r.evidence|join(", ") }}</td>
<td>{{ r.usage.prompt_tokens }} / {{ r.usage.completion_tokens }}</td></tr>{% endfor %}
</table></div>
<p class="muted">F1 scores the held-out positives against the random negatives; detection and fuzzing (class-balanced accuracy, chance 0.5) against random and hard negatives together, and apart.</p>{% endif %}

<h2>Statistics</h2>
{{ stats|safe }}

<h2>Activation distribution (D_base)</h2>
{% if ev.histogram %}<p>Fires on {{ ev.histogram.n_firing }} of {{ ev.histogram.n_samples }} D_base samples (firing density {{ fmt(ev.histogram.density) }}); the histogram counts those samples by their maximum activation over the prompt tokens.</p>
{{ histogram(ev.histogram)|safe }}{% else %}<p class="muted">not in the evidence (written before histograms were)</p>{% endif %}

<h2>Top logit effects</h2>
{% if logits %}<p class="muted">The unembedding (final norm's gain folded in) times the unit decoder direction: the next tokens this feature raises and lowers most.</p>
<table><tr><th>promoted</th><th>logit</th><th>suppressed</th><th>logit</th></tr>
{% for (p, pv), (q, qv) in logits %}<tr><td>{{ p }}</td><td>{{ fmt(pv) }}</td><td>{{ q }}</td><td>{{ fmt(qv) }}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">not in the evidence (written before logit effects were)</p>{% endif %}

<h2>Attribution top heads</h2>
{{ heads|safe }}

<h2>Ablation (table 2 row)</h2>
{{ ablation|safe }}

{% for title, group in groups %}
<h2>{{ title }}</h2>
{% if not group %}<p class="muted">none</p>{% endif %}
<div class="samples">
{% for s in group %}<div class="sample">
<div><img src="{{ s.image }}" alt="picture of {{ s.source }} row {{ s.row }}">{% if s.activation_overlay %}<img src="{{ s.activation_overlay }}" alt="the feature's activation over {{ s.source }} row {{ s.row }}" title="the feature's own activation on the image tokens (one scale for all its samples)">{% endif %}{% if s.overlay %}<img src="{{ s.overlay }}" alt="heat map of the top heads on {{ s.source }} row {{ s.row }}">{% endif %}</div>
<div>{% for t, a in shade(s) %}<span class="tok" style="background: rgba(255, 80, 0, {{ a }})" title="{{ t[1] }}">{{ t[0] }}</span> {% endfor %}</div>
<div class="muted">{% if s.quantile >= 0 %}quantile bin {{ s.quantile + 1 }}; {% endif %}{{ s.source }} row {{ s.row }}, max activation {{ fmt(s.activation) }}{% if s.scene %}; picture: {{ s.scene }}{% endif %}</div>
{% if s.overlay_text %}<div class="muted">{{ s.overlay_text }}</div>{% endif %}
{% for v, c in verdicts(s).items() %}<div class="muted">{{ v|upper }} classified {{ c }}</div>{% endfor %}
</div>{% endfor %}
</div>
{% endfor %}
</body></html>
""", autoescape=True)

INDEX = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Feature dashboards</title>
<style>{{ style }}</style></head><body>
{% if report %}<p><a href="../report.html">← report</a></p>{% endif %}
<h1>Feature dashboards</h1>
<p><a href="features.html">Every adapted feature</a>, sortable by c_f, E_v, odds ratio and set.</p>
{% if not rows %}<p>No selected features were described (EMPTY selection).</p>{% endif %}
<p class="muted">The described features first, then every other member of the spatial and OCR sets (no description; top heads and ablation only where the causal stage scored the feature).</p>
<table><tr><th>feature</th><th>contrast</th><th>rank</th><th>sets</th><th>firing density (D_base)</th><th>top heads</th>
{% for v in variants %}<th>{{ v|upper }} description</th><th>F1 {{ v|upper }}</th><th>detection {{ v|upper }}</th>{% endfor %}</tr>
{% for r in rows %}<tr><td><a href="{{ r.page }}">{{ r.label }}</a></td><td>{{ r.contrast }}</td>
<td>{{ r.rank }}</td><td>{{ r.sets }}</td><td>{{ fmt(r.density) }}</td><td>{{ r.heads }}</td>
{% for v in variants %}<td>{{ r[v].description or r[v].status }}</td><td>{{ fmt(r[v].f1) }}</td><td>{{ fmt(r[v].detection) }}</td>{% endfor %}
</tr>{% endfor %}</table>
</body></html>
""", autoescape=True)


def fmt(v: Any) -> str:
    """A number to 3 decimals, "–" where missing."""
    if v is None or isinstance(v, jinja2.Undefined) or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def shade(s: Sample) -> list[tuple[tuple[str, str], float]]:
    """Each prompt token with its activation and an opacity scaled to the sample's maximum."""
    top = max(s.token_acts, default=0.0) or 1.0
    return [((t.replace("Ġ", " ").replace("▁", " ").strip() or t, f"{a:.3f}"),
             round(max(0.0, a) / top * 0.85, 3)) for t, a in zip(s.tokens, s.token_acts, strict=True)]


def row_table(table: pd.DataFrame, empty: str) -> str:
    """`table` (a few rows) as an HTML table, or a note where it is empty."""
    if table.empty:
        return f'<p class="muted">{escape(empty)}</p>'
    body = table.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="–")
    return f'<div style="overflow-x: auto">{body}</div>'


def _feature_rows(table: pd.DataFrame, ev: FeatureEvidence, label_col: str | None) -> pd.DataFrame:
    if table.empty:
        return table
    if label_col and label_col in table.columns:
        return table[table[label_col] == ev.label]
    return table[(table["layer"] == ev.layer) & (table["feature"] == ev.feature)]


def histogram_svg(h: Mapping[str, Any], width: int = 480, height: int = 120) -> str:
    """An `activation_histogram` as an inline SVG bar chart, its activation range beneath."""
    counts, edges = h["counts"], h["edges"]
    top = max(counts, default=0) or 1
    w = width / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - c / top * height:.1f}" width="{max(w - 1, 1):.1f}" '
        f'height="{c / top * height:.1f}" fill="#e0601f"><title>{edges[i]:.3g} to '
        f'{edges[i + 1]:.3g}: {c}</title></rect>' for i, c in enumerate(counts))
    return (f'<svg class="histogram" width="{width}" height="{height + 16}" role="img" '
            f'aria-label="activation histogram"><line x1="0" y1="{height}" x2="{width}" '
            f'y2="{height}" stroke="#999"/>{bars}<text x="0" y="{height + 13}" font-size="11">'
            f'{edges[0]:.3g}</text><text x="{width}" y="{height + 13}" font-size="11" '
            f'text-anchor="end">{edges[-1]:.3g}</text></svg>')


def sample_groups(ev: FeatureEvidence) -> list[tuple[str, list[Sample]]]:
    """The page's sample sections, in order (validation ones only for described features)."""
    groups = [("Top-activating examples" + (" (described)" if ev.described else ""),
               ev.examples),
              ("Samples across activation quantiles (D_base; bin 1 the strongest)",
               ev.quantile_examples)]
    if ev.described:
        words = ", ".join(ev.hard_words) or "none"
        groups += [("Held-out top-activating samples (validation positives)", ev.positives),
                   ("Random D_base samples (validation negatives)", ev.negatives),
                   (f"Hard negatives: the quietest D_base samples sharing the words it fires "
                    f"on ({words}), under autointerp.negative_max_fraction of its top activation "
                    f"where there are such",
                    ev.hard_negatives)]
    return groups


def _copy_pictures(evs: Sequence[FeatureEvidence], evidence: Path, out: Path) -> None:
    for ev in evs:
        for s in ev.samples():
            for rel in (s.image, s.activation_overlay, s.overlay):
                if rel:
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(evidence / rel, out / rel)


def build_dashboards(
    evidence_dir: str | Path,
    variant_dirs: Mapping[str, str | Path],
    features_path: str | Path,
    heads_path: str | Path,
    ablation_path: str | Path,
    out_dir: str | Path,
    *,
    link_report: bool = True,
    neuronpedia: str | None = None,
) -> list[Path]:
    """The dashboards folder (`index.html`, one `{feature}.html` each, pictures); its pages.
    `neuronpedia`, a URL with `{layer}` and `{index}`, links each page to the base SAE's
    feature of the same index there (imported releases that Neuronpedia hosts)."""
    evidence = Path(evidence_dir)
    evs = read_evidence(evidence)
    records = {v: {r["feature"]: r for r in read_records(d)} for v, d in variant_dirs.items()}
    stats = pd.read_parquet(features_path)
    heads = pd.read_csv(heads_path)
    ablation = pd.read_csv(ablation_path)
    pages = []
    with atomic_dir(out_dir) as tmp:
        _copy_pictures(evs, evidence, tmp)
        rows = []
        for ev in evs:
            recs = {v: records[v][ev.label] for v in VARIANTS if ev.label in records.get(v, {})}
            verdict_of = {}
            for v, r in recs.items():
                for c in r["classification_results"]:
                    verdict_of[v, c["source"], c["row"]] = (
                        f"{c['prediction']} (truth {c['label']}, round {c['round']})")

            def verdicts(s: Sample, _v: dict = verdict_of) -> dict[str, str]:
                return {v: _v[v, s.source, s.row] for v in VARIANTS if (v, s.source, s.row) in _v}

            feature_heads = _feature_rows(heads, ev, "feature")
            html = PAGE.render(
                ev=ev, records=recs, style=STYLE, fmt=fmt, shade=shade, verdicts=verdicts,
                report=link_report,
                logits=list(zip_longest(ev.logit_effects.get("promoted", []),
                                        ev.logit_effects.get("suppressed", []),
                                        fillvalue=("", None))),
                neuronpedia=neuronpedia.format(layer=ev.layer, index=ev.feature)
                if neuronpedia else None,
                stats=row_table(_feature_rows(stats, ev, None).T.reset_index().set_axis(
                    ["statistic", "value"], axis=1), "not in the features table"),
                heads=row_table(feature_heads, "not scored by the causal stage "
                                "(causal.contrast / causal.max_features)"),
                ablation=row_table(_feature_rows(ablation, ev, "feature").loc[
                    :, lambda t: ~t.columns.duplicated()], "not ablated by the causal stage"),
                histogram=histogram_svg, groups=sample_groups(ev))
            page = tmp / f"{ev.label}.html"
            page.write_text(html)
            pages.append(Path(out_dir) / page.name)
            top = " ".join(feature_heads["top_B"].astype(str)) if len(feature_heads) else "–"
            absent = {"description": None, "f1": None, "detection": None,
                      "status": "missing" if ev.described else "not described"}
            rows.append({"label": ev.label, "page": page.name, "contrast": ev.contrast,
                         "rank": ev.rank, "heads": top, "sets": ", ".join(ev.sets) or "–",
                         "density": ev.histogram.get("density"),
                         **{v: recs.get(v, absent) for v in VARIANTS}})
        (tmp / "index.html").write_text(INDEX.render(rows=rows, variants=VARIANTS, style=STYLE,
                                                     fmt=fmt, report=link_report))
        (tmp / FEATURES_PAGE).write_text(
            features_page(stats, [r["label"] for r in rows], STYLE))
    return pages


def dashboards_job(
    *,
    evidence_dir: str | Path,
    features_path: str | Path,
    heads_path: str | Path,
    ablation_path: str | Path,
    raw_dir: str | Path | None,
    overlay_dir: str | Path | None,
    out: Mapping[str, str | Path],
    neuronpedia: str | None = None,
    log: Log = print,
) -> list[Path]:
    """The `dashboards` rule: `build_dashboards` into `out["pages"]`. `raw_dir` and
    `overlay_dir`, the auto-interp records, are None when it is switched off
    (`autointerp.backend: none`)."""
    variants = {v: d for v, d in (("raw", raw_dir), ("overlay", overlay_dir)) if d is not None}
    pages = build_dashboards(evidence_dir, variants, features_path, heads_path, ablation_path,
                             out["pages"], neuronpedia=neuronpedia)
    log(f"{len(pages)} feature dashboard(s) and an index")
    return pages
