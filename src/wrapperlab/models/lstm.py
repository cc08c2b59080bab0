"""A stacked LSTM language model with the hook API of the transformers: ``model.family=lstm``.

embedding → L LSTM layers → final LayerNorm → head. Each layer reads a LayerNorm of the stream and adds its output
back (``x + lstm(ln(x))``), so the stream between layers plays the role of the transformers' residual stream and
the probes, pruning and patching read the same hook names: ``hook_embed``, ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.hook_lstm_out`` (the layer's output before the addition), ``blocks.{l}.hook_resid_post``,
``ln_final.hook_normalized``. There is no attention pattern. Prunable units are the rows of the input-to-gates and
hidden-to-gates matrices (``lstm.ih``, ``lstm.hh``: one gate of one hidden unit each, with its bias entry).
PyTorch's LSTM initialisation is kept; embeddings and head are N(0, 0.02) as in the GPT family.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wrapperlab.models.registry import Components, Matrix, ModelFamily, register, residual_hooks
from wrapperlab.models.transformer import HookedModel, HookPoint, _maybe


class LSTMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["lstm"] = "lstm"
    vocab_size: int = Field(0, ge=0, description="0 = taken from the task")
    d_vocab_out: int | None = Field(None, ge=1, description="output classes; default vocab_size")
    seq_len: int = Field(0, ge=0, description="longest input accepted; 0 = taken from the task")
    d_model: int = Field(96, ge=1, description="width of the embedding, the stream and every LSTM layer")
    n_layer: int = Field(2, ge=1)


class LSTMBlock(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, batch_first=True)
        self.hook_resid_pre, self.hook_lstm_out, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.hook_resid_pre, x)
        h, _ = self.lstm(self.ln(x))
        return _maybe(self.hook_resid_post, x + _maybe(self.hook_lstm_out, h))


class LNFinal(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe(self.hook_normalized, self.norm(x))


class LSTMModel(HookedModel, nn.Module):
    family = "lstm"

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.seq_len < 1:
            raise ValueError("LSTMConfig.vocab_size and seq_len must be set (>= 1) before building a model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(LSTMBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LNFinal(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.d_vocab_out or cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, 0.0, 0.02)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        self._collect_hook_points()

    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds the model's context ({self.cfg.seq_len})")
        x = _maybe(self.hook_embed, self.tok_emb(tokens))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (b, t, vocab); with ``positions`` only at those positions (as the transformers)."""
        x = self.residual(tokens)
        if positions is not None:
            x = x[:, positions]
        return self.head(self.ln_final(x))


def _components(model: LSTMModel) -> Components:
    mats = []
    for i in range(model.cfg.n_layer):
        for kind in ("ih", "hh"):
            p = f"blocks.{i}.lstm.weight_{kind}_l0"
            mats.append(Matrix(p, i, f"lstm.{kind}", f"blocks.{i}.lstm.bias_{kind}_l0"))
    return Components("lstm", model.cfg.n_layer, True, residual_hooks(model.cfg.n_layer), None, mats,
                      ("lstm.ih", "lstm.hh"))


FAMILY = register(ModelFamily(
    "lstm", LSTMConfig, lambda cfg, vocab, seq: LSTMModel(cfg.model_copy(update={"vocab_size": vocab,
                                                                                  "seq_len": seq})),
    _components, "embedding → stacked LSTM (pre-norm, residual) → head"))
