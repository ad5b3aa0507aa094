"""The activation cache's on-disk layout: one zarr v3 group per (model, split, shard).

A store holds `layer_{L}` arrays `[n_tokens, d_model]` (the residual stream after block L) and
1-D `sample`, `position`, `token_id`, `is_image` along the same `token` axis. Writers append
whole chunks into `<out>.partial` and rename it to `<out>` when done; a store whose settings
match resumes from its last whole chunk.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from vlmdiff.logs import Log

TOKEN_DIM, MODEL_DIM = "token", "d_model"
HOOK_POINT = "resid_post"
LAYER_INDEXING = "layer_L = output of decoder block L, 0-based, before the final norm"
DTYPES = ("float16", "float32")
META_DTYPES = {"sample": "int64", "position": "int32", "token_id": "int32", "is_image": "bool"}
PARTIAL = ".partial"
_FREE = {"batch_size"}  # settings a resumed run may change without invalidating what is stored
# activation chunks are never all zeros, so zarr's check for empty chunks only costs time (~half
# of a chunk write)
_WRITE_ALL = {"write_empty_chunks": True}
_GROW_CHUNKS = 16  # arrays grow at least this many chunks at a time (unwritten chunks cost no disk)


def _codecs(compress: bool) -> tuple[Any, ...]:
    # a CRC32C per chunk, so that a truncated or bit-flipped chunk fails when read instead of
    # feeding wrong activations on
    return (ZstdCodec(level=0), Crc32cCodec()) if compress else (Crc32cCodec(),)


def check_finite(acts: torch.Tensor, meta: Mapping[str, np.ndarray]) -> None:
    """Fail naming the first layer, sample and position of `acts` `[layer, token, d]` that is
    not finite."""
    # one float32 sum is finite exactly when every entry is (float16 rows cannot overflow it)
    # and costs a tenth of an elementwise check; only a failing batch is searched entry by entry
    if bool(torch.isfinite(acts.sum(dtype=torch.float32))):
        return
    for layer, x in enumerate(acts.numpy()):
        bad = ~np.isfinite(x).all(axis=1)
        if not bad.any():
            continue
        i = int(np.flatnonzero(bad)[0])
        raise FloatingPointError(
            f"non-finite activation at layer {layer}, sample {int(meta['sample'][i])}, "
            f"position {int(meta['position'][i])} (after casting to {x.dtype}; "
            "if the model's output is finite, store with dtype='float32')"
        )


class CacheWriteError(RuntimeError):
    """A write into a store failed; the store is left unfinished."""


def _gather(jobs: list[Awaitable[Any]]) -> None:
    """Run zarr's async operations together: one wait on its event loop instead of one each."""

    async def together() -> None:
        await asyncio.gather(*jobs)

    if jobs:
        sync(together())


class ChunkWriter:
    """Buffers token rows and appends them in whole chunks, so no chunk is rewritten.

    Writes run on a background thread (unless `background` is false), overlapping the next
    forward pass; at most one write is in flight, so memory stays at about two chunks. A
    failed write surfaces as `CacheWriteError` at the next `add`, `flush` or `wait`. Arrays may be longer than what has
    been written until the final flush trims them; `tokens_done` is the truth. It records
    `samples_done` / `tokens_done`: the samples whose rows are all on disk, where an
    interrupted run resumes.
    """

    def __init__(
        self,
        group: zarr.Group,
        n_layers: int,
        chunk: int,
        samples_done: int,
        tokens_done: int,
        background: bool = True,
    ) -> None:
        self.group = group
        names = [f"layer_{i}" for i in range(n_layers)] + list(META_DTYPES)
        # a config is not stored with the array: give it again, or zarr checks every chunk
        self.arrays = {n: group[n].with_config(_WRITE_ALL) for n in names}
        self.chunk = chunk
        self.written = tokens_done
        self.samples_done = samples_done
        self.pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.pending_rows = 0
        self.sample_ends: list[int] = []  # absolute row where each pending sample ends
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
            if background
            else None
        )
        self.in_flight: Future | None = None
        self.in_flight_rows = (0, 0)

    @property
    def total_rows(self) -> int:
        return self.written + self.pending_rows

    def add(self, acts: torch.Tensor, meta: Mapping[str, np.ndarray], counts: np.ndarray) -> None:
        """Queue `acts` `[layer, token, d_model]` and the tokens' metadata; write whole chunks."""
        for i, x in enumerate(acts.numpy()):
            self.pending[f"layer_{i}"].append(x)
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
            args = (data, start, self.samples_done, tokens_done)
            self.in_flight_rows = (start, target)
            if self.pool is None:
                self.in_flight = Future()
                try:
                    self.in_flight.set_result(self._write(*args))
                except Exception as err:  # noqa: BLE001 - re-raised by wait, as from the thread
                    self.in_flight.set_exception(err)
            else:
                self.in_flight = self.pool.submit(self._write, *args)
        if final:
            self.wait()
            resize = [
                a.async_array.resize((self.written, *a.shape[1:]))
                for a in self.arrays.values()
                if a.shape[0] != self.written
            ]
            _gather(resize)

    def wait(self) -> None:
        """Block until the write in flight is on disk; raises `CacheWriteError` if it failed."""
        if self.in_flight is not None:
            job, self.in_flight = self.in_flight, None
            err = job.exception()
            if err is not None:
                start, stop = self.in_flight_rows
                raise CacheWriteError(
                    f"writing token rows {start}:{stop} of {self.group.store} failed: "
                    f"{type(err).__name__}: {err}; the store is left unfinished"
                ) from err

    def close(self) -> None:
        """Let the write in flight finish (also when the caller is failing) and stop the thread."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _write(
        self,
        data: Mapping[str, np.ndarray],
        start: int,
        samples_done: int,
        tokens_done: int | None,
    ) -> None:
        stop = start + len(next(iter(data.values())))
        grow = []
        for name in data:
            array = self.arrays[name]
            # grow in big steps, as each resize rewrites metadata; the final flush trims
            if array.shape[0] < stop:
                size = max(stop, 2 * array.shape[0], _GROW_CHUNKS * self.chunk)
                grow.append(array.async_array.resize((size, *array.shape[1:])))
        _gather(grow)
        _gather([self.arrays[n].async_array.setitem(slice(start, stop), v) for n, v in data.items()])
        if tokens_done is not None:
            progress = {"samples_done": samples_done, "tokens_done": tokens_done}
            self.group.update_attributes(progress)
def create_store(path: Path, attrs: Mapping[str, Any]) -> zarr.Group:
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
            compressors=_codecs(attrs["compress"]),
            dimension_names=(TOKEN_DIM, MODEL_DIM),
            config=_WRITE_ALL,
        )
    for name, dt in META_DTYPES.items():
        group.create_array(
            name,
            shape=(capacity,),
            chunks=(chunk,),
            dtype=dt,
            compressors=_codecs(False),
            dimension_names=(TOKEN_DIM,),
            config=_WRITE_ALL,
        )
    group.update_attributes({**attrs, "samples_done": 0, "tokens_done": 0, "complete": False})
    return group
def resume_store(path: Path, attrs: Mapping[str, Any], log: Log) -> tuple[zarr.Group, int, int] | None:
    """Reopen an interrupted store that matches these settings, cut back to its last sample."""
    if not path.exists():
        return None
    # zarr writes each chunk to `<key>.<uuid>.partial` and renames it; a killed writer leaves
    # that temporary behind, which would otherwise end up in the finished store
    for stale in path.rglob("*.partial"):
        if stale.is_file():
            stale.unlink()
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
def count_true(array: zarr.Array) -> int:
    step = max(1, array.chunks[0])
    return sum(int(np.count_nonzero(array[i : i + step])) for i in range(0, array.shape[0], step))

