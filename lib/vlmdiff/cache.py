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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch
import xarray as xr
import zarr

if TYPE_CHECKING:
    from datasets import Dataset

Log = Callable[[str], None]
T = TypeVar("T")

HOOK_POINT = "resid_post"
LAYER_INDEXING = "layer_L = output of decoder block L, 0-based, before the final norm"
MODES = ("vqa", "text")
TEXT_SOURCES = ("questions", "corpus")
REGIMES = ("full", "image", "text")
DTYPES = ("float16", "float32")
META_DTYPES = {"sample": "int64", "position": "int32", "token_id": "int32", "is_image": "bool"}
PARTIAL = ".partial"
_FREE = {"batch_size"}  # settings a resumed run may change without invalidating what is stored
TOKEN_DIM, MODEL_DIM = "token", "d_model"
# activation chunks are never all zeros, so zarr's check for empty chunks only costs time (~half
# of a chunk write)
_WRITE_ALL = {"write_empty_chunks": True}
_GROW_CHUNKS = 16  # arrays grow at least this many chunks at a time (unwritten chunks cost no disk)

_COLUMNS = {
    ("vqa", "questions"): ("question", "image"),
    ("text", "questions"): ("question",),
    ("text", "corpus"): ("description", "questions", "answers"),
}


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
    log: Log = print,
) -> dict[str, Any]:
    """Run `model` over one shard of `ds` and store every decoder block's output at `out_dir`.

    `mode="vqa"`: image + question through `processor` (a VLM). `mode="text"`: no image, the
    text taken from `text_source`: `"questions"` (the VQA questions as chat prompts) or
    `"corpus"` (LM corpus documents, formatted as for pretraining, truncated to `max_len`).
    Layer arrays are stored uncompressed unless `compress` (zstd saves only ~8% on float16
    activations and costs CPU time next to a small model). Re-running after a crash resumes
    from `<out_dir>.partial`. Returns a summary, with seconds spent per phase.
    """
    # the writer's imports (transformers) take seconds; readers of caches do not need them
    from vlmdiff.models import language_layers, resolve_device

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
    resumed = _resume(partial, attrs, log)
    if resumed is None:
        group, samples_done, tokens_done = _create_store(partial, attrs), 0, 0
    else:
        group, samples_done, tokens_done = resumed
        log(f"resuming {partial}: {samples_done}/{hi - lo} samples, {tokens_done} tokens on disk")

    dev = resolve_device(str(device))
    model.to(dev).eval()
    backbone = getattr(model, "model", model)  # the decoder stack without the LM head
    capture = ResidCapture(layers, torch.float16 if dtype == "float16" else torch.float32)
    writer = _ChunkWriter(group, len(layers), chunk_tokens, samples_done, tokens_done)
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
                _check_finite(acts, batch.meta)
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

    n_tokens, n_image = writer.total_rows, _count_true(group["is_image"])
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
        _check_columns(ds, _COLUMNS[mode, text_source], split or "dataset")
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
    tokens a random subset of `image_tokens_per_sample` is kept, drawn from an RNG seeded by
    `(seed, row)` so the choice does not depend on batching or sharding.
    """
    attn = attention_mask.bool()
    position = attn.long().cumsum(dim=1) - 1
    keep = attn.clone()
    if bos_id is not None:
        keep &= ~((position == 0) & (input_ids == bos_id))
    is_image = input_ids == image_id if image_id is not None else torch.zeros_like(keep)
    is_image &= keep
    k = image_tokens_per_sample
    if k:
        for b, row in enumerate(rows):
            where = torch.nonzero(is_image[b]).flatten().numpy()
            if len(where) > k:
                rng = np.random.default_rng([seed, int(row)])
                drop = np.setdiff1d(where, rng.choice(where, size=k, replace=False))
                keep[b, torch.from_numpy(drop)] = False
    sample = torch.from_numpy(np.asarray(rows, dtype=np.int64))[:, None].expand_as(keep)
    meta = {
        "sample": sample[keep].numpy(),
        "position": position[keep].numpy().astype(np.int32),
        "token_id": input_ids[keep].numpy().astype(np.int32),
        "is_image": is_image[keep].numpy(),
    }
    return keep, meta


class ResidCapture:
    """Forward hooks on decoder blocks that keep each block's output at selected tokens."""

    def __init__(self, layers: torch.nn.ModuleList, dtype: torch.dtype) -> None:
        self.keep: torch.Tensor | None = None
        self.dtype = dtype
        self.out: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            self.out[i] = h[self.keep].to(self.dtype).cpu()

        return hook

    def run(
        self,
        backbone: torch.nn.Module,
        inputs: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        device: torch.device,
    ) -> list[torch.Tensor]:
        """One forward pass; returns each block's output at the `keep` tokens, on the CPU."""
        kwargs = {n: v.to(device) for n, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(backbone.dtype)
        self.keep = keep.to(device)
        with torch.inference_mode():
            backbone(**kwargs, use_cache=False)
        out, self.out = self.out, [None] * len(self.out)
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            raise RuntimeError(f"decoder blocks {missing} did not run in the forward pass")
        return out  # type: ignore[return-value]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_finite(acts: Sequence[torch.Tensor], meta: Mapping[str, np.ndarray]) -> None:
    for layer, x in enumerate(acts):
        values = x.numpy()
        if np.isfinite(values).all():
            continue
        i = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise FloatingPointError(
            f"non-finite activation at layer {layer}, sample {int(meta['sample'][i])}, "
            f"position {int(meta['position'][i])} (after casting to {x.dtype}; "
            "if the model's output is finite, store with dtype='float32')"
        )


class _ChunkWriter:
    """Buffers token rows and appends them in whole chunks, so no chunk is rewritten.

    Writes run on a background thread, overlapping the next forward pass; at most one write
    is in flight, so memory stays at about two chunks. Arrays may be longer than what has
    been written until the final flush trims them; `tokens_done` is the truth. It records
    `samples_done` / `tokens_done`: the samples whose rows are all on disk, where an
    interrupted run resumes.
    """

    def __init__(
        self, group: zarr.Group, n_layers: int, chunk: int, samples_done: int, tokens_done: int
    ) -> None:
        self.group = group
        names = [f"layer_{i}" for i in range(n_layers)] + list(META_DTYPES)
        self.arrays = {n: group[n] for n in names}
        self.chunk = chunk
        self.written = tokens_done
        self.samples_done = samples_done
        self.pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.pending_rows = 0
        self.sample_ends: list[int] = []  # absolute row where each pending sample ends
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.in_flight: Future | None = None

    @property
    def total_rows(self) -> int:
        return self.written + self.pending_rows

    def add(
        self, acts: Sequence[torch.Tensor], meta: Mapping[str, np.ndarray], counts: np.ndarray
    ) -> None:
        for i, x in enumerate(acts):
            self.pending[f"layer_{i}"].append(x.numpy())
        for name in META_DTYPES:
            self.pending[name].append(meta[name])
        self.sample_ends += (self.total_rows + np.cumsum(counts)).tolist()
        self.pending_rows += int(counts.sum())
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Start writing every whole chunk pending; if `final`, write all and trim to size."""
        total = self.total_rows
        target = total if final else total // self.chunk * self.chunk
        if target > self.written:
            n = target - self.written
            data = {}
            for name, parts in self.pending.items():
                joined = np.concatenate(parts)
                data[name], self.pending[name] = joined[:n], [joined[n:].copy()]
            finished = int(np.searchsorted(self.sample_ends, target, side="right"))
            tokens_done = int(self.sample_ends[finished - 1]) if finished else None
            self.samples_done += finished
            self.sample_ends = self.sample_ends[finished:]
            start, self.written, self.pending_rows = self.written, target, total - target
            self.wait()
            job = self.pool.submit(self._write, data, start, self.samples_done, tokens_done)
            self.in_flight = job
        if final:
            self.wait()
            for array in self.arrays.values():
                if array.shape[0] != self.written:
                    array.resize((self.written, *array.shape[1:]))

    def wait(self) -> None:
        """Block until the write in flight is on disk; re-raises its error."""
        if self.in_flight is not None:
            job, self.in_flight = self.in_flight, None
            job.result()

    def close(self) -> None:
        """Let the write in flight finish (also when the caller is failing) and stop the thread."""
        self.pool.shutdown(wait=True)

    def _write(
        self,
        data: Mapping[str, np.ndarray],
        start: int,
        samples_done: int,
        tokens_done: int | None,
    ) -> None:
        for name, rows in data.items():
            array, stop = self.arrays[name], start + len(rows)
            # grow in big steps, as each resize rewrites metadata; the final flush trims
            if array.shape[0] < stop:
                size = max(stop, 2 * array.shape[0], _GROW_CHUNKS * self.chunk)
                array.resize((size, *array.shape[1:]))
            array[start:stop] = rows
        if tokens_done is not None:
            progress = {"samples_done": samples_done, "tokens_done": tokens_done}
            self.group.update_attributes(progress)


def _create_store(path: Path, attrs: Mapping[str, Any]) -> zarr.Group:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    chunk, d_model = attrs["chunk_tokens"], attrs["d_model"]
    capacity = _GROW_CHUNKS * chunk  # unwritten rows; the writer trims arrays when it finishes
    for i in range(attrs["n_layers"]):
        group.create_array(
            f"layer_{i}",
            shape=(capacity, d_model),
            chunks=(chunk, d_model),
            dtype=attrs["dtype"],
            compressors="auto" if attrs["compress"] else None,
            dimension_names=(TOKEN_DIM, MODEL_DIM),
            config=_WRITE_ALL,
        )
    for name, dt in META_DTYPES.items():
        group.create_array(
            name,
            shape=(capacity,),
            chunks=(chunk,),
            dtype=dt,
            dimension_names=(TOKEN_DIM,),
            config=_WRITE_ALL,
        )
    group.update_attributes({**attrs, "samples_done": 0, "tokens_done": 0, "complete": False})
    return group


def _resume(path: Path, attrs: Mapping[str, Any], log: Log) -> tuple[zarr.Group, int, int] | None:
    """Reopen an interrupted store that matches these settings, cut back to its last sample."""
    if not path.exists():
        return None
    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        stored = dict(group.attrs)
        samples_done, tokens_done = int(stored["samples_done"]), int(stored["tokens_done"])
        changed = [k for k, v in attrs.items() if stored.get(k) != v and k not in _FREE]
        if changed:
            raise ValueError(f"settings differ: {', '.join(changed)}")
        if not 0 <= samples_done <= attrs["row_stop"] - attrs["row_start"]:
            raise ValueError(f"samples_done={samples_done} is out of range")
        names = [f"layer_{i}" for i in range(attrs["n_layers"])] + list(META_DTYPES)
        arrays = [group[n] for n in names]
        short = [n for n, a in zip(names, arrays, strict=True) if a.shape[0] < tokens_done]
        if short:
            raise ValueError(f"arrays {short} hold fewer than tokens_done={tokens_done} rows")
        for a in arrays:
            if a.shape[0] > tokens_done:
                a.resize((tokens_done, *a.shape[1:]))
        group.update_attributes({k: attrs[k] for k in _FREE})
    except (KeyError, ValueError, TypeError, FileNotFoundError) as err:
        log(f"discarding unusable partial store {path}: {err}")
        shutil.rmtree(path)
        return None
    return group, samples_done, tokens_done


def encode_rows(
    ds: Dataset,
    lo: int,
    hi: int,
    *,
    mode: str,
    text_source: str = "questions",
    processor: Any = None,
    tokenizer: Any = None,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for rows `[lo, hi)` of `ds`, right-padded, formatted as in training."""
    from vlmdiff.training import collate, encode_corpus, prompt_texts

    tok = tokenizer if tokenizer is not None else processor.tokenizer
    ds = ds.select_columns(list(_COLUMNS[mode, text_source]))
    if text_source == "corpus":
        enc = encode_corpus(tok, ds.select(range(lo, hi)), max_len)
        batch = collate(enc, range(len(enc)), tok.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows = ds[lo:hi]
    texts = prompt_texts(tok, rows["question"], with_image=mode == "vqa")
    if mode == "vqa":
        batch = processor(
            text=texts,
            images=rows["image"],
            return_tensors="pt",
            padding=True,
            padding_side="right",
        )
        keys = ("input_ids", "attention_mask", "pixel_values")
    else:
        batch = tok(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        )
        keys = ("input_ids", "attention_mask")
    return {key: batch[key] for key in keys}


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


def _count_true(array: zarr.Array) -> int:
    step = max(1, array.chunks[0])
    return sum(int(np.count_nonzero(array[i : i + step])) for i in range(0, array.shape[0], step))


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


# ----------------------------------------------------------------------------------- reading


class SampleBlock(NamedTuple):
    """The stored tokens of one sample, in sequence order."""

    sample: int
    """Row of the sample in its split's dataset."""
    position: np.ndarray
    """Position of each token in the model's input sequence (int32)."""
    token_id: np.ndarray
    """Input token id of each token (int32)."""
    is_image: np.ndarray
    """Whether each token is an image token (bool)."""
    acts: torch.Tensor
    """Activations `[n_tokens, d_model]`, float32."""


def open_store(path: str | Path) -> zarr.Group:
    """The zarr group of a finished cache; fails naming the path if it is missing or partial."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        hint = ""
        if path.with_name(path.name + PARTIAL).exists():
            hint = f" (an unfinished write is at {path.name}{PARTIAL}; re-run its job)"
        raise FileNotFoundError(f"no activation cache at {path}{hint}")
    group = zarr.open_group(path, mode="r", zarr_format=3)
    if group.attrs.get("complete") is not True:
        raise ValueError(f"activation cache {path} is incomplete: attribute complete is not true")
    return group


def layer_array(group: zarr.Group, layer: int, path: str | Path = "") -> zarr.Array:
    """`layer_{layer}` of a store; fails naming the layer and the layers there are."""
    name = f"layer_{layer}"
    if name not in group:
        have = sorted(int(k.split("_")[1]) for k in group.array_keys() if k.startswith("layer_"))
        raise ValueError(f"activation cache {path} has no layer {layer}; layers: {have}")
    return group[name]


def open_cache(path: str | Path) -> xr.Dataset:
    """A finished cache as a lazy xarray Dataset (dims `token`, `d_model`); reads on access."""
    open_store(path)
    ds = xr.open_dataset(path, engine="zarr", chunks=None, cache=False, consolidated=False)
    return ds.set_coords(list(META_DTYPES))


def token_mask(is_image: np.ndarray | torch.Tensor, regime: str) -> np.ndarray | torch.Tensor:
    """Which tokens count under `regime`: `full` all, `image` image tokens, `text` the rest."""
    if regime == "full":
        return is_image | True
    if regime == "image":
        return is_image | False
    if regime == "text":
        return ~is_image
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


def iter_batches(
    paths: Sequence[str | Path],
    layer: int,
    batch_tokens: int,
    *,
    regime: str = "full",
    shuffle: bool = True,
    seed: int = 0,
    start_batch: int = 0,
    max_tokens: int | None = None,
    buffer_chunks: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `(acts float32 [n, d_model], loss_mask bool [n])` streamed from the stores.

    Every token is yielded; the mask marks those that count under `regime`. Chunks are visited
    in a seeded random order and tokens shuffled within a buffer of `buffer_chunks` chunks, so
    memory stays at about two buffers whatever the size of the stores. Without `max_tokens`
    this is one pass over all tokens; with it, passes repeat (reshuffled) until `max_tokens`
    tokens. Batch `i` is the same whatever `start_batch` is, so a resumed run sees what it
    would have seen; skipped buffers are not read.
    """
    token_mask(np.zeros(0, bool), regime)
    if batch_tokens < 1 or buffer_chunks < 1:
        raise ValueError("batch_tokens and buffer_chunks must be positive")
    if not paths:
        raise ValueError("iter_batches needs at least one activation cache")
    stores = []
    for path in paths:
        group = open_store(path)
        stores.append((layer_array(group, layer, path), group["is_image"]))
    widths = {acts.shape[1] for acts, _ in stores}
    if len(widths) > 1:
        raise ValueError(f"activation caches differ in d_model: {sorted(widths)}")
    units = [
        (s, lo, min(lo + acts.chunks[0], acts.shape[0]))
        for s, (acts, _) in enumerate(stores)
        for lo in range(0, acts.shape[0], acts.chunks[0])
    ]
    per_pass = sum(hi - lo for _, lo, hi in units)
    if per_pass == 0:
        return
    limit = per_pass if max_tokens is None else max_tokens
    pieces = _buffers(
        stores, units, buffer_chunks, regime, shuffle, seed, start_batch * batch_tokens, limit
    )
    yield from _rebatch(pieces, batch_tokens)


_Unit = tuple[int, int, int]  # (store, first row, row after the last) of one chunk


def _buffers(
    stores: Sequence[tuple[zarr.Array, zarr.Array]],
    units: Sequence[_Unit],
    buffer_chunks: int,
    regime: str,
    shuffle: bool,
    seed: int,
    skip: int,
    limit: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The row stream as buffers of `(acts, mask)`, from row `skip` up to row `limit`."""
    offset, epoch = 0, 0
    while offset < limit:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        if not shuffle:
            order = np.arange(len(units))
        for j, start in enumerate(range(0, len(units), buffer_chunks)):
            picked = [units[u] for u in order[start : start + buffer_chunks]]
            n = sum(hi - lo for _, lo, hi in picked)
            if offset + n <= skip:
                offset += n
                continue
            acts, is_image = _read_units(stores, picked, n)
            mask = token_mask(is_image, regime)
            if shuffle:
                perm = np.random.default_rng([seed, epoch, j]).permutation(n)
                acts, mask = acts[perm], mask[perm]
            first, last = max(0, skip - offset), min(n, limit - offset)
            offset += n
            if first < last:
                yield acts[first:last], mask[first:last]
            if offset >= limit:
                return
        epoch += 1


def _read_units(
    stores: Sequence[tuple[zarr.Array, zarr.Array]], units: Sequence[_Unit], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations and `is_image` of some chunks, read into one array each."""
    first = stores[units[0][0]][0]
    acts = np.empty((n, first.shape[1]), dtype=first.dtype)
    is_image = np.empty(n, dtype=bool)
    at = 0
    for s, lo, hi in units:
        acts[at : at + hi - lo] = stores[s][0][lo:hi]
        is_image[at : at + hi - lo] = stores[s][1][lo:hi]
        at += hi - lo
    return acts, is_image


def _rebatch(
    pieces: Iterator[tuple[np.ndarray, np.ndarray]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a stream of `(acts, mask)` pieces into batches of `size` rows (the last may be short).

    Only rows of a batch that spans two pieces are copied.
    """
    carry: tuple[np.ndarray, np.ndarray] | None = None
    for acts, mask in pieces:
        start = 0
        if carry is not None:
            start = min(size - len(carry[0]), len(acts))
            carry = (
                np.concatenate([carry[0], acts[:start]]),
                np.concatenate([carry[1], mask[:start]]),
            )
            if len(carry[0]) < size:
                continue
            yield _tensors(*carry)
            carry = None
        stop = start + (len(acts) - start) // size * size
        for i in range(start, stop, size):
            yield _tensors(acts[i : i + size], mask[i : i + size])
        if stop < len(acts):
            carry = (acts[stop:].copy(), mask[stop:].copy())
    if carry is not None:
        yield _tensors(*carry)


def _tensors(acts: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(acts.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(mask))


def iter_sample_chunks(path: str | Path, layer: int) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of whole samples, about one chunk each, in store order.

    Each block maps `sample`, `position`, `token_id`, `is_image` and `acts` (`layer_{layer}` as
    stored) to arrays over the same tokens; a sample that crosses a chunk boundary is held back
    and starts the next block, so no sample is ever split between two blocks.
    """
    group = open_store(path)
    acts = layer_array(group, layer, path)
    names = ("sample", "position", "token_id", "is_image")
    step, n = acts.chunks[0], acts.shape[0]
    carry: dict[str, np.ndarray] | None = None
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        block = {name: group[name][lo:hi] for name in names}
        block["acts"] = acts[lo:hi]
        if carry is not None:
            block = {name: np.concatenate([carry[name], block[name]]) for name in block}
        if hi == n:
            carry = None
        else:
            # the last sample may go on in the next chunk: hold it back
            others = np.flatnonzero(block["sample"] != block["sample"][-1])
            cut = int(others[-1]) + 1 if len(others) else 0
            carry = {name: v[cut:] for name, v in block.items()}
            block = {name: v[:cut] for name, v in block.items()}
        if len(block["sample"]):
            yield block


def iter_samples(path: str | Path, layer: int) -> Iterator[SampleBlock]:
    """Each sample's stored tokens, in store order, read one chunk at a time."""
    for block in iter_sample_chunks(path, layer):
        starts = np.flatnonzero(np.diff(block["sample"])) + 1
        bounds = [0, *starts.tolist(), len(block["sample"])]
        for a, z in zip(bounds[:-1], bounds[1:], strict=True):
            yield _sample_block(block, a, z)


def _sample_block(block: Mapping[str, np.ndarray], a: int, z: int) -> SampleBlock:
    return SampleBlock(
        sample=int(block["sample"][a]),
        position=block["position"][a:z],
        token_id=block["token_id"][a:z],
        is_image=block["is_image"][a:z],
        acts=torch.from_numpy(block["acts"][a:z].astype(np.float32)),
    )


def cache_split(
    model_dir: str | Path,
    split_path: str | Path,
    out_dir: str | Path,
    *,
    mode: str,
    text_source: str,
    max_samples: int,
    shard: tuple[int, int],
    cache_cfg: Mapping[str, Any],
    max_len: int | None,
    seed: int,
    device: str,
    log: Log = print,
) -> dict[str, Any]:
    """The workflow's cache job: load a saved model and a split, cache one shard of it.

    `mode="vqa"` loads a VLM (model + processor); `mode="text"` a language model + tokenizer.
    `max_samples` (0 = all) keeps the first rows of the split before sharding.
    """
    from vlmdiff.data import load_split
    from vlmdiff.models import load_lm, load_vlm, resolve_device

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
        out_dir,
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
