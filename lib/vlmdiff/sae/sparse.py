"""Sparse kernels of the TopK SAE: an encoder whose backward touches only the selected latents,
and a decoder that gathers the selected columns instead of multiplying dense codes.

A TopK code has `j` non-zeros per token out of `d_sae`, so after the one dense product that
scores every latent, everything else (decoding, and the gradients of both the decoder and the
encoder) costs `j` rows per token instead of `d_sae`. `embedding_bag` does the gathering; it is
fast on CPU and CUDA when the gathered rows are contiguous, which is why `TopKSAE` stores its
decoder column-major (`W_dec.T` contiguous). The weight gradients scatter `j` rows per token
into `[d_sae, d]`, and the codes' gradient takes one dot per entry; on a CPU both go through
sparse CSR kernels (a product and a sampled product), elsewhere through embedding_bag's
backward kernels. A `Pattern` holds every latent a step selects (the top k and the AuxK ones)
as one list, grouped by latent once, and the encoder and the decoder, which select the same
latents, scatter through it together: one product per weight.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class Pattern:
    """Latents selected by one or more codes over `d_sae` latents, as one list of entries.

    Code `c` is `(indices [r, j], tokens)`: row `i` selects the latents `indices[i]` for token
    `tokens[i]` (`None`: token `i`). Every row of every code, in order, is one output row (a
    bag) of the decoder. The entries are grouped by latent on the first use (a CSR layout).
    """

    def __init__(self, d_sae: int, codes: list[tuple[Tensor, Tensor | None]]):
        self.d_sae = d_sae
        self.shapes = [tuple(idx.shape) for idx, _ in codes]
        self.latents = torch.cat([idx.reshape(-1) for idx, _ in codes])
        dev = self.latents.device
        self.tokens = torch.cat(
            [t if t is not None else torch.arange(idx.shape[0], device=dev) for idx, t in codes]
        )
        """The token of each bag, `[bags]`."""
        self._every_token_once = len(codes) == 1 and codes[0][1] is None
        per_bag = torch.repeat_interleave(
            torch.tensor([j for _, j in self.shapes]), torch.tensor([r for r, _ in self.shapes])
        ).to(dev)
        self.offsets = per_bag.cumsum(0) - per_bag
        """Where each bag's entries start, `[bags]`."""
        self.bag = torch.repeat_interleave(torch.arange(len(per_bag), device=dev), per_bag)
        """The bag of each entry, `[entries]`."""
        self._csr: tuple[Tensor, Tensor, Tensor] | None = None

    def rows_of(self, x: Tensor) -> Tensor:
        """`x[tokens]`, `[bags, d]`: each bag's token row (`x` for one code of every token)."""
        if self._every_token_once:
            return x
        return x.index_select(0, self.tokens)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Values per entry, `[entries]`, as one `[r, j]` tensor per code."""
        out, at = [], 0
        for r, j in self.shapes:
            out.append(flat[at : at + r * j].view(r, j))
            at += r * j
        return out

    def scatter(
        self, values: Tensor, dense: Tensor, weight: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """`G^T dense`, `[d_sae, d]`, for `G[bag, latent] = value` of every entry and `dense`
        `[bags, d]`; `weight` is any `[d_sae, d]` tensor of the result's dtype. The result may
        be written into `out` (a spare `[d_sae, d]` buffer; its contents are overwritten)."""
        if not _csr_kernels(dense):
            # embedding_bag's backward scatters without forming [entries, d].
            with torch.enable_grad():
                leaf = weight.detach().requires_grad_()
                out = F.embedding_bag(
                    self.latents, leaf, self.offsets, mode="sum", per_sample_weights=values.detach()
                )
                (grad,) = torch.autograd.grad(out, leaf, dense)
            return grad
        crow, cols, order = self._layout()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            g = torch.sparse_csr_tensor(
                crow,
                cols,
                values.index_select(0, order),
                (self.d_sae, dense.shape[0]),
                check_invariants=False,
            )
            # into an output of ours: `g @ dense` fills a zeroed temporary and copies it over,
            # two extra passes over `[d_sae, d]` that cost more than the product at large
            # sizes; a spare buffer also saves the page faults of a fresh one
            out = reuse(out, (self.d_sae, dense.shape[1]), dense)
            return torch.addmm(out, g, dense, beta=0, out=out)

    def gather_dots(self, dense: Tensor, rows: Tensor) -> Tensor:
        """`dense[bag] . rows[latent]` for every entry, `[entries]`, without forming
        `[entries, d]` (`dense` `[bags, d]`, `rows` `[d_sae, d]`)."""
        if not _csr_kernels(dense):
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                dense, rows, self.latents, self.offsets, self.bag, 0  # mode 0: sum
            )
        # On CPU a sampled product over the entries in bag order (CSR) is 1.3-2x faster than
        # embedding_bag's kernel for the same dots (docs/measurements.md).
        crow = torch.cat([self.offsets, self.offsets.new_tensor([len(self.latents)])])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            at = torch.sparse_csr_tensor(
                crow,
                self.latents,
                dense.new_zeros(len(self.latents)),  # beta=0 still multiplies these
                (len(self.offsets), self.d_sae),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(at, dense, rows.T, beta=0.0).values()

    def _layout(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._csr is None:
            # int32 keys sort twice as fast as int64 (d_sae is far below 2**31)
            latent, order = self.latents.to(torch.int32).sort(stable=True)
            crow = torch.zeros(self.d_sae + 1, dtype=torch.long, device=latent.device)
            crow[1:] = torch.bincount(latent, minlength=self.d_sae).cumsum(0)
            self._csr = (crow, self.bag.index_select(0, order), order)
        return self._csr


def _csr_kernels(t: Tensor) -> bool:
    """Whether the CPU's sparse CSR kernels (MKL) take `t`: float32 and float64 only.

    Where they do, they beat embedding_bag's kernels for the same sums at every size measured
    (0.1 to 64 entries per latent; docs/measurements.md)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def decode_rows(acts: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """`sum_i acts[:, i] * rows[indices[:, i]]`, `[n, d]`, for codes `[n, j]` over `rows`."""
    return F.embedding_bag(indices, rows, per_sample_weights=acts, mode="sum")


def decode_pattern(
    acts: Tensor, pattern: Pattern, rows: Tensor, grad_out: Tensor | None = None
) -> Tensor:
    """Every bag of `pattern` decoded, `[bags, d]`, from the entries' values `acts` `[entries]`;
    the gradient of `rows` scatters through the pattern (into `grad_out` where it fits: a
    spare buffer the caller gives up)."""
    return _DecodeRows.apply(acts, rows, pattern, grad_out)


@torch.no_grad()
def topk_scores(
    x: Tensor, weight: Tensor, bias: Tensor, k: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`ReLU(x W^T + b)` (into `out`, `[n, d_sae]`, when given: on CPU a fresh allocation's
    page faults cost about as much as the product) and the indices of its top `k` per row."""
    pre = torch.addmm(bias, x, weight.T, out=out) if out is not None else F.linear(x, weight, bias)
    pre.clamp_min_(0)
    return pre, pre.topk(k, dim=-1, sorted=False).indices


def encode_at(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pattern: Pattern,
    values: Tensor,
    grad_out: Tensor | None = None,
) -> Tensor:
    """`ReLU(x W^T + b)` at every entry of `pattern` (token and latent), given as `values`
    `[entries]` (read from the dense product), with a gradient that touches only those (the
    weight's written into `grad_out` where it fits)."""
    return _EncodeAt.apply(x, weight, bias, pattern, values, grad_out)


@torch.no_grad()
def top_among(pre: Tensor, columns: Tensor, j: int) -> Tensor:
    """Indices `[n, j]` of the `j` largest entries of each row among the `columns` (bool
    `[d_sae]`). May overwrite `pre`."""
    if 4 * int(columns.sum()) < 3 * columns.numel():
        # Up to three quarters of the columns: ranking only those beats masking the others.
        cols = columns.nonzero().squeeze(1)
        # a gather along broadcast indices copies columns 2-4x faster than index_select
        picked = pre.gather(1, cols.expand(pre.shape[0], -1))
        return cols[picked.topk(j, dim=-1, sorted=False).indices]
    # In place: a fresh [n, d_sae] copy costs more than the mask itself.
    return pre.masked_fill_(~columns, -torch.inf).topk(j, dim=-1, sorted=False).indices


def reuse(buf: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """`buf` while it is contiguous with `shape` and `like`'s device and dtype, else a new
    empty tensor."""
    same_kind = buf is not None and (buf.device, buf.dtype) == (like.device, like.dtype)
    if not same_kind or buf.shape != shape or not buf.is_contiguous():
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return buf


class _EncodeAt(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        pattern: Pattern,
        values: Tensor,
        grad_out: Tensor | None,
    ):
        ctx.save_for_backward(x, weight, values)
        ctx.pattern, ctx.grad_out = pattern, grad_out
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        x, weight, values = ctx.saved_tensors
        p: Pattern = ctx.pattern
        out, ctx.grad_out = ctx.grad_out, None  # no reference left: autograd keeps the result
        # ReLU: no gradient where the value was clipped to zero.
        g = grad.masked_fill(values <= 0, 0).to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            per_bag = F.embedding_bag(
                p.latents, weight, p.offsets, mode="sum", per_sample_weights=g
            )
            grad_x = torch.zeros_like(x).index_add_(0, p.tokens, per_bag.to(x.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = p.scatter(g, p.rows_of(x.to(weight.dtype)), weight, out)
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, p.latents, g)
        return grad_x, grad_w, grad_b, None, None, None


class _DecodeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, acts: Tensor, rows: Tensor, pattern: Pattern, grad_out: Tensor | None):
        ctx.save_for_backward(acts, rows)
        ctx.pattern, ctx.grad_out = pattern, grad_out
        return F.embedding_bag(
            pattern.latents, rows, pattern.offsets, mode="sum", per_sample_weights=acts
        )

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        acts, rows = ctx.saved_tensors
        p: Pattern = ctx.pattern
        out, ctx.grad_out = ctx.grad_out, None
        grad_acts = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_acts = p.gather_dots(grad.contiguous(), rows)
        if ctx.needs_input_grad[1]:
            grad_rows = p.scatter(acts, grad, rows, out)
        return grad_acts, grad_rows, None, None
