import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vlmdiff.sae.folder import SAEFormatError
from vlmdiff.sae.topk import TopKSAE, estimate_norm_factor, fvu, l0

D_MODEL, D_SAE, K = 16, 64, 5


def random_sae(seed: int = 0, norm_factor: float = 0.37) -> TopKSAE:
    """An SAE with every parameter random, biases included."""
    sae = TopKSAE(D_MODEL, D_SAE, K, norm_factor=norm_factor)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def reference_codes(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Dense codes, one token and one feature at a time."""
    s = float(sae.norm_factor)
    codes = torch.zeros(x.shape[0], sae.d_sae)
    for i in range(x.shape[0]):
        pre = [
            max(float(torch.dot(sae.W_enc[f], x[i] * s) + sae.b_enc[f]), 0.0)
            for f in range(sae.d_sae)
        ]
        for f in sorted(range(sae.d_sae), key=lambda f: -pre[f])[: sae.k]:
            codes[i, f] = pre[f]
    return codes


def reference_decode(sae: TopKSAE, codes: torch.Tensor) -> torch.Tensor:
    s = float(sae.norm_factor)
    out = torch.zeros(codes.shape[0], sae.d_model)
    for i in range(codes.shape[0]):
        for f in codes[i].nonzero().flatten().tolist():
            out[i] += codes[i, f] * sae.W_dec[:, f]
        out[i] = (out[i] + sae.b_dec) / s
    return out


@torch.no_grad()
def test_encode_decode_match_reference():
    sae = random_sae()
    x = torch.randn(12, D_MODEL) * 3.0
    codes = reference_codes(sae, x)
    assert torch.allclose(sae.dense_acts(x), codes, atol=1e-4)

    out = sae(x)
    assert torch.allclose(out.sae_out, reference_decode(sae, codes), atol=1e-4)
    assert out.latent_acts.shape == out.latent_indices.shape == (12, K)
    assert float(out.l0) == pytest.approx(float((codes > 0).sum(1).float().mean()))

    x_hat = reference_decode(sae, codes)
    mean = x.mean(0)
    expected = sum(float((x[i] - x_hat[i]).pow(2).sum()) for i in range(12)) / sum(
        float((x[i] - mean).pow(2).sum()) for i in range(12)
    )
    assert float(out.fvu) == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def test_decoder_bias_is_not_subtracted_before_encoding():
    sae = random_sae()
    x = torch.randn(4, D_MODEL)
    before = sae.dense_acts(x)
    sae.b_dec.add_(5.0)
    assert torch.equal(sae.dense_acts(x), before)


@torch.no_grad()
def test_masked_fvu_uses_only_selected_tokens():
    sae = random_sae()
    x = torch.randn(10, D_MODEL)
    mask = torch.tensor([True, False] * 5)
    out = sae(x, loss_mask=mask)
    sel = x[mask]
    x_hat = sae(sel).sae_out
    assert torch.allclose(out.sae_out[mask], x_hat, atol=1e-6)
    expected = (sel - x_hat).pow(2).sum() / (sel - sel.mean(0)).pow(2).sum()
    assert float(out.fvu) == pytest.approx(float(expected), rel=1e-5)
    assert float(fvu(x, out.sae_out, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.l0) == pytest.approx(float(l0(out.latent_acts[mask])))


def test_masked_out_tokens_do_not_affect_gradients():
    x = torch.randn(32, D_MODEL)
    mask = torch.rand(32, generator=torch.Generator().manual_seed(1)) < 0.5
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True

    def grads(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        sae = random_sae(seed=3)
        out = sae(inputs, loss_mask=mask, dead_mask=dead)
        (out.fvu + out.auxk_loss).backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}

    changed = x.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), D_MODEL) * 10
    a, b = grads(x), grads(changed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in a.values())


def test_auxk_zero_without_dead_latents_and_trains_dead_ones():
    sae = random_sae()
    x = torch.randn(64, D_MODEL)
    assert float(sae(x).auxk_loss) == 0.0
    no_dead = torch.zeros(D_SAE, dtype=torch.bool)
    assert float(sae(x, dead_mask=no_dead).auxk_loss) == 0.0

    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[D_SAE // 2 :] = True
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss.item() > 0
    out.auxk_loss.backward()
    # Gradient reaches only the dead latents' encoder rows.
    assert sae.W_enc.grad[dead].abs().sum() > 0
    assert sae.W_enc.grad[~dead].abs().sum() == 0


def test_decoder_unit_norm_and_parallel_gradient_removed():
    sae = random_sae()
    sae.set_decoder_norm_to_unit_norm()
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D_SAE), atol=1e-5)

    sae(torch.randn(32, D_MODEL)).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=0)
    assert parallel.abs().max() < 1e-5
    assert sae.W_dec.grad.abs().sum() > 0


def test_feature_directions_are_unit_rows():
    sae = random_sae()
    dirs = sae.feature_directions()
    assert dirs.shape == (D_SAE, D_MODEL)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    assert torch.allclose(dirs[7] * sae.W_dec[:, 7].norm(), sae.W_dec[:, 7], atol=1e-5)


def test_from_random_init():
    sae = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=4)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D_SAE), atol=1e-5)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    again = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=4)
    assert torch.equal(sae.W_dec, again.W_dec)


def test_estimate_norm_factor():
    x = torch.randn(500, D_MODEL) * 7
    s = estimate_norm_factor(x.half())
    assert s * float(x.norm(dim=1).mean()) == pytest.approx(math.sqrt(D_MODEL), rel=1e-2)


def test_save_load_round_trip(tmp_path):
    sae = random_sae(norm_factor=0.25)
    folder = tmp_path / "layer_3"
    extra = {"regime": "text", "layer": 3, "tokens_seen": 1234, "k": K}
    sae.save(folder, extra)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_3"]
    with safe_open(str(folder / "checkpoints" / "final.safetensors"), framework="pt") as f:
        names = f.keys()
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    assert shapes == {
        "encoder.weight": (D_SAE, D_MODEL),
        "encoder.bias": (D_SAE,),
        "decoder.weight": (D_MODEL, D_SAE),
        "decoder.bias": (D_MODEL,),
    }
    hp = json.loads((folder / "hyperparams.json").read_text())
    assert hp["d_model"] == D_MODEL and hp["d_sae"] == D_SAE
    assert hp["act_fn"] == "topk" and hp["top_k"] == K
    assert hp["norm_activation"] == "dataset-wise"
    assert hp["dataset_average_activation_norm"]["in"] == pytest.approx(math.sqrt(D_MODEL) / 0.25)
    assert hp["hook_point_in"] == hp["hook_point_out"] == "blocks.3.hook_resid_post"
    assert {key: hp[key] for key in extra} == extra

    loaded = TopKSAE.load(folder)
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert loaded.k == K and loaded.extra == extra
    assert loaded.hook_point == "blocks.3.hook_resid_post"
    assert TopKSAE.load(folder, k=2).k == 2

    # Saving again over the folder replaces it whole and round-trips the hyperparams.
    loaded.save(folder)
    assert json.loads((folder / "hyperparams.json").read_text()) == hp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_3"]


def test_save_refuses_layout_keys_in_extra(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        random_sae().save(tmp_path / "sae", {"layer": 0, "top_k": 3})


def test_load_errors_name_file_and_key(tmp_path):
    folder = tmp_path / "sae"
    random_sae().save(folder, {"layer": 1})
    weights = folder / "checkpoints" / "final.safetensors"
    hp_path = folder / "hyperparams.json"
    hp = json.loads(hp_path.read_text())

    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "decoder.bias"}, str(weights))
    with pytest.raises(SAEFormatError, match="decoder.bias") as e:
        TopKSAE.load(folder)
    assert str(weights) in str(e.value)

    save_file(tensors, str(weights))
    hp_path.write_text(json.dumps({**hp, "d_sae": D_SAE * 2}))
    with pytest.raises(SAEFormatError, match="encoder.weight") as e:
        TopKSAE.load(folder)
    assert str(weights) in str(e.value)

    hp_path.write_text(json.dumps({k: v for k, v in hp.items() if k != "d_model"}))
    with pytest.raises(SAEFormatError, match="d_model") as e:
        TopKSAE.load(folder)
    assert str(hp_path) in str(e.value)

    hp_path.unlink()
    with pytest.raises(FileNotFoundError, match="hyperparams.json") as e:
        TopKSAE.load(folder)
    assert str(folder) in str(e.value)


@torch.no_grad()
def test_load_llama_scope_jumprelu_folds_decoder_norms(tmp_path):
    """A release-style folder: JumpReLU, non-unit decoder, sparsity counted with decoder norms."""
    gen = torch.Generator().manual_seed(5)
    w_enc, b_enc = torch.randn(D_SAE, D_MODEL, generator=gen), torch.randn(D_SAE, generator=gen)
    w_dec = torch.randn(D_MODEL, D_SAE, generator=gen) * torch.rand(D_SAE, generator=gen) * 3
    b_dec = torch.randn(D_MODEL, generator=gen)
    folder = tmp_path / "L3R"
    (folder / "checkpoints").mkdir(parents=True)
    save_file(
        {
            "encoder.weight": w_enc.bfloat16(),
            "encoder.bias": b_enc.bfloat16(),
            "decoder.weight": w_dec.bfloat16(),
            "decoder.bias": b_dec.bfloat16(),
        },
        str(folder / "checkpoints" / "final.safetensors"),
    )
    in_norm = 9.5
    (folder / "hyperparams.json").write_text(
        json.dumps(
            {
                "d_model": D_MODEL,
                "d_sae": D_SAE,
                "act_fn": "jumprelu",
                "jump_relu_threshold": 0.5,
                "top_k": 50,
                "norm_activation": "dataset-wise",
                "dataset_average_activation_norm": {"in": in_norm, "out": in_norm},
                "sparsity_include_decoder_norm": True,
                "apply_decoder_bias_to_pre_encoder": False,
                "hook_point_in": "blocks.3.hook_resid_post",
                "hook_point_out": "blocks.3.hook_resid_post",
                "l1_coefficient": 2.0,
            }
        )
    )
    sae = TopKSAE.load(folder, k=K)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D_SAE), atol=1e-5)
    assert sae.extra == {"l1_coefficient": 2.0}

    # Release semantics: rank by act * ||decoder column||, decode with the raw decoder.
    w_enc, b_enc, w_dec, b_dec = (t.bfloat16().float() for t in (w_enc, b_enc, w_dec, b_dec))
    s = math.sqrt(D_MODEL) / in_norm
    x = torch.randn(8, D_MODEL) * in_norm / math.sqrt(D_MODEL)
    acts = torch.relu(x * s @ w_enc.T + b_enc)
    idx = (acts * w_dec.norm(dim=0)).topk(K).indices
    codes = torch.zeros_like(acts).scatter(1, idx, acts.gather(1, idx))
    expected = (codes @ w_dec.T + b_dec) / s
    assert torch.allclose(sae(x).sae_out, expected, atol=1e-4)
