"""Low-rank adaptation (LoRA, Hu et al. 2021) of a model's linear maps: ``train.method=lora``.

Each target matrix W (a linear map named as the family's prunable matrices: ``attn.qkv``, ``mlp.fc``, ``attn.wq``
...) gets ``W x + (alpha / r) · B A x`` with A (r, in) drawn as PEFT draws it (Kaiming-uniform, a = sqrt(5)) and
B (out, r) zero, so training starts from the parent's function. Everything else is frozen. The adapters live
beside the model (PyTorch forward hooks on the target modules), so the model's own parameter names and state
dict never change: a LoRA run saves the *merged* weights as its model (every analysis and child stage reads an
ordinary model) and the factors A, B as ``lora.*`` tensors (resume, adapter export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wrapperlab.models.registry import components


class LoRAError(ValueError):
    """Targets LoRA cannot adapt (one-line message)."""


def targets_of(model, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module path, matrix name) of every linear map of ``model`` named in ``names`` (the family's default
    prunable set when empty); a name that is not a linear map of this family is an error naming the choices."""
    comp = components(model)
    wanted = names or comp.default_matrices
    linear = {m.name for m in comp.matrices
              if m.axis == 0 and isinstance(model.get_submodule(m.param.rsplit(".", 1)[0]), nn.Linear)}
    bad = [n for n in wanted if n not in linear]
    if bad:
        raise LoRAError(f"train.lora_targets: {', '.join(bad)} is not a linear map of this {comp.family} model; "
                        f"LoRA adapts {', '.join(sorted(linear)) or 'nothing here'}")
    return [(m.param.rsplit(".", 1)[0], m.name) for m in comp.matrices if m.name in wanted]


class LoRA(nn.Module):
    """The adapter factors of one model, ``A.<i>`` and ``B.<i>`` for target module i, and the hooks applying them."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], rank: int, alpha: float | None = None):
        super().__init__()
        self.paths = [p for p, _ in targets_of(model, names)]
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for path in self.paths:
            lin = model.get_submodule(path)
            a = torch.empty(rank, lin.in_features, device=lin.weight.device, dtype=lin.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(lin.out_features, rank, device=a.device, dtype=a.dtype)))
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles = [model.get_submodule(path).register_forward_hook(self._hook(i))
                         for i, path in enumerate(self.paths)]

    def _hook(self, i: int):
        def fn(module, args, out):
            return out + (args[0] @ self.A[i].t().to(out.dtype)) @ (self.B[i].t() * self.scale).to(out.dtype)
        return fn

    def delta(self, i: int) -> torch.Tensor:
        """ΔW of target i: scale · B A, shaped as the weight (out, in)."""
        return self.scale * self.B[i] @ self.A[i]

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every target weight replaced by W + ΔW."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for i, path in enumerate(self.paths):
                state[f"{path}.weight"] += self.delta(i).to(state[f"{path}.weight"].dtype)
        return state

    def factors(self) -> dict[str, torch.Tensor]:
        """``{path}.lora_A`` / ``{path}.lora_B`` for every target (the tensors a checkpoint keeps)."""
        out = {}
        for i, path in enumerate(self.paths):
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = self.A[i].detach(), self.B[i].detach()
        return out

    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, path in enumerate(self.paths):
                self.A[i].copy_(tensors[f"{path}.lora_A"])
                self.B[i].copy_(tensors[f"{path}.lora_B"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
