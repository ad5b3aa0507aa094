"""Feature dashboards and the report page, built from small synthetic run outputs."""

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from browser import chromium, page_load_problems, page_values
from PIL import Image
from test_autointerp import CountingBackend, make_evidence, openai_cfg
from vlmdiff.interp.autointerp import autointerp_job
from vlmdiff.interp.dashboards import build_dashboards
from vlmdiff.interp.report import MAX_ROWS, SECTIONS, benchmark_table, build_report, section_of


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.headings, self._h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(("img", a["src"]))
        elif tag in ("a", "link") and "href" in a:
            self.refs.append((tag, a["href"]))
        self._h2 = tag == "h2"

    def handle_data(self, data):
        if self._h2 and data.strip():
            self.headings.append(data.strip())
            self._h2 = False


def parse(html_file):
    p = _Links()
    p.feed(Path(html_file).read_text())
    return p


def missing_references(html_file):
    """Local files an HTML page refers to (images, links) that do not exist."""
    base = Path(html_file).parent
    out = []
    for kind, ref in parse(html_file).refs:
        if ref.startswith(("#", "http://", "https://", "mailto:")):
            continue
        if not (base / ref.split("#")[0]).exists():
            out.append((kind, ref))
    return out


def image_refs(html_file):
    return [ref for kind, ref in parse(html_file).refs if kind == "img"]


# ------------------------------------------------------------------------- dashboards


@pytest.fixture
def described(tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    make_evidence(evidence, 2)
    outs = {"raw": tmp_path / "raw", "overlay": tmp_path / "overlay"}
    autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache",
                   cfg=openai_cfg("http://x/v1"), seed=0,
                   make_backend=lambda c, d: CountingBackend(), log=lambda m: None)
    pd.DataFrame({"layer": [0, 0, 1], "feature": [0, 1, 0], "c_f": [0.91, 0.42, 0.5],
                  "E_v": [0.03, 0.02, 0.0]}).to_parquet(tmp_path / "features.parquet")
    pd.DataFrame({"feature": ["L0F0"], "layer": [0], "feature_index": [0], "variant": ["qk"],
                  "top_A": ["L0H1 L0H0"], "top_B": ["L0H1 L0H0"], "overlap": ["L0H1"],
                  "bottom_A": ["L0H0"], "bottom_B": ["L0H0"]}).to_csv(tmp_path / "heads.csv",
                                                                       index=False)
    pd.DataFrame({"feature": ["L0F1"], "layer": [0], "d_vsr_acc_mean": [-3.25]}).to_csv(
        tmp_path / "ablation.csv", index=False)
    return tmp_path, outs


def test_dashboards_pages_and_pictures(described):
    root, outs = described
    out = root / "dashboards"
    pages = build_dashboards(root / "evidence", outs, root / "features.parquet",
                             root / "heads.csv", root / "ablation.csv", out, link_report=False)
    assert sorted(p.name for p in pages) == ["L0F0.html", "L0F1.html"]
    index = out / "index.html"
    assert [r for k, r in parse(index).refs if k == "a"] == [
        "features.html", "L0F0.html", "L0F1.html"]
    for page in [index, *pages]:
        assert not missing_references(page), missing_references(page)
    text = (out / "L0F0.html").read_text()
    # 3 examples + 3 positives + 3 negatives, each with its picture, the feature's activation
    # over it and the heads' heat map
    assert len(image_refs(out / "L0F0.html")) == 27
    assert "acts/L0F0e0.png" in image_refs(out / "L0F0.html")
    assert text.count("this neuron activates for objects left of others") == 2  # RAW, OVERLAY
    assert "0.667" in text and "0.910" not in text and "0.91" in text  # F1; c_f from the stats
    assert "L0H1 L0H0" in text and "not ablated by the causal stage" in text
    # the token where the feature fires is shaded fully (0.85), the others not at all; the
    # negative that says 'left' does not fire
    shaded = re.findall(r'rgba\(255, 80, 0, ([0-9.]+)\)" title="[0-9.]+">left<', text)
    assert sorted(float(a) for a in shaded) == [0.0] + [0.85] * 5
    assert 'rgba(255, 80, 0, 0.0)" title="0.000">circle<' in text
    assert "-3.25" in (out / "L0F1.html").read_text()  # its ablation row
    assert "not scored by the causal stage" in (out / "L0F1.html").read_text()
    # delphi's scores beside F1 (CountingBackend answers as the oracle: detection 2/3,
    # fuzzing 5/6); no Neuronpedia link for SAEs trained here
    assert "0.833" in text and "neuronpedia" not in text.lower()
    # the logit effects from the evidence, promoted and suppressed side by side
    assert re.search(r"<td>left</td><td>1.500</td><td>right</td><td>-0.700</td>", text)
    assert "<td>of</td><td>0.250</td><td></td><td>–</td>" in text


def test_every_adapted_feature_in_one_sortable_table(described):
    root, outs = described
    stats = pd.DataFrame({"layer": [0, 0, 1, 1], "feature": [0, 1, 0, 7],
                          "c_f": [0.91, 0.42, 0.5, 0.1], "E_v": [0.03, 0.02, 0.0, 0.2],
                          "or_spatial": [1.5, 9.0, 2.0, float("nan")],
                          "adapted": [False, True, True, True],
                          "spatial_set": [False, True, False, False],
                          "ocr_set": [False, False, False, True]})
    stats.to_parquet(root / "features.parquet")
    build_dashboards(root / "evidence", outs, root / "features.parquet", root / "heads.csv",
                     root / "ablation.csv", root / "dash", link_report=False)
    page = root / "dash" / "features.html"
    text = page.read_text()
    assert "Adapted features (3)" in text and "L0F0" not in text  # L0F0 is not adapted
    assert [r for k, r in parse(page).refs if k == "a"] == ["index.html", "L0F1.html"]
    assert re.search(r">L1F7<.*>ocr<", text) and re.search(r">L0F1</a>.*>spatial<", text)
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    # columns: feature, layer, index, c_f, E_v, or_spatial, sets
    first = "document.querySelector('#features tbody tr td').textContent"
    last = "document.querySelector('#features tbody tr:last-child td').textContent"
    values = page_values(page.as_uri(), [first, *(f"sortBy({c}); {first}" for c in (5, 5)),
                                         last, f"sortBy(3); {first}"])
    # or_spatial largest first (9.0), then smallest first (2.0; the missing one stays last),
    # then c_f largest first (0.5)
    assert values == ["L0F1", "L0F1", "L1F0", "L1F7", "L1F0"]


def test_dashboards_link_the_base_feature_on_neuronpedia(described):
    root, outs = described
    url = "https://www.neuronpedia.org/llama3.1-8b/{layer}-llamascope-res-32k/{index}"
    build_dashboards(root / "evidence", outs, root / "features.parquet", root / "heads.csv",
                     root / "ablation.csv", root / "dash", link_report=False, neuronpedia=url)
    link = "https://www.neuronpedia.org/llama3.1-8b/0-llamascope-res-32k/1"
    assert ("a", link) in parse(root / "dash" / "L0F1.html").refs


def test_pages_show_the_distribution_quantiles_hard_negatives_and_set_members(tmp_path):
    from dataclasses import asdict

    from test_autointerp import _sample
    from vlmdiff.interp.distribution import activation_histogram
    from vlmdiff.interp.evidence import EVIDENCE_FILE, read_evidence

    evidence = tmp_path / "evidence"
    evidence.mkdir()
    feats = make_evidence(evidence, 2)
    hist = activation_histogram([0.0] * 6 + [0.5, 1.0, 1.0, 2.0], bins=4)
    for i, ev in enumerate(feats):
        ev.histogram = hist
        ev.quantile_examples = [_sample(evidence, f"L0F{i}q{b}", f"left q{b}", 1, 2.0 - b)
                                for b in range(2)]
        for b, s in enumerate(ev.quantile_examples):
            s.quantile = b
    feats[0].hard_negatives = [_sample(evidence, "L0F0h0", "is it left of the box?", 0, 0.0)]
    feats[0].hard_words = ["left"]
    feats[1].described, feats[1].sets = False, ["spatial", "ocr"]
    feats[1].positives, feats[1].negatives = [], []
    (evidence / EVIDENCE_FILE).write_text(json.dumps({"features": [asdict(f) for f in feats]}))
    assert read_evidence(evidence)[1].quantile_examples[1].quantile == 1
    outs = {"raw": tmp_path / "raw"}
    autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache",
                   cfg=openai_cfg("http://x/v1"), seed=0,
                   make_backend=lambda c, d: CountingBackend(), log=lambda m: None)
    pd.DataFrame({"layer": [0, 0], "feature": [0, 1], "c_f": [0.9, 0.4]}).to_parquet(
        tmp_path / "features.parquet")
    pd.DataFrame(columns=["feature", "top_B"]).to_csv(tmp_path / "heads.csv", index=False)
    pd.DataFrame(columns=["feature"]).to_csv(tmp_path / "ablation.csv", index=False)
    out = tmp_path / "dash"
    pages = build_dashboards(evidence, outs, tmp_path / "features.parquet",
                             tmp_path / "heads.csv", tmp_path / "ablation.csv", out,
                             link_report=False)
    assert sorted(p.name for p in pages) == ["L0F0.html", "L0F1.html"]
    for page in [out / "index.html", *pages]:
        assert not missing_references(page), missing_references(page)
    described, member = (out / "L0F0.html").read_text(), (out / "L0F1.html").read_text()
    assert "Fires on 4 of 10 D_base samples (firing density 0.400)" in described
    assert described.count("<rect ") == 4 and "2 to 2: 0" not in described
    assert "quantile bin 1;" in described and "quantile bin 2;" in described
    assert "Hard negatives: the quietest D_base samples sharing the words it fires on (left)" in (
        described)
    assert ">box?</span>" in described
    # the undescribed set member: a page with its distribution, no validation sections
    assert "Not described: a member of the spatial and ocr sets" in member
    assert "Held-out" not in member and "Hard negatives" not in member
    assert member.count("<rect ") == 4 and "quantile bin 2;" in member
    index = (out / "index.html").read_text()
    assert "not described" in index and "spatial, ocr" in index and "0.400" in index
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    failed, broken, _ = page_load_problems((out / "L0F1.html").as_uri())
    assert not failed and not broken
    heights = page_values((out / "L0F0.html").as_uri(), [
        "Array.from(document.querySelectorAll('svg.histogram rect'))"
        ".map(r => Math.round(r.getBBox().height)).join(',')"])
    assert heights == ["0,60,120,60"]  # counts 0, 1, 2, 1 (edges 0, .5, 1, 1.5, 2) over 120 px


# ------------------------------------------------------------------------- the report


def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), colour).save(path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "results/demo"
    files = [_png(run / f"figures/{s}.png") for s in (
        "fig12_attribution_layers", "fig1_fvu_adaptation", "fig2_feature_selection",
        "fig_autointerp_f1", "fig99_something_new", "fig13_attribution_heads")]
    (run / "figures/fig12_attribution_layers.pdf").write_bytes(b"%PDF-1.4")
    files.append(run / "figures/fig12_attribution_layers.pdf")
    (run / "tables").mkdir()
    pd.DataFrame({"layer": range(40), "c_f": [0.5] * 40}).to_csv(run / "tables/features.csv",
                                                                index=False)
    pd.DataFrame({"feature": ["L0F1"], "f1": [0.75]}).to_csv(run / "tables/autointerp.csv",
                                                            index=False)
    (run / "tables/table1_ablation.md").write_text("| a |\n")
    files += [run / "tables/features.csv", run / "tables/autointerp.csv",
              run / "tables/table1_ablation.md"]
    for job, s in (("world", 2.5), ("causal/attribution", 10.0)):
        b = run / f"benchmarks/{job}.tsv"
        b.parent.mkdir(parents=True, exist_ok=True)
        b.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{s}\t0:00:0{int(s) % 10}\t100.5\t{s}\n")
    dash = run / "dashboards"
    dash.mkdir()
    (dash / "index.html").write_text("<html></html>")
    (dash / "L0F1.html").write_text("<html></html>")
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "fig12_attribution_layers.rst").write_text("Layer-wise attribution <b>here</b>.")
    out = build_report(files, run, run / "report.html", run="demo",
                       config={"run": "demo", "autointerp": {"backend": "local"}},
                       benchmarks_dir=run / "benchmarks", captions_dir=captions,
                       dashboards_dir=dash)
    return run, out


def test_report_holds_every_figure_in_paper_order(run_dir):
    run, out = run_dir
    assert not missing_references(out), missing_references(out)
    figures = sorted(str(p.relative_to(run)) for p in (run / "figures").glob("*.png"))
    imgs = image_refs(out)
    assert sorted(imgs) == figures
    # the paper's order: 4.1 before 4.2 before 5.1 before 5.2 (12 before 13); new ones last
    order = [Path(i).stem for i in imgs]
    assert order == ["fig1_fvu_adaptation", "fig2_feature_selection", "fig_autointerp_f1",
                     "fig12_attribution_layers", "fig13_attribution_heads", "fig99_something_new"]
    headings = parse(out).headings
    titles = [s.title for s in SECTIONS]
    shown = [h for h in headings if h in titles]
    assert shown == sorted(shown, key=titles.index)
    assert headings[-4:] == ["Other outputs", "Config used", "Software versions", "Timings"]
    text = out.read_text()
    assert "Layer-wise attribution &lt;b&gt;here&lt;/b&gt;." in text  # captions are escaped
    assert f"first {MAX_ROWS} of 40 rows" in text
    assert 'href="dashboards/L0F1.html"' in text and 'href="tables/table1_ablation.md"' in text
    assert "backend: local" in text and "12.5 s" in text  # config; summed timings
    assert "transformers" in text


def test_section_lookup():
    assert section_of("fig1_fvu_adaptation").key == "adaptation"
    assert section_of("fig12_attribution_layers").key == "attribution"
    assert section_of("fig16_custom_queries").key == "attribution"
    assert section_of("table2_ablation_full", "table").key == "ablation"
    assert section_of("features", "table").key == "adapted"
    assert section_of("features_extra", "table").key == "other"


def test_benchmark_table(run_dir):
    run, _ = run_dir
    table = benchmark_table(run / "benchmarks")
    assert list(table["job"]) == ["causal/attribution", "world"]
    assert table["seconds"].sum() == pytest.approx(12.5)


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium)")
def test_report_loads_in_headless_chromium(run_dir, tmp_path):
    run, out = run_dir
    failed, broken, n_requests = page_load_problems(out.as_uri())
    assert not failed and not broken
    assert n_requests >= 1 + len(image_refs(out))  # the page and each figure were loaded
    # the checker itself notices a missing figure
    (run / "figures/fig2_feature_selection.png").unlink()
    failed, broken, _ = page_load_problems(out.as_uri())
    assert any("fig2_feature_selection.png" in f for f in failed)
    assert any("fig2_feature_selection.png" in b for b in broken)
    json.dumps(failed)


def rst_problems(text):
    """Warnings and errors docutils reports while reading `text` as reStructuredText."""
    from docutils.core import publish_doctree

    stream = io.StringIO()
    publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 5,
                                              "warning_stream": stream})
    return stream.getvalue()


def test_captions_are_valid_rst(root):
    assert "Undefined substitution" in rst_problems("sum of |score| per head")  # it notices
    captions = sorted((root / "report").glob("*.rst"))
    assert captions
    for path in captions:
        assert not rst_problems(path.read_text()), path.name
