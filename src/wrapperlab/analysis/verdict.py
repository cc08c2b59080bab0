"""Verdict for a fine-tuned run: wrapper, deletion, amplification or unchanged (paper §3, Fig. 1b).

The paper's three hypotheses for what fine-tuning does to a pretraining capability C: it learns a minimal
transformation on top of C (a **wrapper**, revivable by pruning or reFT), it **deletes** C, or it **amplifies**
another relevant capability (the fine-tuning capability is learned while C stays intact). We add
**unchanged**: fine-tuning moved neither behaviour.

Evidence (each row printed with its value and the threshold it was held to):
1. behaviour — PT accuracy (O_PT, c_test 0) of the fine-tuned model vs the pretrained model; FT accuracy
   (O_FT at c_test = c_train's side: we report c_test 0 and 1) vs the pretrained model.
2. probes — is O_PT still linearly readable? best-layer probe accuracy within ``probe_tolerance`` of the
   pretrained model's best layer, and at least ``probe_control_margin`` above the random-init control.
3. pruning — does removing at most ``prune_k`` units raise O_PT accuracy by at least ``prune_gain``, to above
   the O_PT set's majority rate (so the gain is not a collapse onto one class)?
4. revival — does reFT reach its target in at most ``revival_ratio`` × the Scr.+FT steps (a baseline that
   never reaches the target counts as needing more steps than were run)?

Decision: if PT behaviour is kept (drop < ``behaviour_drop``), the verdict is *amplification* when FT accuracy
rose by at least ``ft_gain`` at c_test = 0 (the task itself, not the spurious rule), else *unchanged*. If PT
behaviour was lost, each measured mechanistic item (2–4) votes "still there" or "gone": more "still there" →
*wrapper*; more "gone" → *deletion*; a tie or nothing measured → *undetermined*.
"""

from __future__ import annotations

from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings, metric_at


class Thresholds(Settings):
    behaviour_drop: float = Field(0.20, ge=0, le=1)  # PT accuracy lost (absolute) that counts as "behaviour lost"
    ft_gain: float = Field(0.20, ge=0, le=1)  # FT accuracy gained at c_test=0 that counts as "FT capability learned"
    probe_tolerance: float = Field(0.10, ge=0, le=1)  # best-layer O_PT probe within this of the pretrained model's
    probe_control_margin: float = Field(0.20, ge=0, le=1)  # ... and at least this above the random-init control
    prune_k: int = Field(15, ge=0)  # at most this many units pruned (paper Fig. 7: 5-15 neurons)
    prune_gain: float = Field(0.30, ge=0, le=1)  # O_PT accuracy gained by pruning
    revival_ratio: float = Field(0.5, ge=0, le=1)  # reFT needs at most this fraction of the Scr.+FT steps

    @classmethod
    def names(cls) -> list[str]:
        return list(cls.model_fields)


def _row(evidence: str, measured: str, value, threshold: str, passed: bool | None, supports: str) -> dict:
    return {"evidence": evidence, "measured": measured, "value": value, "threshold": threshold,
            "passed": passed, "supports": supports}


# ---------------------------------------------------------------------------------- the rules, one per signal
# Each returns None when the result lacks what the rule reads, else (passed, the numbers it compared). The verdict
# and the report's claims table both call them, so a claim and a verdict can never apply different rules.
def probe_check(probe: Result, th: Thresholds, model: str = "finetune") -> tuple[bool, dict] | None:
    """O_PT still linearly readable: best-layer probe within ``probe_tolerance`` of the pretrained model's and at
    least ``probe_control_margin`` above a random-init model's."""
    summ = {(r["model"], r["target"]): r for r in probe.tables.get("summary", [])}
    me, pre, ctl = summ.get((model, "O_PT")), summ.get(("pretrained", "O_PT")), summ.get(("random-init", "O_PT"))
    if not (me and pre and ctl):
        return None
    ok = me["acc"] >= pre["acc"] - th.probe_tolerance and me["acc"] >= ctl["acc"] + th.probe_control_margin
    return ok, {"me": me, "pretrained": pre, "control": ctl}


def prune_check(prune: Result, th: Thresholds) -> tuple[bool, dict] | None:
    """Pruning at most ``prune_k`` units raises O_PT accuracy (c_test 0) by ``prune_gain``, to above the majority
    rate (a gain that is a collapse onto one class does not count)."""
    sub = sorted((r for r in prune.where(target="O_PT", c_test=0.0) if r["k"] <= th.prune_k), key=lambda r: r["k"])
    if not sub:
        return None
    best = max(sub, key=lambda r: (r["acc"], -r["k"]))
    gain = best["acc"] - sub[0]["acc"]
    return gain >= th.prune_gain and best["acc"] > best["majority"], {"base": sub[0], "best": best, "gain": gain}


def revival_check(revival: Result, th: Thresholds) -> tuple[bool, dict] | None:
    """reFT reaches its target in at most ``revival_ratio`` x the Scr.+FT steps (a baseline that never reaches it
    counts as needing one step more than it ran)."""
    summ = {r["curve"]: r for r in revival.tables.get("summary", [])}
    re_, base = summ.get("reft"), summ.get("scr+ft")
    if not (re_ and base):
        return None
    r_steps = re_["steps_to_target"]
    b_steps = base["steps_to_target"] if base["steps_to_target"] is not None else base["steps"] + 1
    return r_steps is not None and r_steps <= th.revival_ratio * b_steps, {"reft": re_, "baseline": base}


def _evidence(rows: list[dict], lost: bool, learned: bool | None, th: Thresholds, probe: Result | None,
              prune: Result | None, revival: Result | None, extra: tuple[dict, ...] = ()) -> tuple[str, str]:
    """Append the mechanistic evidence rows and decide: (label, why). ``learned`` None: no FT capability measured.
    ``extra``: evidence rows of other measures (``passed``: still there), which vote alike."""
    votes: list[bool] = []
    if probe is not None and (hit := probe_check(probe, th)) is not None:
        ok, f = hit
        me, pre, ctl = f["me"], f["pretrained"], f["control"]
        votes.append(ok)
        rows.append(_row("probe", f"best-layer O_PT probe: fine-tuned {me['acc']:.3f} ({me['best_layer']}), "
                                  f"pretrained {pre['acc']:.3f}, random-init {ctl['acc']:.3f}",
                         round(me["acc"], 4), f">= pretrained - {th.probe_tolerance} and >= random-init + "
                                              f"{th.probe_control_margin}", ok, "capability still readable"))
    if prune is not None and (hit := prune_check(prune, th)) is not None:
        ok, f = hit
        base, best = f["base"], f["best"]
        votes.append(ok)
        blocks = sorted({u["block"] for u in prune.tables.get("units", [])[:best["k"]]})
        rows.append(_row("prune", f"O_PT acc c0: K=0 {base['acc']:.3f} -> K={best['k']} {best['acc']:.3f} "
                                  f"(majority {best['majority']:.3f}; pruned units in blocks {blocks})",
                         round(f["gain"], 4), f"gain >= {th.prune_gain} with K <= {th.prune_k}, above majority", ok,
                         "wrapper removable by pruning"))
    if revival is not None and (hit := revival_check(revival, th)) is not None:
        ok, f = hit
        re_, base = f["reft"], f["baseline"]
        votes.append(ok)
        r_steps = re_["steps_to_target"]
        b_txt = base["steps_to_target"] if base["steps_to_target"] is not None else f"not reached in {base['steps']}"
        r_txt = r_steps if r_steps is not None else f"not reached in {re_['steps']}"
        name = "control" if base.get("label") == "control" else "Scr.+FT"
        rows.append(_row("revival", f"steps to {re_['target']:.3f} O_PT acc: reFT {r_txt}, {name} {b_txt}",
                         r_steps, f"reFT <= {th.revival_ratio} x {name}", ok, "revives faster than baseline"))
    elif revival is not None:  # relearning measured without a baseline: reported, but it cannot vote
        re_ = next((r for r in revival.tables.get("summary", []) if r["curve"] == "reft"), None)
        if re_ is not None:
            r_txt = re_["steps_to_target"] if re_["steps_to_target"] is not None else f"not reached in {re_['steps']}"
            rows.append(_row("revival", f"steps to {re_['target']:.3f} O_PT acc: reFT {r_txt}; no baseline (give a "
                                        f"control model that never had the capability)", re_["steps_to_target"],
                             "needs a baseline", None, "no vote"))
    for r in extra:
        rows.append(r)
        votes.append(bool(r["passed"]))
    if not lost:
        label = "amplification" if learned else "unchanged"
        why = ("PT behaviour kept and the FT capability was learned" if learned
               else "PT behaviour kept (no FT capability was measured)" if learned is None
               else "neither PT nor FT behaviour moved past its threshold")
    else:
        yes, no = sum(votes), len(votes) - sum(votes)
        label = "wrapper" if yes > no else "deletion" if no > yes else "undetermined"
        why = (f"PT behaviour lost; {yes} of {len(votes)} mechanistic checks say the capability is still there"
               if votes else "PT behaviour lost, but no mechanistic evidence was measured")
    return label, why


PRESENT_MARGIN = 0.10  # a base model within this of the majority rate does not have the capability


def behaviour_label(acc_base: float, acc_ft: float, th: Thresholds, majority: float | None = None) -> str | None:
    """What a pair's capability accuracy alone says: *absent* (given ``majority``: the base within PRESENT_MARGIN of
    it), None (lost: a drop of ``behaviour_drop``, for the mechanistic evidence to tell wrapper from deletion),
    *amplification* (kept and risen by ``ft_gain``) or *unchanged*."""
    if majority is not None and acc_base < majority + PRESENT_MARGIN:
        return "absent"
    if acc_base - acc_ft >= th.behaviour_drop:
        return None
    return "amplification" if acc_ft - acc_base >= th.ft_gain else "unchanged"


def decide(acc_base: float, acc_ft: float, th: Thresholds, *, probe: Result | None = None,
           prune: Result | None = None, revival: Result | None = None, what: str = "capability",
           majority: float | None = None, extra: tuple[dict, ...] = ()) -> Result:
    """The verdict on a (base, fine-tuned) pair measured on one capability: *absent* when the base model is within
    ``PRESENT_MARGIN`` of the records' majority rate (given ``majority``: there is nothing to wrap or delete);
    behaviour lost when its accuracy drops by ``behaviour_drop``, then the same mechanistic rules as for a run (and
    the ``extra`` evidence rows); kept and risen by ``ft_gain`` is *amplification* (fine-tuning strengthened the
    capability itself), kept otherwise *unchanged*."""
    drop = acc_base - acc_ft
    got = behaviour_label(acc_base, acc_ft, th, majority)
    lost = got is None
    rows = [_row("behaviour", f"{what}: base {acc_base:.3f} -> fine-tuned {acc_ft:.3f}", round(drop, 4),
                 f"drop >= {th.behaviour_drop} means lost", lost, "PT behaviour lost")]
    meta = {"thresholds": th.to_dict(), "acc_base": acc_base, "acc_finetuned": acc_ft}
    if got == "absent":
        rows.append(_row("presence", f"base {acc_base:.3f} against the majority rate {majority:.3f}",
                         round(acc_base - majority, 4), f"base >= majority + {PRESENT_MARGIN} means present", False,
                         "capability present in the base model"))
        return Result("verdict", rows, {"verdict": "absent", "why": "the base model does not have the capability "
                                        "(at most the majority rate)", **meta, "majority": majority})
    label, why = _evidence(rows, lost, got == "amplification", th, probe, prune, revival, extra)
    if label == "amplification":
        why = f"the capability was kept and rose by {-drop:.3f} (>= ft_gain {th.ft_gain})"
    return Result("verdict", rows, {"verdict": label, "why": why, **meta,
                                    **({"majority": majority} if majority is not None else {})})


def verdict(ft_side: dict, *, probe: Result | None = None, prune: Result | None = None,
            revival: Result | None = None, thresholds: Thresholds | None = None) -> Result:
    """Combine the evidence for one fine-tuned run (``ft_side`` is its checkpoint sidecar)."""
    th = thresholds or Thresholds()
    if ft_side.get("stage") != "finetune":
        raise AnalysisError(f"verdict needs a finetune run (got a {ft_side.get('stage')} run)")
    cfg = ft_side["config"]
    fam = cfg["eval"].get("family") or cfg["train"].get("family") or "count"
    o_pt, o_ft = cfg["task"]["o_pt"], cfg["task"]["o_ft"]
    m = ft_side["metrics"]
    pt0, pt1 = metric_at(m, fam, o_pt, 0.0, 0), metric_at(m, fam, o_pt, 0.0)
    ft0_pre, ft0 = metric_at(m, fam, o_ft, 0.0, 0), metric_at(m, fam, o_ft, 0.0)
    ft1 = metric_at(m, fam, o_ft, 1.0)
    if None in (pt0, pt1, ft0_pre, ft0):
        raise AnalysisError(f"run lacks {fam}/{o_pt} and {fam}/{o_ft} evaluations at c_test=0 (step 0 and final)")
    rows = []
    drop = pt0 - pt1
    lost = drop >= th.behaviour_drop
    rows.append(_row("behaviour", f"PT acc {fam} {o_pt} c0: pretrained {pt0:.3f} -> fine-tuned {pt1:.3f}",
                     round(drop, 4), f"drop >= {th.behaviour_drop} means lost", lost, "PT behaviour lost"))
    gain = ft0 - ft0_pre
    learned = gain >= th.ft_gain
    extra = f"; c1 {ft1:.3f}" if ft1 is not None else ""
    rows.append(_row("behaviour", f"FT acc {fam} {o_ft} c0: pretrained {ft0_pre:.3f} -> fine-tuned {ft0:.3f}{extra}",
                     round(gain, 4), f"gain >= {th.ft_gain} means FT capability learned", learned,
                     "FT capability learned"))
    label, why = _evidence(rows, lost, learned, th, probe, prune, revival)
    meta = {"verdict": label, "why": why, "thresholds": th.to_dict(), "family": fam, "o_pt": o_pt, "o_ft": o_ft,
            "c_train": cfg["train"]["c_train"], "lr": cfg["train"]["lr"]}
    return Result("verdict", rows, meta)
