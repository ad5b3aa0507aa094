"""The sparse encoder and decoder of the TopK SAE against dense references, values and
gradients."""

import pytest
import torch
import torch.nn.functional as F
from vlmdiff.sae import sparse
from vlmdiff.sae.sparse import Pattern, decode_pattern, decode_rows, encode_at, topk_scores
from vlmdiff.sae.topk import TopKSAE

D_MODEL, D_SAE, K, N = 16, 96, 6, 40


def dense_codes(acts: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return acts.new_zeros(acts.shape[0], d_sae).scatter(1, indices, acts)


def leaves(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.fixture(params=["csr", "embedding_bag"])
def scatter(request, monkeypatch):
    """Both ways `Pattern` has of forming the weight gradients and the per-entry dots: the
    CPU's CSR kernels, and embedding_bag's (CUDA, half precision)."""
    if request.param == "embedding_bag":
        monkeypatch.setattr(sparse, "_csr_kernels", lambda t: False)
    return request.param


def test_decode_rows_and_its_gradient_equal_the_dense_product():
    acts, rows = leaves((N, K), (D_SAE, D_MODEL))
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(D_SAE, generator=gen)[:K] for _ in range(N)])
    g = torch.randn(N, D_MODEL, dtype=torch.float64)
    got_out = decode_rows(acts, indices, rows)
    dense = dense_codes(acts, indices, D_SAE) @ rows
    assert torch.allclose(got_out, dense)
    got = torch.autograd.grad(got_out, (acts, rows), g)
    want = torch.autograd.grad(dense, (acts, rows), g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b)


def two_codes(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-k-like code of every token and a wider one of some tokens, sharing latents."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.stack([torch.randperm(D_SAE, generator=gen)[:K] for _ in range(N)])
    top[1] = top[0]
    tokens = torch.tensor([0, 3, 4, 9, 17, 30])
    aux = torch.stack([torch.randperm(D_SAE, generator=gen)[: 2 * K] for _ in tokens])
    return top, tokens, aux


def test_decode_pattern_and_its_gradient_equal_dense_products(scatter):
    top, tokens, aux = two_codes(0)
    pattern = Pattern(D_SAE, [(top, None), (aux, tokens)])
    acts, rows = leaves((N * K + len(tokens) * 2 * K,), (D_SAE, D_MODEL))
    g = torch.randn(N + len(tokens), D_MODEL, dtype=torch.float64)

    got_out = decode_pattern(acts, pattern, rows)
    a_top, a_aux = pattern.split(acts)
    dense = torch.cat(
        [dense_codes(a_top, top, D_SAE) @ rows, dense_codes(a_aux, aux, D_SAE) @ rows]
    )
    assert torch.allclose(got_out, dense)
    got = torch.autograd.grad(got_out, (acts, rows), g)
    want = torch.autograd.grad(dense, (acts, rows), g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b)


def test_topk_and_its_gradient_equal_dense_relu_topk(scatter):
    x, w, b = leaves((N, D_MODEL), (D_SAE, D_MODEL), (D_SAE,), seed=1)
    with torch.no_grad():
        b[:] -= 6.0  # most pre-activations negative: some rows have fewer than K positive
    pre, indices = topk_scores(x, w, b, K)
    values = encode_at(x, w, b, Pattern(D_SAE, [(indices, None)]), pre.gather(1, indices).flatten())
    values = values.view(N, K)
    dense_pre = F.relu(F.linear(x, w, b))
    want_values = dense_pre.gather(1, indices)
    assert torch.equal(pre, dense_pre.detach())
    assert torch.allclose(values, want_values)
    assert torch.equal(values.detach().sort(1).values, dense_pre.detach().topk(K).values.sort(1).values)
    assert bool((values == 0).any()), "the test should cover clipped values"

    g = torch.randn(N, K, dtype=torch.float64)
    got = torch.autograd.grad(values, (x, w, b), g)
    want = torch.autograd.grad(want_values, (x, w, b), g)
    for a, c in zip(got, want, strict=True):
        assert torch.allclose(a, c)


def test_encode_at_gradient_equals_the_dense_gather(scatter):
    x, w, b = leaves((N, D_MODEL), (D_SAE, D_MODEL), (D_SAE,), seed=2)
    dense_pre = F.relu(F.linear(x, w, b))
    top, tokens, aux = two_codes(2)
    pattern = Pattern(D_SAE, [(top, None), (aux, tokens)])
    want_values = torch.cat(
        [dense_pre.gather(1, top).flatten(), dense_pre[tokens].gather(1, aux).flatten()]
    )
    got_values = encode_at(x, w, b, pattern, want_values.detach())
    assert torch.equal(got_values, want_values.detach())
    g = torch.randn(len(want_values), dtype=torch.float64)
    got = torch.autograd.grad(got_values, (x, w, b), g)
    want = torch.autograd.grad(want_values, (x, w, b), g)
    for a, c in zip(got, want, strict=True):
        assert torch.allclose(a, c)


def dense_forward(sae: TopKSAE, x, dead_mask, loss_mask, k_aux):
    """The SAE's loss with dense codes everywhere: `[n, d_sae]` decode, masked-fill AuxK."""
    x_in = x * sae.norm_factor
    pre = F.relu(F.linear(x_in, sae.W_enc, sae.b_enc))
    acts, indices = pre.topk(sae.k, dim=-1, sorted=False)
    out = (dense_codes(acts, indices, sae.d_sae) @ sae.W_dec.T + sae.b_dec) / sae.norm_factor
    m = loss_mask if loss_mask is not None else torch.ones(len(x), dtype=torch.bool)
    err = x[m] - out[m]
    total = (x[m] - x[m].mean(0)).pow(2).sum()
    fvu = err.pow(2).sum() / total
    n_dead = int(dead_mask.sum())
    j = min(k_aux, n_dead)
    aux_acts, aux_idx = pre[m].masked_fill(~dead_mask, -torch.inf).topk(j, dim=-1, sorted=False)
    err_hat = dense_codes(aux_acts, aux_idx, sae.d_sae) @ sae.W_dec.T / sae.norm_factor
    auxk = min(n_dead / k_aux, 1.0) * (err_hat - err.detach()).pow(2).sum() / total
    return fvu, auxk


@pytest.mark.parametrize("dead_fraction", [0.2, 0.9])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_loss_and_gradients_equal_the_dense_reference(scatter, dead_fraction, masked):
    torch.manual_seed(3)
    sae = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=3, norm_factor=0.7).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(N, D_MODEL, dtype=torch.float64) * 2
    dead = torch.rand(D_SAE) < dead_fraction
    mask = torch.rand(N) < 0.6 if masked else None
    k_aux = 8

    out = sae(x, dead_mask=dead, loss_mask=mask, k_aux=k_aux)
    fvu, auxk = dense_forward(sae, x, dead, mask, k_aux)
    assert out.fvu.item() == pytest.approx(fvu.item(), rel=1e-10)
    assert out.auxk_loss.item() == pytest.approx(auxk.item(), rel=1e-10)
    assert auxk.item() > 0
    params = list(sae.parameters())
    got = torch.autograd.grad(out.fvu + 0.5 * out.auxk_loss, params)
    want = torch.autograd.grad(fvu + 0.5 * auxk, params)
    for a, c in zip(got, want, strict=True):
        assert torch.allclose(a, c, atol=1e-10)


def test_decoder_stays_column_major_through_copies(tmp_path):
    sae = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=0)
    assert sae.W_dec.shape == (D_MODEL, D_SAE) and sae.W_dec.T.is_contiguous()
    other = TopKSAE(D_MODEL, D_SAE, K)
    other.load_state_dict(sae.state_dict())
    assert other.W_dec.T.is_contiguous() and torch.equal(other.W_dec, sae.W_dec)
    assert other.to(torch.float64).W_dec.T.is_contiguous()
    sae.save(tmp_path / "sae", extra={"layer": 0})
    again = TopKSAE.load(tmp_path / "sae")
    assert again.W_dec.T.is_contiguous() and torch.equal(again.W_dec, sae.W_dec)
