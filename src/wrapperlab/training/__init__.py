"""Training: one configured loop for every stage, schedules, checkpoints, evaluation during training."""

from wrapperlab.training.config import ConfigError, RunConfig, build_config
from wrapperlab.training.stage import Stage, resolve

__all__ = ["ConfigError", "RunConfig", "Stage", "build_config", "resolve"]
