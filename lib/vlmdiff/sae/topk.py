"""TopK sparse autoencoder stored in the Llama-Scope on-disk layout.

Conventions, matching Llama-Scope so its weights work unchanged:

- Inputs are scaled by a dataset-wise scalar `s = sqrt(d_model) / mean ||x||` before encoding and
  the reconstruction is divided by `s` again, so `x` and `sae_out` live in the model's units.
- `b_dec` is *not* subtracted from the input before encoding (Llama-Scope's
  `apply_decoder_bias_to_pre_encoder: false`); it is only added after decoding.
- `W_dec` is `[d_model, d_sae]`: column `i` is feature `i`'s direction, kept at unit norm in
  training. It is stored column-major (`W_dec.T` is contiguous), so that decoding gathers whole
  columns (see `vlmdiff.sae.sparse`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from vlmdiff.files import atomic_dir
from vlmdiff.sae import sparse
from vlmdiff.sae.folder import (
    HYPERPARAMS_FILE,
    LAYOUT_KEYS,
    WEIGHTS_FILE,
    SAEFormatError,
    parse_hyperparams,
    read_tensors,
)


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """Values of the top-k latents per token, `[n, k]`, non-negative."""

    top_indices: Tensor
    """Feature indices of the top-k latents per token, `[n, k]`."""

    pre_acts: Tensor
    """ReLU of the encoder pre-activations for every feature, `[n, d_sae]`."""


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """Reconstruction of the input, `[n, d_model]`, in the input's units."""

    latent_acts: Tensor
    """Activations of the top-k latents, `[n, k]`."""

    latent_indices: Tensor
    """Indices of the top-k latents, `[n, k]`."""

    fvu: Tensor
    """Fraction of variance unexplained over the loss-masked tokens."""

    auxk_loss: Tensor
    """AuxK loss (dead latents predicting the residual), zero when no latent is dead."""

    l0: Tensor
    """Mean number of non-zero latents per loss-masked token."""


class TopKSAE(nn.Module):
    """`f = TopK(ReLU(W_enc (s x) + b_enc))`, `x_hat = (W_dec f + b_dec) / s`."""

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        k: int,
        *,
        norm_factor: float = 1.0,
        hook_point: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.d_model = d_model
        self.d_sae = d_sae
        self.k = k
        self.hook_point = hook_point
        self.extra: dict[str, Any] = {}
        """Hyperparams fields this class does not interpret (ours or the release's)."""

        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_model, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_model, **kw).T)
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw))
        self.register_buffer("norm_factor", torch.tensor(float(norm_factor), **kw))
        self._pre_scratch: Tensor | None = None  # forward's pre-activations, kept for reuse
        self._spare_grads: dict[str, Tensor] = {}  # the weights' last gradients, to write over

    @classmethod
    def from_random(
        cls,
        d_model: int,
        d_sae: int,
        k: int,
        seed: int,
        *,
        norm_factor: float = 1.0,
        device: str | torch.device = "cpu",
    ) -> TopKSAE:
        """Unit-norm random decoder columns, encoder = decoder transpose, zero biases."""
        sae = cls(d_model, d_sae, k, norm_factor=norm_factor)
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d_model, d_sae, generator=gen)
        w /= w.norm(dim=0, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.T)
        return sae.to(device)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encode(self, x: Tensor) -> EncoderOutput:
        """Top-k of `ReLU(W_enc (s x) + b_enc)` per token; `b_dec` is not subtracted first."""
        x = x.to(self.dtype) * self.norm_factor
        pre, indices = sparse.topk_scores(x, self.W_enc, self.b_enc, self.k)
        code = sparse.Pattern(self.d_sae, [(indices, None)])
        acts = sparse.encode_at(x, self.W_enc, self.b_enc, code, pre.gather(1, indices).flatten())
        return EncoderOutput(acts.view_as(indices), indices, pre)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """`(W_dec f + b_dec) / s` from sparse codes, in the input's units."""
        out = sparse.decode_rows(top_acts, top_indices, self.W_dec.T)
        return (out + self.b_dec) / self.norm_factor

    def dense_acts(self, x: Tensor) -> Tensor:
        """Feature activations `[n, d_sae]`, zero outside each token's top-k."""
        top_acts, top_indices, _ = self.encode(x)
        dense = top_acts.new_zeros(top_acts.shape[0], self.d_sae)
        return dense.scatter(1, top_indices, top_acts)

    @torch.no_grad()
    def feature_directions(self) -> Tensor:
        """Unit-norm decoder directions, `[d_sae, d_model]` (row `i` is feature `i`)."""
        w = self.W_dec.T
        return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def forward(
        self,
        x: Tensor,
        *,
        dead_mask: Tensor | None = None,
        loss_mask: Tensor | None = None,
        k_aux: int | None = None,
    ) -> ForwardOutput:
        """Encode and decode every token; losses use only the tokens where `loss_mask` is True.

        `dead_mask` (bool `[d_sae]`) marks dead latents for the AuxK loss (Gao et al. 2024,
        App. B.1): the top `k_aux` (default `d_model // 2`) dead latents of each token
        reconstruct the residual `x - sae_out`, normalised by the same total variance as the
        FVU and scaled down by `min(n_dead / k_aux, 1)` as in sparsify.
        """
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"expected x of shape [n, {self.d_model}], got {tuple(x.shape)}")
        if loss_mask is not None:
            if loss_mask.dtype != torch.bool or loss_mask.shape != x.shape[:1]:
                raise ValueError(
                    f"loss_mask must be bool of shape [{x.shape[0]}], "
                    f"got {loss_mask.dtype} {tuple(loss_mask.shape)}"
                )
            if bool(loss_mask.all()):
                loss_mask = None  # the same loss, without copying every row
        rows = loss_mask.nonzero().squeeze(1) if loss_mask is not None else None
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        n, n_loss = x.shape[0], x.shape[0] if rows is None else rows.numel()
        x = x.to(self.dtype)
        x_in = x * self.norm_factor
        buf = self._pre_scratch = sparse.reuse(self._pre_scratch, (n, self.d_sae), self.W_enc)
        pre, top_indices = sparse.topk_scores(x_in, self.W_enc, self.b_enc, self.k, buf)
        codes, values = [(top_indices, None)], [pre.gather(1, top_indices).reshape(-1)]
        if n_dead > 0 and n_loss > 0:
            assert dead_mask is not None
            k_aux = k_aux if k_aux is not None else self.d_model // 2
            scale = min(n_dead / k_aux, 1.0)
            pre_loss = pre if rows is None else pre.index_select(0, rows)
            aux_indices = sparse.top_among(pre_loss, dead_mask, min(k_aux, n_dead))
            codes.append((aux_indices, rows))
            values.append(pre_loss.gather(1, aux_indices).reshape(-1))
        # One pattern for the top-k and the AuxK latents: the encoder's and the decoder's
        # gradients each scatter through it in one product.
        pattern = sparse.Pattern(self.d_sae, codes)
        spare = self._spare_grads
        acts = sparse.encode_at(
            x_in, self.W_enc, self.b_enc, pattern, torch.cat(values), spare.pop("W_enc", None)
        )
        decoded = sparse.decode_pattern(acts, pattern, self.W_dec.T, spare.pop("W_dec", None))
        top_acts = pattern.split(acts)[0]
        # one split, not two slices: each slice's backward would zero a `decoded`-sized buffer
        parts = decoded.split([n, decoded.shape[0] - n])
        sae_out = (parts[0] + self.b_dec) / self.norm_factor

        sel = slice(None) if rows is None else rows
        x_sel, out_sel, acts_sel = x[sel], sae_out[sel], top_acts[sel]

        # summed squared errors as one fused loss (and one fused backward)
        total_variance = (x_sel - x_sel.mean(0)).pow(2).sum()
        fvu_ = F.mse_loss(out_sel, x_sel, reduction="sum") / total_variance

        if len(codes) > 1:
            # No decoder bias here: the dead latents model the residual, which has no offset.
            err_hat = parts[1] / self.norm_factor
            err = x_sel - out_sel.detach()
            auxk_loss = scale * F.mse_loss(err_hat, err, reduction="sum") / total_variance
        else:
            auxk_loss = fvu_.new_zeros(())

        return ForwardOutput(sae_out, top_acts, top_indices, fvu_, auxk_loss, l0(acts_sel))

    def recycle_grads(self) -> None:
        """Hand the weights' gradients to the next `forward` to write over, and clear them.

        Instead of `zero_grad` before a training step: at large sizes the page faults of fresh
        `[d_sae, d_model]` gradients cost about a third of the products that fill them.
        """
        for name in ("W_enc", "W_dec"):
            param = getattr(self, name)
            if param.grad is not None:
                # the backward fills `[d_sae, d_model]` rows: W_dec's gradient transposed
                grad = param.grad if name == "W_enc" else param.grad.T
                self._spare_grads[name], param.grad = grad, None

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder column's gradient onto the column's orthogonal complement."""
        if self.W_dec.grad is None:
            return
        # column-wise dots as a batch of tiny products: no `[d_model, d_sae]` temporary
        grad, w = self.W_dec.grad, self.W_dec
        parallel = torch.bmm(grad.T.unsqueeze(1), w.T.unsqueeze(2)).view(1, -1)
        grad.addcmul_(parallel, w, value=-1)

    def save(
        self,
        folder: str | Path,
        extra: dict[str, Any] | None = None,
        *,
        hook_point: str | None = None,
    ) -> None:
        """Write `hyperparams.json` and `checkpoints/final.safetensors`, replacing `folder` whole.

        `extra` fields are merged into `hyperparams.json` on top of `self.extra`. The hook point
        is `hook_point`, else `self.hook_point`, else `blocks.{extra["layer"]}.hook_resid_post`.
        """
        folder = Path(folder)
        extra = {**self.extra, **(extra or {})}
        clash = sorted(LAYOUT_KEYS & extra.keys())
        if clash:
            raise ValueError(f"extra fields {clash} would overwrite layout keys")
        hook = hook_point or self.hook_point
        if hook is None and "layer" in extra:
            hook = f"blocks.{extra['layer']}.hook_resid_post"
        if hook is None:
            raise ValueError("no hook point: pass hook_point= or extra={'layer': L}")

        in_norm = math.sqrt(self.d_model) / float(self.norm_factor)
        hyperparams: dict[str, Any] = {
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "act_fn": "topk",
            "top_k": self.k,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": in_norm, "out": in_norm},
            "hook_point_in": hook,
            "hook_point_out": hook,
            "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False,
            "sparsity_include_decoder_norm": False,
            **extra,
        }
        if self.d_sae % self.d_model == 0:
            hyperparams["expansion_factor"] = self.d_sae // self.d_model
        tensors = {
            "encoder.weight": self.W_enc,
            "encoder.bias": self.b_enc,
            "decoder.weight": self.W_dec,
            "decoder.bias": self.b_dec,
        }
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

        with atomic_dir(folder) as tmp:
            (tmp / "checkpoints").mkdir(parents=True)
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / HYPERPARAMS_FILE).write_text(json.dumps(hyperparams, indent=2) + "\n")

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device = "cpu",
        k: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TopKSAE:
        """Read an SAE folder (ours or a Llama-Scope release); `k` overrides the stored `top_k`."""
        folder = Path(folder)
        hp_path = folder / HYPERPARAMS_FILE
        if not hp_path.is_file():
            raise FileNotFoundError(f"SAE folder {folder}: {HYPERPARAMS_FILE} is missing")
        try:
            raw = json.loads(hp_path.read_text())
        except json.JSONDecodeError as e:
            raise SAEFormatError(f"{hp_path}: not valid JSON ({e})") from e
        spec = parse_hyperparams(raw, hp_path, k=k)
        tensors = read_tensors(folder / WEIGHTS_FILE, spec.d_model, spec.d_sae)

        if spec.fold_decoder_norm:
            # Sparsity was measured on acts * ||column||: moving the column norms into the
            # encoder leaves unit columns and gives the same top-k and the same reconstruction.
            col_norm = tensors["decoder.weight"].norm(dim=0)
            if bool((col_norm == 0).any()):
                raise SAEFormatError(f"{folder / WEIGHTS_FILE}: decoder.weight has zero columns")
            tensors["encoder.weight"] = tensors["encoder.weight"] * col_norm[:, None]
            tensors["encoder.bias"] = tensors["encoder.bias"] * col_norm
            tensors["decoder.weight"] = tensors["decoder.weight"] / col_norm

        sae = cls(
            spec.d_model,
            spec.d_sae,
            spec.k,
            norm_factor=spec.norm_factor,
            hook_point=spec.hook_point,
            dtype=dtype,
        )
        sae.extra = spec.extra
        with torch.no_grad():
            sae.W_enc.copy_(tensors["encoder.weight"])
            sae.b_enc.copy_(tensors["encoder.bias"])
            sae.W_dec.copy_(tensors["decoder.weight"])
            sae.b_dec.copy_(tensors["decoder.bias"])
        return sae.to(device)


def estimate_norm_factor(activations: Tensor) -> float:
    """`s = sqrt(d_model) / mean ||x||` over the rows of `activations` `[n, d_model]`."""
    norms = activations.double().norm(dim=-1)
    mean = float(norms.mean())
    if not (mean > 0 and math.isfinite(mean)):
        raise ValueError(f"cannot estimate a norm factor: mean activation norm is {mean}")
    return math.sqrt(activations.shape[-1]) / mean


def fvu(x: Tensor, x_hat: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error over squared deviation from the mean, over the rows where `mask` is True."""
    if mask is not None:
        x, x_hat = x[mask], x_hat[mask]
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def l0(latent_acts: Tensor) -> Tensor:
    """Mean number of non-zero latents per token (last dimension)."""
    return (latent_acts > 0).sum(-1).float().mean()
