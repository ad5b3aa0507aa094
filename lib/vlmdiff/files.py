"""Writing outputs so that no job leaves a partial file that looks complete."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr


def _temporary_name(path: Path, suffix: str = "") -> Path:
    """This process's temporary name beside `path`, after removing any a killed job left."""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    for stale in path.parent.glob(f".{glob.escape(stem)}.tmp*{glob.escape(suffix)}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return path.with_name(f".{stem}.tmp{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (same suffix) to write to; renamed to `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """`table` as parquet or CSV (by the suffix of `path`), written atomically, no index."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: tables are written as .parquet or .csv")
    return path


def write_netcdf(data: xr.Dataset | xr.DataArray, path: str | os.PathLike) -> Path:
    """`data.to_netcdf`, written atomically."""
    with atomic_path(path) as tmp:
        data.to_netcdf(tmp)
    return Path(path)


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_safetensors(folder: str | os.PathLike) -> None:
    """Give the `.safetensors` files under `folder` the mode a plain `open` gives (0666 less the
    umask), and `folder` that of a plain `mkdir`: safetensors 0.8 writes its files 0600
    (safetensors#782), and `tempfile.mkdtemp` makes 0700 folders, so that a cluster's other
    users, or a container's, could not read the models and SAEs a run wrote."""
    folder, mask = Path(folder), _umask()
    if folder.stat().st_mode & 0o777 == 0o700:
        folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*.safetensors"):
        if f.is_file() and f.stat().st_mode & 0o777 != 0o666 & ~mask:
            f.chmod(0o666 & ~mask)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; it replaces `path` on success, swapped in so
    that no half folder ever shows under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        share_safetensors(tmp)
        if path.exists():
            old = _temporary_name(path.with_name(f"{path.name}.old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError,
                     what: str = "") -> dict[str, Any]:
    """The JSON object in `path`; a missing file raises FileNotFoundError and malformed JSON or
    a non-object raises `error`, each naming the file (prefixed by `what` where given)."""
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}{path} is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw
