"""`features.html` beside the dashboards: every adapted feature in one table that sorts by any
column on a click (decoder cosine c_f, visual energy E_v, odds ratios, set membership), each
row linking to the feature's page where it has one."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import jinja2
import pandas as pd

from vlmdiff.causal.heads import feature_label

FILE = "features.html"
CONTRASTS = ("spatial", "ocr")
NUMBERS = ["c_f", "E_v", "E_v_image", *[f"or_{c}" for c in CONTRASTS]]
"""Numeric columns shown, where the features table has them."""

SORT_JS = """
function sortBy(col) {
  const t = document.getElementById("features"), body = t.tBodies[0];
  const dir = t.dataset.col == String(col) && t.dataset.dir == "desc" ? "asc" : "desc";
  const key = r => r.cells[col].dataset.v;
  const rows = Array.from(body.rows).sort((a, b) => {
    if ((key(a) == "") != (key(b) == "")) return key(a) == "" ? 1 : -1;  // missing: last
    const x = parseFloat(key(a)), y = parseFloat(key(b));
    const c = isNaN(x) || isNaN(y) ? key(a).localeCompare(key(b)) : x - y;
    return dir == "asc" ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  t.dataset.col = String(col);
  t.dataset.dir = dir;
}
"""

PAGE = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Adapted features</title>
<style>{{ style }} th { cursor: pointer; }</style><script>{{ js|safe }}</script></head><body>
<p><a href="index.html">← described features</a></p>
<h1>Adapted features ({{ rows|length }})</h1>
<p class="muted">{{ note }} Click a column's name to sort by it (again: the other way).</p>
<table id="features"><thead><tr>{% for c in columns %}<th onclick="sortBy({{ loop.index0 }})">{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in rows %}<tr>{% for v, shown, link in r %}<td data-v="{{ v }}">{% if link %}<a href="{{ link }}">{{ shown }}</a>{% else %}{{ shown }}{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
</body></html>
""", autoescape=True)


def _number(v: Any) -> tuple[str, str]:
    """(sort key, shown text) of a number; a missing one has an empty key (sorted last)."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v):
        return "", "–"
    return repr(float(v)), f"{float(v):.4g}"


def index_rows(stats: pd.DataFrame, pages: Collection[str]
               ) -> tuple[list[str], list[list[tuple[str, str, str | None]]]]:
    """Column names and, per adapted feature, its cells as (sort key, text, link or None)."""
    numbers = [c for c in NUMBERS if c in stats.columns]
    sets = [c for c in CONTRASTS if f"{c}_set" in stats.columns]
    columns = ["feature", "layer", "index", *numbers, "sets"]
    rows = []
    for r in stats[stats["adapted"].astype(bool)].itertuples(index=False):
        d = r._asdict()
        label = feature_label(int(d["layer"]), int(d["feature"]))
        member = ", ".join(c for c in sets if bool(d[f"{c}_set"]))
        rows.append([(label, label, f"{label}.html" if label in pages else None),
                     (str(d["layer"]), str(d["layer"]), None),
                     (str(d["feature"]), str(d["feature"]), None),
                     *[(*_number(d[c]), None) for c in numbers],
                     (member, member or "–", None)])
    return columns, rows


def features_page(stats: pd.DataFrame, pages: Sequence[str], style: str) -> str:
    """The page's HTML; a note instead of rows where the table has no `adapted` flags."""
    if "adapted" not in stats.columns:
        return PAGE.render(rows=[], columns=[], style=style, js=SORT_JS,
                           note="The features table has no adapted flags (no selection run).")
    columns, rows = index_rows(stats, set(pages))
    note = (f"Every feature of the adapted set (E_v > eps and c_f in the bottom p_cos %), "
            f"{sum(r[0][2] is not None for r in rows)} with a page of its own.")
    return PAGE.render(rows=rows, columns=columns, style=style, js=SORT_JS, note=note)
