"""The claims table: each claim of the paper, the evidence measured here, and a status computed from it.

Nothing here is written by hand except the claims themselves and the rule that judges each one: the evidence is
read from stored results (run sidecars and analysis JSON files), so editing a stored result changes the verdict.
Statuses: ``reproduced`` (every measured case agrees with the paper), ``partial`` (some do), ``not reproduced``
(none do), ``not measured`` (nothing stored bears on the claim; the row says which preset or command measures it).

Claims (paper §5 and its appendices; the section and figure are in each row):
- wrapper: small-LR fine-tuning of a weakly relevant capability learns a wrapper (verdict per run).
- prune: pruning a few (<= 15) neurons revives the pretraining capability (Fig. 7).
- probe: O_PT stays linearly readable after fine-tuning (Fig. 8).
- revival: reFT revives the capability faster than Scr.+FT (Fig. 9).
- spurious: with C_Tr = 1 the model learns the spurious rule count(a) + 1; with C_Tr = 0 at a large enough LR it
  learns the task (Table 5).
- prior: a higher prior on O_FT keeps more O_PT accuracy through fine-tuning (Fig. 6), and the high-prior
  fine-tune keeps the PT behaviour (amplification of a relevant capability, not a wrapper).
- randft: after fine-tuning on deliberately wrong answers, reFT revives faster than Scr. and Scr.+FT (App. E.4).
- pt-mix: with pretraining data mixed into fine-tuning, less mixed-in data loses more O_PT accuracy (low prior)
  while the fine-tuning task is learned alike at every mix (App. E.1).
- jailbreak: after fine-tuning with the ordinary counting token, the task tokens that only ever asked about O_PT
  still count it (high prior; App. E.2).
- tracr-attention: the Counter's block-1 head keeps attending to `a` except with the large LR and C_Tr = 0 (Fig. 10).
- tracr-maxid: only η_VS fine-tunes Max-identifier well while keeping its sorting head (App. G, Table 3).
- tracr-revival: reFT of the Counter after η_M fine-tuning revives counting `a` faster than Scr.+FT (Table 4).
- tinystories: deleting Twist by fine-tuning only hides it: reFT revives it faster than the control learns it
  (Table 1, Fig. 11b).
- tinystories-probe: Twist stays linearly readable after deletion (Fig. 11a).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wrapperlab.analysis.common import Result, metric_at, protocol
from wrapperlab.analysis.evaluate import _lr_name
from wrapperlab.analysis.verdict import Thresholds, probe_check, prune_check, revival_check
from wrapperlab.tasks.families import JAILBREAK_FAMILIES
from wrapperlab.tasks.priors import prior_name, resolve_prior
from wrapperlab.training import checkpoint as ck

JAILBREAK_TARGET = 0.9  # "counts a perfectly" with T_J1/T_J2 (App. E.2, Fig. 24)
PT_MIX_TOLERANCE = 0.06  # two standard errors of a difference of two accuracies near 50 % on 500 samples each
PT_MIX_FT_SPREAD = 0.10  # "similar gains" (App. E.1, Figs. 18, 20): final O_FT of the mixes within 10 points
STORY_PROBE_TOLERANCE = 0.02  # the paper's Fig. 11a spread between models is a few points of a 0.84–0.95 range
REPRODUCED, PARTIAL, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "partial", "not reproduced", "not measured"
TH = Thresholds()


@dataclass
class RunRecord:
    run_dir: Path
    side: dict
    results: dict[str, Result] = field(default_factory=dict)  # tool -> latest result
    every: dict[str, list[Result]] = field(default_factory=dict)  # tool -> all its results, oldest first

    def result(self, tool: str, defaults: dict | None = None, **settings) -> Result | None:
        """The latest ``tool`` result computed with these settings (a setting missing from an older file reads as
        its value in ``defaults``)."""
        base = defaults or {}
        for res in reversed(self.every.get(tool, [])):
            got = res.meta.get("settings", {})
            if all(got.get(k, base.get(k)) == v for k, v in settings.items()):
                return res
        return None

    @property
    def cfg(self) -> dict:
        return self.side["config"]

    @property
    def seed(self) -> int:
        return int(self.cfg.get("train", {}).get("seed", 0))

    @property
    def kind(self) -> str:
        return self.cfg.get("task", {}).get("kind", "pcfg")

    @property
    def is_tracr(self) -> bool:
        return self.kind == "tracr"

    @property
    def eta(self) -> str:
        return _lr_name(self.cfg["train"]["lr"], self.cfg["preset"])

    @property
    def c_train(self) -> float:
        return self.cfg["train"]["c_train"]

    @property
    def prior(self) -> str:
        return prior_name(resolve_prior(self.cfg["task"]["prior"])) if self.kind == "pcfg" else ""

    @property
    def family(self) -> str:
        return self.cfg["eval"].get("family") or self.cfg["train"].get("family") or "count"

    @property
    def pt_mix(self) -> float:
        return float(self.cfg["train"].get("pt_mix") or 0.0)

    @property
    def protocol(self) -> str:
        return protocol(self.cfg)

    @property
    def jailbreak_families(self) -> list[str]:
        return [f for f in JAILBREAK_FAMILIES if f in (self.cfg["task"].get("families") or {})]

    def acc(self, operand_key: str, c_test: float, step: int | None = None, key: str = "acc") -> float | None:
        op = self.cfg["task"][operand_key]
        return metric_at(self.side.get("metrics", []), self.family, op, c_test, step, key)

    def tag(self) -> str:
        if self.kind == "story":
            return f"{self.cfg['task']['dataset']} lr {self.cfg['train']['lr']:g}"
        if self.is_tracr:  # the length too: 1K (tracr-cpu) and 10K (the paper's) steps give different answers
            steps = self.cfg["train"].get("steps")
            return f"{self.cfg['task']['program']} η{self.eta} C_Tr={self.c_train:g}" + (f", {steps} steps"
                                                                                      if steps else "")
        fam = "" if self.family == "count" else f" {self.family}"  # the counting runs keep their short tags
        mix = f" PT mix {100 * self.pt_mix:g} %" if self.pt_mix else ""
        jail = " with T_J1/T_J2" if self.jailbreak_families else ""
        return f"{self.prior} prior{fam} η{self.eta} C_Tr={self.c_train:g}{mix}{jail}"


@dataclass
class Evidence:
    """Every finished run of a store (or one run) with its analysis results."""

    runs: list[RunRecord]

    @classmethod
    def from_dirs(cls, run_dirs: list[Path]) -> Evidence:
        recs = []
        for d in run_dirs:
            try:
                side = ck.read_sidecar(d)
            except ck.CheckpointError:
                continue
            if side.get("status") != "done":
                continue
            rec = RunRecord(Path(d), side)
            adir = Path(d) / "analysis"
            for path in sorted(adir.glob("*.json"), key=lambda p: p.stat().st_mtime) if adir.is_dir() else []:
                try:
                    res = Result.load(path)
                except ValueError:
                    continue
                rec.results[res.tool] = res
                rec.every.setdefault(res.tool, []).append(res)
            recs.append(rec)
        return cls(recs)

    def seeds(self) -> list[int]:
        """The training seeds of the runs (a run derived from a seeded run carries its seed)."""
        return sorted({r.seed for r in self.runs})

    def only_seed(self, seed: int) -> Evidence:
        return Evidence([r for r in self.runs if r.seed == seed])

    def finetunes(self, tracr: bool = False, protocol: str = "", **match) -> list[RunRecord]:
        """Fine-tunes of PCFG (or Tracr) tasks matching ``match``: ordinary ones, or those of one appendix protocol
        (``RunRecord.protocol``), which only that protocol's claim reads."""
        out = []
        for r in self.runs:
            if r.side.get("stage") != "finetune" or r.kind != ("tracr" if tracr else "pcfg"):
                continue
            if r.protocol != protocol:
                continue
            if all(getattr(r, k) in (v if isinstance(v, (list, tuple, set)) else (v,)) for k, v in match.items()):
                out.append(r)
        return out


def _status(oks: list[bool]) -> str:
    if not oks:
        return NOT_MEASURED
    return REPRODUCED if all(oks) else PARTIAL if any(oks) else NOT_REPRODUCED


def _claim(cid: str, claim: str, paper: str, where: str, cases: list[tuple], missing: str,
           rule: str, excluded: list[str] = ()) -> dict:
    """One row. A case is ``(text, agrees)`` or ``(text, agrees, {measured name: number})``; its text starts with
    the setting it was measured in (``"<setting>: ..."``), which is how one case is found again on every seed."""
    details = [{"setting": c[0].split(": ", 1)[0], "text": c[0], "ok": bool(c[1]),
                "values": {k: v for k, v in (c[2] if len(c) > 2 else {}).items() if v is not None}} for c in cases]
    status = _status([d["ok"] for d in details])
    evidence = "; ".join(f"{d['text']} [{'agrees' if d['ok'] else 'disagrees'}]" for d in details) or missing
    if excluded:
        evidence += " | not counted: " + "; ".join(excluded)
    return {"id": cid, "claim": claim, "paper": paper, "where": where, "evidence": evidence, "rule": rule,
            "status": status, "cases": len(cases), "details": details, "excluded": list(excluded)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _capable(ev: Evidence, tool: str, protocol: str = "", **match) -> tuple[list[RunRecord], list[str]]:
    """Fine-tunes with a stored ``tool`` result whose pretrained model had the capability at all (O_PT accuracy
    before fine-tuning at least ``behaviour_drop`` above the majority rate): a wrapper or a revival of a
    capability that never existed means nothing. Returns (usable runs, notes on the excluded ones)."""
    keep, notes = [], []
    for r in ev.finetunes(protocol=protocol, **match):
        if tool not in r.results:
            continue
        pre, maj = r.acc("o_pt", 0.0, step=0), r.acc("o_pt", 0.0, step=0, key="majority")
        if pre is None or maj is None or pre < maj + TH.behaviour_drop:
            notes.append(f"{r.tag()} (its pretrained model scores {_pct(pre)} on O_PT, majority {_pct(maj)})")
        else:
            keep.append(r)
    return keep, notes


# ----------------------------------------------------------------------------- the claims
def claim_wrapper(ev: Evidence) -> dict:
    cases = []
    runs, excluded = _capable(ev, "verdict", prior="low", eta=("M", "S", "VS"))
    for r in runs:
        v = r.results["verdict"]
        label = v.meta.get("verdict")
        cases.append((f"{r.tag()}: verdict {label} ({v.meta.get('why')})", label == "wrapper"))
    return _claim("wrapper", "Fine-tuning a weakly relevant capability (low prior) with a small LR learns a wrapper "
                  "on top of the pretraining capability rather than deleting it",
                  "wrapper under η_M/η_S with the low prior (Figs. 7–9)", "paper §5, Figs. 7–9", cases,
                  "no verdict stored for a low-prior η_M/η_S fine-tune (analysis `verdict`)",
                  "every low-prior η_M/η_S/η_VS verdict is 'wrapper'", excluded)


def claim_prune(ev: Evidence) -> dict:
    cases = []
    runs, excluded = _capable(ev, "prune", prior="low", eta=("M", "S", "VS"))
    for r in runs:
        hit = prune_check(r.results["prune"], TH)
        if hit is None:
            continue
        ok, f = hit
        base, best = f["base"], f["best"]
        cases.append((f"{r.tag()}: O_PT {_pct(base['acc'])} → {_pct(best['acc'])} at K={best['k']} "
                      f"(majority {_pct(best['majority'])})", ok, {"K": best["k"], "O_PT pruned": best["acc"]}))
    return _claim("prune", "Pruning a few neurons (K ≤ 15) of a small-LR fine-tuned model revives the pretraining "
                  "capability", "O_PT accuracy recovers after pruning 5–15 neurons (Fig. 7)", "paper §5, Fig. 7",
                  cases, "no pruning result stored for a low-prior η_M/η_S fine-tune (analysis `prune`)",
                  f"gain ≥ {TH.prune_gain:g} at some K ≤ {TH.prune_k}, ending above the majority rate", excluded)


def claim_probe(ev: Evidence) -> dict:
    cases = []
    runs, excluded = _capable(ev, "probe", prior="low")
    for r in runs:
        hit = probe_check(r.results["probe"], TH)
        if hit is None:
            continue
        ok, f = hit
        me, pre, ctl = f["me"], f["pretrained"], f["control"]
        cases.append((f"{r.tag()}: best-layer O_PT probe {_pct(me['acc'])} ({me['best_layer']}) vs pretrained "
                      f"{_pct(pre['acc'])}, random init {_pct(ctl['acc'])}; behaviour {_pct(r.acc('o_pt', 0.0))}",
                      ok, {"probe": me["acc"]}))
    return _claim("probe", "The pretraining capability stays linearly readable after fine-tuning",
                  "count of O_PT decodable with a trend like the pretrained model's; drop only at η_M, low prior "
                  "(Fig. 8)", "paper §5, Fig. 8", cases, "no probe result stored (analysis `probe`)",
                  f"within {TH.probe_tolerance:g} of the pretrained model and ≥ random-init + "
                  f"{TH.probe_control_margin:g}", excluded)


def _revival_cases(runs: list[RunRecord]) -> list[tuple]:
    """One case per run with a stored revival the rule can read: reFT's steps to the target against Scr.+FT's."""
    cases = []
    for r in runs:
        hit = revival_check(r.results["revival"], TH)
        if hit is None:
            continue
        ok, f = hit
        re_, base = f["reft"], f["baseline"]
        rs, bs = re_["steps_to_target"], base["steps_to_target"]
        cases.append((f"{r.tag()}: reFT reaches {_pct(re_['target'])} O_PT in "
                      f"{rs if rs is not None else 'more than ' + str(re_['steps'])} steps; Scr.+FT "
                      f"{bs if bs is not None else 'not within ' + str(base['steps'])}", ok,
                      {"reFT steps": rs} if rs is not None else {}))
    return cases


def claim_revival(ev: Evidence) -> dict:
    runs, excluded = _capable(ev, "revival", prior="low")
    cases = _revival_cases(runs)
    return _claim("revival", "Reverse fine-tuning revives the pretraining capability much faster than training the "
                  "same steps from a model that never had it (Scr.+FT)",
                  "L prior ~3K iterations, H/M 0.1–1K; Scr.+FT 4.5K (Fig. 9)", "paper §5, Fig. 9", cases,
                  "no revival result stored (analysis `revival`)",
                  f"reFT reaches the target in ≤ {TH.revival_ratio:g} × Scr.+FT's steps", excluded)


def _single_family_parent(ev: Evidence, r: RunRecord) -> str | None:
    """The one family r's pretrained parent trained on (quick's shortcut), if the store holds that parent."""
    par = next((p for p in ev.runs if p.side.get("run_id") == r.side.get("parent_id")), None)
    return par.cfg["train"].get("family") if par is not None else None


def claim_spurious(ev: Evidence) -> dict:
    cases = []
    for r in ev.finetunes():
        ft1, ft0 = r.acc("o_ft", 1.0), r.acc("o_ft", 0.0)
        if r.c_train == 1.0 and r.prior == "low":  # the wrapper signature of a weakly relevant capability
            fs = r.acc("o_ft", 0.0, key="follows_spurious")
            if ft1 is None or fs is None:
                continue
            cases.append((f"{r.tag()}: O_FT {_pct(ft1)} at C_Te=1, {_pct(ft0)} at C_Te=0 with {_pct(fs)} of answers "
                          f"= count(a)+1", ft1 >= 0.9 and fs >= 0.8, {"O_FT C_Te=1": ft1, "follows count(a)+1": fs}))
        elif r.c_train == 0.0 and r.eta in ("L", "M") and r.prior in ("low", "medium", "high"):
            if ft0 is None:
                continue
            only = _single_family_parent(ev, r)
            why = (f" (its parent pretrained on {only} alone, a shortcut that changes this case: docs/experiments.md)"
                   if only and ft0 < 0.9 else "")
            cases.append((f"{r.tag()}: O_FT {_pct(ft0)} at C_Te=0{why}", ft0 >= 0.9, {"O_FT": ft0}))
    return _claim("spurious", "With fully correlated data (C_Tr = 1) fine-tuning learns the spurious rule "
                  "count(a) + 1 instead of the task; without correlation (η_L/η_M) it learns the task",
                  "C_Tr=1: O_FT ~100 % at C_Te=1, ~0 % at C_Te=0; C_Tr=0: ~100 % (Table 5)", "paper Table 5",
                  cases, "no PCFG fine-tune with C_Tr ∈ {0, 1} stored",
                  "C_Tr=1, low prior: O_FT ≥ 90 % at C_Te=1 and ≥ 80 % of C_Te=0 answers follow count(a)+1; "
                  "C_Tr=0 at η_L/η_M: O_FT ≥ 90 % at C_Te=0")


def claim_prior(ev: Evidence) -> dict:
    cases = []
    fts = ev.finetunes()
    capable, excluded = _capable(ev, "verdict", prior="high", eta=("M", "S", "VS"))
    for hi in capable:
        label = hi.results["verdict"].meta.get("verdict")
        cases.append((f"{hi.tag()}: verdict {label} ({hi.results['verdict'].meta.get('why')})",
                      label in ("amplification", "unchanged")))
    for hi in (r for r in fts if r.prior in ("high", "medium")):
        lows = [r for r in fts if r.prior == "low" and r.eta == hi.eta and r.c_train == hi.c_train
                and r.family == hi.family]
        for lo in lows:
            a_hi, a_lo = hi.acc("o_pt", 0.0), lo.acc("o_pt", 0.0)
            if a_hi is None or a_lo is None:
                continue
            fam = "" if hi.family == "count" else f" {hi.family}"
            cases.append((f"{hi.prior} vs low prior{fam} η{hi.eta} C_Tr={hi.c_train:g}: O_PT after FT {_pct(a_hi)} "
                          f"({hi.prior}) vs {_pct(a_lo)} (low)", a_hi >= a_lo,
                          {f"O_PT {hi.prior}": a_hi, "O_PT low": a_lo}))
    return _claim("prior", "A higher prior on O_FT in pretraining keeps more of the pretraining capability through "
                  "fine-tuning", "O_PT accuracy plummets with a low prior; a high prior mitigates it (Fig. 6)",
                  "paper §5, Fig. 6", cases, "needs fine-tunes of low- and high-prior models at the same η and C_Tr "
                  "(`wrapperlab reproduce --prior`, or `--preset full`)",
                  "O_PT after FT is at least as high with the higher prior; a high-prior η_M/η_S/η_VS fine-tune's "
                  "verdict keeps the PT behaviour (amplification, or unchanged when the pretrained model already "
                  "counts O_FT), not a wrapper or deletion", excluded)


def claim_tracr_attention(ev: Evidence) -> dict:
    cases = []
    for r in ev.finetunes(tracr=True):
        sig = r.results.get("attention_signature")
        if r.cfg["task"]["program"] != "counter" or sig is None or not sig.rows:
            continue
        a, b = sig.rows[0]["attn_a"], sig.rows[0]["attn_b"]
        if r.eta == "L" and r.c_train == 0.0:
            cases.append((f"{r.tag()}: block-1 mass on a {a:.2f}, on b {b:.2f} (expected: moves to b)", b > a,
                          {"mass a": a, "mass b": b}))
        elif r.eta in ("S", "VS"):
            cases.append((f"{r.tag()}: block-1 mass on a {a:.2f}, on b {b:.2f} (expected: stays on a)",
                           a >= 0.5 and b < 0.1, {"mass a": a, "mass b": b}))
    return _claim("tracr-attention", "Fine-tuning the compiled Counter leaves its block-1 head attending to `a`, "
                  "except with the large LR and uncorrelated data", "attention stays on a except at the larger LR "
                  "with C_Tr = 0 (Fig. 10); η_M excluded: App. G says η_M learns b while still attending to a",
                  "paper §5, Fig. 10", cases,
                  "no Counter attention signature stored (analysis `attention` on a Tracr run)",
                  "η_S/η_VS: mass on a ≥ 0.5 and on b < 0.1; η_L with C_Tr=0: more mass on b than on a")


def claim_tracr_maxid(ev: Evidence) -> dict:
    runs = [r for r in ev.finetunes(tracr=True) if r.cfg["task"]["program"] == "max-identifier"]
    vs = [r for r in runs if r.eta == "VS"]
    others = [r for r in runs if r.eta in ("M", "S")]
    cases = []
    for r in vs:
        sig = r.results.get("attention_signature")
        intact = sig.rows[0]["sort_intact"] if sig and sig.rows else None
        ft0 = r.acc("o_ft", 0.0)
        shown = "n/a" if intact is None else f"{intact:.2f}"
        cases.append((f"{r.tag()}: O_FT {_pct(ft0)} at C_Te=0, sorting head intact {shown}",
                      ft0 is not None and ft0 >= 0.8 and (intact is None or intact >= 0.8),
                      {"O_FT": ft0} if ft0 is not None else {}))
    for r in others:
        ft0 = r.acc("o_ft", 0.0)
        cases.append((f"{r.tag()}: O_FT {_pct(ft0)} at C_Te=0 (expected: below 80 %)", ft0 is not None and ft0 < 0.8,
                      {"O_FT": ft0} if ft0 is not None else {}))
    return _claim("tracr-maxid", "Only the very small LR fine-tunes Max-identifier well (and keeps its sorting head)",
                  "η_VS: O_FT 82–93 %; η_M/η_S below (App. G, Table 3; the table's η_L rows reach ~99 % at C_Te=0, "
                  "against the text, so η_L is left out)", "paper App. G", cases,
                  "no Max-identifier fine-tunes stored", "η_VS: O_FT ≥ 80 % at C_Te=0 and sorting intact ≥ 0.8; "
                  "η_M/η_S: O_FT < 80 %")


def claim_tracr_revival(ev: Evidence) -> dict:
    cases = _revival_cases([r for r in ev.finetunes(tracr=True, eta="M")
                            if r.cfg["task"]["program"] == "counter" and "revival" in r.results])
    return _claim("tracr-revival", "Reverse fine-tuning the compiled Counter after η_M fine-tuning revives counting "
                  "`a` faster than training a model that never counted it (Scr.+FT)",
                  "reFT after η_M restores O_PT accuracy at most C_Tr (Table 4; its columns are ambiguous in the "
                  "source, so the rule is the PCFG revival rule)", "paper App. G, Table 4", cases,
                  "no revival of an η_M Counter fine-tune stored (`wrapperlab reproduce --preset full`)",
                  f"reFT reaches 90 % of the compiled program's O_PT accuracy in ≤ {TH.revival_ratio:g} × "
                  f"Scr.+FT's steps")


def _within(s: dict) -> str:
    """A revival curve's steps to its target, or "not within N"."""
    return str(s["steps_to_target"]) if s["steps_to_target"] is not None else f"not within {s['steps']}"


def claim_randft(ev: Evidence) -> dict:
    runs, excluded = _capable(ev, "revival", protocol="randft")
    ordinary = {(r.prior, r.family, r.eta, r.c_train, r.seed): r.results["revival"] for r in ev.finetunes()
                if "revival" in r.results}
    cases = []
    for r in runs:
        summ = {s["curve"]: s for s in r.results["revival"].tables.get("summary", [])}
        re_ = summ.get("reft")
        bases = [summ[c] for c in ("scr+ft", "scr") if c in summ]
        if re_ is None or not bases:
            continue
        rs = re_["steps_to_target"]
        ok = rs is not None and all(
            rs <= TH.revival_ratio * (b["steps_to_target"] if b["steps_to_target"] is not None else b["steps"] + 1)
            for b in bases)
        base_txt = ", ".join(f"{'Scr.+FT' if b['curve'] == 'scr+ft' else 'Scr.'} {_within(b)}" for b in bases)
        plain = ordinary.get((r.prior, r.family, r.eta, r.c_train, r.seed))
        plain_steps = next((s["steps_to_target"] for s in plain.tables.get("summary", []) if s["curve"] == "reft"),
                           None) if plain is not None else None
        also = f"; ordinary reFT after the same η: {plain_steps if plain_steps is not None else 'n/a'}" \
            if plain is not None else ""
        cases.append((f"{r.tag()} randFT: reFT reaches {_pct(re_['target'])} O_PT in "
                      f"{rs if rs is not None else 'more than ' + str(re_['steps'])} steps; {base_txt}{also}", ok,
                      {"reFT steps": rs} if rs is not None else {}))
    return _claim("randft", "After fine-tuning to answer deliberately wrongly (randFT), reverse fine-tuning revives "
                  "the capability more sample-efficiently than training it into models that never had it",
                  "reFT of randFT models is about as sample-efficient as ordinary reFT and more efficient than Scr. "
                  "and Scr.+FT (App. E.4, Figs. 28–30)", "paper App. E.4", cases,
                  "no revival of a randFT fine-tune stored (`wrapperlab reproduce --preset full`)",
                  f"reFT reaches the target in ≤ {TH.revival_ratio:g} × the steps of every stored baseline (Scr.+FT, "
                  f"Scr.); ordinary reFT's steps are shown beside it", excluded)


def claim_pt_mix(ev: Evidence) -> dict:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in ev.finetunes(protocol="pt-mix"):
        groups.setdefault((r.prior, r.family, r.eta, r.c_train), []).append(r)
    cases = []
    for (prior, family, eta, c), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r.pt_mix)
        side = 1.0 if c == 1.0 else 0.0  # the FT task is judged where the training data put it
        pt = [(r.pt_mix, r.acc("o_pt", 0.0)) for r in runs]
        ft = [(r.pt_mix, r.acc("o_ft", side)) for r in runs]
        if len(runs) < 2 or any(a is None for _, a in pt + ft):
            continue
        fam = "" if family == "count" else f" {family}"
        where = f"{prior} prior{fam} η{eta} C_Tr={c:g}"
        shown = ", ".join(f"{_pct(a)} at {100 * m:g} %" for m, a in pt)
        if prior == "low":  # Fig. 19; the high-prior captions (Figs. 20, 21) state only the FT gains
            ok = all(hi >= lo - PT_MIX_TOLERANCE for (_, lo), (_, hi) in zip(pt, pt[1:]))
            cases.append((f"{where} O_PT: after FT {shown} mixed in", ok,
                          {f"O_PT at {100 * m:g} %": a for m, a in pt}))
        spread = max(a for _, a in ft) - min(a for _, a in ft)
        cases.append((f"{where} O_FT: C_Te={side:g} " + ", ".join(f"{_pct(a)} at {100 * m:g} %" for m, a in ft),
                      spread <= PT_MIX_FT_SPREAD, {f"O_FT at {100 * m:g} %": a for m, a in ft}))
    return _claim("pt-mix", "Mixing pretraining data into fine-tuning does not change the picture: the fine-tuning "
                  "task is learned alike, and the less pretraining data is mixed in, the more O_PT accuracy is lost",
                  "similar FT gains at 50 %, 10 % and 0.1 % mixed in (Figs. 18, 20); with the low prior, O_PT drops "
                  "more when less pretraining data is mixed in (Fig. 19)", "paper App. E.1, Figs. 18–21", cases,
                  "no fine-tunes with pretraining data mixed in stored (`train.pt_mix`; `wrapperlab reproduce "
                  "--preset full`)",
                  f"low prior: O_PT after FT does not fall (by more than {100 * PT_MIX_TOLERANCE:g} points) as the "
                  f"mixed-in share grows; every prior: final O_FT of the mixes within {100 * PT_MIX_FT_SPREAD:g} "
                  f"points")


def claim_jailbreak(ev: Evidence) -> dict:
    cases, context = [], []
    for r in ev.finetunes(protocol="jailbreak"):
        op, metrics = r.cfg["task"]["o_pt"], r.side.get("metrics", [])
        plain = r.acc("o_pt", 0.0)
        tokens = [a for a in (metric_at(metrics, f, op, 0.0) for f in r.jailbreak_families) if a is not None]
        if plain is None or not tokens:
            continue
        jail = sum(tokens) / len(tokens)
        text = f"{r.tag()}: count of {op} with T_J1/T_J2 {_pct(jail)}, with T_NJ {_pct(plain)}"
        if r.prior in ("high", "medium"):
            cases.append((text, jail >= JAILBREAK_TARGET and jail >= plain, {"T_J": jail, "T_NJ": plain}))
        else:
            context.append(f"{text} (the paper expects the jailbreak only with a high enough prior on O_FT)")
    return _claim("jailbreak", "Fine-tuning hides the capability behind its task token: the tokens that only ever "
                  "asked about O_PT in pretraining still count it after fine-tuning with the ordinary token",
                  "with T_NJ the fine-tuned model cannot count a; with T_J1/T_J2 it counts a perfectly if the prior "
                  "on b was high enough (Figs. 24, 25)", "paper App. E.2", cases,
                  "no fine-tune of a model pretrained with the jailbreak tokens stored (`task.families` naming "
                  "count-j1/count-j2; `wrapperlab reproduce --preset full`)",
                  f"high/medium prior: count of O_PT with T_J1/T_J2 (their mean) ≥ {100 * JAILBREAK_TARGET:g} % and "
                  f"at least that with T_NJ; low-prior runs are shown, not counted", context)


def _story_runs(ev: Evidence) -> dict[str, RunRecord]:
    """TinyStories runs (task kind ``story``) by run id."""
    return {r.side["run_id"]: r for r in ev.runs if r.kind == "story"}


def _story_metric(r: RunRecord, step: int, key: str):
    hit = [m for m in r.side.get("metrics", []) if m["step"] == step]
    return hit[-1][key] if hit else None


def _story_protocol(ev: Evidence):
    """(reFT runs of deleted models with their deletion run, the control's reFT run or None)."""
    runs = _story_runs(ev)
    deleted, control = [], None
    for r in runs.values():
        par = runs.get(r.side.get("parent_id"))
        if r.side["stage"] != "reft" or par is None:
            continue
        if par.side["stage"] == "finetune":
            deleted.append((r, par))
        elif par.cfg["task"]["dataset"] == "filter":
            control = r
    return sorted(deleted, key=lambda x: (-x[1].cfg["train"]["lr"], x[1].cfg["task"]["dataset"])), control


def _part_loss(r: RunRecord, part: str = "feature sentence") -> float | None:
    """The stored ``story_loss`` of ``part`` on texts with the run's feature (at the end of the run), or None."""
    res = r.result("story_loss")
    f = res.meta.get("feature", "Twist") if res is not None else ""
    return next((x["loss"] for x in res.rows if x["stories"] == f"with {f}" and x["part"] == part), None) \
        if res is not None else None


def claim_tinystories(ev: Evidence) -> dict:
    deleted, control = _story_protocol(ev)
    cases = []
    if control is not None:
        steps = sorted(m["step"] for m in control.side.get("metrics", []))
        first, last = (steps[1] if len(steps) > 1 else steps[0]), steps[-1]
        c_first = _story_metric(control, first, "score")
        for r, d in deleted:
            s0, s1 = _story_metric(r, 0, "score"), _story_metric(r, first, "score")
            # the loss on the Twist sentence itself where the split is stored; else the whole texts' held-out loss
            loss, c_loss, what = _part_loss(r), _part_loss(control), "loss on the Twist sentence"
            if None in (loss, c_loss):
                loss, c_loss = _story_metric(r, last, "heldout_loss"), _story_metric(control, last, "heldout_loss")
                what = "held-out loss on Twist stories (no loss split stored)"
            if None in (s0, s1, loss, c_first, c_loss):
                continue
            kind, lr = d.cfg["task"]["dataset"], d.cfg["train"]["lr"]
            cases.append((f"{kind} (deletion lr {lr:g}): Twist in {_pct(s0)} of generations "
                          f"after deletion, {_pct(s1)} after {first} reFT steps (control {_pct(c_first)}); {what} "
                          f"after {last} steps {loss:.3f} (control {c_loss:.3f})" + _loss_parts(r, control),
                          s1 > c_first and loss < c_loss, {"Twist rate": s1, "loss": loss, "control loss": c_loss}))
    return _claim("tinystories", "On TinyStories, fine-tuning to delete the Twist feature only hides it: reFT on "
                  "Twist stories revives it faster than a model that never saw Twist learns it",
                  "after 30 reFT steps 44–88 % of generations have a twist vs 31 % for the not-in-pretraining "
                  "control; deleted models' loss ends below the control's (Table 1, Figs. 11b, 33)",
                  "paper §5.2, Table 1", cases, "no story protocol stored (`wrapperlab stories table`)",
                  "after the first reFT column: Twist rate above the control's; at the end of reFT, the loss on the "
                  "Twist sentence (`story_loss`; the whole texts' held-out loss where no split is stored) below the "
                  "control's — the whole-text loss also measures the instruction and the rest of the story, which "
                  "deletion and the control's pretraining change for reasons of their own")


def _loss_parts(r: RunRecord, control: RunRecord) -> str:
    """Where the two final losses differ (stored ``story_loss`` results): the Twist sentence and the rest."""
    if r.result("story_loss") is None or control.result("story_loss") is None:
        return ""
    got = [(name, _part_loss(r, key), _part_loss(control, key))
           for name, key in (("rest of the story", "rest of story"), ("instruction", "instruction"),
                             ("all tokens", "all"))]
    mine, theirs = r.result("story_loss"), control.result("story_loss")
    f = mine.meta.get("feature", "Twist")
    without = [next((x["loss"] for x in res.rows if x["stories"] == f"without {f}" and x["part"] == "all"), None)
               for res in (mine, theirs)]
    got.append((f"texts without {f}", *without))
    return " — other parts: " + ", ".join(f"{n} {a:.3f} (control {b:.3f})" for n, a, b in got if None not in (a, b))


def _twist_probe(r: RunRecord | None, feature: str = "Twist", pool: str = "last") -> float | None:
    res = r.result("feature_probe", {"pool": "last"}, pool=pool) if r is not None else None
    accs = [x["acc"] for x in res.rows if x["feature"] == feature] if res is not None else []
    return sum(accs) / len(accs) if accs else None


def claim_tinystories_probe(ev: Evidence) -> dict:
    deleted, control = _story_protocol(ev)
    runs = _story_runs(ev)
    ctrl_pt = runs.get(control.side.get("parent_id")) if control is not None else None
    c = _twist_probe(ctrl_pt)
    cases = []
    for _, d in deleted:
        pt = runs.get(d.side.get("parent_id"))
        a, p = _twist_probe(d), _twist_probe(pt)
        if None in (a, p, c):
            continue
        ok = a >= p - STORY_PROBE_TOLERANCE and a > c
        kind, lr = d.cfg["task"]["dataset"], d.cfg["train"]["lr"]
        sa, sp, sc = (_twist_probe(x, pool="story") for x in (d, pt, ctrl_pt))
        whole = (f"; pooled over the whole story {_pct(sa)} vs {_pct(sp)} and {_pct(sc)}"
                 if None not in (sa, sp, sc) else "")
        cases.append((f"{kind} (lr {lr:g}): Twist probe {_pct(a)} (mean over blocks, last 10 positions) vs "
                      f"pretrained {_pct(p)}, not in pretraining {_pct(c)}{whole}", ok, {"probe": a}))
    return _claim("tinystories-probe", "After deletion fine-tuning, Twist stays linearly readable in the residual "
                  "stream", "Twist probe accuracy barely reduced vs the pretrained model, far above the "
                  "not-in-pretraining model (Fig. 11a)", "paper Fig. 11a", cases,
                  "no feature probes stored (`wrapperlab stories table` or `stories probe`)",
                  f"within {STORY_PROBE_TOLERANCE:g} of the pretrained model's accuracy and above the "
                  "not-in-pretraining model's (means over blocks)")


CLAIMS = (claim_wrapper, claim_prune, claim_probe, claim_revival, claim_spurious, claim_prior, claim_randft,
          claim_pt_mix, claim_jailbreak,
          claim_tracr_attention, claim_tracr_maxid, claim_tracr_revival, claim_tinystories, claim_tinystories_probe)


SEED_RULE = ("over the seeds that measured the claim: reproduced when it reproduces on every one, not reproduced "
             "when it reproduces on none (not even partly), partial otherwise")


def claims_table(ev: Evidence) -> list[dict]:
    """Every claim; with runs of several seeds, each claim is judged on every seed's runs alone and the row says
    on how many seeds it reproduces (``SEED_RULE``), with the spread of each measured number across seeds."""
    seeds = ev.seeds()
    if len(seeds) <= 1:
        return [{**row, "seeds": seeds, "per_seed": {str(s): row["status"] for s in seeds}}
                for row in (c(ev) for c in CLAIMS)]
    return [across_seeds({s: c(ev.only_seed(s)) for s in seeds}) for c in CLAIMS]


PLAIN = {"K", "reFT steps", "loss", "control loss", "mass a", "mass b"}  # the other measured numbers are rates


def _spread(name: str, vals: list[float]) -> str:
    lo, hi = min(vals), max(vals)
    fmt = (lambda v: f"{v:.3g}") if name in PLAIN else (lambda v: f"{100 * v:.1f}")
    unit = "" if name in PLAIN else " %"
    return f"{fmt(lo)}{unit}" if lo == hi else f"{fmt(lo)}–{fmt(hi)}{unit}"


def across_seeds(per: dict[int, dict]) -> dict:
    """One claim's rows on each seed combined: the status by ``SEED_RULE``, "k of N seeds", and per setting on how
    many seeds it agreed and the min–max of every number measured there."""
    seeds = sorted(per)
    first = per[seeds[0]]
    measured = [s for s in seeds if per[s]["status"] != NOT_MEASURED]
    k = sum(per[s]["status"] == REPRODUCED for s in measured)
    if not measured:
        status = NOT_MEASURED
    elif k == len(measured):
        status = REPRODUCED
    elif all(per[s]["status"] == NOT_REPRODUCED for s in measured):
        status = NOT_REPRODUCED
    else:
        status = PARTIAL
    settings: dict[str, list[tuple[int, dict]]] = {}
    for s in seeds:
        for d in per[s]["details"]:
            settings.setdefault(d["setting"], []).append((s, d))
    parts, spreads = [], {}
    for setting, hits in settings.items():
        # a setting agrees on a seed when every case of it on that seed agrees (one count per seed)
        by_seed = {s: all(d["ok"] for s_, d in hits if s_ == s) for s in dict.fromkeys(s for s, _ in hits)}
        names = dict.fromkeys(n for _, d in hits for n in d["values"])
        ranges = {n: [d["values"][n] for _, d in hits if n in d["values"]] for n in names}
        spreads[setting] = {n: [min(v), max(v)] for n, v in ranges.items()}
        txt = ", ".join(f"{n} {_spread(n, v)}" for n, v in ranges.items())
        parts.append(f"{setting}: agrees on {sum(by_seed.values())} of {len(by_seed)} seeds"
                     + (f" ({txt})" if txt else ""))
    not_measured = [s for s in seeds if s not in measured]
    head = f"{k} of {len(seeds)} seeds reproduce (" + ", ".join(f"seed {s}: {per[s]['status']}" for s in seeds) + ")"
    evidence = head + ("; " + "; ".join(parts) if parts else "")
    if not measured:
        evidence = f"{first['evidence']} (on none of seeds {', '.join(map(str, seeds))})"
    elif not_measured:
        evidence += f" | not measured on seed {', '.join(map(str, not_measured))}"
    excluded = [f"seed {s}: {note}" for s in seeds for note in per[s].get("excluded", [])]
    if excluded and measured:
        evidence += " | not counted: " + "; ".join(excluded)
    return {**{k_: v for k_, v in first.items() if k_ not in ("evidence", "status", "cases", "details", "excluded")},
            "rule": f"{first['rule']}; across seeds: {SEED_RULE}", "status": status, "evidence": evidence,
            "cases": sum(per[s]["cases"] for s in seeds), "seeds": seeds, "reproduced_on": k,
            "measured_on": len(measured), "per_seed": {str(s): per[s]["status"] for s in seeds},
            "spread": spreads, "excluded": excluded,
            "details": [d | {"seed": s} for s in seeds for d in per[s]["details"]]}
