"""Calibration: every measure and the verdict scored on model organisms whose label is known (``organisms.py``).

Each organism's pair is measured with the registry's pair analyses (probe, prune, revival against the seed's
never-counting model as control, weight_diff, patching, direction) as nodes of one plan, so they run in parallel,
resume, and reuse what is done; the relearning runs are nodes of their own, one per fine-tuned model and one per
seed for the control. From the stored results:

- per measure, one score per organism with a direction fixed before any result was seen (higher means "the
  capability is still there": a wrapper), its AUROC for wrapper against deletion over every seed, and its accuracy
  over all labels when it alone votes (behaviour decides absent, amplification and unchanged with the default
  thresholds; the measure's threshold splits lost capabilities into wrapper and deletion);
- the verdict (the paper's probe, pruning and revival rules), with its default thresholds on every organism, and
  with thresholds chosen on one half of the organisms and scored on the other (two folds, each half stratified by
  recipe), beside the verdict that also counts the new measures' votes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wrapperlab.analysis.common import Result
from wrapperlab.experiments.organisms import (
    LABELS,
    RECIPES,
    OrganismError,
    behaviour_agrees,
    read_cards,
)
from wrapperlab.experiments.organisms import spec as organisms_spec
from wrapperlab.experiments.plan import Node, Plan

RELEARN = {"lr": 2e-5, "steps": 200, "batch_size": 96, "every": 20, "fraction": 0.9}  # the cpu preset's η_S reFT


def tool_settings(relearn: dict | None = None) -> dict[str, dict]:
    """The settings of every measure; ``relearn`` overrides RELEARN (a short look: ``{"steps": 20}``)."""
    bad = sorted(set(relearn or {}) - set(RELEARN))
    if bad:
        raise OrganismError(f"relearning settings: unknown {', '.join(bad)} (known: {', '.join(RELEARN)})")
    return {"behaviour": {}, "probe": {}, "prune": {"ks": list(range(16))}, "revival": {**RELEARN, **(relearn or {})},
            "weight_diff": {}, "patching": {}, "direction": {}}


def result_path(root: Path, organism: str, tool: str, settings: dict) -> Path:
    """Where one measure of one organism is stored: named by a hash of its settings, so other settings never reuse
    it."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / "calibration" / organism / f"{tool}-{h}.json"


@dataclass(frozen=True)
class Score:
    """One number per organism read from one result, and which way points to "still there" (a wrapper)."""

    name: str
    tool: str
    read: Callable[[Result], float | None]
    sign: int  # +1: higher means still there
    what: str


def _probe(r: Result) -> float | None:
    s = {(x["model"], x["target"]): x["acc"] for x in r.tables.get("summary", [])}
    me, pre = s.get(("finetune", "O_PT")), s.get(("pretrained", "O_PT"))
    return None if me is None or pre is None else me - pre


def _prune(r: Result) -> float | None:
    rows = sorted(r.where(target="O_PT", c_test=0.0), key=lambda x: x["k"])
    return max(x["acc"] for x in rows) - rows[0]["acc"] if rows else None


def _summary(key: str) -> Callable[[Result], float | None]:
    return lambda r: r.tables["summary"][0].get(key)


SCORES = (
    Score("probe", "probe", _probe, +1, "best-layer O_PT probe of the fine-tuned model minus the base model's"),
    Score("prune", "prune", _prune, +1, "capability accuracy gained by pruning up to 15 units"),
    Score("revival", "revival", lambda r: r.meta.get("area_gap"), +1,
          "relearning curve area (fine-tuned) minus the never-capable control's, per step, in base accuracies"),
    Score("weights_size", "weight_diff", _summary("rel_change"), -1, "‖ΔW‖ / ‖W‖ over the model (smaller: wrapper)"),
    Score("weights_rank", "weight_diff", _summary("effective_rank"), -1,
          "effective rank of ΔW, weighted by each matrix's share (lower: wrapper)"),
    Score("weights_rows", "weight_diff", _summary("top_rows_share"), +1,
          "share of ‖ΔW‖² in each matrix's top 4 rows, weighted (higher: a local change, a wrapper)"),
    Score("patching", "patching", _summary("best_restored"), +1,
          "restored fraction of the best block patched from the base model"),
    Score("direction", "direction", _summary("best_restored"), +1,
          "restored fraction after ablating the best difference-in-means direction"),
)


# ------------------------------------------------------------------------------------------------ the plan
def plan_calibration(root: str | Path, threads: int = 1, relearn: dict | None = None) -> Plan:
    """Relearning runs and measure nodes for every organism under ``root`` (built first); ``relearn`` overrides
    RELEARN."""
    from wrapperlab.analysis.capability import RelearnSettings, open_subject, relearn_config
    from wrapperlab.experiments.plan import _run_cost
    from wrapperlab.experiments.spec import parse_spec
    from wrapperlab.training.stage import default_run_dir, resolve

    root = Path(root).resolve()
    cards = read_cards(root)
    controls = {c["seed"]: Path(c["dir"]) / "base" for c in cards if c["label"] == "absent"}
    nodes: dict[str, Node] = {}
    tools = tool_settings(relearn)
    rs = RelearnSettings(**tools["revival"], threads=threads)

    def relearn_node(model_dir: Path, cap: Path, seed: int, label: str) -> str:
        raw = relearn_config(open_subject(model_dir), cap, rs)
        cfg, _ = resolve(dict(raw))
        rid = cfg.run_id(None)
        run_dir = default_run_dir(cfg, None, root / "calibration" / f"relearn-s{seed}" / "relearn")
        if rid not in nodes:
            nodes[rid] = Node(rid, "run", "relearn", label, {"train.seed": seed}, [],
                              {"kind": "run", "raw": raw, "run_dir": str(run_dir), "run_id": rid},
                              _run_cost(cfg), rid, str(run_dir),
                              {"config": cfg.model_dump(mode="json"), "run_id": rid, "stage": cfg.stage,
                               "status": "done"})
        return rid

    for c in cards:
        d, seed = Path(c["dir"]), c["seed"]
        if seed not in controls:
            raise OrganismError(f"{root}: no absent organism of seed {seed} to serve as the relearning control")
        cap = root / "capabilities" / f"count-a-s{seed}.jsonl"  # one file per seed: the control's relearning is shared
        ft_id = c["models"]["finetuned"]["run_id"]
        deps = [relearn_node(d / "finetuned", cap, seed, f"relearn {c['organism']}"),
                relearn_node(controls[seed], cap, seed, f"relearn control s{seed}")]
        for tool, settings in tools.items():
            key = f"{tool}@{c['organism']}"
            nodes[key] = Node(key, "analysis", tool, f"{tool} on {c['organism']}", {"train.seed": seed},
                              deps if tool == "revival" else [],
                              {"kind": "call", "target": "wrapperlab.experiments.calibration:execute_measure",
                               "tool": tool, "settings": settings, "base": str(d / "base"),
                               "finetuned": str(d / "finetuned"), "control": str(controls[seed]),
                               "capability": str(cap), "out": str(root / "calibration" / f"relearn-s{seed}"),
                               "result": str(result_path(root, c["organism"], tool, settings)),
                               "threads": threads},
                              1.0 if tool == "revival" else 0.3, ft_id, str(d))
    seeds = sorted({c["seed"] for c in cards})
    built = organisms_spec(len(seeds)).model_dump(mode="json")
    spec = parse_spec({**built, "name": "organisms-calibration", "description": "measures of every organism"},
                      "calibration")  # the store records the plan under this name
    return Plan(spec, root, nodes)


def execute_measure(p: dict) -> dict:
    """One pair analysis of one organism (``behaviour``: the capability accuracy of both models), saved."""
    import torch

    from wrapperlab.analysis.capability import Pair
    from wrapperlab.analysis.registry import Context, analyze_pair
    from wrapperlab.training.capability_eval import accuracy

    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    pair = Pair.open(p["base"], p["finetuned"], p["capability"], p["control"])
    if p["tool"] == "behaviour":
        cap = pair.capability
        res = Result("behaviour", [{"acc_base": accuracy(pair.base.model, cap),
                                    "acc_finetuned": accuracy(pair.finetuned.model, cap),
                                    "majority": cap.majority(np.arange(len(cap))), "n": len(cap)}])
    else:
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in p["settings"].items()}
        res = analyze_pair(p["tool"], pair, settings=settings, context=Context(out=Path(p["out"])))
    res.save(p["result"])
    return {"status": "done", "result": p["result"]}


# ------------------------------------------------------------------------------------------------ scoring
def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic); None if either is
    empty."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def folds(cards: list[dict]) -> list[set[str]]:
    """Two halves of the organisms, stratified by recipe: recipe i's seeds alternate between the halves, starting
    with half i mod 2 (so 3 seeds give 9 and 9 of 18)."""
    halves: list[set[str]] = [set(), set()]
    for i, r in enumerate(RECIPES):
        mine = sorted((c for c in cards if c["recipe"] == r.name), key=lambda c: c["seed"])
        for j, c in enumerate(mine):
            halves[(i + j) % 2].add(c["organism"])
    return halves


def _load(root: Path, organism: str, tools: dict[str, dict]) -> dict[str, Result]:
    return {tool: Result.load(result_path(root, organism, tool, st)) for tool, st in tools.items()}


def _behaviour(b: dict, th) -> str | None:
    """The label behaviour alone gives (absent, amplification, unchanged), or None when the capability was lost."""
    from wrapperlab.analysis.verdict import behaviour_label

    return behaviour_label(b["acc_base"], b["acc_finetuned"], th, b["majority"])


def _single(value: float | None, sign: int, tau: float) -> str:
    if value is None:
        return "undetermined"
    return "wrapper" if sign * value >= sign * tau else "deletion"


def _choose_tau(items: list[tuple[str, float | None]], sign: int) -> float | None:
    """The threshold that best splits (label, value) of lost capabilities into wrapper and deletion: the middle of
    the best run of candidate midpoints (None when nothing was lost)."""
    vals = sorted({v for _, v in items if v is not None})
    if not vals:
        return None
    cands = [vals[0] - 1.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [vals[-1] + 1.0]
    acc = [sum(_single(v, sign, t) == lab for lab, v in items) for t in cands]
    best = [t for t, a in zip(cands, acc) if a == max(acc)]
    return best[len(best) // 2]


def _paper_verdict(ev: dict[str, Result], th, extra: tuple[dict, ...] = ()) -> str:
    from wrapperlab.analysis.verdict import decide

    b = ev["behaviour"].rows[0]
    return decide(b["acc_base"], b["acc_finetuned"], th, probe=ev["probe"], prune=ev["prune"],
                  revival=ev["revival"], majority=b["majority"], extra=extra).meta["verdict"]


THRESHOLD_GRID = {"behaviour_drop": (0.1, 0.2, 0.3), "ft_gain": (0.1, 0.2, 0.3), "probe_tolerance": (0.05, 0.1, 0.2),
                  "probe_control_margin": (0.1, 0.2, 0.3), "prune_gain": (0.1, 0.2, 0.3, 0.4),
                  "revival_ratio": (0.25, 0.5, 0.75)}


def _choose_thresholds(names: list[str], evidence: dict, labels: dict, extra_for=lambda _o, _th: ()):
    """The verdict thresholds (THRESHOLD_GRID) with the most right labels on ``names``; ties go to the combination
    nearest the defaults."""
    from wrapperlab.analysis.verdict import Thresholds

    default = Thresholds()
    keys = list(THRESHOLD_GRID)
    best, best_key = None, None
    for combo in itertools.product(*THRESHOLD_GRID.values()):
        th = default.replace(**dict(zip(keys, combo)))
        right = sum(_paper_verdict(evidence[o], th, extra_for(o, th)) == labels[o] for o in names)
        dist = sum(abs(v - getattr(default, k)) / max(THRESHOLD_GRID[k]) for k, v in zip(keys, combo))
        if best_key is None or (right, -dist) > best_key:
            best, best_key = th, (right, -dist)
    return best


def calibrate(root: str | Path, relearn: dict | None = None) -> Result:
    """The calibration table from the stored measures of every organism under ``root`` (measured with the
    relearning settings ``relearn``, as planned)."""
    from wrapperlab.analysis.verdict import Thresholds

    root = Path(root).resolve()
    cards = read_cards(root)
    labels = {c["organism"]: c["label"] for c in cards}
    evidence, tools = {}, tool_settings(relearn)
    for c in cards:
        try:
            evidence[c["organism"]] = _load(root, c["organism"], tools)
        except Exception as e:  # a missing or unreadable result: the plan did not finish
            raise OrganismError(f"{c['organism']}: measures missing ({e}); run `wrapperlab organisms calibrate "
                                f"{root}` to finish them") from None
    th0 = Thresholds()
    scores = {o: {s.name: s.read(evidence[o][s.tool]) for s in SCORES} for o in labels}
    behave = {o: _behaviour(evidence[o]["behaviour"].rows[0], th0) for o in labels}
    halves = folds(cards)
    rows = []
    for s in SCORES:
        pos = [s.sign * scores[o][s.name] for o in labels if labels[o] == "wrapper" and scores[o][s.name] is not None]
        neg = [s.sign * scores[o][s.name] for o in labels if labels[o] == "deletion" and scores[o][s.name] is not None]
        held, taus = [], []
        for k in (0, 1):
            choose, score = halves[k], halves[1 - k]
            tau = _choose_tau([(labels[o], scores[o][s.name]) for o in choose if behave[o] is None
                               and labels[o] in ("wrapper", "deletion")], s.sign)
            taus.append(tau)
            for o in score:
                pred = behave[o] or (_single(scores[o][s.name], s.sign, tau) if tau is not None else "undetermined")
                held.append(pred == labels[o])
        rows.append({"measure": s.name, "what": s.what, "direction": "higher" if s.sign > 0 else "lower",
                     "auroc": auroc(pos, neg), "n_wrapper": len(pos), "n_deletion": len(neg),
                     "heldout_acc": float(np.mean(held)), "thresholds": taus})
    # the verdict: default thresholds on all; chosen on one half, scored on the other
    default_pred = {o: _paper_verdict(evidence[o], th0) for o in labels}
    verdict_rows = [{"verdict": "paper rules, default thresholds", "organisms": "all",
                     "acc": float(np.mean([default_pred[o] == labels[o] for o in labels]))}]

    def extra_for_taus(taus: dict[str, float | None]):
        def extra(o: str, _th) -> tuple[dict, ...]:
            out = []
            for s in SCORES:
                if s.tool in ("probe", "prune", "revival") or taus.get(s.name) is None or scores[o][s.name] is None:
                    continue
                passed = s.sign * scores[o][s.name] >= s.sign * taus[s.name]
                out.append({"evidence": s.name, "measured": f"{s.name} {scores[o][s.name]:.3f}",
                            "value": scores[o][s.name], "threshold": f"{'>=' if s.sign > 0 else '<='} "
                            f"{taus[s.name]:.3f}", "passed": passed, "supports": "still there"})
            return tuple(out)
        return extra

    chosen, predictions = [], {o: {"default": default_pred[o]} for o in labels}
    for variant in ("paper rules", "paper rules + new measures"):
        held = []
        for k in (0, 1):
            choose, score = sorted(halves[k]), sorted(halves[1 - k])
            extra = lambda _o, _th: ()  # noqa: E731
            if variant != "paper rules":
                taus = {s.name: _choose_tau([(labels[o], scores[o][s.name]) for o in choose if behave[o] is None
                                             and labels[o] in ("wrapper", "deletion")], s.sign) for s in SCORES}
                extra = extra_for_taus(taus)
            th = _choose_thresholds(choose, evidence, labels, extra)
            chosen.append({"verdict": variant, "fold": k, "thresholds": th.to_dict()})
            for o in score:
                pred = _paper_verdict(evidence[o], th, extra(o, th))
                predictions[o][f"{variant} (held out)"] = pred
                held.append(pred == labels[o])
        verdict_rows.append({"verdict": f"{variant}, thresholds chosen on the other half", "organisms": "held out",
                             "acc": float(np.mean(held))})
    table = [{"organism": o, "label": labels[o], **{k: v for k, v in evidence[o]["behaviour"].rows[0].items()},
              "behaviour_agrees": behaviour_agrees(labels[o], *(evidence[o]["behaviour"].rows[0][k] for k in
                                                                 ("acc_base", "acc_finetuned", "majority"))),
              **scores[o], **{f"pred: {k}": v for k, v in predictions[o].items()},
              "half": 0 if o in halves[0] else 1} for o in sorted(labels)]
    meta = {"labels": list(LABELS), "recipes": {r.name: {"label": r.label, "how": r.how} for r in RECIPES},
            "seeds": sorted({c["seed"] for c in cards}), "n": len(cards), "relearning": tools["revival"],
            "split": "two halves stratified by recipe (recipe i's seeds alternate, starting at half i mod 2)",
            "threshold_grid": {k: list(v) for k, v in THRESHOLD_GRID.items()}}
    return Result("calibration", rows, meta, {"verdict": verdict_rows, "organisms": table, "chosen": chosen})


def save(res: Result, root: str | Path) -> Path:
    return res.save(Path(root) / "calibration" / "calibration.json")


def load(root: str | Path) -> Result | None:
    p = Path(root) / "calibration" / "calibration.json"
    return Result.load(p) if p.is_file() else None

