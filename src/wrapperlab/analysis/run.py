"""``Run.load(path)``: any run directory (PCFG, Tracr, story) opened with its config, task, model, metrics and
lineage, the object a notebook starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wrapperlab.analysis.common import lineage
from wrapperlab.analysis.evaluate import load_run


@dataclass
class Run:
    path: Path
    config: object  # the validated RunConfig
    sidecar: dict
    task: object  # the run's task (a story run's carries its tokenizer)
    model: object  # the model at the run's latest checkpoint, in eval mode

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Run:
        """Open a run directory; the checkpoint is verified against its checksum and never unpickled."""
        cfg, task, model, side = load_run(path, device)
        return cls(Path(path), cfg, side, task, model)

    @property
    def run_id(self) -> str:
        return self.sidecar["run_id"]

    @property
    def stage(self) -> str:
        return self.sidecar["stage"]

    @property
    def status(self) -> str:
        return self.sidecar.get("status", "")

    @property
    def metrics(self) -> list[dict]:
        """Every evaluation the run recorded (one row per evaluation set and step)."""
        return list(self.sidecar.get("metrics", []))

    def lineage(self) -> list[Path]:
        """This run and its ancestors' directories, newest first (pretrain last)."""
        return [p for p, _ in lineage(self.path)]

    def parent(self, device: str = "cpu") -> Run | None:
        chain = self.lineage()
        return Run.load(chain[1], device) if len(chain) > 1 else None

    def export_hf(self, out: str | Path) -> Path:
        """Write the model as a Hugging Face checkpoint directory that ``transformers`` loads without wrapperlab
        (``gpt`` as GPT-2, ``llama`` as Llama), with the run's tokenizer: a PCFG run's vocabulary as a word-level
        ``tokenizer.json``, a story run's SentencePiece model as ``tokenizer.model``. ``config.json`` also records
        the run it came from under ``wrapperlab``."""
        from wrapperlab.models.hf_export import word_level_tokenizer, write_hf

        files: dict[str, str | bytes] = {}
        tokens = getattr(getattr(self.task, "vocab", None), "tokens", None)
        if isinstance(tokens, tuple):
            from wrapperlab.tasks.vocab import PAD, SOS

            files = word_level_tokenizer(tokens, pad=PAD, bos=SOS, eos=SOS, max_length=self.task.seq_len)
        elif (self.path / "tokenizer.model").is_file():
            import json

            tok = self.task.tokenizer
            files = {"tokenizer.model": (self.path / "tokenizer.model").read_bytes(),
                     "tokenizer_config.json": json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                          "add_eos_token": False, "bos_token_id": tok.bos_id,
                                                          "eos_token_id": tok.eos_id})}
        prov = {"wrapperlab": {"run_id": self.run_id, "stage": self.stage, "family": self.config.model.family,
                               "task": self.config.task.kind}}
        return write_hf(self.model, out, files, prov)

    def export_peft(self, out: str | Path) -> tuple[Path, Path]:
        """A ``train.method=lora`` run as ``OUT/base`` (its parent, exported as by :meth:`export_hf`) and
        ``OUT/adapter`` (a PEFT LoRA adapter on the Hugging Face names, whose config names that base)."""
        from wrapperlab.models.hf_export import ExportError, check_out, write_peft_adapter
        from wrapperlab.training import checkpoint as ck

        t = self.config.train
        if t.method != "lora":
            raise ExportError(f"{self.path}: not a LoRA run (train.method={t.method}); export it with --format hf")
        parent = self.parent()
        if parent is None:
            raise ExportError(f"{self.path}: a LoRA run without a parent run has no base to export")
        out = check_out(out)
        lora = ck.split_prefix(ck.load_tensors(self.path, self.sidecar)[1], "lora")
        factors = {k[: -len(".lora_A")]: (v, lora[k[: -len(".lora_A")] + ".lora_B"])
                   for k, v in lora.items() if k.endswith(".lora_A")}
        from wrapperlab.models.registry import family_of

        if family_of(self.model).lora_to_hf is None:
            raise ExportError(f"the {self.config.model.family} family has no Hugging Face equivalent to export an "
                              f"adapter for")
        base = parent.export_hf(out / "base")
        try:
            adapter = write_peft_adapter(self.model, factors, t.lora_rank, t.lora_alpha or t.lora_rank, base,
                                         out / "adapter")
        except BaseException:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
            raise
        return base, adapter

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.stage}, {self.status}, task={self.config.task.kind}, " \
               f"model={self.config.model.family})"
