"""Activation caches: every decoder block's output over one (split, shard), as a zarr v3 group.

A store holds `layer_{L}` arrays `[n_tokens, d_model]` (the residual stream after block L) and
1-D `sample`, `position`, `token_id`, `is_image` along the same `token` axis. Writers append
whole chunks into `<out>.partial` and rename it to `<out>` when done; readers stream chunk by
chunk, so memory is bounded by chunk and buffer sizes, never by the size of a store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch

from vlmdiff.cache.store import (
    DTYPES,
    HOOK_POINT,
    LAYER_INDEXING,
    PARTIAL,
    ChunkWriter,
    check_finite,
    count_true,
    create_store,
    resume_store,
)
from vlmdiff.hooks import ResidCapture
from vlmdiff.inputs import COLUMNS, MODES, TEXT_SOURCES, encode_rows
from vlmdiff.logs import Log

if TYPE_CHECKING:
    from datasets import Dataset


T = TypeVar("T")


# ----------------------------------------------------------------------------------- writing


def write_cache(
    model: torch.nn.Module,
    ds: Dataset,
    out_dir: str | Path,
    *,
    mode: str,
    text_source: str = "questions",
    processor: Any = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    image_tokens_per_sample: int | None = None,
    shard: tuple[int, int] = (0, 1),
    dtype: str = "float16",
    seed: int = 0,
    device: str | torch.device = "cpu",
    chunk_tokens: int = 4096,
    compress: bool = False,
    max_len: int | None = None,
    split: str | None = None,
    model_name: str | None = None,
    log_every: int = 10,
    background_writes: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Run `model` over one shard of `ds` and store every decoder block's output at `out_dir`.

    `mode="vqa"`: image + question through `processor` (a VLM). `mode="text"`: no image, the
    text taken from `text_source`: `"questions"` (the VQA questions as chat prompts) or
    `"corpus"` (LM corpus documents, formatted as for pretraining, truncated to `max_len`).
    Layer arrays are stored uncompressed unless `compress` (zstd saves only ~8% on float16
    activations and costs CPU time next to a small model). Re-running after a crash resumes
    from `<out_dir>.partial`. Zarr writes run on a thread beside the next forward pass unless
    `background_writes` is false (the store is the same either way). Returns a summary, with
    seconds spent per phase.
    """
    # the writer's imports (transformers) take seconds; readers of caches do not need them
    from vlmdiff.hooks import language_layers
    from vlmdiff.models.build import resolve_device

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if min(chunk_tokens, batch_size, log_every) < 1:
        raise ValueError("chunk_tokens, batch_size and log_every must be positive")
    source = _Source.build(
        model,
        ds,
        mode=mode,
        text_source=text_source,
        processor=processor,
        tokenizer=tokenizer,
        max_len=max_len,
        split=split,
        image_tokens=image_tokens_per_sample or None,
        seed=seed,
    )
    lo, hi = shard_rows(len(ds), shard)
    layers = language_layers(model)
    attrs = {
        "model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "hook_point": HOOK_POINT,
        "layer_indexing": LAYER_INDEXING,
        "dtype": dtype,
        "mode": mode,
        "text_source": text_source,
        "split": split,
        "shard_index": shard[0],
        "shard_count": shard[1],
        "row_start": lo,
        "row_stop": hi,
        "n_layers": len(layers),
        "d_model": _text_config(model).hidden_size,
        "image_tokens_per_sample": source.image_tokens,
        "image_token_id": source.image_id,
        "bos": "dropped",
        "padding": "dropped",
        "max_len": source.max_len,
        "seed": seed,
        "batch_size": batch_size,
        "chunk_tokens": chunk_tokens,
        "compress": compress,
    }
    attrs = json.loads(json.dumps(attrs))  # as zarr.json gives them back, for comparisons

    out = Path(out_dir)
    partial = out.with_name(out.name + PARTIAL)
    resumed = resume_store(partial, attrs, log)
    if resumed is None:
        group, samples_done, tokens_done = create_store(partial, attrs), 0, 0
    else:
        group, samples_done, tokens_done = resumed
        log(f"resuming {partial}: {samples_done}/{hi - lo} samples, {tokens_done} tokens on disk")

    dev = resolve_device(str(device))
    model.to(dev).eval()
    backbone = getattr(model, "model", model)  # the decoder stack without the LM head
    capture = ResidCapture(layers, torch.float16 if dtype == "float16" else torch.float32)
    writer = ChunkWriter(
        group, len(layers), chunk_tokens, samples_done, tokens_done, background_writes
    )
    first, n_batches = samples_done // batch_size, -(-(hi - lo) // batch_size)
    # batches keep their boundaries on resume (rows already stored are not stored again), so
    # with the same batch size a resumed run computes exactly what an uninterrupted one would
    bounds = [(lo + b * batch_size, min(hi, lo + (b + 1) * batch_size)) for b in range(n_batches)]
    resume_row = lo + samples_done
    # on a CPU, encoding on a thread would only compete with the forward pass for the cores
    batches = _prefetched(
        lambda bound: source.batch(*bound, resume_row), bounds[first:], dev.type != "cpu"
    )
    timer, forwarded = _Timer(), 0
    try:
        for b in range(first, n_batches):
            with timer("encode"):
                batch = next(batches)
            with timer("forward"):
                acts = capture.run(backbone, batch.inputs, batch.keep, dev)
            with timer("store"):
                check_finite(acts, batch.meta)
                writer.add(acts, batch.meta, batch.counts)
            forwarded += int(batch.inputs["attention_mask"].sum())
            if (b + 1 - first) % log_every == 0 or b == n_batches - 1:
                done = bounds[b][1] - lo
                log(_progress(done, hi - lo, samples_done, writer.total_rows, forwarded, timer))
        with timer("store"):
            writer.flush(final=True)
    finally:
        batches.close()
        capture.remove()
        writer.close()

    n_tokens, n_image = writer.total_rows, count_true(group["is_image"])
    group.update_attributes(
        {"n_samples": hi - lo, "n_tokens": n_tokens, "n_image_tokens": n_image, "complete": True}
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    seconds = timer.elapsed()
    log(f"wrote {out}: {hi - lo} samples, {n_tokens} tokens ({n_image} image) in {seconds:.1f}s")
    return {
        "path": str(out),
        "n_samples": hi - lo,
        "n_tokens": n_tokens,
        "n_image_tokens": n_image,
        "n_text_tokens": n_tokens - n_image,
        "n_layers": len(layers),
        "d_model": attrs["d_model"],
        "tokens_forwarded": forwarded,
        "seconds": seconds,
        "tokens_per_s": forwarded / seconds if seconds > 0 else float("nan"),
        **{f"seconds_{name}": t for name, t in timer.totals.items()},
        "resumed_from_sample": samples_done,
    }


class _Batch(NamedTuple):
    inputs: dict[str, torch.Tensor]
    keep: torch.Tensor
    meta: dict[str, np.ndarray]
    counts: np.ndarray  # tokens stored per sample, for the samples not yet on disk


class _Source(NamedTuple):
    """Where a cache's inputs come from and how they are encoded and selected."""

    ds: Dataset
    mode: str
    text_source: str
    processor: Any
    tokenizer: Any
    max_len: int | None
    image_id: int | None
    image_tokens: int | None
    seed: int

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        ds: Dataset,
        *,
        mode: str,
        text_source: str,
        processor: Any,
        tokenizer: Any,
        max_len: int | None,
        split: str | None,
        image_tokens: int | None,
        seed: int,
    ) -> _Source:
        """Check the inputs fit together; fails naming what is missing."""
        _check_mode(mode, text_source)
        tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if mode == "vqa" and processor is None:
            raise ValueError("mode='vqa' needs the VLM's processor")
        if tok is None:
            raise ValueError("mode='text' needs a tokenizer (or a processor that holds one)")
        _check_columns(ds, COLUMNS[mode, text_source], split or "dataset")
        image_id = _image_token_id(model)
        if mode == "vqa" and image_id is None:
            name = type(model).__name__
            raise ValueError(f"mode='vqa' needs a VLM; {name} has no image_token_id")
        if text_source == "corpus" and max_len is None:
            max_len = _text_config(model).max_position_embeddings
        return cls(ds, mode, text_source, processor, tok, max_len, image_id, image_tokens, seed)

    def batch(self, a: int, z: int, resume_row: int) -> _Batch:
        """Inputs for rows `[a, z)` and the tokens to store; rows before `resume_row` are not."""
        inputs = encode_rows(
            self.ds,
            a,
            z,
            mode=self.mode,
            text_source=self.text_source,
            processor=self.processor,
            tokenizer=self.tokenizer,
            max_len=self.max_len,
        )
        rows = np.arange(a, z, dtype=np.int64)
        keep, meta = select_tokens(
            inputs["input_ids"],
            inputs["attention_mask"],
            rows,
            self.tokenizer.bos_token_id,
            self.image_id,
            self.image_tokens,
            self.seed,
        )
        keep[torch.from_numpy(rows < resume_row)] = False
        meta = {n: v[meta["sample"] >= resume_row] for n, v in meta.items()}
        counts = np.bincount(meta["sample"] - a, minlength=z - a)[rows >= resume_row]
        return _Batch(inputs, keep, meta, counts)


def _prefetched(fn: Callable[[T], _Batch], items: Sequence[T], thread: bool) -> Iterator[_Batch]:
    """`fn(item)` for each item; with `thread`, the next one is prepared while the caller works."""
    if not thread:
        yield from map(fn, items)
        return
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-encode") as pool:
        job = pool.submit(fn, items[0])
        for i in range(len(items)):
            result = job.result()
            if i + 1 < len(items):
                job = pool.submit(fn, items[i + 1])
            yield result


def shard_rows(n_rows: int, shard: tuple[int, int]) -> tuple[int, int]:
    """The contiguous row range `[lo, hi)` of shard `i` of `n`."""
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    return i * n_rows // n, (i + 1) * n_rows // n


def select_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: np.ndarray,
    bos_id: int | None,
    image_id: int | None,
    image_tokens_per_sample: int | None,
    seed: int,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Which tokens of a padded batch are stored, and their metadata in row-major order.

    Padding and the leading BOS are dropped; every text token is kept; of each sample's image
    tokens the `image_tokens_per_sample` with the smallest hash keys of `(seed, row, j)` (`j`:
    the image token's ordinal in its row) are kept, a random subset that does not depend on
    batching or sharding.
    """
    attn = attention_mask.bool()
    position = attn.long().cumsum(dim=1) - 1
    keep = attn.clone()
    if bos_id is not None:
        keep &= ~((position == 0) & (input_ids == bos_id))
    is_image = input_ids == image_id if image_id is not None else torch.zeros_like(keep)
    is_image &= keep
    k = image_tokens_per_sample
    if k and bool((is_image.sum(dim=1) > k).any()):
        image = is_image.numpy()
        ordinal = np.cumsum(image, axis=1, dtype=np.uint64)
        keys = np.where(image, _hash_keys(seed, np.asarray(rows), ordinal), np.uint64(2**64 - 1))
        rank = np.empty_like(keys, dtype=np.int64)
        np.put_along_axis(
            rank, np.argsort(keys, axis=1, kind="stable"), np.arange(keys.shape[1])[None], axis=1
        )
        keep &= ~torch.from_numpy(image & (rank >= k))
        is_image &= keep
    sample = torch.from_numpy(np.asarray(rows, dtype=np.int64))[:, None].expand_as(keep)
    meta = {
        "sample": sample[keep].numpy(),
        "position": position[keep].numpy().astype(np.int32),
        "token_id": input_ids[keep].numpy().astype(np.int32),
        "is_image": is_image[keep].numpy(),
    }
    return keep, meta


def _hash_keys(seed: int, rows: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 keys of `(seed, row, ordinal)`: splitmix64's finaliser."""
    # arrays throughout: numpy wraps uint64 arithmetic on arrays silently, on scalars it warns
    x = np.full((len(rows), 1), seed % 2**64, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= rows.astype(np.uint64)[:, None]
    x = x * np.uint64(0xD1B54A32D192ED03) + ordinal
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _check_mode(mode: str, text_source: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"text_source must be one of {TEXT_SOURCES}, got {text_source!r}")
    if mode == "vqa" and text_source != "questions":
        raise ValueError("mode='vqa' reads the questions; text_source='corpus' needs mode='text'")


def _check_columns(ds: Dataset, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise KeyError(f"{name} lacks column(s) {missing}; it has {ds.column_names}")


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _image_token_id(model: torch.nn.Module) -> int | None:
    config = model.config
    value = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if value is None else value


def _progress(done: int, total: int, start: int, stored: int, forwarded: int, timer: _Timer) -> str:
    elapsed = timer.elapsed()
    rate = forwarded / elapsed if elapsed > 0 else float("nan")
    eta = (total - done) * elapsed / max(1, done - start)
    return (
        f"cache: {done}/{total} samples, {stored} tokens stored, {rate:.0f} tokens/s, "
        f"eta {eta:.0f}s"
    )


class _Timer:
    """Wall time since creation, and per named phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.totals: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def cache_activations_job(
    *,
    model_dir: str | Path,
    split_path: str | Path,
    mode: str,
    text_source: str,
    max_samples: int,
    shard: tuple[int, int],
    cache_cfg: Mapping[str, Any],
    max_len: int | None,
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> dict[str, Any]:
    """The `cache_activations` rule: load a saved model and a split, cache one shard of it
    into `out["store"]`.

    `mode="vqa"` loads a VLM (model + processor); `mode="text"` a language model + tokenizer.
    `max_samples` (0 = all) keeps the first rows of the split before sharding.
    """
    from vlmdiff.models.build import load_lm, load_vlm, resolve_device
    from vlmdiff.world.layouts import load_split

    dev = resolve_device(device)
    ds = load_split(split_path)
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    processor = None
    if mode == "vqa":
        model, processor = load_vlm(model_dir, dev)
        tokenizer = processor.tokenizer
    else:
        model, tokenizer = load_lm(model_dir, dev)
    return write_cache(
        model,
        ds,
        out["store"],
        mode=mode,
        text_source=text_source,
        processor=processor,
        tokenizer=tokenizer,
        batch_size=cache_cfg["batch_size"],
        image_tokens_per_sample=cache_cfg["image_tokens_per_sample"],
        shard=shard,
        dtype=cache_cfg["dtype"],
        seed=seed,
        device=dev,
        chunk_tokens=cache_cfg["chunk_tokens"],
        max_len=max_len,
        split=Path(split_path).stem,
        model_name=str(model_dir),
        log=log,
    )
