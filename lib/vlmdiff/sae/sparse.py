"""Sparse kernels of the TopK SAE: an encoder whose backward touches only the selected latents,
and a decoder that gathers the selected columns instead of multiplying dense codes.

A TopK code has `j` non-zeros per token out of `d_sae`, so after the one dense product that
scores every latent, everything else (decoding, and the gradients of both the decoder and the
encoder) costs `j` rows per token instead of `d_sae`. `embedding_bag` does the gathering; it is
fast on CPU and CUDA when the gathered rows are contiguous, which is why `TopKSAE` stores its
decoder column-major (`W_dec.T` contiguous). The weight gradients scatter `j` rows per token
into `[d_sae, d]`; a `Pattern` groups the entries by latent once per code, and the encoder and
the decoder, which select the same latents, share it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# On CPU a CSR product scatters rows up to this width faster than embedding_bag's backward
# (1.3-2x at widths 128 and 576); at 4096 it was slower (benchmarks/peer_sae.py, docs/measurements.md).
CSR_MAX_WIDTH = 1024


class Pattern:
    """The latents `indices` `[n, j]` of a code over `d_sae` latents, grouped by latent on the
    first use (a CSR layout of the code's transpose)."""

    def __init__(self, indices: Tensor, d_sae: int):
        self.indices = indices
        self.d_sae = d_sae
        self._csr: tuple[Tensor, Tensor, Tensor] | None = None

    def scatter(self, values: Tensor, dense: Tensor, weight: Tensor) -> Tensor:
        """`G^T dense`, `[d_sae, d]`, for the sparse `G[t, indices[t, i]] = values[t, i]`.

        `weight` is any `[d_sae, d]` tensor of the result's dtype (only the fallback reads it).
        """
        if dense.device.type != "cpu" or dense.shape[1] > CSR_MAX_WIDTH:
            return _scatter_by_embedding_bag(values, self.indices, dense, weight)
        crow, cols, order = self._layout()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            g = torch.sparse_csr_tensor(
                crow,
                cols,
                values.reshape(-1)[order],
                (self.d_sae, dense.shape[0]),
                check_invariants=False,
            )
            return g @ dense

    def _layout(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._csr is None:
            n, j = self.indices.shape
            flat = self.indices.reshape(-1)
            latent, order = flat.sort(stable=True)
            crow = torch.zeros(self.d_sae + 1, dtype=torch.long, device=flat.device)
            crow[1:] = torch.bincount(latent, minlength=self.d_sae).cumsum(0)
            self._csr = (crow, order // j, order)
        return self._csr


def decode_rows(
    acts: Tensor, indices: Tensor, rows: Tensor, pattern: Pattern | None = None
) -> Tensor:
    """`sum_i acts[:, i] * rows[indices[:, i]]`, `[n, d]`, for codes `[n, j]` over `rows`;
    the gradient of `rows` goes through `pattern` (of `indices`) when given."""
    if pattern is None or not rows.requires_grad:
        return F.embedding_bag(indices, rows, per_sample_weights=acts, mode="sum")
    return _DecodeRows.apply(acts, rows, pattern)


@torch.no_grad()
def topk_scores(
    x: Tensor, weight: Tensor, bias: Tensor, k: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`ReLU(x W^T + b)` (into `out`, `[n, d_sae]`, when given: on CPU a fresh allocation's
    page faults cost about as much as the product) and the indices of its top `k` per row."""
    pre = torch.addmm(bias, x, weight.T, out=out) if out is not None else F.linear(x, weight, bias)
    pre.clamp_min_(0)
    return pre, pre.topk(k, dim=-1, sorted=False).indices


def encode_at(x: Tensor, weight: Tensor, bias: Tensor, pattern: Pattern, pre: Tensor) -> Tensor:
    """`ReLU(x W^T + b)` at the latents of `pattern`, `[n, j]`, read from `pre` (its dense
    value), with a gradient that touches only those latents."""
    return _EncodeAt.apply(x, weight, bias, pattern, pre)


@torch.no_grad()
def top_among(pre: Tensor, columns: Tensor, j: int) -> Tensor:
    """Indices `[n, j]` of the `j` largest entries of each row among the `columns` (bool
    `[d_sae]`). May overwrite `pre`."""
    if 2 * int(columns.sum()) < columns.numel():
        # Few columns: rank only those rather than mask all the others.
        cols = columns.nonzero().squeeze(1)
        return cols[pre.index_select(1, cols).topk(j, dim=-1, sorted=False).indices]
    # In place: a fresh [n, d_sae] copy costs more than the mask itself.
    return pre.masked_fill_(~columns, -torch.inf).topk(j, dim=-1, sorted=False).indices


def reuse(buf: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """`buf` while it has `shape` and `like`'s device and dtype, else a new empty tensor."""
    if buf is None or buf.shape != shape or (buf.device, buf.dtype) != (like.device, like.dtype):
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return buf


class _EncodeAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, pattern: Pattern, pre: Tensor):
        values = pre.gather(1, pattern.indices)
        ctx.save_for_backward(x, weight, values)
        ctx.pattern = pattern
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        x, weight, values = ctx.saved_tensors
        indices = ctx.pattern.indices
        # ReLU: no gradient where the value was clipped to zero.
        g = grad.masked_fill(values <= 0, 0).to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=g, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.pattern.scatter(g, x.to(weight.dtype), weight)
        if ctx.needs_input_grad[2]:
            flat = indices.reshape(-1)
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, flat, g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class _DecodeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, acts: Tensor, rows: Tensor, pattern: Pattern):
        ctx.save_for_backward(acts, rows)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.indices, rows, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        acts, rows = ctx.saved_tensors
        grad_acts = grad_rows = None
        if ctx.needs_input_grad[0]:
            # d out[t] / d acts[t, i] = rows[indices[t, i]]: embedding_bag's own kernel for the
            # per-sample weights gathers those rows without forming [n, j, d].
            n, j = ctx.pattern.indices.shape
            bags = torch.arange(n, device=grad.device)
            grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad.contiguous(),
                rows,
                ctx.pattern.indices.reshape(-1),
                bags * j,
                bags.repeat_interleave(j),
                0,  # mode 0: sum
            ).view(n, j)
        if ctx.needs_input_grad[1]:
            grad_rows = ctx.pattern.scatter(acts, grad, rows)
        return grad_acts, grad_rows, None


def _scatter_by_embedding_bag(
    values: Tensor, indices: Tensor, dense: Tensor, weight: Tensor
) -> Tensor:
    """`G^T dense` through the backward of `embedding_bag`, which scatters without forming
    `[n, j, d]`."""
    with torch.enable_grad():
        leaf = weight.detach().requires_grad_()
        out = F.embedding_bag(indices, leaf, per_sample_weights=values.detach(), mode="sum")
        (grad_w,) = torch.autograd.grad(out, leaf, dense)
    return grad_w
