"""``wrapperlab report RUN_OR_GRID``: one self-contained offline HTML file (images inline as data URIs) plus the
same figures as PNG files beside it.

Order of the page: the claims table (``claims.py``: every claim of the paper with the evidence measured here and a
computed status), then the figures in the paper's style — Figs. 5–6 (FT and PT accuracy against fine-tuning
iterations), 7 (pruning), 8 (probes), 9 (revival), 10 (Tracr attention) — then the Table 5 and Table 3 analogs
with the paper's cells beside ours, and the list of runs.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path

from wrapperlab.report import figures
from wrapperlab.report.claims import (
    NOT_MEASURED,
    NOT_REPRODUCED,
    PARTIAL,
    REPRODUCED,
    SEED_RULE,
    Evidence,
    claims_table,
)
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.checkpoint import atomic_write_text

_COLOURS = {REPRODUCED: "#1b7f3b", PARTIAL: "#b7791f", NOT_REPRODUCED: "#c53030", NOT_MEASURED: "#718096"}

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #1a202c; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #e2e8f0; }
table { border-collapse: collapse; font-size: 12.5px; margin: .5em 0 1em; }
td, th { border: 1px solid #e2e8f0; padding: 3px 7px; vertical-align: top; text-align: left; }
th { background: #f7fafc; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 600; color: white; padding: 1px 7px; border-radius: 4px; white-space: nowrap; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #edf2f7; }
figcaption { font-size: 12.5px; color: #4a5568; } .muted { color: #718096; } code { font-size: 12px; }
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} <span class=muted>({html.escape(path.name)})</span></figcaption>"
            f"</figure>")


def _table(rows: list[dict], cols: dict[str, str], num: set[str] = frozenset()) -> str:
    if not rows:
        return "<p class=muted>none</p>"
    head = "".join(f"<th>{html.escape(v)}</th>" for v in cols.values())
    body = []
    for r in rows:
        cells = []
        for k in cols:
            v = r.get(k)
            txt = "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
            cells.append(f"<td{' class=num' if k in num else ''}>{html.escape(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def seeds_note(c: dict) -> str:
    """"k of N seeds" for a claim judged on several seeds ("k of M measured, N seeds" when some seeds did not
    measure it), else ""."""
    n, m = len(c.get("seeds", ())), c.get("measured_on", 0)
    if n <= 1:
        return ""
    k = c.get("reproduced_on", 0)
    return f"{k} of {n} seeds" if m in (0, n) else f"{k} of {m} measured seeds ({n} in all)"


def _claims_html(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        colour = _COLOURS[c["status"]]
        note = seeds_note(c)
        rows.append(f"<tr><td>{html.escape(c['claim'])}<br><span class=muted>{html.escape(c['where'])}</span></td>"
                    f"<td>{html.escape(c['paper'])}</td><td>{html.escape(c['evidence'])}"
                    f"{'<br><span class=muted>rule: ' + html.escape(c['rule']) + '</span>' if c['rule'] else ''}</td>"
                    f"<td><span class=status style='background:{colour}'>{html.escape(c['status'])}</span>"
                    f"{'<br><span class=seeds>' + note + '</span>' if note else ''}</td></tr>")
    return ("<table id=claims><tr><th>claim</th><th>paper</th><th>measured here</th><th>status</th></tr>"
            + "".join(rows) + "</table>")


def _run_dirs(target: Path) -> tuple[list[Path], str]:
    if (target / ck.SIDECAR).is_file():
        return [target], f"run {target}"
    from wrapperlab.experiments.store import Store, StoreError, is_store

    if is_store(target):
        store = Store(target, create=False)
        store.sync()
        dirs = [Path(r["run_dir"]) for r in store.runs()]
        # the TinyStories protocol (`reproduce --stories`, `stories table --out STORE/stories`) sits beside the store
        stories = sorted(p.parent for p in (target / "stories").rglob(ck.SIDECAR)) if (target / "stories").is_dir() \
            else []
        return dirs + stories, f"store {target}" + (f" and {len(stories)} story runs" if stories else "")
    if target.is_dir():
        dirs = sorted(p.parent for p in target.rglob(ck.SIDECAR))
        if dirs:
            return dirs, f"directory {target}"
    raise StoreError(f"report: {target} is neither a run directory nor a store nor a folder holding runs")


def build_report(target: str | Path, out: str | Path | None = None, title: str | None = None) -> dict:
    """Write ``out/index.html`` (default ``TARGET/report``) and its PNGs; return {path, claims, figures}."""
    target = Path(target)
    dirs, what = _run_dirs(target)
    out = Path(out) if out else (target / "report")
    out.mkdir(parents=True, exist_ok=True)
    ev = Evidence.from_dirs(dirs)
    claims = claims_table(ev)
    seeds = ev.seeds()
    seed_txt = (f"Seeds: {', '.join(map(str, seeds))} — each claim is judged on every seed's runs alone; the status "
                f"across seeds follows the rule: {SEED_RULE}." if len(seeds) > 1
                else f"One seed ({seeds[0]}): every number below comes from a single training seed." if seeds else "")
    parts = [f"<h1>{html.escape(title or 'wrapperlab report')}</h1>",
             f"<p>Evidence from {html.escape(what)}: {len(ev.runs)} finished runs. Generated "
             f"{dt.datetime.now().isoformat(timespec='seconds')}. Paper: Jain et al., ICLR 2024, "
             f"<a href='https://arxiv.org/abs/2311.12786'>arXiv 2311.12786</a>. Statuses are computed from the stored "
             f"results by the rule under each row.</p>", f"<p id=seeds>{html.escape(seed_txt)}</p>", "<h2>Claims</h2>",
             _claims_html(claims)]
    parts += _calibration(target)
    figs: list[Path] = []
    parts += _figures(ev, out, figs)
    parts += _tables(ev)
    parts.append("<h2>Runs</h2>")
    parts.append(_table([{"tag": r.tag() if r.side.get("stage") == "finetune" else r.side.get("stage"),
                          "stage": r.side.get("stage"), "seed": r.seed, "id": r.side.get("run_id"),
                          "dir": r.run_dir.name,
                          "wall": r.side.get("wall_s"), "analyses": ", ".join(sorted(r.results))}
                         for r in ev.runs],
                        {"stage": "stage", "tag": "setting", "seed": "seed", "id": "run id", "dir": "directory",
                         "wall": "wall s", "analyses": "analyses"}, {"wall"}))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title or 'wrapperlab')}"
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "index.html"
    atomic_write_text(path, page)
    atomic_write_text(out / "claims.json", json.dumps(claims, indent=1))
    return {"path": str(path), "claims": claims, "figures": [str(f) for f in figs]}


def _fmt(v, digits: int = 3):
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else v


def _calibration(target: Path) -> list[str]:
    """The calibration table of an organisms directory (``wrapperlab organisms calibrate``), when it has one."""
    from wrapperlab.experiments.calibration import SCORES, load

    res = load(target)
    if res is None:
        return []
    m = res.meta
    rows = [{**r, "auroc": _fmt(r["auroc"], 2), "heldout_acc": _fmt(r["heldout_acc"], 2),
             "n": f"{r['n_wrapper']} / {r['n_deletion']}", "thresholds": " | ".join(_fmt(t) for t in r["thresholds"])}
            for r in res.rows]
    preds = sorted({k for o in res.tables["organisms"] for k in o if k.startswith("pred: ")})
    orgs = [{k: _fmt(v) for k, v in o.items()} for o in res.tables["organisms"]]
    return ["<h2 id=calibration>Calibration on model organisms</h2>",
            f"<p>{m['n']} organisms (seeds {', '.join(map(str, m['seeds']))}) whose label is set by construction "
            f"(the organisms table says whether behaviour shows it). "
            f"Per measure: AUROC of wrapper against deletion (1.0: every wrapper scores on the wrapper side of every "
            f"deletion; 0.5: chance), and its accuracy over all labels on held-out organisms, with behaviour deciding "
            f"absent, amplification and unchanged and the measure's threshold, chosen on the other half, splitting "
            f"lost capabilities (split: {html.escape(m['split'])}). Relearning: "
            f"{html.escape(json.dumps(m['relearning']))}.</p>",
            _table(rows, {"measure": "measure", "what": "score", "direction": "wrapper if", "auroc": "AUROC w/d",
                          "n": "n wrapper / deletion", "heldout_acc": "held-out accuracy",
                          "thresholds": "threshold per fold"}, {"auroc", "heldout_acc"}),
            "<h3>The verdict</h3>",
            _table([{**r, "acc": _fmt(r["acc"], 2)} for r in res.tables["verdict"]],
                   {"verdict": "verdict", "organisms": "scored on", "acc": "accuracy"}, {"acc"}),
            "<h3>Organisms</h3>",
            _table(orgs, {"organism": "organism", "label": "label", "acc_base": "base acc",
                          "acc_finetuned": "fine-tuned acc", "behaviour_agrees": "behaviour shows the label",
                          "half": "half",
                          **{s.name: s.name for s in SCORES}, **{k: k[6:] for k in preds}},
                   {"acc_base", "acc_finetuned"})]


def _figures(ev: Evidence, out: Path, figs: list[Path]) -> list[str]:
    parts = ["<h2>Figures</h2>"]
    several = len(ev.seeds()) > 1

    def tag(r) -> str:  # every seed's run is drawn, so with several seeds each label names its seed
        return f"{r.tag()} seed {r.seed}" if several else r.tag()

    pcfg = ev.finetunes()
    if pcfg:
        curves = []
        for r in sorted(pcfg, key=lambda r: (r.prior, r.eta, r.c_train)):
            rows = []
            for key in ("o_pt", "o_ft"):
                op = r.cfg["task"][key]
                rows += [{"step": m["step"], "operand_key": key, "c_test": m["c_test"], "acc": m["acc"]}
                         for m in r.side["metrics"] if m["family"] == r.family and m["operand"] == op]
            curves.append({"label": tag(r), "rows": rows})
        p = figures.plot_ft_grid(curves, out / "fig5-6_finetuning.png", "fine-tuning: O_FT (top) and O_PT (bottom)")
        figs.append(p)
        parts.append(_img(p, "Figs. 5–6 analog: accuracy on O_FT and O_PT against fine-tuning iterations"))
    for r in ev.runs:
        name = r.run_dir.name
        res = r.results.get("prune")
        if res is not None:
            p = figures.plot_prune(res.rows, res.tables.get("histogram", []), out / f"fig7_prune_{name}.png",
                                   f"pruning: {tag(r)}")
            figs.append(p)
            parts.append(_img(p, f"Fig. 7 analog: accuracy after pruning the top-K neurons — {tag(r)}"))
        res = r.results.get("probe")
        if res is not None:
            p = figures.plot_probe(res.rows, out / f"fig8_probe_{name}.png", f"probes: {tag(r)}")
            figs.append(p)
            parts.append(_img(p, f"Fig. 8 analog: linear probe accuracy per block — {tag(r)}"))
        res = r.results.get("revival")
        if res is not None:
            p = figures.plot_revival(res.rows, res.meta.get("target", 0.0), out / f"fig9_revival_{name}.png",
                                     f"revival: {tag(r)}")
            figs.append(p)
            parts.append(_img(p, f"Fig. 9 analog: reverse fine-tuning against Scr.+FT — {tag(r)}"))
    sig_rows = []
    for r in ev.finetunes(tracr=True):
        res = r.results.get("attention_signature")
        if res is not None and res.rows:
            label = f"{r.cfg['task']['program'][:7]} η{r.eta} c{r.c_train:g}" + (f" s{r.seed}" if several else "")
            sig_rows.append({"label": label, **res.rows[0]})
    if sig_rows:
        p = figures.plot_tracr_signatures(sig_rows, out / "fig10_tracr_attention.png", "Tracr attention after FT")
        figs.append(p)
        parts.append(_img(p, "Fig. 10 analog: where the fine-tuned Tracr programs attend"))
    if len(parts) == 1:
        parts.append("<p class=muted>no fine-tuned runs or analyses to draw</p>")
    return parts


def _tables(ev: Evidence) -> list[str]:
    from wrapperlab.analysis.evaluate import grid_row, paper_tables, sort_grid

    parts = []
    paper = paper_tables()
    grid = sort_grid([g for r in ev.finetunes() if (g := grid_row(r.side, r.run_dir, paper)) is not None])
    if grid:
        rows = []
        for g in grid:
            p = g["paper"] or {}
            row = {"eta": g["eta"], "prior": g["prior"], "c": g["c_train"], "fs": g["follows_spurious_c0"]}
            for key in ("o_pt", "o_ft"):
                for cell in ("c0@10K", "c1@10K"):
                    row[f"{key}{cell}"] = g[key][cell]
                    pv = (p.get(key) or {}).get(cell) if isinstance(p.get(key), dict) else None
                    row[f"p_{key}{cell}"] = pv
            rows.append(row)
        cols = {"eta": "η", "prior": "prior", "c": "C_Tr"}
        for key, name in (("o_pt", "O_PT"), ("o_ft", "O_FT")):
            for cell, ct in (("c0@10K", "0"), ("c1@10K", "1")):
                cols[f"{key}{cell}"] = f"{name} C_Te={ct} (ours)"
                cols[f"p_{key}{cell}"] = "paper"
        cols["fs"] = "C_Te=0 answers = count(a)+1"
        parts += ["<h2>Table 5 analog (counting, final step; paper: 200K pretraining, 10K FT)</h2>",
                  _table(rows, cols, set(cols) - {"eta", "prior"})]
    tr = ev.finetunes(tracr=True)
    if tr:
        from wrapperlab.experiments.tracr_table import cell_rows
        from wrapperlab.training.config import validate

        rows = []
        for r in tr:
            rows += cell_rows(validate(r.cfg), r.side, r.run_dir)
        parts += ["<h2>Table 3 analog (Tracr fine-tuning, accuracy %)</h2>",
                  _table(rows, {"program": "program", "lr_name": "η", "c_train": "C_Tr", "c_test": "C_Te",
                                "acc_opt": "O_PT (ours)", "paper_opt": "O_PT (paper)", "acc_oft": "O_FT (ours)",
                                "paper_oft": "O_FT (paper)", "follows_spurious": "follows r(x,O_PT)+q"},
                         {"c_train", "c_test", "acc_opt", "paper_opt", "acc_oft", "paper_oft", "follows_spurious"})]
    return parts
