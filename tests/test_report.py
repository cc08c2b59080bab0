"""The claims table and the HTML report.

The claim rules are checked on hand-built evidence whose expected statuses follow from each rule's definition;
the end-to-end tests run a real (tiny) grid, edit a stored result and see the status move, and load the report in
a real headless browser (Debian's chromium via Playwright)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error, wl

from wrapperlab.analysis.common import Result
from wrapperlab.report.claims import (
    NOT_MEASURED,
    NOT_REPRODUCED,
    PARTIAL,
    REPRODUCED,
    Evidence,
    RunRecord,
    claim_prior,
    claim_prune,
    claim_randft,
    claim_revival,
    claim_spurious,
    claim_tracr_attention,
    claim_wrapper,
    claims_table,
)
from wrapperlab.training.presets import named_lrs


def _metrics(step: int, vals: dict) -> list[dict]:
    """vals: {(operand, c_test): (acc, majority[, follows_spurious])}"""
    out = []
    for (op, c), v in vals.items():
        row = {"step": step, "family": "count", "operand": op, "c_test": c, "acc": v[0], "majority": v[1]}
        if len(v) > 2:
            row["follows_spurious"] = v[2]
        out.append(row)
    return out


def pcfg_run(eta: str, c_train: float, *, pre_a=0.99, post_a=0.1, post_b1=1.0, post_b0=0.25, fs0=0.9,
             prior="low", results=None) -> RunRecord:
    side = {"stage": "finetune", "status": "done", "run_id": f"{eta}{c_train}", "step": 100,
            "config": {"preset": "cpu", "task": {"kind": "pcfg", "prior": prior, "o_pt": "a", "o_ft": "b"},
                       "train": {"lr": named_lrs("cpu")[eta], "c_train": c_train, "family": "count"},
                       "eval": {"family": None}},
            "metrics": _metrics(0, {("a", 0.0): (pre_a, 0.45), ("b", 0.0): (0.3, 0.48), ("b", 1.0): (0.01, 0.46)})
            + _metrics(100, {("a", 0.0): (post_a, 0.45), ("b", 0.0): (post_b0, 0.48, fs0),
                             ("b", 1.0): (post_b1, 0.46)})}
    return RunRecord(Path(f"/x/{eta}{c_train}"), side, results or {})


def prune_result(acc_by_k: dict[int, float], majority=0.45) -> Result:
    return Result("prune", [{"k": k, "target": "O_PT", "c_test": 0.0, "acc": a, "majority": majority}
                            for k, a in acc_by_k.items()])


def test_prune_claim_follows_its_rule():
    good = pcfg_run("S", 1.0, results={"prune": prune_result({0: 0.10, 1: 0.80, 2: 0.60})})
    small = pcfg_run("M", 1.0, results={"prune": prune_result({0: 0.10, 1: 0.30})})  # gain 0.2 < 0.3
    collapse = pcfg_run("M", 1.0, results={"prune": prune_result({0: 0.10, 5: 0.45})})  # not above majority
    late = pcfg_run("S", 1.0, results={"prune": prune_result({0: 0.10, 16: 0.95})})  # K beyond 15 is not counted
    assert claim_prune(Evidence([good]))["status"] == REPRODUCED
    assert claim_prune(Evidence([good, small]))["status"] == PARTIAL
    assert claim_prune(Evidence([small, collapse]))["status"] == NOT_REPRODUCED
    assert claim_prune(Evidence([late]))["status"] == NOT_REPRODUCED
    assert claim_prune(Evidence([pcfg_run("S", 1.0)]))["status"] == NOT_MEASURED
    # a large LR is not part of the claim; a model that never had the capability is not counted
    assert claim_prune(Evidence([pcfg_run("L", 1.0, results=good.results)]))["status"] == NOT_MEASURED
    unable = pcfg_run("S", 1.0, pre_a=0.5, results=good.results)
    c = claim_prune(Evidence([unable]))
    assert c["status"] == NOT_MEASURED and "not counted" in c["evidence"]


def test_wrapper_revival_and_spurious_claims_follow_their_rules():
    verdict = lambda label: Result("verdict", [], {"verdict": label, "why": "test"})  # noqa: E731
    ev = Evidence([pcfg_run("S", 1.0, results={"verdict": verdict("wrapper")}),
                   pcfg_run("M", 1.0, results={"verdict": verdict("deletion")})])
    assert claim_wrapper(ev)["status"] == PARTIAL

    def rev(reft, base, base_steps=500):
        return Result("revival", [], {}, {"summary": [
            {"curve": "reft", "steps_to_target": reft, "steps": 500, "target": 0.9},
            {"curve": "scr+ft", "steps_to_target": base, "steps": base_steps, "target": 0.9}]})

    assert claim_revival(Evidence([pcfg_run("S", 1.0, results={"revival": rev(50, None)})]))["status"] == REPRODUCED
    assert claim_revival(Evidence([pcfg_run("S", 1.0, results={"revival": rev(50, 100)})]))["status"] == REPRODUCED
    assert claim_revival(Evidence([pcfg_run("S", 1.0, results={"revival": rev(60, 100)})]))["status"] == \
        NOT_REPRODUCED  # 60 > 0.5 x 100
    assert claim_revival(Evidence([pcfg_run("S", 1.0, results={"revival": rev(None, None)})]))["status"] == \
        NOT_REPRODUCED
    # spurious: C_Tr=1 must score on C_Te=1 and follow count(a)+1 on C_Te=0; C_Tr=0 at L/M must learn the task
    assert claim_spurious(Evidence([pcfg_run("M", 1.0), pcfg_run("L", 0.0, post_b0=0.97)]))["status"] == REPRODUCED
    assert claim_spurious(Evidence([pcfg_run("M", 1.0, fs0=0.5)]))["status"] == NOT_REPRODUCED
    assert claim_spurious(Evidence([pcfg_run("M", 1.0), pcfg_run("M", 0.0, post_b0=0.5)]))["status"] == PARTIAL
    # a failing case names its parent's single-family pretraining (quick's shortcut), where the store holds it
    child = pcfg_run("M", 0.0, post_b0=0.5)
    child.side["parent_id"] = "pt1"
    parent = RunRecord(Path("/x/pt1"), {"stage": "pretrain", "status": "done", "run_id": "pt1",
                                         "config": {"train": {"family": "count"}, "task": {}}})
    assert "pretrained on count alone" in claim_spurious(Evidence([child, parent]))["evidence"]
    assert "alone" not in claim_spurious(Evidence([child]))["evidence"]
    # Table 5 is the low prior: a high-prior model that counts b need not follow the spurious rule at C_Tr=1
    assert claim_spurious(Evidence([pcfg_run("M", 1.0, fs0=0.3, prior="high")]))["status"] == NOT_MEASURED


def test_tracr_attention_claim():
    def run(eta, c, a, b):
        side = {"stage": "finetune", "status": "done", "run_id": eta, "step": 10, "metrics": [],
                "config": {"preset": "tracr-cpu", "task": {"kind": "tracr", "program": "counter", "o_pt": "a",
                                                           "o_ft": "b"},
                           "train": {"lr": named_lrs("tracr-cpu")[eta], "c_train": c}, "eval": {}}}
        return RunRecord(Path(eta), side, {"attention_signature": Result("attention_signature",
                                                                         [{"attn_a": a, "attn_b": b}])})

    assert claim_tracr_attention(Evidence([run("S", 0.0, 0.7, 0.0), run("L", 0.0, 0.1, 0.8)]))["status"] == \
        REPRODUCED
    assert claim_tracr_attention(Evidence([run("S", 0.0, 0.7, 0.0), run("L", 0.0, 0.9, 0.0)]))["status"] == PARTIAL
    assert claim_tracr_attention(Evidence([run("M", 0.0, 0.9, 0.0)]))["status"] == NOT_MEASURED  # η_M: no prediction


def test_prior_claim_compares_priors_and_reads_the_high_prior_verdict():
    verdict = lambda label: Result("verdict", [], {"verdict": label, "why": "test"})  # noqa: E731
    low = pcfg_run("M", 1.0, post_a=0.05)
    kept = pcfg_run("M", 1.0, post_a=0.95, prior="high", results={"verdict": verdict("unchanged")})
    assert claim_prior(Evidence([low, kept]))["status"] == REPRODUCED
    assert claim_prior(Evidence([low, pcfg_run("M", 1.0, post_a=0.95, prior="high",
                                               results={"verdict": verdict("wrapper")})]))["status"] == PARTIAL
    assert claim_prior(Evidence([low, pcfg_run("M", 1.0, post_a=0.01, prior="high",
                                               results={"verdict": verdict("deletion")})]))["status"] == NOT_REPRODUCED
    assert claim_prior(Evidence([low]))["status"] == NOT_MEASURED
    # a high-prior model that never counted a says nothing about keeping it
    unable = claim_prior(Evidence([pcfg_run("S", 0.0, pre_a=0.4, post_a=0.4, prior="high",
                                            results={"verdict": verdict("unchanged")})]))
    assert unable["status"] == NOT_MEASURED and "not counted" in unable["evidence"]


def test_randft_claim_needs_reft_faster_than_every_baseline_and_no_other_claim_reads_randft_runs():
    def rev(reft, scr_ft, scr):
        return Result("revival", [], {}, {"summary": [
            {"curve": "reft", "steps_to_target": reft, "steps": 500, "target": 0.9},
            {"curve": "scr+ft", "steps_to_target": scr_ft, "steps": 500, "target": 0.9},
            {"curve": "scr", "steps_to_target": scr, "steps": 500, "target": 0.9}]})

    def randft(reft, scr_ft, scr):
        r = pcfg_run("M", 0.0, post_a=0.05, post_b0=0.3, results={"revival": rev(reft, scr_ft, scr)})
        r.side["config"]["train"]["answer_operand"] = "b"
        return r

    assert claim_randft(Evidence([randft(20, None, 300)]))["status"] == REPRODUCED
    assert claim_randft(Evidence([randft(200, None, 300)]))["status"] == NOT_REPRODUCED  # 200 > 0.5 x 300
    assert claim_randft(Evidence([randft(20, 30, None)]))["status"] == NOT_REPRODUCED  # 20 > 0.5 x 30
    assert claim_randft(Evidence([randft(None, None, None)]))["status"] == NOT_REPRODUCED
    ordinary = pcfg_run("M", 0.0, post_b0=0.97, results={"revival": rev(40, None, None)})
    c = claim_randft(Evidence([randft(20, None, 300), ordinary]))
    assert c["status"] == REPRODUCED and "ordinary reFT after the same η: 40" in c["evidence"]
    assert claim_randft(Evidence([ordinary]))["status"] == NOT_MEASURED
    # a randFT run learns wrong answers on purpose: it is not a failed fine-tune of the spurious or revival claims
    assert claim_spurious(Evidence([randft(20, None, 300)]))["status"] == NOT_MEASURED
    assert claim_revival(Evidence([randft(20, None, 300)]))["status"] == NOT_MEASURED


def _seeded(run: RunRecord, seed: int) -> RunRecord:
    run.side["config"]["train"]["seed"] = seed
    return run


def test_a_claim_on_several_seeds_is_judged_per_seed_and_counted():
    """Each seed's runs alone give that seed's status; the row says on how many it reproduces, with the spread of
    the numbers its cases measured (the planted K and accuracies)."""
    def pruned(seed, accs):
        return _seeded(pcfg_run("S", 1.0, results={"prune": prune_result(accs)}), seed)

    rows = {c["id"]: c for c in claims_table(Evidence([pruned(0, {0: 0.1, 2: 0.8}), pruned(1, {0: 0.1, 5: 0.9}),
                                                        pruned(2, {0: 0.1, 1: 0.2})]))}
    c = rows["prune"]
    assert (c["status"], c["reproduced_on"], c["seeds"]) == (PARTIAL, 2, [0, 1, 2])
    assert c["per_seed"] == {"0": REPRODUCED, "1": REPRODUCED, "2": NOT_REPRODUCED}
    assert c["spread"]["low prior ηS C_Tr=1"] == {"K": [1, 5], "O_PT pruned": [0.2, 0.9]}
    assert "agrees on 2 of 3 seeds (K 1–5, O_PT pruned 20.0–90.0 %)" in c["evidence"]
    assert rows["wrapper"]["status"] == NOT_MEASURED and rows["wrapper"]["reproduced_on"] == 0
    every = claims_table(Evidence([pruned(0, {0: 0.1, 2: 0.8}), pruned(4, {0: 0.1, 3: 0.85})]))[1]
    assert (every["status"], every["reproduced_on"]) == (REPRODUCED, 2)
    none = claims_table(Evidence([pruned(0, {0: 0.1, 1: 0.2}), pruned(4, {0: 0.1, 3: 0.3})]))[1]
    assert (none["status"], none["reproduced_on"]) == (NOT_REPRODUCED, 0)
    # a seed that did not measure the claim does not count against it, and the row says so
    gap = claims_table(Evidence([pruned(0, {0: 0.1, 2: 0.8}), _seeded(pcfg_run("S", 1.0), 4)]))[1]
    assert gap["status"] == REPRODUCED and gap["per_seed"] == {"0": REPRODUCED, "4": NOT_MEASURED}
    assert "not measured on seed 4" in gap["evidence"]
    from wrapperlab.report.build import seeds_note

    assert seeds_note(gap) == "1 of 1 measured seeds (2 in all)" and seeds_note(every) == "2 of 2 seeds"
    # two cases of one setting on one seed count once for that seed; a run left out is still named per seed
    twice = claims_table(Evidence([pruned(0, {0: 0.1, 2: 0.8}), pruned(0, {0: 0.1, 3: 0.7}),
                                   pruned(1, {0: 0.1, 1: 0.2}),
                                   _seeded(pcfg_run("S", 1.0, pre_a=0.5, results=pruned(0, {0: 0.1}).results), 1)]))
    assert "low prior ηS C_Tr=1: agrees on 1 of 2 seeds" in twice[1]["evidence"]
    assert "not counted: seed 1: low prior ηS C_Tr=1" in twice[1]["evidence"]
    # one seed: the table is the single-seed table
    assert claims_table(Evidence([pruned(0, {0: 0.1, 2: 0.8})]))[1]["status"] == REPRODUCED


# ----------------------------------------------------------------------------- end to end on real stored results
CAPABLE = {
    "name": "tiny-capable",
    "runs": {
        "pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32, "model.n_layer": 1,
                                            "model.n_head": 2, "family": "count", "lr": 0.003, "steps": 400,
                                            "batch_size": 64, "eval.n": 200, "eval.every": 200, "threads": 1}},
        "ft": {"stage": "finetune", "parent": "pt", "set": {"steps": 40, "eval.every": 20, "eval.n": 200,
                                                            "batch_size": 32, "threads": 1},
               "grid": {"lr": ["S"], "c_train": [1]}},
        "counter": {"stage": "finetune", "preset": "tracr-cpu",
                    "set": {"task.program": "counter", "steps": 5, "eval.every": 5, "eval.n": 40, "batch_size": 8,
                            "threads": 1}, "grid": {"lr": ["S"]}},
    },
    "analyses": [{"tool": "prune", "on": "ft", "settings": {"ks": [0, 1, 2], "n_grad": 128, "n_eval": 100}},
                 {"tool": "verdict", "on": "ft"},
                 {"tool": "attention_signature", "on": "counter", "settings": {"n": 20}}],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(CAPABLE, sort_keys=False))
    r = wl("run", str(spec), "--out", str(tmp / "store"), "--no-progress", "--workers", "2")
    assert r.returncode == 0, r.stderr
    return tmp / "store"


def _claims(store: Path, out: Path) -> dict:
    r = wl("report", str(store), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return {c["id"]: c for c in json.loads(r.stdout)["claims"]}


def test_claims_are_computed_from_stored_results(store, tmp_path):
    before = _claims(store, tmp_path / "r1")
    assert set(before) == {"wrapper", "prune", "probe", "revival", "spurious", "prior", "tracr-attention",
                           "randft", "pt-mix", "jailbreak", "tracr-maxid", "tracr-revival", "tinystories",
                           "tinystories-probe"}
    assert before["tinystories"]["status"] == before["tinystories-probe"]["status"] == NOT_MEASURED
    assert before["wrapper"]["status"] in (REPRODUCED, NOT_REPRODUCED)  # the pretrained model counts: measured
    # edit the stored verdict: the claim's status follows
    (vfile,) = list(store.glob("runs/finetune-*/analysis/verdict-*.json"))
    d = json.loads(vfile.read_text())
    d["meta"]["verdict"] = "deletion" if before["wrapper"]["status"] == REPRODUCED else "wrapper"
    vfile.write_text(json.dumps(d))
    after = _claims(store, tmp_path / "r2")
    assert after["wrapper"]["status"] != before["wrapper"]["status"]
    # edit a stored attention signature (η_S: expected to stay on a)
    (afile,) = list(store.glob("runs/finetune-*/analysis/attention_signature-*.json"))
    d = json.loads(afile.read_text())
    d["rows"][0].update(attn_a=0.05, attn_b=0.9)
    afile.write_text(json.dumps(d))
    assert _claims(store, tmp_path / "r3")["tracr-attention"]["status"] == NOT_REPRODUCED
    d["rows"][0].update(attn_a=0.9, attn_b=0.0)
    afile.write_text(json.dumps(d))
    assert _claims(store, tmp_path / "r4")["tracr-attention"]["status"] == REPRODUCED


def test_report_of_a_single_run_and_bad_targets(store, tmp_path):
    (ft,) = [d for d in (store / "runs").iterdir() if d.name.startswith("finetune") and (d / "analysis").is_dir()
             and list((d / "analysis").glob("prune-*"))]
    r = wl("report", str(ft), "--out", str(tmp_path / "one"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert Path(res["path"]).is_file() and any("fig7_prune" in f for f in res["figures"])
    one_line_error(wl("report", str(tmp_path / "missing")), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(wl("report", str(tmp_path / "empty")), "neither a run directory nor a store")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    not CHROMIUM and not os.environ.get("WRAPPERLAB_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (CI installs it and sets WRAPPERLAB_REQUIRE_BROWSER)")


def _in_chromium(page_path: Path, **queries: str) -> tuple[dict, list[str], list[str]]:
    """Open the page in headless chromium; (the value of each JavaScript query, problems seen, URLs requested)."""
    playwright = pytest.importorskip("playwright.sync_api") if not os.environ.get("WRAPPERLAB_REQUIRE_BROWSER") \
        else __import__("playwright.sync_api", fromlist=["sync_playwright"])
    problems, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda q: problems.append(f"request failed: {q.url[:80]}"))
            page.on("request", lambda q: requests.append(q.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            return {k: page.evaluate(q) for k, q in queries.items()}, problems, requests
        finally:
            browser.close()


STATUSES = "Array.from(document.querySelectorAll('#claims .status')).map(e => e.textContent)"


@needs_browser
def test_report_renders_in_headless_chromium(store, tmp_path):
    out = tmp_path / "html"
    r = wl("report", str(store), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    page_path = Path(res["path"])
    got, problems, requests = _in_chromium(
        page_path, images="Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])",
        claim_rows="document.querySelectorAll('#claims tr').length", statuses=STATUSES,
        seeds="document.getElementById('seeds').textContent")
    images, claim_rows, statuses = got["images"], got["claim_rows"], got["statuses"]
    assert problems == []
    assert got["seeds"].startswith("One seed (0)")
    assert len(images) == len(res["figures"]) >= 3  # Figs. 5-6, 7, 10 at least
    assert all(done and width > 0 for done, width, _ in images), images
    assert claim_rows == 1 + len(res["claims"])
    assert statuses == [c["status"] for c in res["claims"]]
    # self-contained: nothing but the page itself (images are inline data URIs) was requested over any network
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    # the PNGs are also written beside the page
    assert all(Path(f).is_file() and Path(f).parent == out for f in res["figures"])


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory) -> Path:
    """The same tiny grid replicated under seeds 0 and 1 (`seeds:` in the spec)."""
    tmp = tmp_path_factory.mktemp("seeded")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({**CAPABLE, "seeds": [0, 1]}, sort_keys=False))
    r = wl("run", str(spec), "--out", str(tmp / "store"), "--no-progress", "--workers", "2")
    assert r.returncode == 0, r.stderr
    return tmp / "store"


def test_claims_on_two_seeds_count_the_seeds_and_follow_each_seeds_stored_results(seeded_store, tmp_path):
    before = _claims(seeded_store, tmp_path / "r1")
    for c in before.values():
        assert c["seeds"] == [0, 1] and set(c["per_seed"]) == {"0", "1"}
    w = before["wrapper"]
    assert w["per_seed"]["0"] in (REPRODUCED, NOT_REPRODUCED) and w["per_seed"]["1"] in (REPRODUCED, NOT_REPRODUCED)
    # flip seed 1's stored verdict: only seed 1's status moves, and the count with it
    (vfile,) = [f for f in seeded_store.glob("runs/finetune-*/analysis/verdict-*.json")
                if json.loads((f.parent.parent / "checkpoint.json").read_text())["config"]["train"]["seed"] == 1]
    d = json.loads(vfile.read_text())
    d["meta"]["verdict"] = "deletion" if w["per_seed"]["1"] == REPRODUCED else "wrapper"
    vfile.write_text(json.dumps(d))
    after = _claims(seeded_store, tmp_path / "r2")["wrapper"]
    assert after["per_seed"]["0"] == w["per_seed"]["0"] and after["per_seed"]["1"] != w["per_seed"]["1"]
    assert after["reproduced_on"] == w["reproduced_on"] + (1 if after["per_seed"]["1"] == REPRODUCED else -1)
    r = wl("report", str(seeded_store), "--out", str(tmp_path / "r3"))
    assert r.returncode == 0 and f"{after['reproduced_on']} of 2 seeds" in r.stdout


@needs_browser
def test_a_report_on_two_seeds_renders_the_seed_counts(seeded_store, tmp_path):
    r = wl("report", str(seeded_store), "--out", str(tmp_path / "html"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    got, problems, _ = _in_chromium(Path(res["path"]), statuses=STATUSES,
                                    counts="Array.from(document.querySelectorAll('#claims tr')).slice(1).map("
                                           "tr => (tr.querySelector('.seeds') || {textContent: ''}).textContent)",
                                    seeds="document.getElementById('seeds').textContent",
                                    captions="Array.from(document.querySelectorAll('figcaption'))"
                                             ".map(e => e.textContent)")
    assert problems == []
    assert got["statuses"] == [c["status"] for c in res["claims"]]
    for seed in (0, 1):  # every seed's runs are drawn, each figure naming its seed
        assert any(f"seed {seed}" in c and "Fig. 7" in c for c in got["captions"]), got["captions"]
    assert got["counts"] == [f"{c['reproduced_on']} of 2 seeds" if c["measured_on"] in (0, 2)
                             else f"{c['reproduced_on']} of {c['measured_on']} measured seeds (2 in all)"
                             for c in res["claims"]]
    assert got["seeds"].startswith("Seeds: 0, 1")


def test_tracr_revival_claim_reads_the_stored_revival_of_an_eta_m_counter(tmp_path):
    """The Table 4 analog on a tiny store: reFT and Scr.+FT really train; then editing the stored summary moves the
    claim (the rule is the revival rule: reFT within half the baseline's steps)."""
    spec = {"name": "tracr-revival", "runs": {"counter": {
        "stage": "finetune", "preset": "tracr-cpu",
        "set": {"task.program": "counter", "steps": 10, "eval.every": 10, "eval.n": 40, "batch_size": 8,
                "threads": 1}, "grid": {"lr": ["M"], "c_train": [1]}}},
        "analyses": [{"tool": "revival", "on": "counter",
                      "settings": {"steps": 10, "scratch_steps": 10, "baselines": ["scr+ft"]}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = wl("run", str(path), "--out", str(tmp_path / "store"), "--no-progress", "--workers", "2")
    assert r.returncode == 0, r.stderr
    (rfile,) = list((tmp_path / "store").glob("runs/finetune-*/analysis/revival-*.json"))
    assert _claims(tmp_path / "store", tmp_path / "r0")["tracr-revival"]["status"] != NOT_MEASURED
    d = json.loads(rfile.read_text())
    summary = {s["curve"]: s for s in d["tables"]["summary"]}
    for reft, expected in ((3, REPRODUCED), (None, NOT_REPRODUCED)):
        summary["reft"]["steps_to_target"], summary["scr+ft"]["steps_to_target"] = reft, None
        rfile.write_text(json.dumps(d))
        assert _claims(tmp_path / "store", tmp_path / f"r{reft}")["tracr-revival"]["status"] == expected
