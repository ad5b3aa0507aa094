"""A relation curriculum for LLaVA stage 2: phases in which only some relations' answers carry
the loss, so that the VLM meets one relation before its mirror image.

Why: with "left of" and "right of" both asked, nothing that reads one object's place without
the relation word lowers the loss (the two relations cancel), so stage 2 sits on a plateau at
chance; with one relation alone, the subject's place already predicts the answer and the VLM
learns to bind names to places, after which the mirror relation is a small step
(`docs/research/toy_models.md`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from vlmdiff.inputs import IGNORE, Encoded
from vlmdiff.logs import Log
from vlmdiff.world.scenes import RELATIONS


@dataclass(frozen=True)
class Phase:
    """`steps` optimiser steps in which spatial answers count only for `relations`, and other
    answers only for `families` (None: every family)."""

    steps: int
    relations: tuple[str, ...]
    families: tuple[str, ...] | None = None


def phases(curriculum: Sequence[Mapping[str, Any]], total_steps: int, where: str) -> list[Phase]:
    """The `curriculum` key of a stage's config as phases, checked against the stage's steps."""
    out = []
    for i, p in enumerate(curriculum, 1):
        unknown = sorted(set(p["relations"]) - set(RELATIONS))
        if unknown:
            raise ValueError(f"{where}.curriculum phase {i}: unknown relations {unknown}; "
                             f"known: {list(RELATIONS)}")
        families = p.get("families")
        out.append(Phase(int(p["steps"]), tuple(p["relations"]),
                         None if families is None else tuple(families)))
    if sum(p.steps for p in out) >= max(1, total_steps):
        raise ValueError(f"{where}.curriculum: its phases take {sum(p.steps for p in out)} steps, "
                         f"which leaves none of {where}.steps ({total_steps}) for every answer")
    return out


def answer_mask(relations: Sequence[str | None], families: Sequence[str], phase: Phase) -> np.ndarray:
    """Rows whose answer counts in `phase`: the spatial rows about one of its relations, and the
    other rows (relation empty or None, as the world's splits write it) of its families."""
    return np.array([r in phase.relations if r else phase.families is None or f in phase.families
                     for r, f in zip(relations, families, strict=True)], dtype=bool)


def curriculum_batches(
    data: Encoded,
    relations: Sequence[str | None],
    families: Sequence[str],
    plan: Sequence[Phase],
    make_batches: Any,
    log: Log = print,
) -> Iterator[dict[str, torch.Tensor]]:
    """`make_batches(data)`'s batches, the answers masked phase by phase as `plan` says, then
    unmasked for good. `relations` and `families` are those of each row that `data` encodes."""
    spatial = np.array([bool(r) for r in relations])
    for i, phase in enumerate(plan, 1):
        keep = answer_mask(relations, families, phase)
        counted = int((keep & spatial).sum())
        if counted == 0:
            raise ValueError(f"curriculum phase {i}: the training split has no question about "
                             f"{list(phase.relations)}")
        others = "every other family" if phase.families is None else (
            ", ".join(phase.families) if phase.families else "no other family")
        log(f"curriculum phase {i}: {phase.steps} steps, spatial answers about "
            f"{', '.join(phase.relations)} only ({counted} of {int(spatial.sum())} spatial rows), "
            f"{others} ({int((keep & ~spatial).sum())} rows)")
        # only the conversations with an answer that counts: the phase's relations then fill
        # its batches, and no batch is all held back (a NaN loss)
        masked = data.answers_of(keep)
        learning = [c for c, lab in enumerate(masked.labels) if bool((lab != IGNORE).any())]
        log(f"curriculum phase {i}: {len(learning)} of {len(data)} conversations have answers "
            "that count")
        yield from islice(make_batches(masked.select(learning)), phase.steps)
    if plan:
        log("curriculum done: every answer counts from here on")
    yield from make_batches(data)
