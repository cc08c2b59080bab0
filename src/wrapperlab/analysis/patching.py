"""Cross-model activation patching per block: which block's base-model activations restore the capability in the
fine-tuned model?

For each block l, the fine-tuned model runs on a capability prompt with block l's write to the residual stream
(its output minus its input, ``mode: block``) replaced by what block l of the base model writes on the same prompt
in the base model's own forward pass; ``mode: resid`` replaces the whole residual stream after block l instead (so
everything below l is the base model's). Every position is patched, and greedy decoding of a multi-token answer
patches every step. Rows: per block, the patched model's accuracy, answer loss and restored fraction; ``summary``:
the block that restores most. A change confined to one block is undone by patching that block alone; a wrapper
spread over the upper blocks, or a deletion, is not.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from wrapperlab.analysis.common import Result, Settings
from wrapperlab.analysis.interventions import Intervened, block_hooks, restored, same_shape, sample
from wrapperlab.tasks.capability import Capability
from wrapperlab.training.capability_eval import accuracy, answer_loss


class PatchSettings(Settings):
    mode: Literal["block", "resid"] = Field("block", description="patch the block's write (block) or the residual "
                                                                 "stream after it (resid)")
    limit: int = Field(400, ge=1, description="records scored (a seeded sample when there are more)")
    min_gap: float = Field(0.1, ge=0, le=1, description="accuracy the fine-tuning must have lost for a restored "
                                                        "fraction to be reported")
    seed: int = Field(0, ge=0)


def patched(base, finetuned, block: int, mode: str = "block") -> Intervened:
    """``finetuned`` with block ``block``'s write (or the residual after it) taken from ``base`` on every call."""
    pre, post = block_hooks(finetuned)[block]

    def hooks_for(tokens: torch.Tensor) -> list:
        _, cache = base.run_with_cache(tokens, names_filter=[pre, post], positions=-1)
        seen: dict[str, torch.Tensor] = {}

        def keep(x, hook):
            seen["pre"] = x

        def put(x, hook):
            if mode == "resid":
                return cache[post].to(x.dtype)
            return seen["pre"] + (cache[post] - cache[pre]).to(x.dtype)

        return [(pre, keep), (post, put)]

    return Intervened(finetuned, hooks_for)


def patching(base, finetuned, cap: Capability, s: PatchSettings | None = None) -> Result:
    """Accuracy and answer loss of ``finetuned`` with each block patched from ``base``, on the capability."""
    s = s or PatchSettings()
    same_shape(base, finetuned)
    idx = sample(cap, s.limit, s.seed)
    acc_b, acc_f = accuracy(base, cap, idx), accuracy(finetuned, cap, idx)
    with torch.no_grad():
        loss_b, loss_f = float(answer_loss(base, cap, idx)), float(answer_loss(finetuned, cap, idx))
    rows = []
    for block in range(len(block_hooks(finetuned))):
        m = patched(base, finetuned, block, s.mode)
        acc = accuracy(m, cap, idx)
        with torch.no_grad():
            loss = float(answer_loss(m, cap, idx))
        rows.append({"block": block, "acc": acc, "loss": loss, "restored": restored(acc, acc_b, acc_f, s.min_gap)})
    best = max(rows, key=lambda r: (r["acc"], -r["loss"]))
    summary = {"acc_base": acc_b, "acc_finetuned": acc_f, "loss_base": loss_b, "loss_finetuned": loss_f,
               "best_block": best["block"], "best_acc": best["acc"], "best_restored": best["restored"], "n": len(idx)}
    return Result("patching", rows, {"settings": s.to_dict(), "capability": cap.source}, {"summary": [summary]})
