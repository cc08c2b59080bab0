"""A model family from another installed package: registered through the ``wrapperlab.model_families`` entry point,
it trains through the ordinary stages and the analyses reach it through its components, with no change to
wrapperlab. The plugin here is a GRU language model written the way a user would write one (docs/extending.md)."""

import json
import textwrap

from conftest import one_line_error, wl

PLUGIN = '''
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from wrapperlab.models.registry import Components, Matrix, ModelFamily, register, residual_hooks
from wrapperlab.models.transformer import HookedModel, HookPoint


class GRUConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: Literal["gru"] = "gru"
    vocab_size: int = 0
    seq_len: int = 0
    d_model: int = 32
    n_layer: int = 1


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gru = nn.GRU(d, d, batch_first=True)
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_resid_pre(x)
        return self.hook_resid_post(x + self.gru(x)[0])


class GRUModel(HookedModel, nn.Module):
    family = "gru"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self._collect_hook_points()

    def forward(self, tokens, positions=None):
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x if positions is None else x[:, positions])


def components(m):
    mats = [Matrix(f"blocks.{i}.gru.weight_ih_l0", i, "gru.ih", f"blocks.{i}.gru.bias_ih_l0")
            for i in range(m.cfg.n_layer)]
    return Components("gru", m.cfg.n_layer, True, residual_hooks(m.cfg.n_layer), None, mats, ("gru.ih",))


register(ModelFamily("gru", GRUConfig,
                     lambda c, v, s: GRUModel(c.model_copy(update={"vocab_size": v, "seq_len": s})), components))
'''


def _install(root, module_body: str, group: str = "wrapperlab.model_families") -> dict:
    (root / "wl_gru.py").write_text(textwrap.dedent(module_body))
    dist = root / "wl_gru-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wl-gru\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\ngru = wl_gru\n")
    return {"PYTHONPATH": str(root)}


def test_a_family_from_another_package_trains_and_is_analysed(tmp_path):
    env = _install(tmp_path, PLUGIN)
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    common = ["task.window=32", "batch_size=8", "eval.n=40", "threads=1", "--no-progress"]
    r = wl("pretrain", "--preset", "cpu", "model.family=gru", "family=count", "steps=10", "eval.every=10",
           *common, "--out", str(pt), env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((pt / "checkpoint.json").read_text())["config"]["model"]["family"] == "gru"
    r = wl("finetune", "--preset", "cpu", f"parent={pt}", "steps=4", "eval.every=4", *common[1:], "--out",
           str(ft), env=env)
    assert r.returncode == 0, r.stderr
    r = wl("analyze", "prune", str(ft), "--k-max", "1", "--n-grad", "16", "--n-eval", "40", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert {u["matrix"] for u in json.loads(r.stdout)["tables"]["units"]} == {"gru.ih"}
    one_line_error(wl("analyze", "attention", str(ft), env=env), "gru has no attention pattern")


def test_without_the_plugin_the_family_is_unknown_and_a_broken_plugin_is_named(tmp_path):
    one_line_error(wl("pretrain", "--preset", "cpu", "model.family=gru", "--out", str(tmp_path / "x")),
                   "unknown model family 'gru'")
    env = _install(tmp_path, "raise RuntimeError('broken on purpose')\n")
    one_line_error(wl("pretrain", "--preset", "cpu", "--out", str(tmp_path / "y"), env=env),
                   "plugin 'gru'", "wl_gru", "broken on purpose")
    assert not (tmp_path / "y").exists()
