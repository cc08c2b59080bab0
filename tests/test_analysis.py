"""The analysis toolkit on constructed cases whose answer is known independently of the code under test:
a planted gate neuron that pruning must find first; probes on features that do / do not contain the target;
attention maps of hand-set heads against a numpy softmax; verdict logic against its definition."""

import copy

import numpy as np
import pytest
import torch

from wrapperlab.analysis.attention import attention, mass_on
from wrapperlab.analysis.common import AnalysisError, Result, lineage
from wrapperlab.analysis.evaluate import load_run
from wrapperlab.analysis.probing import ProbeSettings, layer_names, residual_features, train_probes
from wrapperlab.analysis.pruning import PruneSettings, prune, saliency
from wrapperlab.analysis.verdict import Thresholds, verdict
from wrapperlab.models.transformer import ModelConfig, Transformer
from wrapperlab.training.evaluation import build_eval_sets, predict

# ----------------------------------------------------------------------------------------------- pruning

GATE = 3  # the MLP neuron turned into a gate


def plant_gate(model: Transformer, pad_id: int, strength: float = 4.0) -> tuple[Transformer, Transformer]:
    """(gated, reference): ``reference`` is the model with neuron GATE of the last MLP simply removed;
    ``gated`` turns that neuron into an always-on unit that writes a direction pushing every answer to PAD
    (a token that is never a correct answer) — a planted wrapper that suppresses the capability."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        mlp = ref.blocks[-1].mlp
        mlp.fc.weight[GATE] = 0
        mlp.fc.bias[GATE] = 0
        mlp.proj.weight[:, GATE] = 0
    gated = copy.deepcopy(ref)
    with torch.no_grad():
        gamma, head = gated.ln_final.norm.weight, gated.head.weight
        v = gamma * (head[pad_id] - head.mean(0))
        v = (v - v.mean()) / (v - v.mean()).norm()
        gated.blocks[-1].mlp.fc.bias[GATE] = 3.0  # input weights are 0: the unit is always on (gelu(3) ~ 3)
        gated.blocks[-1].mlp.proj.weight[:, GATE] = v * strength / 3.0
    return gated, ref


def _acc(model, task, s, operand, c):
    sets = build_eval_sets(task, "count", list(s.c_tests), s.n_eval, s.seed + 1)
    es = next(x for x in sets if x.operand == operand and x.c_test == c)
    return float((predict(model, task, es.batch.tokens) == es.batch.answer).mean())


def test_pruning_finds_planted_gate_first_and_revives(counter):
    _, task, model, _ = load_run(counter)
    gated, ref = plant_gate(model, task.vocab.pad_id)
    s = PruneSettings(ks=(0, 1, 2), n_grad=256, n_eval=200)
    expected_k0, expected_k1 = _acc(gated, task, s, "a", 0.0), _acc(ref, task, s, "a", 0.0)
    assert expected_k0 == 0.0 and expected_k1 > 0.9  # preconditions: the gate suppresses, its removal restores
    res = prune(gated, task, settings=s)
    top = res.tables["units"][0]
    assert (top["block"], top["matrix"], top["kind"], top["index"]) == (0, "mlp.fc", "row", [GATE])
    got = {(r["k"], r["operand"], r["c_test"]): r["acc"] for r in res.rows}
    assert got[(0, "a", 0.0)] == expected_k0
    assert got[(1, "a", 0.0)] == pytest.approx(expected_k1)  # pruning the gate row = removing the neuron
    assert got[(1, "a", 1.0)] == pytest.approx(_acc(ref, task, s, "a", 1.0))
    # the unit list names where the gate sits; the histogram shows K=0 collapsed onto PAD, K=1 did not
    hist = res.tables["histogram"]
    k0 = {h["class"]: h["count"] for h in hist if h["k"] == 0}
    es = next(x for x in build_eval_sets(task, "count", [0.0, 1.0], 200, s.seed + 1) if x.operand == "a"
              and x.c_test == 0.0)
    pred = predict(gated, task, es.batch.tokens)
    assert k0 == {task.vocab.tokens[int(t)]: int(c) for t, c in zip(*np.unique(pred, return_counts=True))}
    assert k0[task.vocab.tokens[task.vocab.pad_id]] >= 190  # collapsed onto PAD
    truth = sum(h["count"] for h in hist if h["k"] == "truth")
    assert truth == sum(h["count"] for h in hist if h["k"] == 1) == 200
    # the input model is untouched
    assert _acc(gated, task, s, "a", 0.0) == 0.0


def test_single_weight_pruning_finds_the_gate_bias(counter):
    _, task, model, _ = load_run(counter)
    gated, _ = plant_gate(model, task.vocab.pad_id)
    units, n = saliency(gated, task, settings=PruneSettings(unit="weight", n_grad=256), top=3)
    assert (units[0].matrix, units[0].kind, units[0].index) == ("mlp.fc", "bias", (GATE,))
    assert n == sum(p.numel() for name, p in gated.named_parameters()
                    if name.startswith("blocks.") and any(m in name for m in ("qkv", "attn.proj", "mlp.")))


def test_saliency_scores_are_grad_times_weight_summed_per_row(counter):
    """Independent check of the score: autograd of the same loss, summed by hand over rows (+ bias)."""
    from wrapperlab.analysis.pruning import pretraining_loss

    _, task, model, _ = load_run(counter)
    s = PruneSettings(n_grad=64, matrices=("mlp.fc",))
    units, n = saliency(model, task, settings=s)
    assert n == model.cfg.mlp_dim
    m2 = copy.deepcopy(model).eval()
    pretraining_loss(m2, task, "count", 64, s.seed).backward()
    fc = m2.blocks[0].mlp.fc
    expect = (fc.weight.grad * fc.weight).sum(1) + fc.bias.grad * fc.bias
    got = torch.zeros_like(expect)
    for u in units:
        got[u.index[0]] = u.score
    assert torch.allclose(got, expect.detach(), atol=1e-6)
    assert [u.score for u in units] == sorted((u.score for u in units), reverse=True)


def test_pruning_rejects_bad_settings(counter):
    _, task, model, _ = load_run(counter)
    with pytest.raises(AnalysisError, match="unit"):
        prune(model, task, settings=PruneSettings(unit="head"))
    with pytest.raises(AnalysisError, match="matrices"):
        prune(model, task, settings=PruneSettings(matrices=("nope",)))
    with pytest.raises(AnalysisError, match="ks"):
        prune(model, task, settings=PruneSettings(ks=(0, 10**9), n_eval=10, n_grad=10))


# ----------------------------------------------------------------------------------------------- probing

def _labels(n, classes, rng):
    return torch.from_numpy(rng.integers(0, classes, n))


def test_probe_reads_a_target_that_is_there_and_not_one_that_is_not():
    rng = np.random.default_rng(0)
    n_tr, n_te, d, classes = 2000, 500, 24, 8
    y_tr, y_te = _labels(n_tr, classes, rng), _labels(n_te, classes, rng)

    def feats(y, informative):
        x = torch.from_numpy(rng.normal(size=(len(y), d))).float()
        if informative:  # the label's one-hot, scaled, in the first `classes` dimensions, plus noise
            x[:, :classes] += 6 * torch.nn.functional.one_hot(y, classes).float()
        return x

    x_tr = torch.stack([feats(y_tr, True), feats(y_tr, False)])
    x_te = torch.stack([feats(y_te, True), feats(y_te, False)])
    acc = train_probes(x_tr, y_tr, x_te, y_te, classes, ProbeSettings(iters=800))
    assert acc[0] > 0.97  # readable (Bayes error ~1e-4 at this separation)
    assert acc[1] < 1 / classes + 0.07  # chance: nothing to read


def test_batched_probes_equal_separately_trained_probes():
    rng = np.random.default_rng(1)
    y = _labels(300, 5, rng)
    x = torch.from_numpy(rng.normal(size=(3, 300, 6))).float()
    x[1, :, 0] += y.float()
    s = ProbeSettings(iters=50)
    together = train_probes(x[:, :200], y[:200], x[:, 200:], y[200:], 5, s)
    apart = [train_probes(x[i:i + 1, :200], y[:200], x[i:i + 1, 200:], y[200:], 5, s)[0] for i in range(3)]
    assert np.allclose(together, apart)


def test_residual_features_are_the_residual_stream_at_the_art_position(counter):
    _, task, model, _ = load_run(counter)
    b = task.sample(7, np.random.default_rng(3), family="count", operand="a")
    pos = task.answer_pos - 1
    f = residual_features(model, b.tokens, pos)
    assert f.shape == (model.cfg.n_layer + 1, 7, model.cfg.d_model)
    n = model.cfg.n_layer
    assert layer_names(model) == [("B0", "blocks.0.hook_resid_pre")] + [
        (f"B{i + 1}", f"blocks.{i}.hook_resid_post") for i in range(n)]
    toks = torch.from_numpy(b.tokens)
    with torch.no_grad():  # B0 by hand: token + position embedding of the ART token; last: model.residual
        b0 = model.tok_emb.weight[toks[:, pos]] + model.pos_emb.weight[pos]
        last = model.residual(toks[:, :pos + 1])[:, pos]
    assert torch.allclose(f[0], b0, atol=1e-6)
    assert torch.allclose(f[-1], last, atol=1e-5)
    assert (toks[:, pos] == task.vocab.id("=")).all()


def test_probe_settings_are_validated():
    with pytest.raises(AnalysisError, match="iters"):
        ProbeSettings(iters=0).check()
    with pytest.raises(AnalysisError, match="c_test"):
        ProbeSettings(c_test=2).check()


# --------------------------------------------------------------------------------------------- attention

def _hand_set_model(strength: float) -> Transformer:
    """1 layer, no LayerNorm, one-hot token embeddings, zero position embeddings. Head 0: zero query/key
    weights (uniform causal attention). Head 1: every query is e0; the key of token 3 is strength * e0, of
    every other token 0."""
    cfg = ModelConfig(vocab_size=5, seq_len=6, d_model=8, n_layer=1, n_head=2, d_head=4, norm="none")
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.tok_emb.weight[:, :5] = torch.eye(5)
        w = m.blocks[0].attn.qkv.weight  # rows: q (h0: 0-3, h1: 4-7), k (8-15), v (16-23)
        w[4, :5] = 1.0  # head 1 query dim 0 = 1 for every token
        w[12, 3] = strength  # head 1 key dim 0 = strength for token 3
    return m


def test_attention_maps_of_hand_set_heads():
    strength = 2.0
    m = _hand_set_model(strength)
    toks = np.array([[1, 3, 2, 3, 4, 0]])
    res = attention(m, toks)
    pat = res.arrays["pattern"][0]  # layer 0: (heads, q, k)
    t = toks.shape[1]
    uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    assert np.allclose(pat[0], uniform, atol=1e-6)
    logits = np.where(toks[0] == 3, strength / np.sqrt(4), 0.0)  # d_head 4: scale 1/2
    expect = np.zeros((t, t))
    for q in range(t):
        e = np.exp(logits[:q + 1])
        expect[q, :q + 1] = e / e.sum()
    assert np.allclose(pat[1], expect, atol=1e-6)
    # rows: the last query's mass on token "3" (labels are ids without a vocab)
    assert mass_on(res, 0, 1, "3") == pytest.approx(expect[-1, [1, 3]].sum(), abs=1e-6)
    assert mass_on(res, 0, 0, "3") == pytest.approx(2 / 6, abs=1e-6)
    assert res.meta["labels"] == ["1", "3", "2", "3", "4", "0"] and not res.meta["averaged"]


def test_attention_average_is_the_mean_of_single_maps():
    m = _hand_set_model(3.0)
    toks = np.array([[1, 3, 2, 3, 4, 0], [3, 3, 3, 1, 1, 1], [0, 1, 2, 4, 4, 3]])
    avg = attention(m, toks)
    singles = np.stack([attention(m, toks[i:i + 1]).arrays["pattern"] for i in range(3)])
    assert avg.meta["averaged"]
    assert np.allclose(avg.arrays["pattern"], singles.mean(0), atol=1e-6)
    with pytest.raises(AnalysisError, match="layers"):
        attention(m, toks, layers=[1])


# ----------------------------------------------------------------------------------------------- verdict

def _side(pt_before, pt_after, ft_before, ft_after):
    m = []
    for step, pt, ft in ((0, pt_before, ft_before), (500, pt_after, ft_after)):
        m += [{"family": "count", "operand": "a", "c_test": 0.0, "acc": pt, "majority": 0.45, "step": step},
              {"family": "count", "operand": "b", "c_test": 0.0, "acc": ft, "majority": 0.45, "step": step}]
    return {"stage": "finetune", "metrics": m,
            "config": {"task": {"o_pt": "a", "o_ft": "b"}, "train": {"family": "count", "c_train": 1.0, "lr": 1e-5},
                       "eval": {"family": None}}}


def _probe(me, pre, ctl):
    return Result("probe", [], tables={"summary": [
        {"model": "finetune", "target": "O_PT", "best_layer": "B3", "acc": me},
        {"model": "pretrained", "target": "O_PT", "best_layer": "B3", "acc": pre},
        {"model": "random-init", "target": "O_PT", "best_layer": "B2", "acc": ctl}]})


def _prune(accs):
    return Result("prune", [{"k": k, "target": "O_PT", "c_test": 0.0, "acc": a, "majority": 0.45}
                            for k, a in enumerate(accs)], tables={"units": [{"block": 2}] * len(accs)})


def _revival(reft, scrft, steps=500):
    return Result("revival", [], tables={"summary": [
        {"curve": "reft", "steps_to_target": reft, "steps": steps, "target": 0.9},
        {"curve": "scr+ft", "steps_to_target": scrft, "steps": steps, "target": 0.9}]})


def test_verdict_follows_its_definition():
    lost = _side(0.99, 0.15, 0.25, 0.25)
    v = verdict(lost, probe=_probe(0.98, 0.99, 0.55), prune=_prune([0.15, 0.8]), revival=_revival(100, None))
    assert v.meta["verdict"] == "wrapper"
    assert all(r["passed"] for r in v.rows if r["evidence"] in ("probe", "prune", "revival"))
    v = verdict(lost, probe=_probe(0.5, 0.99, 0.55), prune=_prune([0.15, 0.2]), revival=_revival(None, 300))
    assert v.meta["verdict"] == "deletion"
    assert verdict(_side(0.99, 0.97, 0.25, 0.95)).meta["verdict"] == "amplification"
    assert verdict(_side(0.99, 0.97, 0.25, 0.3)).meta["verdict"] == "unchanged"
    assert verdict(lost).meta["verdict"] == "undetermined"
    # a threshold is a setting: the same pruning gain passes at 0.3 and fails at 0.7
    gain = verdict(lost, prune=_prune([0.15, 0.7]))
    assert gain.meta["verdict"] == "wrapper"
    assert verdict(lost, prune=_prune([0.15, 0.7]), thresholds=Thresholds(prune_gain=0.6)).meta["verdict"] == "deletion"
    # a pruning "gain" up to the majority rate is a collapse, not a revival
    assert verdict(lost, prune=_prune([0.0, 0.44])).meta["verdict"] == "deletion"
    # the revival baseline that never reaches the target counts as needing more than the steps run
    assert verdict(lost, revival=_revival(240, None, steps=500)).meta["verdict"] == "wrapper"
    assert verdict(lost, revival=_revival(260, 500)).meta["verdict"] == "deletion"
    with pytest.raises(AnalysisError, match="prune_gain"):
        Thresholds(prune_gain=1.5).check()


def test_lineage_finds_parents_recorded_relative_to_another_directory(tmp_path, counter):
    import json
    import shutil

    from wrapperlab.training import checkpoint as ck

    root = tmp_path / "proj"
    shutil.copytree(counter, root / "runs" / "parent")
    child = root / "runs" / "kids" / "child"
    shutil.copytree(counter, child)
    side = ck.read_sidecar(child)
    side["parent"], side["parent_id"], side["run_id"] = "runs/parent", side["run_id"], "childid"
    ck.atomic_write_text(child / ck.SIDECAR, json.dumps(side))
    chain = lineage(child)
    assert [p.resolve() for p, _ in chain] == [child.resolve(), (root / "runs" / "parent").resolve()]


def test_probes_and_pruning_read_a_llama_model_through_its_components():
    """The analyses ask the model family for its components, so a llama model (other matrix names, no causal
    flag in its config) is probed and pruned like a GPT."""
    from wrapperlab.models.registry import get_family
    from wrapperlab.tasks.task import PCFGTask, TaskConfig

    task = PCFGTask(TaskConfig(window=16, o2={"count": 8, "count-composition": 8, "token-value": 8,
                                              "index-of-occurrence": 2, "index-of-composition": 2}))
    fam = get_family("llama")
    torch.manual_seed(0)
    model = fam.build(fam.config(d_model=16, n_layer=2, n_head=2), len(task.vocab), task.seq_len).eval()
    b = task.sample(5, np.random.default_rng(0), family="count", operand="a")
    pos = task.readout_pos
    f = residual_features(model, b.tokens, pos)
    assert f.shape == (3, 5, 16)
    assert torch.allclose(f[0], model.tok_emb.weight[torch.from_numpy(b.tokens[:, pos])])  # no position embedding
    units, n = saliency(model, task, family="count", settings=PruneSettings(n_grad=16, n_eval=20), top=5)
    d, hidden = 16, model.cfg.mlp_dim
    assert n == 2 * (4 * d + 2 * hidden + d)  # rows of wq, wk, wv, wo, w1, w3 (hidden each) and w2
    assert all(u.matrix in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3") for u in units)


def test_every_analysis_is_reached_through_one_call_shape(counter):
    """analyze(name, run) and analyze(name, model, task=...) dispatch through the registry to the same code as the
    module functions; unknown names and settings, and missing components, are one-line errors before any work."""
    from wrapperlab.analysis.probing import probe
    from wrapperlab.analysis.registry import analyses, analyze
    from wrapperlab.models.lstm import LSTMConfig, LSTMModel

    assert {"probe", "prune", "attention", "attention_signature", "revival", "verdict", "feature_probe"} <= set(
        analyses())
    cfg, task, model, _ = load_run(counter)
    s = ProbeSettings(n_train=200, n_test=100, iters=30)
    via_registry = analyze("probe", model, task=task, settings=s)
    direct = probe(model, task, family="count", settings=s)
    assert via_registry.rows == direct.rows
    pr = analyze("prune", counter, ks=(0, 1), n_grad=32, n_eval=40)
    assert pr.meta["settings"]["c_tests"] == list(cfg.eval.c_test)  # the run's own test sets by default
    assert {r["k"] for r in pr.rows} == {0, 1}
    with pytest.raises(AnalysisError, match="unknown analysis 'nope'; choose from probe"):
        analyze("nope", counter)
    with pytest.raises(AnalysisError, match="unknown setting.*bogus"):
        analyze("prune", counter, bogus=1)
    with pytest.raises(AnalysisError, match="^n_grad: "):
        analyze("prune", counter, n_grad=0)
    lstm = LSTMModel(LSTMConfig(vocab_size=len(task.vocab), seq_len=task.seq_len, d_model=8, n_layer=1))
    with pytest.raises(AnalysisError, match="^lstm has no attention pattern$"):
        analyze("attention", lstm, task=task)
    with pytest.raises(AnalysisError, match="needs a run directory"):
        analyze("revival", model, task=task)
