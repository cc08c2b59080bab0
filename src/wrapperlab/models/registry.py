"""The model contract: every model family registers how to build it and which named components it exposes.

A family (``gpt``, ``llama``, ``tracr``, ``lstm``, or one of yours) is a pydantic config class whose ``family``
field is a literal, a ``build(config, vocab_size, seq_len)`` function, and a ``components(model)`` function that
names, with TransformerLens hook names, what analyses may ask for:

- ``residual``: the residual stream at the input of the first block and after every block, as (label, hook name)
  pairs ``B0 … B{L}`` (the probes read these);
- ``attention``: one ``hook_pattern`` per layer, or None when the family has no attention;
- ``matrices``: the prunable matrices, whose units are output units of a linear map (rows, or columns of a
  Conv1D), with their bias entries;
- ``causal``: whether position t only sees positions ≤ t (lets analyses truncate inputs after the readout).

An analysis asks for a component with :func:`require`; a model without it fails with one line ("lstm has no
attention pattern") before any work. Families register themselves on import; :data:`BUILTIN` lists the modules
imported on first use, so adding a family is its module plus one line there (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from wrapperlab.registry import Registry

BUILTIN = (
    "wrapperlab.models.transformer",
    "wrapperlab.models.llama",
    "wrapperlab.models.tracr",
    "wrapperlab.models.lstm",
    "wrapperlab.models.hf",
)


class ComponentError(ValueError):
    """A model lacks the component an analysis needs (one-line message)."""


@dataclass(frozen=True)
class Matrix:
    """A prunable matrix: ``param`` is the weight's parameter name; its units are output units, the rows of a
    ``(out, in)`` weight (``axis=0``) or the columns of an ``(in, out)`` one (``axis=1``, as GPT-2's Conv1D), each
    together with ``bias[i]`` when ``bias`` names a bias. ``name`` is the short name users select (``attn.qkv``,
    ``lstm.ih``, ``mlp.c_fc``)."""

    param: str
    block: int
    name: str
    bias: str | None = None
    axis: int = 0


@dataclass(frozen=True)
class Components:
    family: str
    n_layer: int
    causal: bool
    residual: list[tuple[str, str]]
    attention: list[str] | None
    matrices: list[Matrix]
    default_matrices: tuple[str, ...] = ()  # the matrix names pruned unless the user picks others

    @property
    def matrix_names(self) -> list[str]:
        return list(dict.fromkeys(m.name for m in self.matrices))


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config: type[BaseModel]
    build: Callable[[BaseModel, int, int], object]  # (config, vocab_size, seq_len) -> nn.Module
    components: Callable[[object], Components]
    description: str = ""
    default_for_tasks: tuple[str, ...] = field(default=())  # task kinds whose runs use this family by default
    # a family whose shape is fixed by the task (a compiled program): task config -> the model config
    shape_from_task: Callable[[object], BaseModel] | None = None
    # a family that brings its own trained weights: (task config, seed) -> the model a parentless fine-tune starts from
    pretrained: Callable[[object, int], object] | None = None
    # a family with a Hugging Face equivalent: model -> (config.json dict, state dict in the HF parameter names),
    # weights as they are (no folding); None = not exportable
    to_hf: Callable[[object], tuple[dict, dict]] | None = None
    # LoRA factors {module path: (A, B)} in our names -> ({HF module path: (A, B)}, fan_in_fan_out) for the same
    # checkpoint as ``to_hf`` writes (a PEFT adapter loads on top of it)
    lora_to_hf: Callable[[object, dict], tuple[dict, bool]] | None = None
    # a fresh randomly initialised model of the same architecture (default: ``build`` on the model's config)
    fresh: Callable[[object], object] | None = None


FAMILIES: Registry[ModelFamily] = Registry("model family", BUILTIN, group="wrapperlab.model_families")
register, families, get_family = FAMILIES.register, FAMILIES.all, FAMILIES.get


def default_family(task_kind: str) -> str:
    """The family a run of ``task_kind`` uses when its config names none (gpt unless a family claims the kind)."""
    return next((f.name for f in families().values() if task_kind in f.default_for_tasks), "gpt")


def family_of(model) -> ModelFamily:
    """The registered family of a built model (its class attribute ``family``)."""
    name = getattr(model, "family", None)
    if name is None:
        raise ComponentError(f"{type(model).__name__} is not a registered wrapperlab model family")
    return get_family(name)


def random_like(model, seed: int = 0):
    """A randomly initialised model of ``model``'s architecture (the probes' control), in eval mode on its device."""
    import torch

    fam = family_of(model)
    torch.manual_seed(seed)
    if fam.fresh is not None:
        new = fam.fresh(model)
    else:
        cfg = model.cfg
        new = fam.build(cfg, cfg.vocab_size, cfg.seq_len)
    return new.to(next(model.parameters()).device).eval()


def components(model) -> Components:
    return family_of(model).components(model)


WHAT = {"residual": "residual stream", "attention": "attention pattern", "matrices": "prunable matrices"}


def require(model, component: str) -> Components:
    """The model's components, after checking it has ``component`` (one line naming the family otherwise)."""
    comp = components(model)
    if component not in WHAT:
        raise ValueError(f"unknown component {component!r}; choose from {', '.join(WHAT)}")
    if not getattr(comp, component):
        raise ComponentError(f"{comp.family} has no {WHAT[component]}")
    return comp


def residual_hooks(n_layer: int) -> list[tuple[str, str]]:
    """B0 (input of block 0) … B{n_layer} (output of the last block), with the standard hook names."""
    return [("B0", "blocks.0.hook_resid_pre")] + [(f"B{i + 1}", f"blocks.{i}.hook_resid_post")
                                                  for i in range(n_layer)]


def row_matrices(model, names: dict[str, str]) -> list[Matrix]:
    """Every ``blocks.{l}.<path>.weight`` whose ``<path>`` is a key of ``names`` (mapped to its short name), with
    the matching bias when the model has one, in parameter order."""
    params = dict(model.named_parameters())
    out = []
    for pname in params:
        parts = pname.split(".")
        if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit():
            continue
        path, leaf = ".".join(parts[2:-1]), parts[-1]
        if leaf == "weight" and path in names:
            bias = pname[: -len("weight")] + "bias"
            out.append(Matrix(pname, int(parts[1]), names[path], bias if bias in params else None))
    return out
