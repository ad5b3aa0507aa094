"""Recording and patching attention heads: the LM's eager attention routed through a probe
that exposes per-head queries, keys, head outputs and patterns; attention over the image.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from vlmdiff.hooks import language_layers
from vlmdiff.inputs import encode_rows, prompt_span, to_device

# ------------------------------------------------------------------------- the attention probe


class AttentionProbe:
    """Records, and optionally patches, each attention layer's per-head tensors.

    Stands in for the eager attention function of the language model (numerically the same
    computation) while `probe_attention` is active. Per layer it records `query` `[b, H, s, d]`
    (after RoPE), `key` `[b, H, s, d]` (after the KV heads are repeated for their query heads),
    `output` `[b, s, H, d]` (the input to `o_proj`, split per head) and `pattern` `[b, H, s, s]`
    (the attention probabilities). `patches[layer][name] = (source, heads)` replaces the heads
    marked in the bool `heads` `[H]` by `source` (a recording of another run).
    """

    def __init__(self, layers: Sequence[int] | None = None, *, detach: bool = True) -> None:
        self.layers = None if layers is None else set(layers)
        self.detach = detach
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self.patches: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.masks: dict[int, torch.Tensor | None] = {}

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **_: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = int(module.layer_idx)
        groups = int(module.num_key_value_groups)
        keys = key.repeat_interleave(groups, dim=1)  # = transformers' repeat_kv
        values = value.repeat_interleave(groups, dim=1)
        patch = self.patches.get(layer, {})
        query = _patch(query, patch.get("query"), head_dim=1)
        keys = _patch(keys, patch.get("key"), head_dim=1)
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        mask = None if attention_mask is None else attention_mask[..., : keys.shape[-2]]
        scores = _masked(scores, mask)
        # float32 softmax as in eager attention (float64 kept for precise checks)
        dtype = torch.promote_types(query.dtype, torch.float32)
        pattern = F.softmax(scores, dim=-1, dtype=dtype).to(query.dtype)
        pattern = F.dropout(pattern, p=dropout, training=module.training)
        out = torch.matmul(pattern, values).transpose(1, 2).contiguous()
        out = _patch(out, patch.get("output"), head_dim=2)
        if self.layers is None or layer in self.layers:
            rec = {"query": query, "key": keys, "output": out, "pattern": pattern}
            self.records[layer] = {k: v.detach() if self.detach else v for k, v in rec.items()}
            self.masks[layer] = None if mask is None else mask.detach()
        return out, pattern


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def _patch(
    x: torch.Tensor, patch: tuple[torch.Tensor, torch.Tensor] | None, head_dim: int
) -> torch.Tensor:
    if patch is None:
        return x
    source, heads = patch
    shape = [1] * x.ndim
    shape[head_dim] = -1
    return torch.where(heads.view(shape).to(x.device), source.to(x), x)


@contextmanager
def probe_attention(model: torch.nn.Module, probe: AttentionProbe) -> Iterator[AttentionProbe]:
    """Route the language model's eager attention through `probe` while in the block.

    Works for transformers' Llama-family attention modules, which look up their module's
    `eager_attention_forward` at call time; the model must use eager attention.
    """
    attn = language_layers(model)[0].self_attn
    impl = getattr(attn.config, "_attn_implementation", "eager")
    if impl != "eager":
        raise ValueError(
            f"attention probing needs eager attention; the model uses {impl!r} "
            "(load it with attn_implementation='eager')"
        )
    module = sys.modules[type(attn).__module__]
    if not hasattr(module, "eager_attention_forward"):
        raise TypeError(f"{type(attn).__name__} has no eager_attention_forward to probe")
    with mock.patch.object(module, "eager_attention_forward", probe.attention):
        yield probe


def head_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, query heads, key-value heads) of the language model."""
    attn = language_layers(model)[0].self_attn
    cfg = attn.config
    n_heads = int(cfg.num_attention_heads)
    return len(language_layers(model)), n_heads, n_heads // int(attn.num_key_value_groups)


def kv_head_of(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """The key-value head each query head reads (`h // G`, as transformers' `repeat_kv`)."""
    return np.arange(n_heads) // (n_heads // n_kv_heads)


# ------------------------------------------------------------------------- attention overlays


@torch.no_grad()
def attention_to_image(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    heads: Sequence[tuple[int, int]],
    *,
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    """Attention from the prompt tokens to the image patches, `[n, len(heads), grid, grid]`.

    For each (image, question) and head `(layer, head)`: the attention probabilities from every
    token of the prompt span (the question's tokens and the answer position) to each image
    token, averaged over those query tokens, laid out on the patch grid (row-major).
    """
    from datasets import Dataset

    layers = sorted({lay for lay, _ in heads})
    image_id = model.config.image_token_id
    maps = []
    ds = Dataset.from_dict({"question": list(questions), "image": list(images)})
    for lo in range(0, len(ds), batch_size):
        inputs = to_device(encode_rows(ds, lo, min(lo + batch_size, len(ds)), mode="vqa",
                                 processor=processor), device, model.dtype)
        span = prompt_span(inputs["input_ids"], inputs["attention_mask"], image_id)
        is_image = inputs["input_ids"] == image_id
        probe = AttentionProbe(layers)
        with probe_attention(model, probe):
            model.model(**inputs, use_cache=False)
        batch = []
        for lay, h in heads:
            pattern = probe.records[lay]["pattern"][:, h].float()  # [b, s, s]
            rows = []
            for i in range(pattern.shape[0]):
                block = pattern[i][span[i]][:, is_image[i]]  # [query tokens, patches]
                rows.append(block.mean(0))
            batch.append(torch.stack(rows))
        maps.append(torch.stack(batch, dim=1).cpu().numpy())
    out = np.concatenate(maps)
    grid = int(round(out.shape[-1] ** 0.5))
    return out.reshape(*out.shape[:2], grid, grid)
