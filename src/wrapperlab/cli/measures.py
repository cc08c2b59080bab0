"""``wrapperlab analyze weights | patching | direction --base B --finetuned F --capability C.jsonl``: the measures
of a model pair that need no training, dispatched through the analysis registry's pair form."""

from __future__ import annotations

from pathlib import Path

import typer

from wrapperlab.cli.analyze import BASE_OPT, CAP_OPT, JSON_OPT, _emit_pair, analyze_app
from wrapperlab.cli.common import _fail, out, print_rows, user_errors

SET_OPT = typer.Option(None, "--set", help="setting=value (repeatable; see --help of the measure for names)")
PAIR_OUT = typer.Option(None, "--out", help="directory for the result JSON (default: print only)")
FT_REQ = typer.Option(..., "--finetuned", help="fine-tuned model: a run, an HF directory or BASE+ADAPTER",
                      show_default=False)


def _settings(name: str, items: list[str] | None) -> dict:
    from wrapperlab.analysis.registry import get_analysis

    names = get_analysis(name).make_settings(pair=True).model_fields
    values = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or key not in names:
            _fail(f"--set: expected NAME=VALUE with NAME in {', '.join(names)}, got {item!r}")
        values[key] = val
    return values


def _measure(name: str, base: Path | None, finetuned: Path, capability: Path | None, sets: list[str] | None,
             out_dir: Path | None, as_json: bool, columns: dict, title: str, summary: dict) -> None:
    from wrapperlab.analysis.capability import Pair
    from wrapperlab.analysis.registry import analyze_pair

    if base is None:
        _fail(f"--base: {name} compares two models; give --base, --finetuned and --capability")
    if capability is None:
        _fail(f"--capability: {name} reads a capability file (JSONL of prompt/answer records)")
    values = _settings(name, sets)
    with user_errors():
        res = analyze_pair(name, Pair.open(base, finetuned, capability), settings=values)
    res.meta |= {"base": str(base), "finetuned": str(finetuned)}

    def table() -> None:
        print_rows(res.rows, columns, f"{title}: {finetuned} against {base}")
        s = res.tables["summary"][0]
        out.print("; ".join(f"{label} {_fmt(s[k])}" for k, label in summary.items()), highlight=False)

    _emit_pair(res, out_dir, as_json, table)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "—" if v is None else str(v)


@analyze_app.command("weights")
def weights_cmd(base: Path | None = BASE_OPT, finetuned: Path = FT_REQ, capability: Path | None = CAP_OPT,
                sets: list[str] | None = SET_OPT, out_dir: Path | None = PAIR_OUT, as_json: bool = JSON_OPT) -> None:
    """Structure of the weight change ΔW = fine-tuned − base, per matrix: relative size, effective rank, the rank
    holding 90 % of ‖ΔW‖² (--set energy=…), the share in the top-k rows and columns (--set top_k=…) against an even
    spread, and each block's share. The capability file is read only to check the pair shares a tokenizer."""
    _measure("weight_diff", base, finetuned, capability, sets, out_dir, as_json,
             {"param": "matrix", "rel_change": "‖ΔW‖/‖W‖", "effective_rank": "eff. rank", "energy_rank": "rank 90 %",
              "top_rows_share": "top rows", "even_rows_share": "even", "top_cols_share": "top cols"},
             "ΔW structure", {"rel_change": "whole model ‖ΔW‖/‖W‖", "top_block": "top block",
                              "top_block_share": "its share", "effective_rank": "mean effective rank"})


@analyze_app.command("patching")
def patching_cmd(base: Path | None = BASE_OPT, finetuned: Path = FT_REQ, capability: Path | None = CAP_OPT,
                 sets: list[str] | None = SET_OPT, out_dir: Path | None = PAIR_OUT, as_json: bool = JSON_OPT) -> None:
    """Cross-model activation patching: the fine-tuned model with one block's write to the residual stream taken
    from the base model (--set mode=resid: the whole residual stream after the block), block by block, scored by
    behaviour on the capability. restored = (patched − fine-tuned) / (base − fine-tuned) accuracy."""
    _measure("patching", base, finetuned, capability, sets, out_dir, as_json,
             {"block": "block", "acc": "patched acc", "loss": "answer loss", "restored": "restored"},
             "patching", {"acc_base": "base acc", "acc_finetuned": "fine-tuned acc", "best_block": "best block",
                          "best_restored": "restored"})


@analyze_app.command("direction")
def direction_cmd(base: Path | None = BASE_OPT, finetuned: Path = FT_REQ, capability: Path | None = CAP_OPT,
                  sets: list[str] | None = SET_OPT, out_dir: Path | None = PAIR_OUT, as_json: bool = JSON_OPT) -> None:
    """Difference-in-means direction ablation: at each residual boundary, the mean fine-tuned − base residual at
    the last prompt token (on 75 % of the records) is removed from the fine-tuned model at every boundary
    (--set mode=subtract: subtracted at its own boundary), and the other 25 % are scored."""
    _measure("direction", base, finetuned, capability, sets, out_dir, as_json,
             {"boundary": "boundary", "norm": "‖d‖", "acc": "ablated acc", "restored": "restored"},
             "direction ablation", {"acc_base": "base acc", "acc_finetuned": "fine-tuned acc",
                                    "best_boundary": "best boundary", "best_restored": "restored"})
