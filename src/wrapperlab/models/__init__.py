"""Models: the model families (gpt, llama, tracr, lstm, or yours) behind one registry, each exposing its residual
stream, attention pattern and prunable matrices under TransformerLens hook names."""

from wrapperlab.models.registry import (
    ComponentError,
    Components,
    Matrix,
    ModelFamily,
    components,
    families,
    get_family,
    register,
    require,
)
from wrapperlab.models.transformer import HookPoint, ModelConfig, Transformer

__all__ = ["ComponentError", "Components", "HookPoint", "Matrix", "ModelConfig", "ModelFamily", "Transformer",
           "components", "families", "get_family", "register", "require"]
