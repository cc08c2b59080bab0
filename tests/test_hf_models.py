"""Local Hugging Face checkpoints as wrapperlab models: tiny randomly initialised GPT-2, GPT-NeoX, Llama and Qwen2
models built from configs (no downloads), loaded offline, their hooks checked against transformers' own hidden
states and attention weights, and the analyses run on them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_module, wl

transformers = need_module("transformers")

from wrapperlab.models.hf import HFLoadError, load_hf  # noqa: E402
from wrapperlab.models.registry import components  # noqa: E402
from wrapperlab.tasks.task import PCFGTask, TaskConfig  # noqa: E402

TASK = PCFGTask(TaskConfig(window=16, o2={"count": 8, "count-composition": 8, "token-value": 8,
                                         "index-of-occurrence": 2, "index-of-composition": 2}))
V, T = len(TASK.vocab), TASK.seq_len


def _configs():
    c = dict(vocab_size=V)
    return {
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=T, **c),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, max_position_embeddings=T, **c),
        "llama": transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=T, **c),
        "qwen2": transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=T,
                                          **c),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, cfg in _configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


WORDS = [f"t{i}" for i in range(V)]


def _readable(src: Path, dest: Path) -> Path:
    """A copy of the checkpoint ``src`` at ``dest`` with a word-level tokenizer (token i is "t{i}")."""
    import shutil

    from wrapperlab.models.hf_export import word_level_tokenizer

    shutil.copytree(src, dest)
    for name, text in word_level_tokenizer(WORDS).items():
        (dest / name).write_text(text)
    return dest


def _relearning(model_dir: Path, tmp_path: Path, seed: int, n: int, **train) -> dict:
    """The raw config of a capability stage that trains the checkpoint on ``n`` random records."""
    rng = np.random.default_rng(seed)
    cap = tmp_path / "cap.jsonl"
    cap.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i] for i in rng.integers(0, V, 5)),
                                       "answer": WORDS[int(rng.integers(0, V))]}) + "\n" for _ in range(n)))
    return {"stage": "reft", "model": {"family": "hf", "path": str(model_dir)},
            "task": {"kind": "capability", "path": str(cap), "tokenizer": str(model_dir), "vocab_size": V},
            "train": {"loss": "masked", "batch_size": 4, "warmup_steps": 0, "schedule": "constant", **train},
            "threads": 1}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_hooks_read_what_transformers_computes(checkpoints, arch):
    model = load_hf(checkpoints[arch])
    tokens = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True, output_attentions=True)
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, out.logits)
    comp = components(model)
    assert comp.family == "hf" and comp.n_layer == 2 and [lab for lab, _ in comp.residual] == ["B0", "B1", "B2"]
    # hidden_states[0] is the embedding output = block 0's input; the last one is after the final norm in HF
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], out.hidden_states[0])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], out.hidden_states[1])
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[-1])
    for i in range(2):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], out.attentions[i])
    assert model.hf.config._attn_implementation == "sdpa"  # eager only while a pattern is hooked


def test_editing_the_residual_stream_changes_the_output(checkpoints):
    model = load_hf(checkpoints["llama"])
    tokens = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        zeroed = model.run_with_hooks(tokens, [("blocks.1.hook_resid_post", lambda x, hook: torch.zeros_like(x))])
        expect = model.hf.lm_head(model.hf.model.norm(torch.zeros(2, 8, 32)))
    torch.testing.assert_close(zeroed, expect)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_analyses_run_on_hf_models(checkpoints, arch):
    from wrapperlab import analyze

    model = load_hf(checkpoints[arch])
    res = analyze("probe", model, task=TASK, n_train=60, n_test=30, iters=5)
    assert {r["layer"] for r in res.rows} == {"B0", "B1", "B2"}
    res = analyze("prune", model, task=TASK, ks=(0, 2), n_grad=16, n_eval=20, units_listed=5)
    units = res.tables["units"]
    comp = components(model)
    kinds = {m.name: ("row", "column")[m.axis] for m in comp.matrices}
    assert all(u["kind"] == kinds[u["matrix"]] for u in units) and len(units) == 5
    if arch == "gpt2":
        assert {u["kind"] for u in units} == {"column"}  # Conv1D weights are (in, out)
    res = analyze("attention", model, task=TASK)
    assert res.arrays["pattern"].shape[:2] == (2, 2 if arch in ("gpt2", "gpt_neox") else 4)


def test_pruning_a_column_unit_zeroes_that_output_unit():
    """GPT-2 stores (in, out): zeroing column j of mlp.c_fc and bias j silences hidden neuron j exactly."""
    from wrapperlab.analysis.pruning import Unit, zero_units

    torch.manual_seed(0)
    from wrapperlab.models.hf import HFModel

    model = HFModel(transformers.AutoModelForCausalLM.from_config(_configs()["gpt2"]).eval())
    name = "hf.transformer.h.0.mlp.c_fc"
    zero_units(model, [Unit(0, "mlp.c_fc", "column", (3,), 1.0, name + ".weight", name + ".bias")])
    tokens = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        h = model.hf.transformer.h[0]
        pre = h.mlp.c_fc(h.ln_2(cache["blocks.0.hook_resid_pre"] + h.attn(h.ln_1(cache["blocks.0.hook_resid_pre"]))[0]))
    assert torch.all(pre[..., 3] == 0) and torch.any(pre[..., 4] != 0)


def test_only_local_directories_load(tmp_path, checkpoints):
    with pytest.raises(HFLoadError, match="local Hugging Face directories only"):
        load_hf("gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFLoadError, match="no config.json"):
        load_hf(tmp_path / "empty")
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HFLoadError, match="'bert' is not supported"):
        load_hf(bad)


def _adapter(tmp_path, base_dir):
    peft = need_module("peft")
    torch.manual_seed(5)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    return pm.eval(), tmp_path / "adapter"


def test_a_lora_adapter_is_analysed_merged_and_its_delta_is_b_times_a(tmp_path, checkpoints):
    """ΔW is checked against the adapter file itself: scale · B @ A with scale = lora_alpha / r."""
    from safetensors.torch import load_file

    from wrapperlab.models.hf import adapter_delta, load_any

    pm, adapter = _adapter(tmp_path, checkpoints["llama"])
    for spec in (f"{checkpoints['llama']}+{adapter}",):
        model = load_any(spec)
        tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), pm(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
        raw = load_file(adapter / "adapter_model.safetensors")
        delta = adapter_delta(spec)
        assert len(delta) == 4  # q_proj and v_proj of 2 layers
        for i in range(2):
            for proj in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                expect = 2.0 * raw[f"{key}.lora_B.weight"] @ raw[f"{key}.lora_A.weight"]
                torch.testing.assert_close(delta[f"hf.model.layers.{i}.self_attn.{proj}.weight"], expect)
    # an adapter that names its local base opens on its own
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path":
                                                             str(checkpoints["llama"])}))
    assert adapter_delta(adapter).keys() == delta.keys()
    assert all(p.requires_grad for p in load_any(adapter).parameters())  # prunable: PEFT had frozen the base
    with pytest.raises(HFLoadError, match="not a PEFT adapter"):
        load_any(f"{checkpoints['llama']}+{tmp_path}")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_the_pair_verdict_runs_on_tiny_hf_models(tmp_path, checkpoints, arch):
    """A base, a fine-tune that moved its MLP output weights, both with a word-level tokenizer; the capability is
    the base's own greedy answers, so the base scores 100 % by construction."""
    import shutil

    from wrapperlab.models.hf_export import word_level_tokenizer

    tokens = [f"t{i}" for i in range(V)]
    base, ft = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(checkpoints[arch], base)
    for name, text in word_level_tokenizer(tokens).items():
        (base / name).write_text(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    rng = np.random.default_rng(0)
    lines = []
    with torch.no_grad():
        for _ in range(40):
            prompt = rng.integers(0, V, 6).tolist()
            ans = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
            lines.append(json.dumps({"prompt": " ".join(tokens[i] for i in prompt), "answer": tokens[ans]}))
        for n, p in model.named_parameters():
            if "mlp" in n and n.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(ft)
    for name, text in word_level_tokenizer(tokens).items():
        (ft / name).write_text(text)
    cap = tmp_path / "cap.jsonl"
    cap.write_text("\n".join(lines) + "\n")
    r = wl("analyze", "verdict", "--base", str(base), "--finetuned", str(ft), "--capability", str(cap), "--json",
           "--set", "prune_k=3", "--relearn-steps", "5")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["meta"]["acc_base"] == 1.0 and res["meta"]["verdict"] in ("wrapper", "deletion", "undetermined",
                                                                          "unchanged")
    assert {row["evidence"] for row in res["rows"]} == {"behaviour", "probe", "prune", "revival"}
    relearn = next(row for row in res["rows"] if row["evidence"] == "revival")
    assert relearn["passed"] is None and "no baseline" in relearn["measured"]  # no --control: it cannot vote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "cap.jsonl", "ft"]  # nothing written without --out
    assert {u["matrix"] for u in res["evidence"]["prune"]["tables"]["units"]} <= set(
        n for n in {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "attn.c_attn", "attn.c_proj", "mlp.c_fc",
                    "mlp.c_proj"})


def test_relearning_an_hf_model_resumes_bit_identically_with_tied_weights(tmp_path, checkpoints):
    """A relearning stage trains the checkpoint itself (GPT-2: embedding and head tied, dropout on): interrupted
    after 3 steps and resumed, it ends with the same weights as one uninterrupted run, and the tie survives."""

    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.stage import Stage, resolve

    model_dir = _readable(checkpoints["gpt2"], tmp_path / "gpt2")
    assert json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    raw = _relearning(model_dir, tmp_path, 1, 24, lr=1e-3, steps=6) | {"eval": {"every": 3}}
    cfg, _ = resolve(raw)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Stage(cfg, None, whole).run(progress=False)
    assert Stage(cfg, None, parts).run(progress=False, stop_after=3)["step"] == 3
    assert Stage(cfg, None, parts).run(progress=False)["status"] == "done"
    a, b = ck.load_tensors(whole)[1], ck.load_tensors(parts)[1]
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["model.hf.lm_head.weight"], a["model.hf.transformer.wte.weight"])
    before = load_hf(model_dir).state_dict()["hf.transformer.wte.weight"]
    assert not torch.equal(before, a["model.hf.transformer.wte.weight"])  # it did train


def test_attention_on_a_capability_record_is_what_transformers_computes(tmp_path, checkpoints):
    """`analyze attention --finetuned DIR --capability CAP`: the attention mass the last prompt token puts on each
    key token equals the sum of transformers' own eager attention weights over that token's positions."""

    from conftest import one_line_error


    tokens = [f"t{i}" for i in range(V)]
    model_dir = tmp_path / "llama"
    _readable(checkpoints["llama"], model_dir)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 6, 7).tolist() for _ in range(5)]  # few distinct tokens: repeated keys add up
    cap = tmp_path / "cap.jsonl"
    cap.write_text("".join(json.dumps({"prompt": " ".join(tokens[i] for i in p), "answer": "t9"}) + "\n"
                           for p in prompts))
    r = wl("analyze", "attention", "--finetuned", str(model_dir), "--capability", str(cap), "--index", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        att = ref(input_ids=torch.tensor([prompts[2]]), output_attentions=True).attentions
    ids = np.array(prompts[2])
    for row in rows:
        tok = int(row["key_token"][1:])
        expected = float(att[row["layer"]][0, row["head"], -1, torch.from_numpy(ids == tok)].sum())
        assert abs(row["mass"] - expected) < 1e-5, row
    assert {(r["layer"], r["head"]) for r in rows} == {(l_, h) for l_ in range(2) for h in range(4)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap.jsonl", "llama"]  # nothing written without --out
    one_line_error(wl("analyze", "attention", "--finetuned", str(model_dir), "--capability", str(cap), "--index",
                      "9"), "--index")
    one_line_error(wl("analyze", "attention", "--finetuned", str(model_dir), "--capability", str(cap), "--family",
                      "count"), "--family: not used with --finetuned")


def test_lora_trains_a_hugging_face_checkpoint_through_the_stages(tmp_path, checkpoints):
    """train.method=lora on an hf model: the adapted linear maps change by a matrix of rank <= r, nothing else
    changes, and the saved factors multiply out to that change."""

    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.stage import Stage, resolve

    model_dir = _readable(checkpoints["llama"], tmp_path / "llama")
    raw = _relearning(model_dir, tmp_path, 2, 16, lr=1e-2, steps=4, method="lora", lora_rank=2) | \
        {"eval": {"every": 4}}
    cfg, _ = resolve(raw)
    assert Stage(cfg, None, tmp_path / "run").run(progress=False)["status"] == "done"
    saved = ck.load_tensors(tmp_path / "run")[1]
    base = load_hf(model_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], saved[f"model.{k}"])}
    adapted = {k[len("lora."):-len(".lora_A")] + ".weight" for k in saved if k.endswith(".lora_A")}
    assert changed and changed <= adapted
    for k in changed:
        delta = saved[f"model.{k}"] - base[k]
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 2, k
        name = k[: -len(".weight")]
        a, b = saved[f"lora.{name}.lora_A"], saved[f"lora.{name}.lora_B"]
        torch.testing.assert_close(delta, b @ a, atol=1e-5, rtol=1e-4)  # alpha = r: scale 1
    raw["train"]["lora_targets"] = ["mlp.c_fc"]  # a GPT-2 name on a Llama: one line, before anything runs
    from wrapperlab.training.config import ConfigError

    with pytest.raises(ConfigError, match="mlp.c_fc"):
        resolve(raw)


def test_a_relearning_stage_is_named_by_what_it_reads(tmp_path, checkpoints):
    """Editing the records or rewriting the checkpoint in place changes the fingerprint in the stage's config, so a
    finished stage is never reused for different data or weights."""
    import os

    from wrapperlab.analysis.capability import fingerprint

    model_dir = _readable(checkpoints["gpt2"], tmp_path / "gpt2")
    cap = tmp_path / "cap.jsonl"
    cap.write_text('{"prompt": "t1 t2", "answer": "t3"}\n')
    first = fingerprint(model_dir, cap)
    assert fingerprint(model_dir, cap) == first
    cap.write_text('{"prompt": "t1 t2", "answer": "t4"}\n')
    second = fingerprint(model_dir, cap)
    assert second != first
    weights = next(model_dir.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(model_dir, cap) != second
