"""train.method=lora: the adapter's arithmetic against W + (alpha/r) B A written out, a LoRA run's saved model is its
parent plus exactly that change on the targets and nothing else, an interrupted LoRA run resumes bit-identically,
and full fine-tuning keeps its run ids."""

import pytest
import torch
from conftest import TINY, one_line_error, wl

from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import build_config
from wrapperlab.training.stage import Stage, resolve


def _model():
    from wrapperlab.models.registry import get_family

    torch.manual_seed(0)
    fam = get_family("gpt")
    return fam.build(fam.config(d_model=16, n_layer=1, n_head=2), 11, 8).double().eval()


def test_the_adapter_adds_scale_b_a_to_its_targets_only():
    from wrapperlab.training.lora import LoRA

    model = _model()
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    before = model(x).detach()
    lora = LoRA(model, ("mlp.fc",), rank=3, alpha=6.0).double()
    torch.testing.assert_close(model(x), before)  # B starts at zero: the parent's function
    with torch.no_grad():
        lora.B[0].normal_()
    fc = model.blocks[0].mlp.fc
    inp = torch.randn(4, 16, dtype=torch.float64)
    expect = inp @ (fc.weight + 2.0 * lora.B[0] @ lora.A[0]).T + fc.bias
    torch.testing.assert_close(fc(inp), expect)
    merged = lora.merged_state(model)
    with torch.no_grad():
        torch.testing.assert_close(merged["blocks.0.mlp.fc.weight"], fc.weight + 2.0 * lora.B[0] @ lora.A[0])
    assert torch.equal(merged["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    assert [p.requires_grad for p in model.parameters()] == [False] * len(list(model.parameters()))
    lora.remove()
    torch.testing.assert_close(fc(inp), inp @ fc.weight.T + fc.bias)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    pt = tmp_path_factory.mktemp("lora") / "pt"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=6", "eval.every=6", "--no-progress", "--out", str(pt))
    assert r.returncode == 0, r.stderr
    return pt


def _ft(parent, *extra):
    return build_config("finetune", "cpu", None, [f"parent={parent}", "steps=8", "eval.every=4", "eval.n=40",
                                                  "threads=1", "c_train=1", "lr=1e-2", *extra])


def test_a_lora_run_is_its_parent_plus_low_rank_changes_and_resumes_exactly(parent, tmp_path):
    over = ["train.method=lora", "train.lora_rank=2", "train.lora_targets=[attn.qkv,mlp.fc]"]
    cfg, side = resolve(_ft(parent, *over))
    done = Stage(cfg, side, tmp_path / "a").run(progress=False)
    assert done["status"] == "done"
    _, pt = ck.load_tensors(parent)
    _, ft = ck.load_tensors(tmp_path / "a")
    changed = {k for k in ck.split_prefix(pt, "model") if not torch.equal(pt[f"model.{k}"], ft[f"model.{k}"])}
    assert changed == {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight"}
    for k in changed:
        path = k.rsplit(".", 1)[0]
        delta = ft[f"model.{k}"] - pt[f"model.{k}"]
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 2
        a, b = ft[f"lora.{path}.lora_A"], ft[f"lora.{path}.lora_B"]
        torch.testing.assert_close(delta, (2 / 2) * b @ a, rtol=1e-5, atol=1e-7)
    # interrupted after 3 steps, then resumed: the same tensors, bit for bit
    cfg2, side2 = resolve(_ft(parent, *over))
    assert Stage(cfg2, side2, tmp_path / "b").run(progress=False, stop_after=3)["status"] == "running"
    assert Stage(cfg2, side2, tmp_path / "b").run(progress=False)["status"] == "done"
    _, resumed = ck.load_tensors(tmp_path / "b")
    assert set(resumed) == set(ft)
    for k in ft:
        if not k.startswith("rng"):
            assert torch.equal(resumed[k], ft[k]), k


def test_full_fine_tuning_keeps_its_run_id_and_bad_lora_settings_are_one_line(parent, tmp_path):
    full, _ = resolve(_ft(parent))
    explicit, _ = resolve(_ft(parent, "train.method=full", "train.lora_rank=4"))
    lora, _ = resolve(_ft(parent, "train.method=lora"))
    assert full.run_id() == explicit.run_id() != lora.run_id()
    assert "method" not in full.identity()["train"]
    one_line_error(wl("finetune", "--preset", "cpu", f"parent={parent}", "train.method=lora",
                      "train.lora_targets=[lstm.ih]", "--out", str(tmp_path / "x")), "lstm.ih", "attn.qkv")
    one_line_error(wl("pretrain", "--preset", "cpu", "train.method=lora", "--out", str(tmp_path / "y")),
                   "train.method")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
