"""``wrapperlab export``: a run as a standard checkpoint another library loads without wrapperlab."""

from __future__ import annotations

from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, user_errors

FORMATS = ("hf", "peft")


def export(run: Path = typer.Argument(..., help="run directory (a gpt or llama run)"),
           format: str = typer.Option("hf", "--format", help="hf: a Hugging Face transformers directory "
                                      "(config.json, model.safetensors, tokenizer); gpt runs become GPT-2 "
                                      "(untied head, exact GELU), llama runs Llama; peft: a train.method=lora "
                                      "run as OUT/base (its parent, as hf) and OUT/adapter (a PEFT LoRA adapter)"),
           out: Path = typer.Option(..., "--out", help="new (or empty) directory to write")) -> None:
    """Export a run's model. The directory loads with AutoModelForCausalLM.from_pretrained(DIR) and gives the
    run's logits; weights are written as stored (nothing folded), so two exported checkpoints differ exactly where
    the runs do. Families with no Hugging Face equivalent (tracr, lstm) are refused."""
    from wrapperlab.analysis.run import Run
    from wrapperlab.models.hf_export import ExportError

    if format not in FORMATS:
        _fail(f"--format: unknown format {format!r}; choose from {', '.join(FORMATS)}")
    with user_errors():
        r = Run.load(run)
        try:
            paths = [r.export_hf(out)] if format == "hf" else list(r.export_peft(out))
        except ExportError as e:
            _fail(str(e))
    import json

    arch = json.loads((paths[0] / "config.json").read_text())["architectures"][0]
    typer.echo(f"wrote {', '.join(map(str, paths))} ({r.config.model.family} run {r.run_id}; {arch})")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
