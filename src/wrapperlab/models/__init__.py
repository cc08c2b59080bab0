"""Models: the minGPT-style decoder with TransformerLens-style hook points."""

from wrapperlab.models.transformer import HookPoint, ModelConfig, Transformer

__all__ = ["HookPoint", "ModelConfig", "Transformer"]
