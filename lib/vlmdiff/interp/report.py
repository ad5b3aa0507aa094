"""results/{run}/report.html: every figure and table of a run, in the paper's order.

Sections follow the paper (data and models, 4.1 adaptation, 4.2 adapted features, 4.3 spatial
and OCR features, 5.1 auto-interp, 5.2 attribution, 5.3 ablation and steering); an output no
section claims lands in "Other outputs", so nothing the run made is left out. Figures are
linked by relative path (the page opens from disk beside them) with their captions from
`report/{stem}.rst`, the same captions `snakemake --report` shows. Then the config used,
software versions and the jobs' timings from their `benchmark:` files.
"""

from __future__ import annotations

import html
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from vlmdiff.files import atomic_path
from vlmdiff.interp.feature_index import FILE as EVERY
from vlmdiff.logs import Log


@dataclass(frozen=True)
class Section:
    """A part of the report: the figures and tables (file stems; `x_` = a prefix) it holds."""

    key: str
    title: str
    figures: tuple[str, ...]
    tables: tuple[str, ...]


SECTIONS = (
    Section("data", "Data and models",
            ("vlm_eval", "vlm_eval_relations", "vlm_eval_errors", "vlm_eval_positions"),
            ("summary", "vlm_eval", "vlm_eval_relations", "vlm_eval_errors", "vlm_eval_positions",
             "vqav2_summary", "vsr_summary")),
    Section("adaptation", "4.1 SAE adaptation", ("fig1_", "fig5_", "fig6_"),
            ("sae_adaptation", "fvu_summary")),
    Section("adapted", "4.2 Adapted features", ("fig2_", "fig7_", "fig8_"),
            ("feature_sets", "adapted_per_layer", "threshold_sweep", "features")),
    Section("spatial", "4.3 Spatial and OCR features", ("fig9_", "fig10_"),
            ("selected_features", "ground_truth_summary", "ground_truth")),
    Section("autointerp", "5.1 Auto-interp", ("fig_autointerp_",), ("autointerp",)),
    Section("attribution", "5.2 Attribution patching", ("fig12_", "fig13_", "fig14_", "fig15_",
                                                        "fig4_", "fig16_", "fig_attribution_"),
            ("attribution_top_heads", "attribution_vs_patching", "attribution")),
    Section("ablation", "5.3 Ablation and steering", ("fig_steering_",),
            ("table1_ablation", "table2_ablation_full", "steering", "ablation_runs")),
)
OTHER = Section("other", "Other outputs", (), ())
MAX_ROWS = 25  # longer tables show their first rows and link the whole file
VERSION_PACKAGES = ("vlmdiff", "snakemake", "torch", "transformers", "datasets", "numpy",
                    "pandas", "xarray", "zarr", "matplotlib", "openai", "gguf", "jinja2")


def _match(stem: str, patterns: Sequence[str]) -> int | None:
    for i, p in enumerate(patterns):
        if stem == p or (p.endswith("_") and stem.startswith(p)):
            return i
    return None


def section_of(stem: str, kind: str = "figure") -> Section:
    """The section a figure (or table) with this file stem belongs to."""
    for s in SECTIONS:
        if _match(stem, s.figures if kind == "figure" else s.tables) is not None:
            return s
    return OTHER


def _order(stem: str, kind: str) -> tuple[int, str]:
    s = section_of(stem, kind)
    i = _match(stem, s.figures if kind == "figure" else s.tables)
    return (len(SECTIONS) if i is None else i, stem)


def caption(captions_dir: Path, stem: str) -> str:
    """The figure's caption text from `report/{stem}.rst` ("" where there is none)."""
    path = captions_dir / f"{stem}.rst"
    return path.read_text().strip() if path.is_file() else ""


def render_table(path: Path, rel: str) -> str:
    """A CSV as an HTML table (the first `MAX_ROWS` rows of longer ones)."""
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return '<p class="muted">empty file</p>'
    note = ""
    if len(table) > MAX_ROWS:
        note = (f'<p class="muted">first {MAX_ROWS} of {len(table)} rows; '
                f'whole table: <a href="{html.escape(rel)}">{html.escape(rel)}</a></p>')
        table = table.head(MAX_ROWS)
    if table.empty:
        return '<p class="muted">EMPTY: no rows</p>'
    body = table.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}")
    return f'<div class="scroll">{body}</div>{note}'


def benchmark_table(bench_dir: str | Path) -> pd.DataFrame:
    """One row per job with a `benchmark:` file: wall seconds, CPU seconds, peak memory."""
    bench_dir = Path(bench_dir)
    rows = []
    for p in sorted(bench_dir.rglob("*.tsv")):
        t = pd.read_csv(p, sep="\t")
        if t.empty:
            continue
        rows.append({"job": str(p.relative_to(bench_dir).with_suffix("")),
                     "seconds": float(t["s"].iloc[-1]),
                     "cpu_seconds": float(t["cpu_time"].iloc[-1]) if "cpu_time" in t else None,
                     "max_rss_mb": float(t["max_rss"].iloc[-1]) if "max_rss" in t else None})
    table = pd.DataFrame(rows, columns=["job", "seconds", "cpu_seconds", "max_rss_mb"])
    return table.sort_values("seconds", ascending=False, kind="stable").reset_index(drop=True)


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages the run used."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _figure(png: Path, run_dir: Path, captions_dir: Path) -> dict[str, Any]:
    pdf = png.with_suffix(".pdf")
    return {"src": os.path.relpath(png, run_dir), "stem": png.stem,
            "caption": caption(captions_dir, png.stem),
            "pdf": os.path.relpath(pdf, run_dir) if pdf.is_file() else None}


def collect(files: Sequence[str | Path], run_dir: Path, captions_dir: Path
            ) -> list[dict[str, Any]]:
    """The report's sections, each with its figures (PNG) and tables (CSV, JSON; markdown,
    LaTeX and parquet copies linked)."""
    parts: dict[str, dict[str, list]] = {s.key: {"figures": [], "tables": [], "links": []}
                                         for s in (*SECTIONS, OTHER)}
    for f in sorted({Path(x) for x in files}):
        rel = os.path.relpath(f, run_dir)
        if f.suffix == ".png":
            parts[section_of(f.stem).key]["figures"].append(_figure(f, run_dir, captions_dir))
        elif f.suffix == ".csv":
            parts[section_of(f.stem, "table").key]["tables"].append(
                {"name": rel, "stem": f.stem, "html": render_table(f, rel)})
        elif f.suffix == ".json" and f.is_file():
            text = f.read_text()
            parts[section_of(f.stem, "table").key]["tables"].append(
                {"name": rel, "stem": f.stem, "html": "<details><summary>show</summary>"
                 f"<pre>{html.escape(text)}</pre></details>"})
        elif f.suffix in (".md", ".tex", ".parquet", ".nc"):
            parts[section_of(f.stem, "table").key]["links"].append(rel)
    out = []
    for s in (*SECTIONS, OTHER):
        p = parts[s.key]
        p["figures"].sort(key=lambda x: _order(x["stem"], "figure"))
        p["tables"].sort(key=lambda x: _order(x["stem"], "table"))
        if any(p.values()) or s.key == "autointerp":
            out.append({"key": s.key, "title": s.title, **p})
    return out


PAGE = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlmdiff report – {{ run }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 75em; color: #222; }
nav a { margin-right: 1em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.15em 0.45em; text-align: left; }
th { background: #f2f2f2; } .scroll { overflow-x: auto; }
.muted { color: #777; font-size: 0.85em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
</style></head><body>
<h1>vlmdiff report – run “{{ run }}”</h1>
<p>Stage-wise model diffing of a language model and its vision–language fine-tune with sparse
autoencoders: adaptation, adapted features, spatial features, auto-interp, attribution, ablation.</p>
<nav>{% for s in sections %}<a href="#{{ s.key }}">{{ s.title }}</a>{% endfor %}
<a href="#config">Config</a><a href="#versions">Software</a><a href="#timings">Timings</a></nav>
{% for s in sections %}
<h2 id="{{ s.key }}">{{ s.title }}</h2>
{% if s.key == "autointerp" %}
{% if autointerp_off %}<p class="muted">Auto-interp was switched off (<code>autointerp.backend: none</code>): the dashboards show each feature's evidence without descriptions.</p>{% endif %}
<p>Feature dashboards: <a href="{{ dashboards }}/index.html">index</a>{% if every %} · <a href="{{ dashboards }}/{{ every }}">every adapted feature</a>{% endif %}{% for d in pages %} · <a href="{{ dashboards }}/{{ d }}.html">{{ d }}</a>{% endfor %}</p>
{% endif %}
{% for f in s.figures %}<figure id="{{ f.stem }}"><img src="{{ f.src }}" alt="{{ f.stem }}">
<figcaption><b>{{ f.stem }}</b>{% if f.caption %}: {{ f.caption }}{% endif %}{% if f.pdf %} <a href="{{ f.pdf }}">[PDF]</a>{% endif %}</figcaption></figure>
{% endfor %}
{% for t in s.tables %}<h3 id="table-{{ t.stem }}">{{ t.name }}</h3>{{ t.html|safe }}{% endfor %}
{% if s.links %}<p class="muted">Also: {% for l in s.links %}<a href="{{ l }}">{{ l }}</a> {% endfor %}</p>{% endif %}
{% endfor %}
<h2 id="config">Config used</h2>
<details><summary>config (YAML, defaults filled in)</summary><pre>{{ config }}</pre></details>
<h2 id="versions">Software versions</h2>
<table>{% for k, v in versions.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<h2 id="timings">Timings</h2>
<p>Wall time summed over {{ n_jobs }} job(s): {{ "%.1f"|format(total_s) }} s (from the rules' <code>benchmark:</code> files).</p>
{{ timings|safe }}
</body></html>
""", autoescape=True)


def build_report(
    files: Sequence[str | Path],
    run_dir: str | Path,
    out_html: str | Path,
    *,
    run: str,
    config: Mapping[str, Any],
    benchmarks_dir: str | Path,
    captions_dir: str | Path,
    dashboards_dir: str | Path,
) -> Path:
    """Write the report page for the run's output `files`."""
    run_dir = Path(run_dir)
    sections = collect(files, run_dir, Path(captions_dir))
    bench = benchmark_table(benchmarks_dir)
    dash = Path(dashboards_dir)
    pages = sorted(p.stem for p in dash.glob("*.html") if p.name not in ("index.html", EVERY))
    text = PAGE.render(
        run=run, sections=sections, dashboards=os.path.relpath(dash, run_dir), pages=pages,
        every=EVERY if (dash / EVERY).is_file() else None,
        autointerp_off=config.get("autointerp", {}).get("backend") == "none",
        config=yaml.safe_dump(_plain(config), sort_keys=False), versions=versions(),
        n_jobs=len(bench), total_s=float(bench["seconds"].sum()),
        timings=bench.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.1f}"))
    with atomic_path(out_html) as tmp:
        tmp.write_text(text)
    return Path(out_html)


def _plain(obj: Any) -> Any:
    """Snakemake's config as plain dicts and lists (it may hold its own mapping types)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def report_job(
    *,
    targets: Sequence[str | Path],
    dashboards_dir: str | Path,
    run: str,
    config: Mapping[str, Any],
    benchmarks_dir: str | Path,
    captions_dir: str | Path,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> Path:
    """The `report` rule: `build_report` of the run's outputs `targets` to `out["html"]`, in
    the run's folder."""
    html_path = build_report(
        targets, Path(out["html"]).parent, out["html"], run=run, config=config,
        benchmarks_dir=benchmarks_dir, captions_dir=captions_dir, dashboards_dir=dashboards_dir,
    )
    log(f"{html_path}: {len(targets)} output(s) of the run")
    return html_path
