"""Exports read back by SAELens and sparsify themselves (the `interop` extra, which `test` pulls
in): same top-k latents, same codes and same reconstructions as ours, in model units."""

import json
import math

import pytest
import torch
from sae_lens import SAE
from sparsify import SparseCoder
from test_llama_scope import LAYER, N_IN, N_OUT, THRESHOLD, inputs, release_forward, write_release
from vlmdiff.sae.export import ExportError, export_sae, export_saes_job, saelens_files
from vlmdiff.sae.topk import TopKSAE
from vlmdiff.sources.llama_scope import load_llama_scope

# (d_model, d_sae, k): a toy layer and one closer to the default preset's SAEs
SIZES = [(16, 64, 5), (128, 1024, 32)]
MEAN_NORM = 37.0  # model-unit activations far from the SAE's own scale sqrt(d_model)
TOL = 1e-5
"""Largest difference allowed, relative to the largest |value| compared: float32 arithmetic in
model units (reconstructions of magnitude ~70 here) differs from ours by a few ulps."""


def close(theirs: torch.Tensor, ours_: torch.Tensor) -> bool:
    return bool((theirs - ours_).abs().max() <= TOL * ours_.abs().max())


def trained_like(d_model: int, d_sae: int, k: int, seed: int = 0) -> TopKSAE:
    """Unit decoder columns, random encoder and biases, input scale sqrt(d) / MEAN_NORM."""
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_model, d_sae, k, norm_factor=math.sqrt(d_model) / MEAN_NORM,
                  hook_point=f"blocks.{LAYER}.hook_resid_post")
    w_dec = torch.randn(d_model, d_sae, generator=gen)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=0))
        sae.W_enc.copy_(sae.W_dec.T + 0.3 * torch.randn(d_sae, d_model, generator=gen)
                        / math.sqrt(d_model))
        sae.b_enc.copy_(0.5 + 0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(torch.randn(d_model, generator=gen))
    sae.extra = {"layer": LAYER, "regime": "text"}
    return sae


def activations(d_model: int, n: int = 300, seed: int = 1) -> torch.Tensor:
    """Model-unit activations with an offset, mean norm about MEAN_NORM."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(d_model, generator=gen)
    x = torch.randn(n, d_model, generator=gen) + offset
    return x * MEAN_NORM / x.norm(dim=1).mean()


def ours(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted top-k indices, dense codes and reconstruction."""
    out = sae(x)
    assert bool((out.latent_acts > 0).all())  # every token has k active latents to compare
    return out.latent_indices.sort(dim=1).values, sae.dense_acts(x), out.sae_out


@torch.no_grad()
@pytest.mark.parametrize(("d_model", "d_sae", "k"), SIZES)
def test_saelens_loads_the_export_and_gives_our_codes(tmp_path, d_model, d_sae, k):
    sae = trained_like(d_model, d_sae, k)
    export_sae(sae, tmp_path, model_name="lm")
    folder = tmp_path / "saelens" / f"blocks.{LAYER}.hook_resid_post"
    loaded = SAE.load_from_disk(str(folder))
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == k
    assert loaded.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"

    x = activations(d_model)
    indices, codes, recon = ours(sae, x)
    acts = loaded.encode(x)
    theirs = acts.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(theirs, indices)
    assert int((acts > 0).sum()) == x.shape[0] * k
    assert close(acts, codes)
    assert close(loaded.decode(acts), recon)
    assert close(loaded(x), recon)

    # The check can fail: without the scale folded in, SAELens would rank other latents.
    raw = TopKSAE(d_model, d_sae, k, hook_point=sae.hook_point)
    raw.load_state_dict({**sae.state_dict(), "norm_factor": torch.tensor(1.0)})
    assert not torch.equal(raw(x).latent_indices.sort(dim=1).values, indices)


@torch.no_grad()
@pytest.mark.parametrize(("d_model", "d_sae", "k"), SIZES)
def test_sparsify_loads_the_export_and_gives_our_codes(tmp_path, d_model, d_sae, k):
    sae = trained_like(d_model, d_sae, k, seed=3)
    export_sae(sae, tmp_path)
    loaded = SparseCoder.load_from_disk(tmp_path / "sparsify" / f"layers.{LAYER}")
    assert (loaded.cfg.k, loaded.num_latents, loaded.d_in) == (k, d_sae, d_model)

    x = activations(d_model, seed=4)
    indices, codes, recon = ours(sae, x)
    top_acts, top_indices, _ = loaded.encode(x)
    order = top_indices.argsort(dim=1)
    assert torch.equal(top_indices.gather(1, order), indices)
    theirs = torch.zeros_like(codes).scatter(1, top_indices, top_acts)
    assert close(theirs, codes)
    assert close(loaded.decode(top_acts, top_indices), recon)
    assert close(loaded(x).sae_out, recon)

    # sparsify's loader reads the whole layout: every layer's folder, named by hookpoint.
    many = SparseCoder.load_many(str(tmp_path / "sparsify"), local=True)
    assert list(many) == [f"layers.{LAYER}"]


@torch.no_grad()
@pytest.mark.parametrize("n_out", [N_OUT, N_IN])
def test_jumprelu_export_reproduces_the_release(tmp_path, n_out):
    folder, hp, t = write_release(tmp_path / "release", n_out=n_out)
    sae = load_llama_scope(folder, LAYER, k=50)
    export_sae(sae, tmp_path / "out", jumprelu=True)
    loaded = SAE.load_from_disk(
        str(tmp_path / "out" / "saelens_jumprelu" / f"blocks.{LAYER}.hook_resid_post")
    )
    assert loaded.cfg.architecture() == "jumprelu"
    assert torch.allclose(loaded.threshold, torch.full_like(loaded.threshold,
                                                            math.sqrt(16) / N_IN * THRESHOLD))

    x = inputs(200)
    _, codes, expected = release_forward(hp, t, x, threshold=THRESHOLD)
    acts = loaded.encode(x)
    assert torch.equal(acts > 0, codes > 0)  # the release's active set on every token
    assert torch.allclose(loaded.decode(acts).double(), expected, atol=1e-4, rtol=1e-4)
    # the TopK export beside it is the paper's k=50 SAE
    topk = SAE.load_from_disk(str(tmp_path / "out" / "saelens" / f"blocks.{LAYER}.hook_resid_post"))
    assert topk.cfg.architecture() == "topk" and topk.cfg.k == 50


def test_jumprelu_needs_an_imported_release_layer(tmp_path):
    sae = trained_like(16, 64, 5)
    with pytest.raises(ExportError, match="only base SAEs imported from a Llama-Scope release"):
        saelens_files(sae, architecture="jumprelu", source="sae/base/layer_3/hyperparams.json")
    with pytest.raises(ExportError, match="architecture 'relu'"):
        saelens_files(sae, architecture="relu")


def test_job_writes_every_layer_and_checks_the_hook_point(tmp_path):
    dirs = []
    for layer in (0, 1):
        sae = trained_like(16, 64, 5, seed=layer)
        sae.hook_point = None
        sae.extra = {"layer": layer, "regime": "full"}
        sae.save(tmp_path / "sae" / f"layer_{layer}")
        dirs.append(tmp_path / "sae" / f"layer_{layer}")
    out = tmp_path / "exports" / "full"
    sizes = export_saes_job(layers=[0, 1], sae_dirs=dirs, jumprelu=False, model_name="vlm",
                            out={"exports": out}, log=lambda _: None)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "saelens/blocks.0.hook_resid_post/cfg.json",
        "saelens/blocks.0.hook_resid_post/sae_weights.safetensors",
        "saelens/blocks.1.hook_resid_post/cfg.json",
        "saelens/blocks.1.hook_resid_post/sae_weights.safetensors",
        "sparsify/layers.0/cfg.json",
        "sparsify/layers.0/sae.safetensors",
        "sparsify/layers.1/cfg.json",
        "sparsify/layers.1/sae.safetensors",
    ]
    # four float32 matrices of 16 x 64 dominate each format's bytes
    assert all(2 * 16 * 64 * 4 < s < 2 * 16 * 64 * 4 + 4096 for s in sizes[0].values())
    cfg = json.loads((out / "saelens/blocks.1.hook_resid_post/cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "vlm"

    with pytest.raises(ExportError, match=r"layer_0/hyperparams.json: hook point is layer 0, "
                                          r"expected 1"):
        export_saes_job(layers=[1], sae_dirs=dirs[:1], jumprelu=False, model_name=None,
                        out={"exports": tmp_path / "bad"}, log=lambda _: None)
    assert not (tmp_path / "bad").exists()
