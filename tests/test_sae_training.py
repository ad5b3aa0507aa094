import dataclasses
import math

import pytest
import torch
from vlmdiff.sae.topk import TopKSAE, fvu
from vlmdiff.sae.training import (
    CHECKPOINT_FILE,
    Batch,
    TrainConfig,
    evaluate,
    lr_at,
    make_optimiser,
    optimiser_step,
    train_sae,
)

D_MODEL, D_SAE, ACTIVE = 32, 256, 4


def unit_columns(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=0, keepdim=True)


TRUE_DICT = unit_columns(torch.randn(D_MODEL, D_SAE, generator=torch.Generator().manual_seed(123)))


def sparse_batches(
    n_batches: int, rows: int = 512, seed: int = 1, mask_p: float = 1.0
) -> list[Batch]:
    """Tokens made of ACTIVE atoms of TRUE_DICT with coefficients in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(rows, D_SAE, generator=gen).argsort(dim=1)[:, :ACTIVE]
        vals = torch.rand(rows, ACTIVE, generator=gen) + 0.5
        codes = torch.zeros(rows, D_SAE).scatter(1, idx, vals)
        mask = torch.rand(rows, generator=gen) < mask_p
        out.append(Batch(codes @ TRUE_DICT.T, mask))
    return out


EVAL = sparse_batches(2, seed=99)


def config(**overrides) -> TrainConfig:
    section = {"lr": 1e-3, "batch_tokens": 512, "eval_every_tokens": 10_000,
               "dead_tokens_threshold": 1024}
    base = TrainConfig.from_mapping(section, "sae.base", k=ACTIVE, seed=0, device="cpu")
    return dataclasses.replace(base, **{"max_tokens": None, "log_interval_s": 1e9, **overrides})


def train(sae: TopKSAE, batches, cfg: TrainConfig, **kw):
    kw = {"eval_batches": lambda: EVAL, "layer": 0, "regime": "full", "log": lambda s: None, **kw}
    return train_sae(sae, batches, cfg, **kw)


def test_recycled_gradient_buffers_give_the_steps_of_fresh_ones():
    """The trainer writes each step's weight gradients over the last step's buffers; the
    weights come out as with `zero_grad`, and the buffers are the same memory every step."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(96, 16, generator=gen) for _ in range(3)]
    mask, dead = torch.ones(96, dtype=torch.bool), torch.arange(128) % 3 == 0
    a, b = TopKSAE.from_random(16, 128, 4, seed=1), TopKSAE.from_random(16, 128, 4, seed=1)
    opt_a, opt_b = make_optimiser(a, 1e-3), make_optimiser(b, 1e-3)
    for i, x in enumerate(xs):
        if i:
            # the spares stay alive until the backward has written: no fresh allocation can
            # take their addresses, so equal addresses mean the gradients went into them
            a.recycle_grads()
            spares = {n: t.data_ptr() for n, t in a._spare_grads.items()}
            assert spares.keys() == {"W_enc", "W_dec"}
        optimiser_step(a, opt_a, x, mask, dead, auxk_alpha=1 / 32)
        if i:
            assert a.W_enc.grad.data_ptr() == spares["W_enc"]
            assert a.W_dec.grad.data_ptr() == spares["W_dec"]
        opt_b.zero_grad(set_to_none=True)
        out = b(x, dead_mask=dead, loss_mask=mask)
        (out.fvu + out.auxk_loss / 32).backward()
        b.remove_gradient_parallel_to_decoder_directions()
        opt_b.step()
        b.set_decoder_norm_to_unit_norm()
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_lr_rule():
    cfg = TrainConfig.from_mapping({"lr": 2e-4}, "sae.base", k=ACTIVE, seed=0, device="cpu")
    assert lr_at(cfg, 2**14, layer=7) == pytest.approx(2e-4)
    assert lr_at(cfg, 2**16, layer=0) == pytest.approx(1e-4)
    cfg = TrainConfig.from_mapping({"lr": 1e-3, "lr_scale_rule": "constant", "layer_lr_decay": 0.5},
                                   "sae.base", k=ACTIVE, seed=0, device="cpu")
    assert lr_at(cfg, 2**16, layer=2) == pytest.approx(2.5e-4)


def test_training_lowers_fvu_and_keeps_unit_decoder():
    sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    result = train(sae, sparse_batches(40), config())
    start, end = result.history[0], result.history[-1]
    assert start["tokens_seen"] == 0 and end["tokens_seen"] == result.tokens_seen == 40 * 512
    assert end["fvu"] < 0.75 * start["fvu"]
    assert end["l0"] <= ACTIVE
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D_SAE), atol=1e-5)
    assert [row["tokens_seen"] for row in result.history] == [0, 10240, 20480]
    assert set(start) >= {"tokens_seen", "fvu", "l0", "dead_fraction", "layer", "regime"}


def test_warm_start_from_perturbed_dictionary_beats_random():
    noise = torch.randn(D_MODEL, D_SAE, generator=torch.Generator().manual_seed(5))
    w = unit_columns(TRUE_DICT + 0.05 * noise)
    warm = TopKSAE(D_MODEL, D_SAE, ACTIVE)
    with torch.no_grad():
        warm.W_dec.copy_(w)
        warm.W_enc.copy_(w.T)
    cold = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    batches = sparse_batches(20)
    warm_fvu = train(warm, batches, config()).history
    cold_fvu = train(cold, batches, config()).history
    assert warm_fvu[0]["fvu"] < cold_fvu[0]["fvu"]
    assert warm_fvu[-1]["fvu"] < cold_fvu[-1]["fvu"]


def test_auxk_revives_dead_latents():
    weak = torch.arange(D_SAE) >= D_SAE // 2
    batches = sparse_batches(20)

    def fired_weak(auxk_alpha: float) -> float:
        sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
        with torch.no_grad():
            sae.W_enc[weak] *= 0.01  # these never make the top-k
        train(sae, batches, config(auxk_alpha=auxk_alpha))
        with torch.no_grad():
            fired = torch.cat([sae.dense_acts(b.acts) for b in EVAL]).gt(0).any(dim=0)
        return float(fired[weak].float().mean())

    assert fired_weak(0.0) == 0.0
    assert fired_weak(1 / 32) > 0.3


def test_nan_activations_raise_with_context():
    batches = sparse_batches(3)
    batches[2].acts[5, 3] = math.nan
    sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    with pytest.raises(FloatingPointError) as e:
        train(sae, batches, config(), layer=5, regime="image")
    msg = str(e.value)
    assert "layer 5" in msg and "'image'" in msg and "step 3" in msg


def test_non_finite_loss_raises_with_context():
    sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    with torch.no_grad():
        sae.b_dec[0] = math.inf
    with pytest.raises(FloatingPointError, match=r"layer 2, regime 'text', step 1: loss"):
        train(sae, sparse_batches(1), config(), eval_batches=None, layer=2, regime="text")


def test_resume_matches_uninterrupted_run(tmp_path):
    # Incoming batches are split into 3 steps each and only ~70% of tokens count, so the
    # interruption falls inside a batch.
    batches = sparse_batches(12, rows=768, seed=2, mask_p=0.7)
    cfg = config(batch_tokens=256, eval_every_tokens=1500, checkpoint_every_tokens=1000)
    n = 3000

    one_go = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    full = train(one_go, batches, config(**{**cfg.__dict__, "max_tokens": 2 * n}))

    first = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    part = train(
        first, batches, config(**{**cfg.__dict__, "max_tokens": n}), checkpoint_dir=tmp_path
    )
    assert (tmp_path / CHECKPOINT_FILE).exists()
    assert n <= part.tokens_seen < full.tokens_seen

    lines: list[str] = []
    resumed_sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    resumed = train(
        resumed_sae,
        batches,
        config(**{**cfg.__dict__, "max_tokens": 2 * n}),
        checkpoint_dir=tmp_path,
        log=lines.append,
    )
    assert any("resuming" in line for line in lines)
    assert resumed.resumed_from_tokens == part.tokens_seen
    assert (resumed.tokens_seen, resumed.steps) == (full.tokens_seen, full.steps)
    for name, t in one_go.state_dict().items():
        assert torch.equal(resumed_sae.state_dict()[name], t), name
    assert resumed.history[0]["tokens_seen"] == 0

    with pytest.raises(ValueError, match="lr"):
        train(
            TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0),
            batches,
            config(**{**cfg.__dict__, "lr": 5e-3}),
            checkpoint_dir=tmp_path,
        )


def test_progress_log_has_rate_and_eta():
    lines: list[str] = []
    sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    train(sae, sparse_batches(3), config(log_interval_s=0.0, max_tokens=1024), log=lines.append)
    progress = [line for line in lines if "tok/s" in line]
    assert progress and "ETA" in progress[0] and "fvu" in progress[0]


@torch.no_grad()
def test_evaluate_pools_batches_and_respects_mask():
    sae = TopKSAE.from_random(D_MODEL, D_SAE, ACTIVE, seed=0)
    batches = sparse_batches(2, rows=64, seed=3, mask_p=0.5)
    result = evaluate(sae, batches)
    acts = torch.cat([b.acts for b in batches])
    mask = torch.cat([b.loss_mask for b in batches])
    x_hat = sae(acts).sae_out
    assert result["fvu"] == pytest.approx(float(fvu(acts, x_hat, mask)), rel=1e-5)
    assert result["n_tokens"] == int(mask.sum())
    fired = sae.dense_acts(acts)[mask].gt(0).any(dim=0).float().mean()
    assert result["fired_fraction"] == pytest.approx(float(fired))
