"""Model organisms: (base, fine-tuned) pairs whose label (the paper's hypotheses of §3 and Fig. 1b: wrapper, deletion,
amplification; plus unchanged, and absent as a control) holds by construction, so that the verdict and the field's
measures can be scored on models whose answer is known.

The capability is counting a (O_PT) on the PCFG count family at c = 0. The training runs are an ordinary experiment
spec (``data/experiments/organisms.yaml``) planned with a seed axis; three model edits join the plan as nodes of
their own (``call`` payloads, so they run on the executor's workers and are reused when done): removing the least
salient last-block MLP unit, planting that unit as a gate that writes one wrong answer, and re-initialising the
units most salient for the capability (grad·w) before a fine-tune on counting b. Each organism is then written as a
directory: ``card.json`` (label, recipe, seed, runs, measured accuracies), ``capability.jsonl``, ``base`` and
``finetuned`` (links to the native run directories) and ``hf/base``, ``hf/finetuned`` (Hugging Face exports that
load without wrapperlab).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from wrapperlab.experiments.plan import Node, Plan, _run_cost
from wrapperlab.experiments.spec import SpecError
from wrapperlab.training import checkpoint as ck

CAPABILITY = {"family": "count", "operand": "a", "c": 0.0, "n": 1000}
REINIT_FRACTION = 0.10  # share of the prunable units re-initialised by the deletion edit
GATE_PRE = 4.0  # the gate unit's constant pre-activation (GELU(4) ~ 4: the unit is always on)
GATE_SCALE = 4.0  # the gate's write, in multiples of the median residual norm at the answer position
EDIT_VERSION = 1  # part of an edit's run id: bump when an edit's recipe changes


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    base: str  # a spec group or an edit
    finetuned: str
    how: str


RECIPES = (
    Recipe("wrapper-ft", "wrapper", "pt", "wrapper_ft",
           "the counting model fine-tuned at η_M on counting b, fully correlated with the spurious token (C_Tr = 1): "
           "the paper's wrapper setting (§5), revivable in a few reFT steps at this scale"),
    Recipe("wrapper-gate", "wrapper", "unit_removed", "gate",
           "the counting model without its least salient last-block MLP unit, and that unit planted back as a gate "
           "that writes one wrong answer at every position; removing the unit restores the base exactly"),
    Recipe("deletion-reinit", "deletion", "pt", "deletion_ft",
           f"the counting model with the {REINIT_FRACTION:.0%} of prunable units most salient for counting a "
           f"(grad·w) re-initialised, then fine-tuned at η_M on counting b (C_Tr = 0)"),
    Recipe("amplification-ft", "amplification", "pt_early", "amplify_ft",
           "counting a partly learned (the counting model's pretraining stopped at the first evaluation 15 points "
           "above the majority rate), then fine-tuned at η_L on counting a itself until it is 45 points above (at most "
           "1000 steps)"),
    Recipe("unchanged-ft", "unchanged", "pt", "unchanged_ft",
           "the counting model fine-tuned on the token-value family at LR 2e-6 for 100 steps"),
    Recipe("absent-ft", "absent", "pt_absent", "absent_ft",
           "a model pretrained on token-value only (it never counts), fine-tuned at η_M on counting b (C_Tr = 0)"),
)
LABELS = ("wrapper", "deletion", "amplification", "unchanged", "absent")
EDITS = {"unit_removed": "remove_unit", "gate": "gate", "reinit": "reinit"}  # node group -> edit op (all of pt)
EDIT_CHILDREN = {"deletion_ft": ("reinit", {"lr": "M", "c_train": 0})}  # fine-tunes of an edit


class OrganismError(SpecError):
    """A problem with an organisms directory or request (one line; the CLI reports it as a spec error)."""


def spec(seeds: int, every_run: dict | None = None):
    """The organisms' training spec under seeds 0..seeds-1; ``every_run``: values set on every run group (a short
    look: ``{"steps": 50}``; the labels then no longer hold by the recipes' measured behaviour)."""
    import yaml

    from wrapperlab.experiments.spec import parse_spec

    data = yaml.safe_load(resources.files("wrapperlab.data").joinpath("experiments", "organisms.yaml").read_text())
    for g in data["runs"].values():
        g["set"] = {**g.get("set", {}), **(every_run or {})}
    return parse_spec({**data, "seeds": list(range(seeds))}, "organisms.yaml")


# ------------------------------------------------------------------------------------------------ the plan
def extend(plan: Plan, threads: int = 0, device: str = "cpu", every_run: dict | None = None) -> None:
    """Add the edits of every seed's counting model, and the fine-tunes that start from an edit, to ``plan``."""
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import default_run_dir, resolve

    runs_dir = plan.root / "runs"
    for pt in plan.runs("pt"):
        edits = {}
        for group, op in EDITS.items():
            rid = hashlib.sha256(json.dumps({"source": pt.run_id, "edit": op, "version": EDIT_VERSION},
                                            sort_keys=True).encode()).hexdigest()[:12]
            run_dir = runs_dir / f"edit-{op.replace('_', '-')}-{rid}"
            plan.groups.setdefault(group, []).append(rid)
            plan.nodes[rid] = edits[group] = Node(
                rid, "run", group, f"{group} <- {pt.label}", dict(pt.point), [pt.key],
                {"kind": "call", "target": "wrapperlab.experiments.organisms:execute_edit", "op": op,
                 "source": pt.run_dir, "run_dir": str(run_dir), "run_id": rid, "threads": threads},
                pt.cost * 0.05, rid, str(run_dir), {**pt.side, "run_id": rid})
        for group, (parent, values) in EDIT_CHILDREN.items():
            p = edits[parent]
            raw = build_config("finetune", "cpu", values={**values, **(every_run or {}), "parent": p.run_dir,
                                                          "threads": threads, "device": device})
            cfg, _ = resolve(raw, parent_side=p.side)
            rid = cfg.run_id(p.run_id)
            run_dir = default_run_dir(cfg, p.run_id, runs_dir)
            raw.pop("_notes", None)
            plan.groups.setdefault(group, []).append(rid)
            plan.nodes[rid] = Node(rid, "run", group, f"{group} <- {p.label}", dict(p.point), [p.key],
                                   {"kind": "run", "raw": raw, "run_dir": str(run_dir), "run_id": rid},
                                   _run_cost(cfg), rid, str(run_dir),
                                   {"config": cfg.model_dump(mode="json"), "run_id": rid, "stage": cfg.stage,
                                    "status": "done"})


def seeds_of(plan: Plan) -> list[int]:
    return sorted({n.point["train.seed"] for n in plan.runs("pt")})


def node_of(plan: Plan, group: str, seed: int) -> Node:
    keys = plan.groups.get(group) or [k for k, n in plan.nodes.items() if n.kind == "run" and n.group == group]
    return next(plan.nodes[k] for k in keys if plan.nodes[k].point.get("train.seed") == seed)


# ------------------------------------------------------------------------------------------------ edits
def _capability_batch(task, n: int, seed: int):
    return task.sample(n, np.random.default_rng([seed, 31]), family=CAPABILITY["family"],
                       operand=task.config.o_pt, c=CAPABILITY["c"])


@torch.no_grad()
def _accuracy(model, task, b) -> float:
    x = torch.from_numpy(task.answer_inputs(b.tokens))
    return float((model(x, positions=task.readout).argmax(-1).numpy() == b.answer).mean())


def _ranked(model, task, seed: int):
    from wrapperlab.analysis.pruning import pretraining_loss, rank_units

    return rank_units(model, lambda m: pretraining_loss(m, task, CAPABILITY["family"], 512, seed), (), "neuron")


def _quiet_unit(model, task, seed: int) -> tuple[int, int]:
    """(block, unit): the last block's MLP hidden unit with the smallest grad·w saliency for the capability (needs
    gradients: never call it under no_grad, where every score would be 0)."""
    units, _ = _ranked(model, task, seed)
    last = model.cfg.n_layer - 1
    mine = [u for u in units if u.block == last and u.matrix == "mlp.fc"]
    return last, int(min(mine, key=lambda u: abs(u.score)).index[0])


@torch.no_grad()
def _remove(model, block: int, unit: int) -> None:
    mlp = model.blocks[block].mlp
    mlp.fc.weight[unit] = 0
    mlp.fc.bias[unit] = 0
    mlp.proj.weight[:, unit] = 0


def edit_remove_unit(model, task, seed: int) -> dict:
    block, unit = _quiet_unit(model, task, seed)
    _remove(model, block, unit)
    return {"op": "remove_unit", "block": block, "unit": unit}


def edit_gate(model, task, seed: int) -> dict:
    """Remove the quiet unit, then plant it as a gate: a constant pre-activation, and a write (at every position)
    fitted so that the final norm and the head read one answer, the rarest among the capability's answers, on the
    capability's prompts (Adam on the cross-entropy to that answer, from the norm of GATE_SCALE residuals)."""
    block, unit = _quiet_unit(model, task, seed)
    _remove(model, block, unit)
    b = _capability_batch(task, 1000, seed)
    counts = np.bincount(b.answer)
    target = min((int(c) for c in np.unique(b.answer)), key=lambda c: (counts[c], c))  # rarest observed answer
    name = f"blocks.{block}.hook_resid_post"
    with torch.no_grad():
        h = model.run_with_cache(torch.from_numpy(task.answer_inputs(b.tokens)), names_filter=[name])[1][name]
    h = h[:, task.readout].float()
    scale = GATE_SCALE * float(h.norm(dim=-1).median())
    g = torch.Generator().manual_seed(seed * 1000 + 43)
    v = torch.randn(h.shape[-1], generator=g)
    v = (v * scale / v.norm()).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.02 * scale)
    want = torch.full((len(h),), target)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(model.ln_final.norm(h + v)), want)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        mlp = model.blocks[block].mlp
        mlp.fc.bias[unit] = GATE_PRE
        act = float(torch.nn.functional.gelu(torch.tensor(GATE_PRE)))
        mlp.proj.weight[:, unit] = v.detach() / act
    return {"op": "gate", "block": block, "unit": unit, "target": task.output_names[target],
            "pre_activation": GATE_PRE, "write_norm": float(v.detach().norm())}


def edit_reinit(model, task, seed: int) -> dict:
    units, n = _ranked(model, task, seed)  # needs gradients: not under no_grad
    k = max(1, int(round(REINIT_FRACTION * n)))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed * 1000 + 41)
    with torch.no_grad():
        for u in units[:k]:
            w = params[u.param]
            row = w[u.index[0]] if u.kind == "row" else w[:, u.index[0]]
            row.copy_(torch.randn(row.shape, generator=g) * 0.02)
            if u.bias:
                params[u.bias][u.index[0]] = 0.0
    blocks = {}
    for u in units[:k]:
        blocks[f"{u.block}:{u.matrix}"] = blocks.get(f"{u.block}:{u.matrix}", 0) + 1
    return {"op": "reinit", "units": k, "of": n, "per_matrix": blocks, "init": "N(0, 0.02), bias 0"}


EDIT_OPS = {"remove_unit": edit_remove_unit, "gate": edit_gate, "reinit": edit_reinit}


def execute_edit(p: dict) -> dict:
    """Edit the source run's model and write it as a finished run directory with the same config (a fine-tune can
    start from it) and its own run id; the sidecar records the edit and the capability accuracy before and after."""
    from wrapperlab.analysis.evaluate import load_run

    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    cfg, task, model, side = load_run(p["source"])
    seed = cfg.train.seed
    b = _capability_batch(task, 500, seed + 1)
    before = _accuracy(model, task, b)
    info = EDIT_OPS[p["op"]](model, task, seed)
    model.eval()
    after = _accuracy(model, task, b)
    maj = float(np.bincount(b.answer).max() / len(b.answer))
    row = {"family": CAPABILITY["family"], "operand": task.config.o_pt, "c_test": CAPABILITY["c"], "acc": after,
           "majority": maj, "n": len(b.answer), "step": side["step"]}
    new = {"run_id": p["run_id"], "stage": side["stage"], "status": "done", "config": side["config"],
           "parent": None, "parent_id": None, "source": p["source"], "source_id": side["run_id"],
           "edit": {**info, "capability_acc_before": before, "capability_acc_after": after},
           "metrics": [row], "wall_s": 0.0, "steps": side.get("steps")}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    ck.save_checkpoint(Path(p["run_dir"]), side["step"], tensors, new)
    return {"status": "done", "step": side["step"]}


# ------------------------------------------------------------------------------------------------ the directory
def write_capability(run_dir: str | Path, path: Path, seed: int) -> None:
    """The capability file of a seed: CAPABILITY['n'] records of counting O_PT at c = 0, drawn with the seed."""
    from wrapperlab.analysis.evaluate import load_run
    from wrapperlab.fileio import atomic_write_text

    _, task, _, _ = load_run(run_dir)
    b = task.sample(CAPABILITY["n"], np.random.default_rng([seed, 37]), family=CAPABILITY["family"],
                    operand=task.config.o_pt, c=CAPABILITY["c"])
    prompts = task.answer_inputs(b.tokens)
    lines = [json.dumps({"prompt": " ".join(task.vocab.decode(prompts[i])),
                         "answer": task.vocab.tokens[b.answer[i]], "label": task.vocab.tokens[b.answer[i]]})
             for i in range(len(b.answer))]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _link(target: Path, link: Path) -> None:
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == rel:
            return
        link.unlink()
    link.symlink_to(rel, target_is_directory=True)


def assemble(plan: Plan, log=lambda _m: None) -> list[dict]:
    """Write every organism's directory under ``plan.root/organisms`` (exports and capability files that exist are
    kept); returns the cards."""
    from wrapperlab.analysis.capability import Pair
    from wrapperlab.analysis.run import Run
    from wrapperlab.fileio import atomic_write_text
    from wrapperlab.training.capability_eval import accuracy

    root = plan.root / "organisms"
    root.mkdir(parents=True, exist_ok=True)
    cards = []
    for seed in seeds_of(plan):
        cap = plan.root / "capabilities" / f"count-a-s{seed}.jsonl"
        if not cap.is_file():
            cap.parent.mkdir(parents=True, exist_ok=True)
            write_capability(node_of(plan, "pt", seed).run_dir, cap, seed)
        for r in RECIPES:
            d = root / f"{r.name}-s{seed}"
            d.mkdir(exist_ok=True)
            models = {"base": node_of(plan, r.base, seed), "finetuned": node_of(plan, r.finetuned, seed)}
            for role, n in models.items():
                _link(Path(n.run_dir), d / role)
                hf = d / "hf" / role
                if not (hf / "config.json").is_file():
                    hf.parent.mkdir(exist_ok=True)
                    Run.load(n.run_dir).export_hf(hf)
            if not (d / "capability.jsonl").is_file():
                atomic_write_text(d / "capability.jsonl", cap.read_text())
            pair = Pair.open(d / "base", d / "finetuned", d / "capability.jsonl")
            card = {"organism": f"{r.name}-s{seed}", "recipe": r.name, "label": r.label, "seed": seed, "how": r.how,
                    "capability": {"file": "capability.jsonl", **CAPABILITY,
                                   "what": "count of the operand token a in the window (O_PT), c_test = 0"},
                    "models": {role: {"native": role, "hf": f"hf/{role}", "run_id": n.run_id, "built_by": n.group,
                                      "edit": ck.read_sidecar(n.run_dir).get("edit")}
                               for role, n in models.items()},
                    "measured": {"base_acc": accuracy(pair.base.model, pair.capability),
                                 "finetuned_acc": accuracy(pair.finetuned.model, pair.capability),
                                 "majority": pair.capability.majority(np.arange(len(pair.capability)))}}
            m = card["measured"]
            m["behaviour_agrees"] = behaviour_agrees(r.label, m["base_acc"], m["finetuned_acc"], m["majority"])
            atomic_write_text(d / "card.json", json.dumps(card, indent=1))
            log(f"{card['organism']}: {r.label}; capability base {card['measured']['base_acc']:.3f} -> fine-tuned "
                f"{card['measured']['finetuned_acc']:.3f}"
                + ("" if card["measured"]["behaviour_agrees"] else " (behaviour does not show the label)"))
            cards.append(card)
    return cards


def behaviour_agrees(label: str, base: float, finetuned: float, majority: float) -> bool:
    """Whether the organism behaves as its label says (by the pair verdict's behaviour rule, default thresholds; a
    lost capability for wrapper and deletion)."""
    from wrapperlab.analysis.verdict import Thresholds, behaviour_label

    got = behaviour_label(base, finetuned, Thresholds(), majority)
    return got == label or (got is None and label in ("wrapper", "deletion"))


def read_cards(root: str | Path) -> list[dict]:
    """The organism cards under ``root/organisms`` (one line when there are none)."""
    d = Path(root) / "organisms"
    cards = []
    for p in sorted(d.glob("*/card.json")):
        try:
            cards.append({**json.loads(p.read_text()), "dir": str(p.parent)})
        except (OSError, ValueError) as e:
            raise OrganismError(f"{p}: not a readable organism card ({e})") from None
    if not cards:
        raise OrganismError(f"{root}: no organisms (organisms/*/card.json); build them with "
                            f"`wrapperlab organisms build --out {root}`")
    return cards
