"""Interventions on the residual stream of a fine-tuned model, read with the ordinary capability measures.

:class:`Intervened` is a model whose forward is the target model's forward with hooks built for the tokens of that
call, so behaviour (greedy decoding, which grows its input token by token) and the answer loss measure the
intervened model without knowing about the intervention. Two analyses build on it: cross-model activation patching
(``patching.py``) and difference-in-means direction ablation (``direction.py``). Both score a restored fraction,
(acc_intervened − acc_finetuned) / (acc_base − acc_finetuned), only where the fine-tuning lost at least
``min_gap`` of accuracy (else there is nothing to restore and it is None).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from wrapperlab.analysis.common import AnalysisError
from wrapperlab.tasks.capability import Capability


class Intervened(nn.Module):
    """``target`` run with ``hooks_for(tokens)`` (a list of (hook name, fn)) on every call."""

    def __init__(self, target, hooks_for: Callable[[torch.Tensor], list]):
        super().__init__()
        self.target = target
        self.hooks_for = hooks_for

    def forward(self, tokens: torch.Tensor, positions=None) -> torch.Tensor:
        return self.target.run_with_hooks(tokens, self.hooks_for(tokens), positions=positions)


def block_hooks(model) -> list[tuple[str, str]]:
    """(input, output) residual hook names of every block, from the model's ``residual`` component."""
    from wrapperlab.analysis.common import need

    names = [h for _, h in need(model, "residual").residual]
    pre = [f"blocks.{i}.hook_resid_pre" for i in range(len(names) - 1)]
    return list(zip(pre, names[1:]))


def same_shape(base, finetuned) -> None:
    from wrapperlab.models.registry import components

    cb, cf = components(base), components(finetuned)
    if len(cb.residual) != len(cf.residual):
        raise AnalysisError(f"base has {cb.n_layer} blocks and the fine-tuned model {cf.n_layer}; a pair must share "
                            f"an architecture")


def restored(acc: float, acc_base: float, acc_ft: float, min_gap: float) -> float | None:
    gap = acc_base - acc_ft
    return (acc - acc_ft) / gap if gap >= min_gap else None


@torch.no_grad()
def last_token_residuals(model, cap: Capability, idx: np.ndarray) -> torch.Tensor:
    """Residual stream at the last prompt token at every boundary B0..BL: (L + 1, len(idx), d), in ``idx`` order."""
    from wrapperlab.analysis.capability import features

    return features(model, cap, idx)


def sample(cap: Capability, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` record indices (all when there are fewer), seeded, sorted."""
    if len(cap) <= limit:
        return np.arange(len(cap))
    return np.sort(np.random.default_rng([seed, 23]).choice(len(cap), limit, replace=False))

