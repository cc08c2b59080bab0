"""``wrapperlab export RUN --format hf``: the directory loads in ``transformers`` in a process that never imports
wrapperlab and gives the run's logits (fp32, within 1e-5) on random sequences; its tokenizer gives the run's ids.
The expected logits are wrapperlab's own forward pass of the run; the comparison is against an independent
implementation (transformers' GPT-2 and Llama)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, need_module, one_line_error, wl

need_module("transformers")

HF_SIDE = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, tokens_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(d).eval()
with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(np.load(tokens_path))).logits
np.save(out_path, logits.float().numpy())
tok = AutoTokenizer.from_pretrained(d)
ids = tok(sys.argv[4], add_special_tokens=False)["input_ids"]
assert "wrapperlab" not in sys.modules
print(json.dumps({"ids": ids, "class": type(model).__name__, "tied": model.lm_head.weight.data_ptr()
                  == model.get_input_embeddings().weight.data_ptr()}))
"""


def _train(tmp_path, name: str, *extra: str, shape=TINY):
    run = tmp_path / name
    r = wl("pretrain", "--preset", "cpu", *shape, "steps=6", "eval.every=6", "lr=3e-3", "--no-progress", *extra,
           "--out", str(run))
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.parametrize("family,extra,arch", [
    ("gpt", ["model.n_layer=2"], "GPT2LMHeadModel"),
    ("llama", ["model.family=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_heads=2"],
     "LlamaForCausalLM"),
])
def test_exported_checkpoint_gives_the_runs_logits_without_wrapperlab(tmp_path, family, extra, arch):
    from wrapperlab import Run

    run = _train(tmp_path, family, *extra)
    out = tmp_path / f"{family}-hf"
    r = wl("export", str(run), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    native = Run.load(run)
    seq = native.task.seq_len
    tokens = torch.randint(0, len(native.task.vocab), (64, seq), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    text = "$ ( a b c a = 3"
    p = subprocess.run([sys.executable, "-c", HF_SIDE, str(out), str(tmp_path / "tokens.npy"),
                        str(tmp_path / "hf.npy"), text], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["class"] == arch and info["tied"] == (family == "llama")
    with torch.no_grad():
        ours = native.model(tokens).float().numpy()
    theirs = np.load(tmp_path / "hf.npy")
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 1e-5, np.abs(theirs - ours).max()
    assert info["ids"] == [native.task.vocab.id(t) for t in text.split()]
    assert json.loads((out / "config.json").read_text())["wrapperlab"]["run_id"] == native.run_id


def test_export_refuses_families_without_an_equivalent_and_never_overwrites(tmp_path):
    lstm = _train(tmp_path, "lstm", "model.family=lstm", shape=[t for t in TINY if "n_head" not in t])
    one_line_error(wl("export", str(lstm), "--out", str(tmp_path / "x")), "lstm family has no Hugging Face")
    assert not (tmp_path / "x").exists()
    gpt = _train(tmp_path, "gpt")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    one_line_error(wl("export", str(gpt), "--out", str(taken)), "already exists")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    one_line_error(wl("export", str(gpt), "--format", "onnx", "--out", str(tmp_path / "y")), "--format", "hf")
    one_line_error(wl("export", str(tmp_path / "nope"), "--out", str(tmp_path / "z")), "nope")
    assert not list(tmp_path.glob(".*export*"))  # no temporary directory left behind


PEFT_SIDE = r"""
import sys
import numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
d, tokens_path, out_path = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(d + "/base")
model = PeftModel.from_pretrained(base, d + "/adapter").eval()
with torch.no_grad():
    np.save(out_path, model(input_ids=torch.from_numpy(np.load(tokens_path))).logits.float().numpy())
assert "wrapperlab" not in sys.modules
"""


@pytest.mark.parametrize("family,extra", [
    ("gpt", ["model.n_layer=2"]),
    ("llama", ["model.family=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_heads=2"]),
])
def test_a_lora_run_exports_as_base_plus_a_peft_adapter_that_peft_loads_alone(tmp_path, family, extra):
    from wrapperlab import Run

    need_module("peft")
    pt = _train(tmp_path, family, *extra)
    ft = tmp_path / "lora"
    targets = "[attn.qkv,mlp.proj]" if family == "gpt" else "[attn.wq,attn.wk,mlp.w2]"
    r = wl("finetune", "--preset", "cpu", f"parent={pt}", "steps=6", "eval.every=6", "lr=1e-2", "eval.n=40",
           "threads=1", "train.method=lora", "train.lora_rank=3", f"train.lora_targets={targets}", "--no-progress",
           "--out", str(ft))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "peft"
    r = wl("export", str(ft), "--format", "peft", "--out", str(out))
    assert r.returncode == 0, r.stderr
    native = Run.load(ft)
    tokens = torch.randint(0, len(native.task.vocab), (16, native.task.seq_len),
                           generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    p = subprocess.run([sys.executable, "-c", PEFT_SIDE, str(out), str(tmp_path / "tokens.npy"),
                        str(tmp_path / "peft.npy")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        ours = native.model(tokens).float().numpy()
    assert np.abs(np.load(tmp_path / "peft.npy") - ours).max() < 1e-5
    one_line_error(wl("export", str(pt), "--format", "peft", "--out", str(tmp_path / "z")), "not a LoRA run")
