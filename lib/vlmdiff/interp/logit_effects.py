"""A feature's direct effect on the next-token logits, as feature pages usually show it: the
unembedding times the feature's decoder direction, with the final norm's gain folded into the
unembedding (as TransformerLens folds it), giving the tokens it promotes and suppresses most."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def unembedding(model: Any) -> Tensor:
    """`W_U γ` `[vocab, d_model]`: the output embeddings times the final norm's gain, where the
    language model has one (`model.get_decoder().norm`)."""
    w_u = model.get_output_embeddings().weight.detach().float()
    norm = getattr(model.get_decoder(), "norm", None)
    gain = getattr(norm, "weight", None)
    return w_u * gain.detach().float() if gain is not None else w_u


def logit_effects(w_u: Tensor, direction: Tensor, tokenizer: Any, n: int = 10
                  ) -> dict[str, list[tuple[str, float]]]:
    """The `n` tokens whose logits `direction` (a decoder column, model units) raises most
    (`promoted`, largest first) and lowers most (`suppressed`, most negative first)."""
    effect = w_u @ direction.detach().float().to(w_u.device)
    n = min(n, effect.numel())
    out = {}
    for name, values, ids in (("promoted", *torch.topk(effect, n)),
                              ("suppressed", *torch.topk(-effect, n))):
        sign = 1.0 if name == "promoted" else -1.0
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        out[name] = [(str(t), round(sign * float(v), 4)) for t, v in zip(tokens, values,
                                                                          strict=True)]
    return out
