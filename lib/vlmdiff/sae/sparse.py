"""Sparse kernels of the TopK SAE: an encoder whose backward touches only the selected latents,
and a decoder that gathers the selected columns instead of multiplying dense codes.

A TopK code has `k` non-zeros per token out of `d_sae`, so after the one dense product that
scores every latent, everything else (decoding, and the gradients of both the decoder and the
encoder) costs `k` rows per token instead of `d_sae`. `embedding_bag` does the gathering and,
in its backward, the scattering; it is fast on CPU and CUDA when the gathered rows are
contiguous, which is why `TopKSAE` stores its decoder column-major (`W_dec.T` contiguous).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def decode_rows(acts: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """`sum_j acts[:, j] * rows[indices[:, j]]`, `[n, d]`, for codes `[n, j]` over `rows`."""
    return F.embedding_bag(indices, rows, per_sample_weights=acts, mode="sum")


def topk_encode(
    x: Tensor, weight: Tensor, bias: Tensor, k: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`ReLU(x W^T + b)` and its top `k` per row: (values, indices, all pre-activations).

    Only the values carry a gradient, and it flows back through the selected latents alone;
    the pre-activations are returned detached, for choosing more latents (AuxK) with
    `encode_at`. They are written into `out` (`[n, d_sae]`) when given, which saves a fresh
    allocation (on CPU, page faults that cost about as much as the product itself).
    """
    return _TopKEncode.apply(x, weight, bias, k, out)


def encode_at(x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
    """`ReLU(x W^T + b)` at `indices` `[n, j]`, read from `pre` (its dense value), with a
    gradient that touches only those latents."""
    return _EncodeAt.apply(x, weight, bias, indices, pre)


@torch.no_grad()
def top_among(pre: Tensor, columns: Tensor, j: int) -> Tensor:
    """Indices `[n, j]` of the `j` largest entries of each row among the `columns` (bool `[d_sae]`).

    May overwrite `pre`.
    """
    if 2 * int(columns.sum()) < columns.numel():
        # Few columns: rank only those rather than mask all the others.
        cols = columns.nonzero().squeeze(1)
        return cols[pre.index_select(1, cols).topk(j, dim=-1, sorted=False).indices]
    # In place: a fresh [n, d_sae] copy costs more than the mask itself.
    return pre.masked_fill_(~columns, -torch.inf).topk(j, dim=-1, sorted=False).indices


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, k: int, out: Tensor | None):
        pre = (
            torch.addmm(bias, x, weight.T, out=out)
            if out is not None
            else F.linear(x, weight, bias)
        )
        pre.clamp_min_(0)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, weight, indices, values)
        ctx.mark_non_differentiable(indices, pre)
        # The backward needs no gradient for `pre`: do not fill an [n, d_sae] one with zeros.
        ctx.set_materialize_grads(False)
        return values, indices, pre

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _indices: None, _pre: None):
        x, weight, indices, values = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        return (*_linear_at_backward(ctx, grad, x, weight, indices, values), None, None)


class _EncodeAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor):
        values = pre.gather(1, indices)
        ctx.save_for_backward(x, weight, indices, values)
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        return (*_linear_at_backward(ctx, grad, x, weight, indices, values), None, None)


def _linear_at_backward(
    ctx: Any, grad: Tensor, x: Tensor, weight: Tensor, indices: Tensor, values: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `ReLU(x W^T + b)` read at `indices`, for x, W and b."""
    # ReLU: no gradient where the value was clipped to zero.
    g = grad.masked_fill(values <= 0, 0).to(weight.dtype)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = decode_rows(g, indices, weight).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = _scatter_rows(g, indices, x.to(weight.dtype), weight)
    if ctx.needs_input_grad[2]:
        grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, indices.reshape(-1), g.reshape(-1))
    return grad_x, grad_w, grad_b


def _scatter_rows(g: Tensor, indices: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """`G^T x` for the sparse `G[t, indices[t, j]] = g[t, j]`: `[d_sae, d]`, via the backward
    of `embedding_bag`, which does this scatter without forming `[n, j, d]`."""
    with torch.enable_grad():
        leaf = weight.detach().requires_grad_()
        out = decode_rows(g, indices, leaf)
        (grad_w,) = torch.autograd.grad(out, leaf, x)
    return grad_w
