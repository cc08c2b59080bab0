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

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.stage}, {self.status}, task={self.config.task.kind}, " \
               f"model={self.config.model.family})"
