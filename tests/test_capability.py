"""Capability files and the verdict on any (base, fine-tuned) pair: records read with one-line errors, behaviour,
loss and features checked against the model's plain forward pass record by record, and the same verdict, probes
and pruned units on a pair of runs and on the same pair exported to Hugging Face."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import need_module, one_line_error, wl

from wrapperlab.analysis.capability import (
    Capability,
    CapabilityError,
    Record,
    WordTokenizer,
    answer_loss,
    correct,
    features,
    read_records,
)


def _model(vocab=12, seq=16):
    from wrapperlab.models.registry import get_family

    torch.manual_seed(0)
    fam = get_family("gpt")
    return fam.build(fam.config(d_model=16, n_layer=2, n_head=2), vocab, seq).eval()


TOKENS = tuple("abcdefghijkl")


def _cap(records):
    return Capability.build(records, WordTokenizer(TOKENS), len(TOKENS), 16, "t")


def test_records_and_tokens_fail_with_the_line_that_is_wrong(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "a b", "answer": "c"}\n\n{"prompt": "a", "answer": 3}\n')
    with pytest.raises(CapabilityError, match="line 3 needs string fields"):
        read_records(p)
    p.write_text('{"prompt": "a b", "answer": "c"}\nnot json\n')
    with pytest.raises(CapabilityError, match="line 2 is not valid JSON"):
        read_records(p)
    p.write_text("")
    with pytest.raises(CapabilityError, match="no records"):
        read_records(p)
    with pytest.raises(CapabilityError, match="line 7: token 'z' is not in the model's vocabulary"):
        _cap([Record("a z", "b", line=7)])
    with pytest.raises(CapabilityError, match="line 2: token id 11 is beyond the model's vocabulary"):
        Capability.build([Record("a l", "b", line=2)], WordTokenizer(TOKENS), 11, None, "t")
    # the model reads every token but the last: 16 prompt tokens + 1 answer fit a 16-token context, 17 + 1 do not
    assert len(Capability.build([Record(" ".join("a" * 16), "b", line=1)], WordTokenizer(TOKENS), 12, 16, "t")) == 1
    with pytest.raises(CapabilityError, match="the model would read 17, beyond its context"):
        Capability.build([Record(" ".join("a" * 17), "b", line=1)], WordTokenizer(TOKENS), 12, 16, "t")


def test_behaviour_loss_and_features_match_the_plain_forward_pass():
    """Expected values come from calling the model on each record alone, one greedy step at a time."""
    model = _model()
    rng = np.random.default_rng(0)
    records = []
    for i in range(30):  # prompts of three lengths, answers of one or two tokens
        prompt = [TOKENS[j] for j in rng.integers(0, 12, 3 + i % 3)]
        x = torch.tensor([[TOKENS.index(t) for t in prompt]])
        with torch.no_grad():
            first = int(model(x)[0, -1].argmax())
            second = int(model(torch.cat([x, torch.tensor([[first]])], 1))[0, -1].argmax())
        ans = [first, second][: 1 + i % 2]
        if i % 4 == 0:  # a wrong answer: its first token differs from the greedy one
            ans[0] = (ans[0] + 1) % 12
        records.append(Record(" ".join(prompt), " ".join(TOKENS[a] for a in ans), line=i + 1))
    cap = _cap(records)
    assert correct(model, cap).tolist() == [i % 4 != 0 for i in range(30)]
    idx = np.arange(30)
    with torch.no_grad():
        expect = []
        for p, a in zip(cap.prompts, cap.answers):
            seq = torch.tensor([p + a])
            logits = model(seq[:, :-1])[0, len(p) - 1:]
            expect.append(F.cross_entropy(logits, seq[0, len(p):], reduction="sum"))
        n_tokens = sum(len(a) for a in cap.answers)
        torch.testing.assert_close(answer_loss(model, cap, idx), torch.stack(expect).sum() / n_tokens)
        feats = features(model, cap, idx[::-1].copy())
    # batch by batch with backward=True: the same value and the gradient of the mean
    whole = answer_loss(model, cap, idx)
    whole.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    parts = answer_loss(model, cap, idx, batch_size=4, backward=True)
    torch.testing.assert_close(parts, whole.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])
    with torch.no_grad():
        for k, i in enumerate(idx[::-1]):
            _, cache = model.run_with_cache(torch.tensor([cap.prompts[i]]))
            torch.testing.assert_close(feats[2, k], cache["blocks.1.hook_resid_post"][0, -1])


def test_pair_verdict_on_runs_and_on_their_hf_export_agree(tmp_path):
    """The round trip that proves the adapter: the same pair, native and exported, gives the same verdict, the same
    probe accuracies for both models, the same top pruned units under their GPT-2 names and the same relearning
    curves (the fine-tuned model and a control pretrained without operand a, each relearning the records)."""
    need_module("transformers")
    shape = ["task.window=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "batch_size=16", "eval.n=40",
             "threads=1", "--no-progress"]
    pt, ft, cap = tmp_path / "pt", tmp_path / "ft", tmp_path / "cap.jsonl"
    assert wl("pretrain", "--preset", "cpu", *shape, "family=count", "steps=60", "eval.every=60", "lr=3e-3",
              "--out", str(pt)).returncode == 0
    assert wl("finetune", "--preset", "cpu", f"parent={pt}", "steps=20", "eval.every=20", "c_train=1", "lr=1e-3",
              "eval.n=40", "threads=1", "--no-progress", "--out", str(ft)).returncode == 0
    ctl = tmp_path / "ctl"
    assert wl("pretrain", "--preset", "cpu", *shape, "family=count", "steps=60", "eval.every=60", "lr=3e-3",
              "prior=0,0.5,0.5", "--out", str(ctl)).returncode == 0
    r = wl("data", "sample", "--preset", "cpu", "task.window=32", "--family", "count", "--operand", "a", "--n",
           "200", "--capability-jsonl", str(cap))
    assert r.returncode == 0, r.stderr
    one_line_error(wl("data", "sample", "--preset", "cpu", "--n", "3", "--capability-jsonl", str(tmp_path)),
                   "--capability-jsonl")
    rec = json.loads(cap.read_text().splitlines()[0])
    assert rec["prompt"].split()[-1] == "=" and rec["answer"] == rec["label"]
    out = {}
    models = {"native": (pt, ft, ctl), "hf": (tmp_path / "hf-pt", tmp_path / "hf-ft", tmp_path / "hf-ctl")}
    for name, (b, f, c) in models.items():
        if name == "hf":
            for src, dst in zip(models["native"], models["hf"]):
                assert wl("export", str(src), "--out", str(dst)).returncode == 0
        r = wl("analyze", "verdict", "--base", str(b), "--finetuned", str(f), "--capability", str(cap), "--json",
               "--control", str(c), "--relearn-steps", "30", "--relearn-lr", "1e-3", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        out[name] = json.loads(r.stdout)
    nat, hf = out["native"], out["hf"]
    assert nat["meta"]["verdict"] == hf["meta"]["verdict"]
    assert nat["rows"][0]["value"] == hf["rows"][0]["value"]  # behaviour drop
    acc = {n: {(r["model"], r["layer"]): r["acc"] for r in o["evidence"]["probe"]["rows"]} for n, o in out.items()}
    for key, a in acc["native"].items():
        if key[0] != "random-init":  # the control is a fresh init of each architecture's own scheme
            assert abs(a - acc["hf"][key]) <= 0.005, key
    names = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    top = {n: [(u["block"], u["matrix"], u["index"]) for u in o["evidence"]["prune"]["tables"]["units"][:10]]
           for n, o in out.items()}
    assert [(b, names[m], i) for b, m, i in top["native"]] == top["hf"]
    assert [r["acc"] for r in nat["evidence"]["prune"]["rows"]] == [r["acc"] for r in hf["evidence"]["prune"]["rows"]]
    curves = {n: o["evidence"]["revival"]["rows"] for n, o in out.items()}
    assert [(r["curve"], r["step"], r["acc"]) for r in curves["native"]] == \
        [(r["curve"], r["step"], r["acc"]) for r in curves["hf"]]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(curves["native"], curves["hf"])) < 1e-4
    steps = {n: [(s["curve"], s["steps_to_target"]) for s in o["evidence"]["revival"]["tables"]["summary"]]
             for n, o in out.items()}
    assert steps["native"] == steps["hf"] and [c for c, _ in steps["native"]] == ["reft", "scr+ft"]
    assert [r["passed"] for r in nat["rows"] if r["evidence"] == "revival"] == \
        [r["passed"] for r in hf["rows"] if r["evidence"] == "revival"] != [None]
    assert (tmp_path / "native" / "revival.json").is_file() and len(list((tmp_path / "hf" / "relearn").iterdir())) == 2


def test_pair_bad_input_is_one_line(tmp_path):
    shape = ["task.window=32", "model.d_model=16", "model.n_layer=1", "model.n_head=2", "batch_size=8", "eval.n=20",
             "threads=1", "--no-progress", "steps=2", "eval.every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert wl("pretrain", "--preset", "cpu", *shape, "--out", str(a)).returncode == 0
    assert wl("pretrain", "--preset", "cpu", *shape, "model.n_layer=2", "--out", str(b)).returncode == 0
    cap = tmp_path / "cap.jsonl"
    cap.write_text('{"prompt": "$ ( a", "answer": "3"}\n{"prompt": "$ (", "answer": "4"\n')
    one_line_error(wl("analyze", "verdict", "--base", str(a), "--finetuned", str(a), "--capability", str(cap)),
                   "line 2 is not valid JSON")
    cap.write_text('{"prompt": "$ ( a", "answer": "3"}\n')
    one_line_error(wl("analyze", "verdict", "--base", str(a), "--finetuned", str(b), "--capability", str(cap)),
                   "different shapes")
    one_line_error(wl("analyze", "verdict", "--base", "gpt2", "--finetuned", str(a), "--capability", str(cap)),
                   "local Hugging Face directories only")
    one_line_error(wl("analyze", "verdict", "--base", str(a), "--capability", str(cap)), "all of them")
    cap.write_text('{"prompt": "$ ( a", "answer": "Paris"}\n')
    one_line_error(wl("analyze", "verdict", "--base", str(a), "--finetuned", str(a), "--capability", str(cap)),
                   "line 1: token 'Paris'")
    one_line_error(wl("analyze", "probe", str(a), "--finetuned", str(a)), "give a RUN, or --base")
    cap.write_text('{"prompt": "$ ( a", "answer": "3"}\n' * 8)
    r = wl("analyze", "prune", "--finetuned", str(a), "--capability", str(cap), "--k-max", "2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["k"] for row in json.loads(r.stdout)["rows"]] == [0, 1, 2]
    one_line_error(wl("analyze", "prune", "--finetuned", str(a), "--capability", str(cap), "--n-grad", "5"),
                   "--n-grad: not used with --finetuned")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "$ ( a", "answer": "3"}\n{"prompt": 3}\n')
    one_line_error(wl("analyze", "revival", "--base", str(a), "--finetuned", str(a), "--capability", str(cap),
                      "--relearn-data", str(bad)), "line 2 needs string fields")
    one_line_error(wl("analyze", "revival", "--base", str(a), "--finetuned", str(a), "--capability", str(cap),
                      "--baselines", "scr"), "the baseline is --control")
    one_line_error(wl("analyze", "revival", str(a), "--control", str(b)), "--control: used with --base")
    one_line_error(wl("analyze", "verdict", str(a), "--relearn-steps", "5"), "--relearn-steps: used with --base")
    one_line_error(wl("analyze", "probe", str(a), "--control", str(b)), "--control: used with --base")
    one_line_error(wl("analyze", "verdict", "--base", str(a), "--finetuned", str(a), "--capability", str(cap),
                      "--no-revival", "--relearn-lr", "1e-3"), "--relearn-lr: relearning is off")
    one_line_error(wl("analyze", "revival", "--base", str(a), "--finetuned", str(a), "--capability", str(cap),
                      "--steps", "0"), "steps")
    one_line_error(wl("analyze", "revival", "--base", str(a), "--finetuned", str(a), "--capability", str(cap),
                      "--lr", "S"), "--lr: a pair's relearning LR is a number")
    bad.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cap.jsonl"]  # nothing written without --out
