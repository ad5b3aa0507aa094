"""Reading or replacing a decoder block's output: the residual-stream capture of the caches,
layer replacement (splice, ablation, steering), SAE splicing and prompt-token activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from vlmdiff.inputs import encode_rows, prompt_span

if TYPE_CHECKING:
    from datasets import Dataset


class ResidCapture:
    """Forward hooks on decoder blocks that keep each block's output at selected tokens.

    Every block writes its rows into one `[n_layers, n_kept, d_model]` buffer, so the kept
    tokens are located once per batch (not once per block) and a GPU run copies to the host
    once per batch.
    """

    def __init__(self, layers: torch.nn.ModuleList, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.n_layers = len(layers)
        self.index: torch.Tensor | None = None  # flat positions of the kept tokens
        self.buffer: torch.Tensor | None = None
        self.seen = [False] * self.n_layers
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            rows = h.reshape(-1, h.shape[-1]).index_select(0, self.index)
            if self.buffer is None:
                shape = (self.n_layers, *rows.shape)
                self.buffer = torch.empty(shape, dtype=self.dtype, device=rows.device)
            self.buffer[i].copy_(rows)
            self.seen[i] = True

        return hook

    def run(
        self,
        backbone: torch.nn.Module,
        inputs: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """One forward pass; returns the blocks' outputs at the `keep` tokens, on the CPU, as
        `[n_layers, n_kept, d_model]` in row-major token order."""
        kwargs = {n: v.to(device) for n, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(backbone.dtype)
        self.index = keep.to(device).flatten().nonzero().squeeze(1)
        self.buffer, self.seen = None, [False] * self.n_layers
        try:
            with torch.inference_mode():
                backbone(**kwargs, use_cache=False)
            missing = [i for i, seen in enumerate(self.seen) if not seen]
            if missing:
                raise RuntimeError(f"decoder blocks {missing} did not run in the forward pass")
            return self.buffer.cpu()  # type: ignore[union-attr]
        finally:
            self.index = self.buffer = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def prompt_activations(
    model: torch.nn.Module,
    processor: Any,
    ds: Dataset,
    features: Mapping[int, Sequence[int]],
    saes: Mapping[int, torch.nn.Module],
    *,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]]:
    """Per batch of `ds` rows (`question`, `image`, encoded exactly as for the activation
    caches): the first row's index, the model inputs, the prompt-token mask `[batch, seq]`, and
    per layer the features' activations on the masked tokens in row order,
    `[n_prompt_tokens, len(features[layer])]`."""
    image_id = model.config.image_token_id
    current: dict[str, Any] = {}

    def recorder(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        sae, cols = saes[layer], torch.tensor(list(features[layer]), device=device)

        def fn(h: torch.Tensor) -> torch.Tensor:
            current["acts"][layer] = sae.dense_acts(h[current["span"]].to(sae.dtype))[:, cols]
            return h

        return fn

    with ExitStack() as hooks:
        for layer in features:
            hooks.enter_context(replace_layer_output(model, layer, recorder(layer)))
        for lo in range(0, len(ds), batch_size):
            inputs = encode_rows(
                ds, lo, min(lo + batch_size, len(ds)), mode="vqa", processor=processor
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            span = prompt_span(inputs["input_ids"], inputs["attention_mask"], image_id)
            current.update(span=span, acts={})
            model.model(**inputs, use_cache=False)
            yield lo, inputs, span, current["acts"]


Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def replace_layer_output(model: torch.nn.Module, layer: int, fn: Replace):
    """Replace decoder block `layer`'s hidden-state output by fn(output) while in the block."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = language_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replacement(sae: torch.nn.Module, span: torch.Tensor | None) -> Replace:
    """Reconstruct through the SAE, at every token or only where `span` [batch, seq] is True."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        recon = sae(h.reshape(-1, h.shape[-1]).to(sae.W_enc.dtype)).sae_out.reshape(h.shape)
        recon = recon.to(h.dtype)
        return recon if span is None else torch.where(span[..., None], recon, h)

    return fn


def language_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of an LM or of a VLM's language backbone."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner.layers
