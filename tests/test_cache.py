"""Activation caches: what is stored equals the hooked forward pass; sharding, resume, reading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from datasets import Dataset, Features, Sequence, Value
from vlmdiff.cache.read import CacheReadError, iter_batches, iter_samples, open_cache, token_mask
from vlmdiff.cache.store import CacheWriteError, ChunkWriter
from vlmdiff.cache.write import _prefetched, select_tokens, write_cache
from vlmdiff.hooks import language_layers
from vlmdiff.inputs import encode_corpus, prompt_texts
from vlmdiff.models.build import build_lm, build_vlm, make_processor
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.world.datasets import noise_vqa

PRESET = yaml.safe_load((Path(__file__).parents[1] / "presets" / "tiny.yaml").read_text())
IMAGE_SIZE = PRESET["world"]["scene"]["image_size"]
QUESTIONS = [
    "what colour is the circle",
    "is the square left of the triangle",
    "how many shapes are there",
    "is there a red square",
    "what letter is written",
    "is the blue circle above the green triangle",
]
N_IMAGE = (IMAGE_SIZE // PRESET["vision"]["patch_size"]) ** 2
ATOL = 3e-3  # float16 storage of activations of order 1


def write_vqa_cache(model, ds, out, **kwargs):
    """`write_cache` in VQA mode, silent unless the test passes its own `log`."""
    kwargs.setdefault("log", lambda m: None)
    return write_cache(model, ds, out, mode="vqa", **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    words = QUESTIONS + ["a red green blue circle square triangle yes no one two three"]
    return build_tokenizer(words)


@pytest.fixture(scope="module")
def lm(tokenizer):
    return build_lm(tokenizer, PRESET["lm"], seed=0).eval()


@pytest.fixture(scope="module")
def vlm(lm, tokenizer):
    return build_vlm(lm, tokenizer, PRESET["vision"], IMAGE_SIZE, seed=0).eval()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer, IMAGE_SIZE, PRESET["vision"]["patch_size"])


@pytest.fixture(scope="module")
def vqa() -> Dataset:
    return noise_vqa(QUESTIONS, 12, IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def corpus() -> Dataset:
    features = Features(
        {
            "description": Value("string"),
            "questions": Sequence(Value("string")),
            "answers": Sequence(Value("string")),
        }
    )
    return Dataset.from_dict(
        {
            "description": ["a red circle", "a blue square left of a green triangle", "two shapes"],
            "questions": [QUESTIONS[:2], QUESTIONS[2:3], QUESTIONS[3:6]],
            "answers": [["red", "yes"], ["two"], ["no", "a", "yes"]],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def vqa_cache(tmp_path_factory, vlm, vqa, processor) -> Path:
    out = tmp_path_factory.mktemp("cache") / "vqa"
    write_vqa_cache(
        vlm,
        vqa,
        out,
        processor=processor,
        batch_size=5,
        chunk_tokens=64,
        split="val",
        model_name="tiny-vlm",
    )
    return out


def read_all(path: Path, n_layers: int = 2) -> dict[str, np.ndarray]:
    ds = open_cache(path)
    out = {n: ds[n].values for n in ("sample", "position", "token_id", "is_image")}
    for layer in range(n_layers):
        out[f"layer_{layer}"] = ds[f"layer_{layer}"].values.astype(np.float32)
    return out


def direct_activations(model, inputs: dict) -> list[np.ndarray]:
    """Each block's output for one unpadded sample, from hidden states (+ a hook on the last)."""
    last: list[torch.Tensor] = []
    handle = language_layers(model)[-1].register_forward_hook(
        lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        hidden = model.model(**inputs, output_hidden_states=True).hidden_states
    handle.remove()
    n = len(language_layers(model))
    # hidden_states[L + 1] is block L's output, except the last, which has the final norm on it
    return [hidden[layer + 1][0].numpy() for layer in range(n - 1)] + [last[0][0].numpy()]


def test_vqa_cache_equals_hooked_forward(vqa_cache, vlm, vqa, processor, tokenizer):
    store = read_all(vqa_cache)
    assert sorted(set(store["sample"])) == list(range(len(vqa)))
    for s in range(len(vqa)):
        text = prompt_texts(tokenizer, [vqa[s]["question"]], with_image=True)
        inputs = processor(text=text, images=[vqa[s]["image"]], return_tensors="pt")
        ids = inputs["input_ids"][0].numpy()
        rows = store["sample"] == s
        # every token but BOS, in order; no padding
        np.testing.assert_array_equal(store["position"][rows], np.arange(1, len(ids)))
        np.testing.assert_array_equal(store["token_id"][rows], ids[1:])
        np.testing.assert_array_equal(store["is_image"][rows], ids[1:] == vlm.config.image_token_id)
        assert store["is_image"][rows].sum() == N_IMAGE
        for layer, direct in enumerate(direct_activations(vlm, dict(inputs))):
            np.testing.assert_allclose(
                store[f"layer_{layer}"][rows],
                direct[1:],
                atol=ATOL,
                rtol=2e-3,
                err_msg=f"layer {layer}, sample {s}",
            )
    assert tokenizer.bos_token_id not in set(store["token_id"][store["position"] == 0])
    assert tokenizer.pad_token_id not in set(store["token_id"])


def test_open_cache_is_lazy_and_described(vqa_cache, vlm):
    ds = open_cache(vqa_cache)
    assert set(ds.dims) == {"token", "d_model"}
    assert ds.sizes["d_model"] == vlm.config.text_config.hidden_size
    assert not ds["layer_0"].variable._in_memory
    assert {"sample", "position", "token_id", "is_image"} <= set(ds.coords)
    a = ds.attrs
    assert a["complete"] is True and a["hook_point"] == "resid_post" and a["bos"] == "dropped"
    assert a["model"] == "tiny-vlm" and a["split"] == "val" and a["dtype"] == "float16"
    assert a["n_layers"] == 2 and a["n_samples"] == 12 and a["n_tokens"] == ds.sizes["token"]
    assert a["image_tokens_per_sample"] is None and "0-based" in a["layer_indexing"]
    assert ds["layer_1"].dtype == np.float16
    assert not Path(str(vqa_cache) + ".partial").exists()


def test_image_subsampling_is_seeded_and_batch_independent(
    tmp_path, vqa_cache, vlm, vqa, processor
):
    def run(name: str, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        write_vqa_cache(
            vlm,
            vqa,
            tmp_path / name,
            processor=processor,
            seed=seed,
            batch_size=batch_size,
            image_tokens_per_sample=5,
        )
        return read_all(tmp_path / name)

    a, b, c = run("a", 4, seed=1), run("b", 7, seed=1), run("c", 4, seed=2)
    full = read_all(vqa_cache)
    for s in range(len(vqa)):
        rows, all_rows = a["sample"] == s, full["sample"] == s
        assert a["is_image"][rows].sum() == 5
        text, all_text = rows & ~a["is_image"], all_rows & ~full["is_image"]
        np.testing.assert_array_equal(a["position"][text], full["position"][all_text])
        image = a["position"][rows & a["is_image"]]
        assert set(image) < set(full["position"][all_rows & full["is_image"]])
    for name in ("sample", "position", "token_id", "is_image"):
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_allclose(a["layer_1"], b["layer_1"], atol=ATOL)
    assert not np.array_equal(a["position"], c["position"])
    np.testing.assert_array_equal(a["position"][~a["is_image"]], c["position"][~c["is_image"]])


def test_image_subsets_are_uniform_over_positions():
    """Each image position is kept about k/n of the time, and rows differ in what they keep."""
    n_rows, n_image, k = 4000, 36, 8
    ids = torch.full((n_rows, n_image + 4), 5)
    ids[:, 2 : 2 + n_image] = 9
    keep, meta = select_tokens(ids, torch.ones_like(ids), np.arange(n_rows), None, 9, k, seed=3)
    image = keep[:, 2 : 2 + n_image]
    assert (image.sum(dim=1) == k).all() and keep[:, :2].all() and keep[:, -2:].all()
    share = image.float().mean(dim=0).numpy()
    sigma = np.sqrt(k / n_image * (1 - k / n_image) / n_rows)
    assert np.abs(share - k / n_image).max() < 4.5 * sigma
    assert len({tuple(r) for r in image[:200].int().tolist()}) > 195
    assert meta["is_image"].sum() == n_rows * k


def test_token_mask_selects_regimes():
    is_image = np.array([False, True, True, False])
    np.testing.assert_array_equal(token_mask(is_image, "full"), [True] * 4)
    np.testing.assert_array_equal(token_mask(is_image, "image"), is_image)
    np.testing.assert_array_equal(token_mask(is_image, "text"), ~is_image)
    t = torch.from_numpy(is_image)
    assert torch.equal(token_mask(t, "text"), ~t)
    assert token_mask(t, "full").all()
    with pytest.raises(ValueError, match="regime"):
        token_mask(is_image, "random")


def test_union_of_shards_equals_unsharded(tmp_path, vqa_cache, vlm, vqa, processor):
    whole = read_all(vqa_cache)
    parts = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        write_vqa_cache(
            vlm,
            vqa,
            out,
            processor=processor,
            shard=(i, 3),
            batch_size=3,
            chunk_tokens=64,
            compress=i == 1,
        )
        assert open_cache(out).attrs["shard_index"] == i
        parts.append(read_all(out))
    assert [p["sample"].min() for p in parts] == [0, 4, 8]
    for name, value in whole.items():
        joined = np.concatenate([p[name] for p in parts])
        if name.startswith("layer_"):
            np.testing.assert_allclose(joined, value, atol=ATOL)
        else:
            np.testing.assert_array_equal(joined, value)


class Killed(RuntimeError):
    pass


def test_resume_after_kill_equals_uninterrupted(tmp_path, vlm, vqa, processor):
    kwargs = dict(
        mode="vqa", processor=processor, batch_size=3, chunk_tokens=32, image_tokens_per_sample=7
    )
    write_cache(vlm, vqa, tmp_path / "ref", log=lambda m: None, **kwargs)
    ref = read_all(tmp_path / "ref")

    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    calls = []

    def kill_in_hook(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise Killed

    handle = language_layers(vlm)[1].register_forward_hook(kill_in_hook)
    with pytest.raises(Killed):
        write_cache(vlm, vqa, out, log=lambda m: None, **kwargs)
    handle.remove()
    assert partial.exists() and not out.exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        open_cache(out)

    def kill_in_log(message: str) -> None:
        if "samples" in message and not message.startswith("resuming"):
            raise Killed

    # a second kill, after one more batch, from the progress log
    with pytest.raises(Killed):
        write_cache(vlm, vqa, out, log=kill_in_log, log_every=1, **kwargs)
    group = zarr.open_group(partial, mode="r+")
    done = group.attrs["samples_done"]
    assert 0 < done < len(vqa)
    # a kill between two arrays' appends leaves some arrays ahead of samples_done
    group["layer_0"].append(np.ones((10, group["layer_0"].shape[1]), np.float16))
    group["sample"].append(np.full(10, 99, np.int64))
    # and a kill inside a chunk write leaves zarr's own temporary beside the chunk
    stray = partial / "layer_0" / "c" / "0" / "0.0123abcd.partial"
    stray.write_bytes(b"half a chunk")

    messages: list[str] = []
    summary = write_cache(vlm, vqa, out, log=messages.append, **kwargs)
    assert any(m.startswith(f"resuming {partial}: {done}/") for m in messages)
    assert summary["resumed_from_sample"] == done
    assert not partial.exists()
    assert not list(out.rglob("*.partial"))
    got = read_all(out)
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _store_contents(path: Path) -> dict:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in sorted(group.array_keys())}, dict(group.attrs)


def test_background_writes_store_what_serial_writes_store(tmp_path, vlm, vqa, processor):
    kwargs = dict(processor=processor, batch_size=3, chunk_tokens=16, image_tokens_per_sample=5)
    write_vqa_cache(vlm, vqa, tmp_path / "serial", background_writes=False, **kwargs)
    write_vqa_cache(vlm, vqa, tmp_path / "thread", background_writes=True, **kwargs)
    serial, serial_attrs = _store_contents(tmp_path / "serial")
    thread, thread_attrs = _store_contents(tmp_path / "thread")
    assert thread_attrs == serial_attrs and serial_attrs["n_tokens"] > 4 * 16
    assert list(thread) == list(serial)
    for name, value in serial.items():
        assert thread[name].dtype == value.dtype, name
        assert thread[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("background", [True, False])
def test_failed_write_names_rows_and_leaves_store_unfinished(
    tmp_path, monkeypatch, vlm, vqa, processor, background
):
    kwargs = dict(processor=processor, batch_size=3, chunk_tokens=16, background_writes=background)
    write_vqa_cache(vlm, vqa, tmp_path / "ref", **kwargs)
    write = ChunkWriter._write
    calls = []

    def fail_second(self, data, start, *args):
        calls.append(start)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return write(self, data, start, *args)

    monkeypatch.setattr(ChunkWriter, "_write", fail_second)
    out = tmp_path / "run"
    message = r"writing token rows [1-9]\d*:\d+ of .*run\.partial.* failed: OSError: No space left"
    with pytest.raises(CacheWriteError, match=message):
        write_vqa_cache(vlm, vqa, out, **kwargs)
    assert not out.exists()
    assert zarr.open_group(tmp_path / "run.partial", mode="r").attrs["complete"] is False
    with pytest.raises(FileNotFoundError, match="unfinished"):
        open_cache(out)

    monkeypatch.setattr(ChunkWriter, "_write", write)
    write_vqa_cache(vlm, vqa, out, **kwargs)  # resumes from what the first write stored
    got, ref = _store_contents(out)[0], _store_contents(tmp_path / "ref")[0]
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_changed_settings_discard_partial(tmp_path, vlm, vqa, processor):
    out = tmp_path / "run"
    handle = language_layers(vlm)[0].register_forward_hook(_raise_on_call(3))
    with pytest.raises(Killed):
        write_vqa_cache(
            vlm,
            vqa,
            out,
            processor=processor,
            batch_size=2,
            chunk_tokens=16,
        )
    handle.remove()
    messages: list[str] = []
    write_vqa_cache(
        vlm,
        vqa,
        out,
        processor=processor,
        batch_size=2,
        chunk_tokens=16,
        image_tokens_per_sample=3,
        log=messages.append,
    )
    assert any("discarding" in m and "image_tokens_per_sample" in m for m in messages)
    assert open_cache(out).attrs["n_image_tokens"] == 3 * len(vqa)


def _raise_on_call(n: int):
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == n:
            raise Killed

    return hook


def test_text_mode_on_lm_with_corpus(tmp_path, lm, tokenizer, corpus):
    out = tmp_path / "corpus"
    summary = write_cache(
        lm,
        corpus,
        out,
        mode="text",
        text_source="corpus",
        tokenizer=tokenizer,
        batch_size=2,
        log=lambda m: None,
    )
    store = read_all(out)
    docs = encode_corpus(tokenizer, corpus, PRESET["lm"]["max_len"]).input_ids
    assert summary["n_tokens"] == sum(len(d) - 1 for d in docs) == len(store["sample"])
    assert not store["is_image"].any()
    assert open_cache(out).attrs["text_source"] == "corpus"
    for s, ids in enumerate(docs):
        rows = store["sample"] == s
        np.testing.assert_array_equal(store["token_id"][rows], ids[1:].numpy())
        for layer, direct in enumerate(direct_activations(lm, {"input_ids": ids[None]})):
            np.testing.assert_allclose(
                store[f"layer_{layer}"][rows], direct[1:], atol=ATOL, rtol=2e-3
            )


def test_text_mode_questions_on_vlm_without_image(tmp_path, vlm, tokenizer, vqa, processor):
    out = tmp_path / "noimage"
    write_cache(
        vlm,
        vqa,
        out,
        mode="text",
        processor=processor,
        shard=(1, 4),
        dtype="float32",
        log=lambda m: None,
    )
    assert open_cache(out)["layer_0"].dtype == np.float32
    store = read_all(out)
    assert not store["is_image"].any()
    assert sorted(set(store["sample"])) == [3, 4, 5]
    for s in (3, 4, 5):
        text = prompt_texts(tokenizer, [vqa[s]["question"]], with_image=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        np.testing.assert_array_equal(store["token_id"][store["sample"] == s], ids[0, 1:].numpy())


def test_non_finite_activation_names_layer_and_sample(tmp_path, vlm, vqa, processor):
    def poison(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h[1, 3] = float("nan")

    handle = language_layers(vlm)[1].register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match="layer 1, sample 1"):
            write_vqa_cache(
                vlm,
                vqa,
                tmp_path / "nan",
                processor=processor,
                batch_size=4,
            )
    finally:
        handle.remove()


def test_read_errors_name_path_and_layer(tmp_path, vqa_cache):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_cache(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        next(iter_batches([tmp_path / "nowhere"], 0, 8))
    with pytest.raises(ValueError, match=r"no layer 7; layers: \[0, 1\]"):
        next(iter_batches([vqa_cache], 7, 8))
    with pytest.raises(ValueError, match="no layer 7"):
        next(iter_samples(vqa_cache, 7))

    broken = tmp_path / "broken"
    shutil.copytree(vqa_cache, broken)
    zarr.open_group(broken, mode="r+").attrs["complete"] = False
    for read in (open_cache, lambda p: next(iter_samples(p, 0))):
        with pytest.raises(ValueError, match=f"{broken}.*incomplete"):
            read(broken)


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0x10
        path.write_bytes(bytes(raw))
    else:
        path.unlink()


# a deleted metadata chunk is not damage zarr can see: one equal to the fill value (an all-text
# `is_image`) is never written
@pytest.mark.parametrize(
    ("how", "array"),
    [(how, a) for how in ("truncate", "flip") for a in ("layer_1", "is_image", "sample")]
    + [("delete", "layer_1")],
)
def test_damaged_chunk_fails_naming_store_and_chunk(tmp_path, vqa_cache, how, array):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(vqa_cache, damaged)
    chunk = damaged / array / "c" / ("1/0" if array.startswith("layer") else "1")
    _damage(chunk, how)
    layer = 1 if array.startswith("layer") else 0
    where = "chunk file" if how == "delete" else "rows 64:128"
    readers = [lambda: list(iter_samples(damaged, layer))]
    if array != "sample":  # batches read no sample ids
        readers.append(lambda: list(iter_batches([damaged], layer, 16)))
    for read in readers:
        with pytest.raises(CacheReadError, match=f"{damaged}.*{array}.*damaged") as err:
            read()
        assert where in str(err.value)

def test_write_errors(tmp_path, lm, vlm, vqa, corpus, tokenizer, processor):
    with pytest.raises(ValueError, match="mode"):
        write_cache(vlm, vqa, tmp_path / "x", mode="image", processor=processor)
    with pytest.raises(ValueError, match="processor"):
        write_cache(vlm, vqa, tmp_path / "x", mode="vqa", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs a VLM"):
        write_cache(lm, vqa, tmp_path / "x", mode="vqa", processor=processor)
    with pytest.raises(KeyError, match="description"):
        write_cache(lm, vqa, tmp_path / "x", mode="text", text_source="corpus", tokenizer=tokenizer)


def _index_rows(path: Path, offset: int = 0) -> None:
    """Overwrite column 0 of layer 1 with each token's row number (+ offset)."""
    layer = zarr.open_group(path, mode="r+")["layer_1"]
    values = layer[:]
    values[:, 0] = offset + np.arange(len(values))
    layer[:] = values


@pytest.fixture(scope="module")
def indexed_cache(tmp_path_factory, vqa_cache) -> Path:
    """A copy of the VQA cache in which each token's activations say which token it is."""
    out = tmp_path_factory.mktemp("indexed") / "vqa"
    shutil.copytree(vqa_cache, out)
    _index_rows(out)
    return out


def _rows(batches) -> np.ndarray:
    return np.concatenate([a[:, 0].numpy() for a, _ in batches]).astype(np.int64)


@pytest.mark.parametrize(("shuffle", "size"), [(True, 50), (False, 50), (True, 130)])
def test_iter_batches_covers_every_token_once(indexed_cache, shuffle, size):
    is_image = open_cache(indexed_cache)["is_image"].values
    n = len(is_image)
    # buffers of 2 chunks (128 tokens): batches of 50 and of 130 both straddle buffers
    kwargs = dict(regime="image", shuffle=shuffle, seed=3, buffer_chunks=2)
    batches = list(iter_batches([indexed_cache], 1, size, **kwargs))
    assert [len(a) for a, _ in batches] == [size] * (n // size) + [n % size] * (n % size > 0)
    assert all(a.dtype == torch.float32 and m.dtype == torch.bool for a, m in batches)
    rows = _rows(batches)
    np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([m.numpy() for _, m in batches]), is_image[rows])
    if shuffle:
        assert not np.array_equal(rows, np.arange(n))
        other = _rows(iter_batches([indexed_cache], 1, size, **{**kwargs, "seed": 4}))
        assert not np.array_equal(rows, other)
    else:
        np.testing.assert_array_equal(rows, np.arange(n))

    resumed = list(iter_batches([indexed_cache], 1, size, start_batch=2, **kwargs))
    assert len(resumed) == len(batches) - 2
    for (a, m), (b, k) in zip(resumed, batches[2:], strict=True):
        assert torch.equal(a, b) and torch.equal(m, k)


def test_iter_batches_across_stores_and_token_budget(tmp_path, indexed_cache, vlm, vqa, processor):
    other = tmp_path / "other"
    write_vqa_cache(
        vlm,
        vqa,
        other,
        processor=processor,
        chunk_tokens=48,
        image_tokens_per_sample=2,
    )
    n1 = open_cache(indexed_cache).sizes["token"]
    _index_rows(other, offset=n1)
    n = n1 + open_cache(other).sizes["token"]
    paths = [indexed_cache, other]
    one_pass = _rows(iter_batches(paths, 1, 64, seed=1))
    np.testing.assert_array_equal(np.sort(one_pass), np.arange(n))
    budget = list(iter_batches(paths, 1, 64, seed=1, max_tokens=2 * n + 10))
    seen = np.bincount(_rows(budget), minlength=n)
    assert seen.sum() == 2 * n + 10 and seen.min() == 2 and (seen == 3).sum() == 10
    again = list(iter_batches(paths, 1, 64, seed=1, max_tokens=2 * n + 10))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(budget, again, strict=True))
    tail = list(
        iter_batches(paths, 1, 64, seed=1, max_tokens=2 * n + 10, start_batch=len(budget) - 2)
    )
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(tail, budget[-2:], strict=True))


def test_prefetching_keeps_order_and_errors():
    assert list(_prefetched(lambda i: i * i, range(5), thread=True)) == [0, 1, 4, 9, 16]
    assert list(_prefetched(lambda i: i, [], thread=True)) == []

    def fail(i: int) -> int:
        if i == 2:
            raise Killed
        return i

    with pytest.raises(Killed):
        list(_prefetched(fail, range(4), thread=True))


def test_iter_samples_yields_each_sample_in_order(vqa_cache):
    store = read_all(vqa_cache)
    blocks = list(iter_samples(vqa_cache, 1))
    assert [b.sample for b in blocks] == list(range(12))
    for b in blocks:
        rows = store["sample"] == b.sample
        np.testing.assert_array_equal(b.position, store["position"][rows])
        np.testing.assert_array_equal(b.is_image, store["is_image"][rows])
        np.testing.assert_array_equal(b.token_id, store["token_id"][rows])
        np.testing.assert_array_equal(b.acts.numpy(), store["layer_1"][rows])
        assert b.acts.dtype == torch.float32
