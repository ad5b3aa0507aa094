"""Reading activation caches: lazy xarray views, shuffled token batches, whole samples.

Readers stream chunk by chunk, so memory is bounded by chunk and buffer sizes, never by the size
of a store. `TOKEN_SETS` are the token masks a reader can select (`token_mask`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import xarray as xr
import zarr

from vlmdiff.cache.store import META_DTYPES, PARTIAL

# Snakemake marks a finished directory output with this file, which zarr warns about on every read
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")

_Unit = tuple[int, int, int]  # (store, first row, row after the last) of one chunk


TOKEN_SETS = ("full", "image", "text")


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


class CacheReadError(ValueError):
    """A finished cache is damaged: a chunk is missing, truncated or fails its checksum."""


_DAMAGED = "the store is damaged; delete it and re-run the job that wrote it"


def open_store(path: str | Path) -> zarr.Group:
    """The zarr group of a finished cache; fails naming the path if it is missing, partial, or
    lacks a chunk file."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        hint = ""
        if path.with_name(path.name + PARTIAL).exists():
            hint = f" (an unfinished write is at {path.name}{PARTIAL}; re-run its job)"
        raise FileNotFoundError(f"no activation cache at {path}{hint}")
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except (ValueError, TypeError, KeyError) as e:
        raise CacheReadError(f"activation cache {path}: metadata cannot be read ({e}); {_DAMAGED}") from e
    if attrs.get("complete") is not True:
        raise ValueError(f"activation cache {path} is incomplete: attribute complete is not true")
    _check_chunk_files(path, group)
    return group


def _check_chunk_files(path: Path, group: zarr.Group) -> None:
    # zarr reads a missing chunk as its fill value (zeros), which would pass for activations;
    # activation chunks are never all zeros, so each is on disk (metadata chunks equal to the
    # fill value, like an all-text `is_image`, may be absent)
    for name, array in group.arrays():
        if not name.startswith("layer_"):
            continue
        for i in range(-(-array.shape[0] // array.chunks[0])):
            key = "/".join(["c", str(i), *("0" * (array.ndim - 1))])
            if not (path / name / key).is_file():
                raise CacheReadError(
                    f"activation cache {path}: chunk file {name}/{key} is missing; {_DAMAGED}"
                )


def read_rows(array: zarr.Array, lo: int, hi: int, path: str | Path = "") -> np.ndarray:
    """Rows `[lo, hi)` of a cache array; a chunk that fails to decode (truncated, or failing
    its checksum) raises `CacheReadError` naming the store, array and rows."""
    try:
        return array[lo:hi]
    except Exception as e:
        raise CacheReadError(
            f"activation cache {path}: {array.basename} rows {lo}:{hi} cannot be read "
            f"({type(e).__name__}: {e}); {_DAMAGED}"
        ) from e


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
    raise ValueError(f"regime must be one of {TOKEN_SETS}, got {regime!r}")


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
        stores.append((layer_array(group, layer, path), group["is_image"], path))
    widths = {acts.shape[1] for acts, _, _ in stores}
    if len(widths) > 1:
        raise ValueError(f"activation caches differ in d_model: {sorted(widths)}")
    units = [
        (s, lo, min(lo + acts.chunks[0], acts.shape[0]))
        for s, (acts, _, _) in enumerate(stores)
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


def _buffers(
    stores: Sequence[tuple[zarr.Array, zarr.Array, str | Path]],
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
    stores: Sequence[tuple[zarr.Array, zarr.Array, str | Path]], units: Sequence[_Unit], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations and `is_image` of some chunks, read into one array each."""
    first = stores[units[0][0]][0]
    acts = np.empty((n, first.shape[1]), dtype=first.dtype)
    is_image = np.empty(n, dtype=bool)
    at = 0
    for s, lo, hi in units:
        layer, image, path = stores[s]
        acts[at : at + hi - lo] = read_rows(layer, lo, hi, path)
        is_image[at : at + hi - lo] = read_rows(image, lo, hi, path)
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
        block = {name: read_rows(group[name], lo, hi, path) for name in names}
        block["acts"] = read_rows(acts, lo, hi, path)
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
