"""Auto-interpretation of selected features (paper 5.1, App. B.1), in two variants.

For each feature and variant (RAW: picture + text; OVERLAY: picture + text + the attention
heat maps of its top heads): one call describes the feature from its top-activating examples
(prompt A, `{"description": ...}` completing "this neuron activates for ..."); two short
rounds classify held-out positives and random VQA negatives against that description
(prompt B, `{"classifications": [0/1, ...]}`); F1 of those classifications scores it.

A finished (feature, variant) is stored in a cache keyed by everything the model was shown and
who answered, so a re-run never asks it again and an interrupted run resumes where it stopped.
A call that fails (malformed replies after retries, or the endpoint gives up) is recorded as a
failure in the outputs, not cached, and asked again on the next run.

Beside F1, the validation rounds are scored as delphi scores detection (class-balanced
accuracy), and as many fuzzing rounds (prompt C) show the same held-out samples with words
marked `<<...>>`: positives where the feature fires, negatives where a random positive fired;
the model says whether the marked words are what the description is about
(`vlmdiff.interp.scoring`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmdiff.files import atomic_dir, atomic_path
from vlmdiff.interp.backends import Backend, BackendError, Expect, Message, ReplyError, ask
from vlmdiff.interp.distribution import word_marks
from vlmdiff.interp.evidence import FeatureEvidence, Sample, read_evidence
from vlmdiff.interp.scoring import Item, classification_scores, fuzzing_items
from vlmdiff.logs import Log

VARIANTS = ("raw", "overlay")
PROMPT_VERSION = "B.1/3+C/1"  # part of the cache key: changing the prompts asks everything again
SUMMARY_FILE = "summary.json"
CONTENT_FREE = "N/A"  # the description of the calibration baseline (see llm.LocalBackend)

_SEES = {"raw": "image+text", "overlay": "image+text; OVERLAY also includes attention heatmaps"}
DESCRIBE_SYSTEM = ("You are analyzing individual neurons using their top-activating samples "
                   "({sees}).")
DESCRIBE_TASK = (
    'Task: Produce one short, lower-case sentence completing: "this neuron activates for ...".\n'
    "Guidelines: Base it on consistent patterns supported by image{plus} and text; be specific; "
    "no hedging.\n"
    'Return: {{"description": "one concise sentence"}}')
VALIDATE_SYSTEM = ("You are validating a neuron description against short examples "
                   "({sees}).")
VALIDATE_TASK = (
    "Description: {description}\n"
    "Task: For each sample, output 1 if it reasonably matches the description; else 0.\n"
    'Return: {{"classifications": [0/1, ...]}} with one entry per sample, in order.')
FUZZ_SYSTEM = ("You are checking a neuron description against short examples whose marked "
               "words may be where the neuron fires ({sees}).")
FUZZ_TASK = (
    "Description: {description}\n"
    "In each sample the words between << and >> are marked.\n"
    "Task: For each sample, output 1 if the marked words are what the description is about; "
    "else 0.\n"
    'Return: {{"classifications": [0/1, ...]}} with one entry per sample, in order.')


# ------------------------------------------------------------------------- messages


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def top_tokens(s: Sample, n: int = 2) -> list[str]:
    """The `n` most active words of a sample's prompt (where the feature fires; chat-template
    tokens such as `<|assistant|>` left out: they say nothing about the sample)."""
    order = np.argsort(-np.asarray(s.token_acts, float), kind="stable")
    words = [s.tokens[i] for i in order if s.token_acts[i] > 0 and not s.tokens[i].startswith("<")]
    return words[:n]


def evidence_kinds(variant: str, vision: bool) -> list[str]:
    """What the model is shown of each sample."""
    kinds = ["text", "image" if vision else "picture in words (text-only model)"]
    if variant == "overlay":
        kinds.append("heat map image" if vision else "heat map in words (text-only model)")
    return kinds


def sample_parts(s: Sample, i: int, variant: str, vision: bool, folder: Path, *,
                 show_tokens: bool) -> list[dict[str, Any]]:
    """One sample as message parts: its text, its picture (or words), its heat map (OVERLAY).
    Described examples name their source; samples to classify do not (the negatives all come
    from VQA, so the source would give the answer away)."""
    line = f'Sample {i} ({s.source}): "{s.text}"' if show_tokens else f'Sample {i}: "{s.text}"'
    if show_tokens:
        tops = top_tokens(s)
        if tops:
            line += f" (most active on: {', '.join(repr(t) for t in tops)})"
    parts: list[dict[str, Any]] = []
    if vision:
        parts.append({"type": "text", "text": line})
        parts.append({"type": "image_url", "image_url": {"url": _data_url(folder / s.image)}})
        if variant == "overlay" and s.overlay:
            parts.append({"type": "text", "text": f"Sample {i} attention heatmap:"})
            parts.append({"type": "image_url", "image_url": {"url": _data_url(folder / s.overlay)}})
        return parts
    if s.scene:
        line += f"\n  picture: {s.scene}"
    if variant == "overlay" and s.overlay_text:
        line += f"\n  heatmap: {s.overlay_text}"
    return [{"type": "text", "text": line}]


def _user(parts: list[dict[str, Any]], vision: bool) -> Message:
    if vision:
        return {"role": "user", "content": parts}
    return {"role": "user", "content": "\n".join(p["text"] for p in parts)}


def describe_messages(ev: FeatureEvidence, variant: str, vision: bool, folder: Path) -> list[Message]:
    """Prompt A: the feature's examples, asking for one description."""
    parts: list[dict[str, Any]] = []
    for i, s in enumerate(ev.examples, 1):
        parts += sample_parts(s, i, variant, vision, folder, show_tokens=True)
    plus = " (+ overlays)" if variant == "overlay" else ""
    parts.append({"type": "text", "text": DESCRIBE_TASK.format(plus=plus)})
    return [{"role": "system", "content": DESCRIBE_SYSTEM.format(sees=_SEES[variant])},
            _user(parts, vision)]


def validate_messages(description: str, samples: Sequence[Sample], variant: str, vision: bool,
                      folder: Path) -> list[Message]:
    """Prompt B: one round of samples to classify against `description`."""
    parts: list[dict[str, Any]] = []
    for i, s in enumerate(samples, 1):
        parts += sample_parts(s, i, variant, vision, folder, show_tokens=False)
    parts.append({"type": "text", "text": VALIDATE_TASK.format(description=description)})
    return [{"role": "system", "content": VALIDATE_SYSTEM.format(sees=_SEES[variant])},
            _user(parts, vision)]


def fuzz_messages(description: str, pairs: Sequence[tuple[Sample, Item]], variant: str,
                  vision: bool, folder: Path) -> list[Message]:
    """Prompt C: one fuzzing round, each sample's prompt shown with its marked words."""
    parts: list[dict[str, Any]] = []
    for i, (s, item) in enumerate(pairs, 1):
        parts += sample_parts(replace(s, text=item.text), i, variant, vision, folder,
                              show_tokens=False)
    parts.append({"type": "text", "text": FUZZ_TASK.format(description=description)})
    return [{"role": "system", "content": FUZZ_SYSTEM.format(sees=_SEES[variant])},
            _user(parts, vision)]


# ------------------------------------------------------------------------- scoring


def validation_rounds(ev: FeatureEvidence, n_rounds: int, seed: int) -> list[list[Sample]]:
    """Held-out positives, random and hard negatives, shuffled (seeded per feature), in
    `n_rounds` rounds."""
    samples = ev.positives + ev.negatives + ev.hard_negatives
    salt = int(hashlib.sha256(ev.label.encode()).hexdigest()[:8], 16)
    order = np.random.default_rng([seed, salt]).permutation(len(samples))
    chunks = np.array_split(order, max(1, min(n_rounds, len(samples))))
    return [[samples[int(i)] for i in c] for c in chunks if len(c)]


def words(s: Sample) -> tuple[list[str], list[float]]:
    """A sample's prompt tokens as words, with their activations: chat-template tokens dropped,
    BPE space marks stripped (a sample without tokens gives its text's words, unmarked)."""
    if not s.tokens:
        return s.text.split(), [0.0] * len(s.text.split())
    pairs = [(t.lstrip("\u0120\u2581"), float(a)) for t, a in zip(s.tokens, s.token_acts,
                                                                  strict=True)
             if not t.startswith("<")]
    pairs = [(t, a) for t, a in pairs if t]
    return [t for t, _ in pairs], [a for _, a in pairs]


def fuzzing_rounds(ev: FeatureEvidence, n_rounds: int, seed: int
                   ) -> list[list[tuple[Sample, Item]]]:
    """Held-out positives and negatives marked for fuzzing, shuffled, in `n_rounds` rounds.
    Hard negatives are marked on the words they share with the described examples (where
    they share none, at a random positive's spans, as random negatives are)."""
    salt = int(hashlib.sha256(ev.label.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, salt, 1])
    marks = {id(s): word_marks(words(s)[0], ev.hard_words) for s in ev.hard_negatives}
    marked = [s for s in ev.hard_negatives if any(marks[id(s)])]
    unmarked = ev.negatives + [s for s in ev.hard_negatives if not any(marks[id(s)])]
    items = fuzzing_items([words(s) for s in ev.positives], [words(s)[0] for s in unmarked],
                          rng, hard=[(words(s)[0], marks[id(s)]) for s in marked])
    pairs = list(zip(ev.positives + unmarked + marked, items, strict=True))
    order = rng.permutation(len(pairs))
    chunks = np.array_split(order, max(1, min(n_rounds, len(pairs))))
    return [[pairs[int(i)] for i in c] for c in chunks if len(c)]


def f1_score(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float | int]:
    """Counts, precision, recall and F1 of 0/1 predictions (0 where undefined)."""
    y, p = np.asarray(labels, int), np.asarray(predictions, int)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    tp = int(((y == 1) & (p == 1)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    fn = int(((y == 1) & (p == 0)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "f1": f1}


def sample_kinds(ev: FeatureEvidence) -> dict[int, str]:
    """`id` of each sample scored -> "positive", "random" or "hard"."""
    kinds = {id(s): "positive" for s in ev.positives}
    kinds.update({id(s): "random" for s in ev.negatives})
    kinds.update({id(s): "hard" for s in ev.hard_negatives})
    return kinds


def kind_scores(results: Sequence[Mapping[str, Any]], kinds: Sequence[str]
                ) -> dict[str, float | int] | None:
    """`classification_scores` of the results of the sample kinds named (None where they hold
    no negative: a score against negatives that were never shown means nothing)."""
    chosen = [r for r in results if r["kind"] in kinds]
    if not any(r["label"] == 0 for r in chosen):
        return None
    return classification_scores([r["label"] for r in chosen], [r["prediction"] for r in chosen])


def _sample_ref(s: Sample) -> dict[str, Any]:
    return {"source": s.source, "row": s.row, "text": s.text, "activation": s.activation}


def _base_record(ev: FeatureEvidence, variant: str, backend: Backend) -> dict[str, Any]:
    return {
        "feature": ev.label, "layer": ev.layer, "index": ev.feature, "contrast": ev.contrast,
        "rank": ev.rank, "variant": variant, "backend": backend.name, "model": backend.model,
        "evidence": evidence_kinds(variant, backend.vision), "heads": ev.heads,
        "prompt_version": PROMPT_VERSION,
        "examples": [{**_sample_ref(s), "image": s.image, "overlay": s.overlay}
                     for s in ev.examples],
        "description": None, "classification_results": [], "f1": None, "detection": None,
        "fuzzing_results": [], "fuzzing": None, "detection_random": None,
        "detection_hard": None, "fuzzing_random": None, "fuzzing_hard": None,
        "hard_words": ev.hard_words,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0},
        "malformed_replies": [], "status": "ok", "error": None,
    }


def _add_usage(record: dict[str, Any], usage: Mapping[str, int]) -> None:
    for k, v in usage.items():
        record["usage"][k] += v


def _ask_rounds(backend: Backend, record: dict[str, Any], kind: str,
                chunks: Sequence[Sequence[tuple[Sample, Item]]], description: str, variant: str,
                folder: Path, attempts: int, step: list[str],
                kinds: Mapping[int, str]) -> tuple[list[int], list[int]]:
    """One call per round of `kind` ("validation": prompt B on whole samples; "fuzzing":
    prompt C on marked words), calibrated against the content-free description; each answer
    joins the record's results; returns labels and predictions. `step` names the round being
    asked, for the error of a failure."""
    fuzz = kind == "fuzzing"
    build = fuzz_messages if fuzz else validate_messages
    results = record["fuzzing_results" if fuzz else "classification_results"]
    labels, preds = [], []
    for r, chunk in enumerate(chunks, 1):
        step[0] = f"{kind} round {r}"
        shown = chunk if fuzz else [s for s, _ in chunk]
        null = build(CONTENT_FREE, shown, variant, backend.vision, folder)
        got, usage, bad = ask(backend, build(description, shown, variant, backend.vision, folder),
                              Expect("classifications", len(chunk), null), attempts=attempts)
        _add_usage(record, usage)
        record["malformed_replies"] += bad
        for (s, item), p in zip(chunk, got, strict=True):
            marked = {"marked": item.text} if fuzz else {}
            results.append({**_sample_ref(s), **marked, "round": r, "label": item.label,
                            "prediction": int(p), "kind": kinds[id(s)]})
            labels.append(item.label)
            preds.append(int(p))
    return labels, preds


def interpret(backend: Backend, ev: FeatureEvidence, variant: str, folder: Path, *,
              rounds: int, attempts: int, seed: int) -> dict[str, Any]:
    """The record of one (feature, variant): description, classifications, F1, usage."""
    start = time.perf_counter()
    record = _base_record(ev, variant, backend)
    if variant == "overlay" and not ev.heads:
        record.update(status="skipped",
                      error="no heat maps: the causal stage scored no heads for this feature")
        return record
    if not ev.examples or not ev.positives:
        record.update(status="skipped", error="too few top-activating samples to describe "
                      "and validate (the feature rarely fires)")
        return record
    step = ["description"]
    try:
        value, usage, bad = ask(backend, describe_messages(ev, variant, backend.vision, folder),
                                Expect("description"), attempts=attempts)
        _add_usage(record, usage)
        record["malformed_replies"] += bad
        record["description"] = value
        kinds = sample_kinds(ev)
        detect = [[(s, Item(s.text, s.label)) for s in c]
                  for c in validation_rounds(ev, rounds, seed)]
        labels, preds = _ask_rounds(backend, record, "validation", detect, value, variant,
                                    folder, attempts, step, kinds)
        record["detection"] = classification_scores(labels, preds)["balanced_accuracy"]
        # F1 as before hard negatives: the positives against the random negatives only
        results = record["classification_results"]
        record.update(f1_score(*zip(*[(r["label"], r["prediction"]) for r in results
                                      if r["kind"] != "hard"], strict=True)))
        labels, preds = _ask_rounds(backend, record, "fuzzing", fuzzing_rounds(ev, rounds, seed),
                                    value, variant, folder, attempts, step, kinds)
        record["fuzzing"] = classification_scores(labels, preds)["balanced_accuracy"]
        for name, key in (("detection", "classification_results"), ("fuzzing", "fuzzing_results")):
            for kind in ("random", "hard"):
                got = kind_scores(record[key], ("positive", kind))
                record[f"{name}_{kind}"] = got["balanced_accuracy"] if got else None
    except (ReplyError, BackendError) as err:
        record.update(status="failed", error=f"{step[0]}: {err}")
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


# ------------------------------------------------------------------------- caching, the job


def cache_file(cache_dir: Path, ev: FeatureEvidence, variant: str, backend_name: str,
               model: str, vision: bool, rounds: int, seed: int) -> Path:
    """Where a finished (feature, variant) is kept: keyed by what the model saw and who."""
    key = json.dumps([ev.digest(), variant, backend_name, model, vision, rounds, seed,
                      PROMPT_VERSION])
    return cache_dir / variant / f"{ev.label}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def _ask_and_keep(backend: Backend, ev: FeatureEvidence, variant: str, folder: Path, path: Path,
                  *, rounds: int, attempts: int, seed: int) -> dict[str, Any]:
    """`interpret`, its record cached as soon as it is done (failures are not): an
    interrupted run loses only the features in flight."""
    rec = {**interpret(backend, ev, variant, folder, rounds=rounds, attempts=attempts,
                       seed=seed), "cached": False}
    if rec["status"] != "failed":
        _write_json(rec, path)
    return rec


def _identity(cfg: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(backend, model, vision) a config names, known before any model is loaded."""
    kind = cfg["backend"]
    if kind == "auto":
        kind = "openai" if cfg["openai"].get("base_url") else "local"
    if kind == "openai":
        return "openai", cfg["openai"]["model"], bool(cfg["openai"]["vision"])
    from vlmdiff.interp.backends import local_model_source

    folder, gguf = local_model_source(cfg["local"].get("model"))
    return "local", (f"{folder.name}/{gguf}" if gguf else str(folder)), False


def autointerp_job(
    *,
    evidence_dir: str | Path,
    out: Mapping[str, str | Path],
    cache_dir: str | Path,
    cfg: Mapping[str, Any],
    seed: int,
    device: str = "cpu",
    make_backend: Callable[[Mapping[str, Any], str], Backend] | None = None,
    log: Log = print,
) -> dict[str, list[dict[str, Any]]]:
    """The `autointerp` rule: every (feature, variant) record, asked or taken from the cache;
    one JSON per feature and a `summary.json` (counts, F1, token usage) per variant folder in
    `out` (variant -> folder: `raw`, `overlay`)."""
    if make_backend is None:
        from vlmdiff.interp.backends import make_backend
    folder, cache = Path(evidence_dir), Path(cache_dir)
    evs = [ev for ev in read_evidence(folder) if ev.described]
    name, model, vision = _identity(cfg)
    rounds, attempts = cfg["rounds"], cfg["attempts"]
    records: dict[tuple[str, str], dict[str, Any]] = {}
    todo = []
    for ev in evs:
        for variant in out:
            path = cache_file(cache, ev, variant, name, model, vision, rounds, seed)
            if path.is_file():
                records[ev.label, variant] = {**json.loads(path.read_text()), "cached": True}
            else:
                todo.append((ev, variant, path))
    resuming = "resuming from its cache, " if records else ""
    log(f"auto-interp with {name} ({model}): {resuming}{len(records)} of {len(evs) * len(out)} "
        f"(feature, variant) pair(s) cached, {len(todo)} to ask")
    run_usage = {v: {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0} for v in out}
    if todo:
        start = time.perf_counter()
        backend = make_backend(cfg, device)
        log(f"{name} backend ready in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=backend.concurrency)
        try:
            futures = {pool.submit(_ask_and_keep, backend, ev, variant, folder, path,
                                   rounds=rounds, attempts=attempts, seed=seed): (ev, variant)
                       for ev, variant, path in todo}
            for done, fut in enumerate(as_completed(futures), 1):
                ev, variant = futures[fut]
                rec = records[ev.label, variant] = fut.result()
                for k, v in rec["usage"].items():
                    run_usage[variant][k] += v
                elapsed = time.perf_counter() - start
                eta = elapsed / done * (len(todo) - done)
                log(f"{ev.label} {variant}: {rec['status']}, F1 {rec['f1']}, detection "
                    f"{rec.get('detection')}, fuzzing {rec.get('fuzzing')}, "
                    f"{rec['description']!r} ({done}/{len(todo)}, {elapsed:.0f} s elapsed, "
                    f"eta {eta:.0f} s){' ' + rec['error'] if rec['error'] else ''}")
        finally:
            # interrupted: what has not started is dropped; what finished is in the cache
            pool.shutdown(wait=False, cancel_futures=True)
    result: dict[str, list[dict[str, Any]]] = {}
    for variant, target in out.items():
        recs = [records[ev.label, variant] for ev in evs]
        result[variant] = recs
        with atomic_dir(target) as tmp:
            for rec in recs:
                (tmp / f"{rec['feature']}.json").write_text(json.dumps(rec, indent=1))
            (tmp / SUMMARY_FILE).write_text(json.dumps(
                summarise(recs, name, model, run_usage[variant]), indent=1))
    for variant, u in run_usage.items():
        log(f"{variant}: {u['prompt_tokens']} prompt and {u['completion_tokens']} completion "
            f"tokens in {u['calls']} call(s) this run")
    return result


def summarise(records: Sequence[Mapping[str, Any]], backend: str, model: str,
              run_usage: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Counts by status, mean F1 and summed token usage of one variant's records."""
    f1 = [r["f1"] for r in records if r["status"] == "ok"]
    usage = {k: sum(r["usage"][k] for r in records)
             for k in ("prompt_tokens", "completion_tokens", "calls")}
    out = {"backend": backend, "model": model, "features": len(records),
           "status": {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "skipped")},
           "cached": sum(bool(r.get("cached")) for r in records),
           "mean_f1": float(np.mean(f1)) if f1 else None, "usage_all_records": usage}
    for name in ("detection", "fuzzing", "detection_hard", "fuzzing_hard"):
        v = [r[name] for r in records if r["status"] == "ok" and r.get(name) is not None]
        out[f"mean_{name}"] = float(np.mean(v)) if v else None
    if run_usage is not None:
        out["usage_this_run"] = dict(run_usage)
    return out


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """The per-feature records of one variant folder."""
    folder = Path(folder)
    if not (folder / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {SUMMARY_FILE} (an unfinished auto-interp output)")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
            if p.name != SUMMARY_FILE]
