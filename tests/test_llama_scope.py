import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from vlmdiff.sae.folder import SAEFormatError
from vlmdiff.sae.topk import TopKSAE
from vlmdiff.sources.llama_scope import convert_llama_scope, load_llama_scope, release_layer_folder

D_MODEL, D_SAE, LAYER = 16, 64, 3
N_IN, N_OUT, THRESHOLD = 9.5, 12.0, 0.8


def write_release(
    root: Path,
    *,
    layer: int = LAYER,
    n_in: float = N_IN,
    n_out: float = N_OUT,
    apply_b_dec: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """A release layer folder as a Hub snapshot lays it out, with random non-unit decoder."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_MODEL, generator=gen) / math.sqrt(D_MODEL),
        "encoder.bias": torch.randn(D_SAE, generator=gen) * 0.5,
        "decoder.weight": torch.randn(D_MODEL, D_SAE, generator=gen)
        * (0.2 + 2 * torch.rand(D_SAE, generator=gen)),
        "decoder.bias": torch.randn(D_MODEL, generator=gen),
    }
    hook = f"blocks.{layer}.hook_resid_post"
    hp: dict[str, Any] = {
        "sae_type": "sae",
        "d_model": D_MODEL,
        "expansion_factor": D_SAE // D_MODEL,
        "d_sae": D_SAE,
        "act_fn": "jumprelu",
        "jump_relu_threshold": THRESHOLD,
        "top_k": 50,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": n_in, "out": n_out},
        "sparsity_include_decoder_norm": True,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": apply_b_dec,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "l1_coefficient": 2.0,
        **overrides,
    }
    folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2))
    return folder, hp, tensors


def release_forward(
    hp: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's definition, token by token: (h_s, codes f, reconstruction in model units).

    Latents pass the JumpReLU where `release_gate` says so (all with a ReLU when threshold=0).
    """
    d = hp["d_model"]
    s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    col = t["decoder.weight"].double().norm(dim=0)
    keep = release_gate(hp, t, x, threshold) if threshold > 0 else None
    h_s = torch.zeros(x.shape[0], hp["d_sae"], dtype=torch.float64)
    codes = torch.zeros_like(h_s)
    out = torch.zeros(x.shape[0], d, dtype=torch.float64)
    for n in range(x.shape[0]):
        xin = x[n].double() * s_in
        if hp["apply_decoder_bias_to_pre_encoder"]:
            xin = xin - t["decoder.bias"].double()
        for i in range(hp["d_sae"]):
            h = float(t["encoder.weight"][i].double() @ xin + t["encoder.bias"][i])
            h_s[n, i] = h * col[i]
            if (h_s[n, i] > 0) if keep is None else bool(keep[n, i]):
                codes[n, i] = h_s[n, i] / col[i]
        y = t["decoder.weight"].double() @ codes[n] + t["decoder.bias"].double()
        out[n] = y / s_out
    return h_s, codes, out


def release_gate(
    hp: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The release's JumpReLU mask at inference, step by step as its code takes them: the
    dataset norms folded into the weights (encoder bias / s_in, decoder weight * s_in / s_out),
    then raw activations encoded and scored with the folded decoder's column norms."""
    assert not hp["apply_decoder_bias_to_pre_encoder"]
    d = hp["d_model"]
    s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    b_enc = t["encoder.bias"].double() / s_in
    w_dec = t["decoder.weight"].double() * s_in / s_out
    hidden = x.double() @ t["encoder.weight"].double().T + b_enc
    return hidden * w_dec.norm(dim=0) > threshold


def inputs(n: int = 10, seed: int = 1) -> torch.Tensor:
    """Activations at the release's dataset scale (mean norm about N_IN)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_MODEL, generator=gen) * N_IN / math.sqrt(D_MODEL)


@torch.no_grad()
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_keep_all_latents_matches_release_without_threshold(tmp_path, apply_b_dec):
    folder, hp, t = write_release(tmp_path, apply_b_dec=apply_b_dec)
    sae = load_llama_scope(folder, LAYER, k=D_SAE)
    x = inputs()
    h_s, codes, expected = release_forward(hp, t, x, threshold=0.0)
    assert 0 < int((h_s <= 0).sum()) < h_s.numel()  # ReLU matters on these inputs
    got = sae(x).sae_out.double()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)

    # The check can fail: decoding with the "in" norm instead of the "out" norm differs.
    wrong = expected * N_IN / N_OUT
    assert not torch.allclose(got, wrong, atol=1e-2)
    assert sae.norm_factor.item() == pytest.approx(math.sqrt(D_MODEL) / N_IN)


@torch.no_grad()
@pytest.mark.parametrize("n_out", [N_OUT, N_IN])
def test_release_threshold_in_our_units_reproduces_jumprelu(tmp_path, n_out):
    folder, hp, t = write_release(tmp_path, n_out=n_out)
    sae = load_llama_scope(folder, LAYER, k=D_SAE)
    x = inputs(200)
    h_s, codes, expected = release_forward(hp, t, x, threshold=THRESHOLD)
    # The threshold removes some latents that the ReLU alone would keep, and keeps some.
    assert int(((h_s > 0) & (codes == 0)).sum()) > 0
    assert int((codes > 0).sum()) > 0

    stored = sae.extra["release_jump_relu_threshold"]
    s_in = math.sqrt(D_MODEL) / N_IN
    assert stored == pytest.approx(s_in * THRESHOLD)
    pre = sae.encode(x).pre_acts
    gated = pre * (pre > stored)
    got = (gated @ sae.W_dec.T + sae.b_dec) / sae.norm_factor
    assert torch.equal(gated > 0, codes > 0)  # the release's active set, on every token
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)

    # The check can fail: the gate the folder used to store (r * t) keeps other latents.
    r = n_out / N_IN
    assert not torch.equal(pre > r * THRESHOLD, codes > 0)


@torch.no_grad()
def test_decoder_unit_norm_and_latents_rescaled_by_the_norms(tmp_path):
    folder, hp, t = write_release(tmp_path)
    sae = load_llama_scope(folder, LAYER, k=D_SAE)
    col = t["decoder.weight"].norm(dim=0)
    assert not torch.allclose(col, torch.ones(D_SAE), atol=0.1)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D_SAE), atol=1e-5)
    assert torch.allclose(sae.W_dec * col, t["decoder.weight"], atol=1e-5)

    x = inputs()
    _, codes, _ = release_forward(hp, t, x, threshold=0.0)
    r = N_OUT / N_IN
    expected = codes * col.double() * r
    assert torch.allclose(sae.dense_acts(x).double(), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_topk_keeps_the_k_largest_release_latents(tmp_path):
    folder, hp, t = write_release(tmp_path, apply_b_dec=True)
    k = 5
    sae = load_llama_scope(folder, LAYER, k=k)
    x = inputs()
    h_s, codes, _ = release_forward(hp, t, x, threshold=0.0)
    out = sae(x)
    for n in range(x.shape[0]):
        expected = set(h_s[n].topk(k).indices.tolist())
        assert set(out.latent_indices[n].tolist()) == expected
        kept = torch.zeros_like(codes[n])
        idx = list(expected)
        kept[idx] = codes[n, idx]
        s_out = math.sqrt(D_MODEL) / N_OUT
        ref = (t["decoder.weight"].double() @ kept + t["decoder.bias"].double()) / s_out
        assert torch.allclose(out.sae_out[n].double(), ref, atol=1e-4, rtol=1e-4)
    assert sae.k == k and sae.extra["release_top_k"] == 50


@torch.no_grad()
def test_equal_norms_agree_with_generic_loader_and_convert_round_trips(tmp_path):
    folder, hp, t = write_release(tmp_path / "release", n_out=N_IN)
    sae = load_llama_scope(folder, LAYER, k=7)
    generic = TopKSAE.load(folder, k=7)
    x = inputs()
    assert torch.allclose(sae(x).sae_out, generic(x).sae_out, atol=1e-5)

    dst = tmp_path / "ours" / "layer_3"
    convert_llama_scope(folder, dst, LAYER, k=7)
    again = load_llama_scope(dst, LAYER, k=7)
    assert torch.allclose(again(x).sae_out, sae(x).sae_out, atol=1e-6)
    assert again.extra["layer"] == LAYER and again.extra["source_format"] == "llama-scope"
    assert again.extra["l1_coefficient"] == 2.0
    assert again.hook_point == "blocks.3.hook_resid_post"


def test_our_own_folder_loads_with_layer_check(tmp_path):
    ours = TopKSAE.from_random(D_MODEL, D_SAE, 4, seed=2, norm_factor=0.3)
    ours.save(tmp_path / "layer_3", {"layer": 3, "regime": "text"})
    sae = load_llama_scope(tmp_path / "layer_3", 3, k=9)
    assert sae.k == 9 and torch.equal(sae.W_enc, ours.W_enc)
    with pytest.raises(SAEFormatError, match="layer 4 was requested"):
        load_llama_scope(tmp_path / "layer_3", 4, k=9)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hook_point_in", "blocks.3.hook_resid_pre", "hook_point_in"),
        ("hook_point_out", "blocks.3.hook_mlp_out", "hook_point_out"),
        ("hook_point_out", "blocks.4.hook_resid_post", "hook_point_out .* is layer 4"),
        ("d_sae", D_SAE * 2, "encoder.weight"),
        ("dataset_average_activation_norm", {"in": 1.0}, "dataset_average_activation_norm"),
        ("act_fn", "relu", "act_fn"),
    ],
)
def test_bad_hyperparams_name_file_and_field(tmp_path, field, value, message):
    folder, _, _ = write_release(tmp_path, **{field: value})
    with pytest.raises(SAEFormatError, match=message) as e:
        load_llama_scope(folder, LAYER, k=5)
    assert str(folder) in str(e.value)


def test_requested_layer_must_match(tmp_path):
    folder, _, _ = write_release(tmp_path, layer=5)
    with pytest.raises(SAEFormatError, match="hook_point_in .* is layer 5, but layer 3") as e:
        load_llama_scope(folder, LAYER, k=5)
    assert str(folder / "hyperparams.json") in str(e.value)


def test_missing_or_corrupt_files_are_named(tmp_path):
    folder, hp, t = write_release(tmp_path)
    weights = folder / "checkpoints" / "final.safetensors"

    save_file({**t, "decoder.weight": t["decoder.weight"][:, :-1].contiguous()}, str(weights))
    with pytest.raises(SAEFormatError, match="decoder.weight") as e:
        load_llama_scope(folder, LAYER, k=5)
    assert str(weights) in str(e.value)

    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(SAEFormatError, match="safetensors") as e:
        load_llama_scope(folder, LAYER, k=5)
    assert str(weights) in str(e.value)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="final.safetensors") as e:
        load_llama_scope(folder, LAYER, k=5)

    (folder / "hyperparams.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="hyperparams.json"):
        load_llama_scope(folder, LAYER, k=5)
    (folder / "hyperparams.json").unlink()
    with pytest.raises(FileNotFoundError, match="hyperparams.json"):
        load_llama_scope(folder, LAYER, k=5)


def test_release_layer_folder_name():
    assert release_layer_folder("fnlp/Llama3_1-8B-Base-LXR-8x", 15) == "Llama3_1-8B-Base-L15R-8x"
    with pytest.raises(ValueError, match="LX"):
        release_layer_folder("someone/other-sae", 1)
