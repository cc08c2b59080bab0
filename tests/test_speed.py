"""Speed: the bf16 option keeps trained accuracy, the benchmarks measure what they say, the CLI."""

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, wl
from safetensors.numpy import load_file

from wrapperlab.training import checkpoint as ck

COUNTER = ["--preset", "cpu", "task.window=32", "model.d_model=32", "model.n_layer=1", "model.n_head=2", "threads=1",
           "steps=400", "batch_size=64", "lr=3e-3", "eval.n=500", "eval.every=400", "family=count", "operand=a",
           "--no-progress", "--json"]


def _final_acc(run: Path) -> float:
    side = ck.read_sidecar(run)
    return next(r["acc"] for r in side["metrics"]
                if r["step"] == side["step"] and r["operand"] == "a" and r["c_test"] == 0)


def test_bf16_autocast_keeps_trained_accuracy(tmp_path, counter):
    """The same recipe (the `counter` fixture's: fp32 learns count(a) to ~100 %) trained under bf16 autocast
    reaches the same accuracy, although its weights differ (the option really changes the arithmetic)."""
    r = wl("scratch", *COUNTER, "train.precision=bf16", "--out", str(tmp_path / "bf16"))
    assert r.returncode == 0, r.stderr
    r = wl("scratch", *COUNTER, "--out", str(tmp_path / "fp32"))
    assert r.returncode == 0, r.stderr
    acc16, acc32 = _final_acc(tmp_path / "bf16"), _final_acc(tmp_path / "fp32")
    assert acc32 >= 0.95, acc32
    assert acc16 >= 0.95 and abs(acc16 - acc32) <= 0.03, (acc16, acc32)
    w16, w32 = (load_file(str(p / ck.read_sidecar(p)["checkpoint"]["file"])) for p in (tmp_path / "bf16",
                                                                                         tmp_path / "fp32"))
    assert any(not (w16[k] == w32[k]).all() for k in w32 if k.startswith("model."))
    s16, s32 = ck.read_sidecar(tmp_path / "bf16"), ck.read_sidecar(tmp_path / "fp32")
    assert s16["run_id"] != s32["run_id"]
    assert s16["config"]["train"]["precision"] == "bf16" and w16["model.head.weight"].dtype.name == "float32"


def test_fp32_run_ids_are_unchanged_by_the_precision_field():
    """Adding train.precision must not move existing run ids: at fp32 it is left out of the identity."""
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import resolve

    cfg, _ = resolve(build_config("pretrain", "cpu"))
    assert "precision" not in cfg.identity()["train"]
    cfg16, _ = resolve(build_config("pretrain", "cpu", None, ["train.precision=bf16"]))
    assert cfg16.identity()["train"]["precision"] == "bf16" and cfg16.run_id() != cfg.run_id()
    paper, _ = resolve(build_config("pretrain", "paper"))
    assert paper.train.precision == "bf16"


def test_bad_precision_is_a_one_line_error(tmp_path):
    one_line_error(wl("pretrain", "--preset", "cpu", "train.precision=fp8", "--out", str(tmp_path / "r")),
                   "precision")


def test_vendored_reference_is_the_shared_one():
    from wrapperlab.bench.train import REFERENCE

    shared = Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_gpt_train.py"
    if not shared.is_file():
        pytest.skip("shared/bench is not beside this checkout")
    assert REFERENCE.read_bytes() == shared.read_bytes()


def test_step_flops_equals_the_references_own_estimate():
    """For the full next-token loss our FLOPs formula must be the reference's (ratios of GFLOP/s compare like with
    like): the reference prints gflop_per_s and step_s for its model; their product is its FLOPs estimate."""
    from wrapperlab.bench.common import run_json
    from wrapperlab.bench.train import reference_cmd, stage_for, step_flops

    st = stage_for("cpu", loss="lm", batch=4, threads=1)
    model = st._fresh()[0]
    t = st.task.seq_len - 1
    shape = {"d_model": 96, "n_layer": 3, "n_head": 4, "seq_len": t, "batch": 4, "vocab": len(st.task.vocab)}
    ref = run_json(reference_cmd(shape, 1, 0, 1))
    ref_flops = ref["gflop_per_s"] * 1e9 * ref["step_s"]
    ours = step_flops(model, 4, t, t)
    assert ref["params"] == model.n_params() + 0 * 1 or abs(ref["params"] - model.n_params()) < 0.01 * ref["params"]
    assert abs(ours - ref_flops) / ref_flops < 0.01, (ours, ref_flops)


def test_forward_counter_counts_sequences_including_copies():
    import copy

    import numpy as np

    from wrapperlab.bench.analysis import ForwardCounter, _subject
    from wrapperlab.training.evaluation import predict

    _, task, model = _subject(1)
    tokens = task.sample(70, np.random.default_rng(0), family="count", operand="a").tokens
    c = ForwardCounter()
    try:
        predict(model, task, tokens, batch_size=32)  # 32 + 32 + 6
        predict(copy.deepcopy(model), task, tokens[:5])
    finally:
        c.close()
    assert c.n == 75
    predict(model, task, tokens[:3])
    assert c.n == 75  # closed: no longer counting


def test_bench_train_cli_prints_one_json_object_with_the_ratio(tmp_path):
    """`wrapperlab bench train --json` as a user runs it (cpu shape, 1 round of 1 step to stay quick): the ratio is
    wrapperlab's tokens/s over the reference's, both timed on the same shape and batch."""
    r = wl("bench", "train", "--shape", "cpu", "--rounds", "1", "--steps", "1", "--threads", "1", "--json",
           timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["benchmark"] == "train" and res["shape"] == "cpu" and res["batch"] == 64
    assert res["ratio_vs_reference"] == pytest.approx(res["tokens_per_s"] / res["reference_tokens_per_s"], rel=2e-3)
    assert res["round_ratios"] == [pytest.approx(res["ratio_vs_reference"], abs=1e-3)]
    assert res["finetune_ratio_vs_head_everywhere"] > 0 and res["peak_bf16_gflop_per_s"] > 0
    assert 0 < res["fraction_of_peak"] < 1.5


@pytest.mark.parametrize("args, needle", [
    (["nope"], "unknown benchmark"), (["train", "--shape", "huge"], "--shape"), (["train", "--rounds", "0"],
                                                                                 "--rounds"),
])
def test_bench_cli_bad_input(args, needle):
    one_line_error(wl("bench", *args), needle)


def test_bench_sampling_cli_json():
    r = wl("bench", "sampling", "--json", "--threads", "1", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["benchmark"] == "sampling" and res["window"] == 250 and res["train_precision"] == "bf16"
    assert res["ratio_mix"] >= 10 and res["ratio_finetune"] >= 10  # the target in docs/speed.md


def test_autocast_is_off_in_fp32_and_on_in_bf16():
    from wrapperlab.bench.train import stage_for

    for prec, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        st = stage_for("cpu", precision=prec, threads=1)
        model = st._fresh()[0]
        seen: dict = {}

        def grab(m, i, o, seen=seen):
            seen.setdefault("dtype", o.dtype)

        h = model.blocks[0].mlp.fc.register_forward_hook(grab)
        with st.autocast():
            model(torch.zeros(2, 8, dtype=torch.long))
        h.remove()
        assert seen["dtype"] == want


def test_cpu_attention_under_bf16_autocast_runs_in_fp32_and_agrees_with_bf16_attention():
    """Under CPU bf16 autocast the fused attention is computed in fp32 (faster backward here, docs/speed.md). Both
    ways must agree with the fp32 model to bf16 accuracy, and the fp32 path must be untouched by the switch."""
    import wrapperlab.models.transformer as T
    from wrapperlab.bench.train import stage_for

    st = stage_for("cpu", threads=1)
    model = st._fresh()[0].eval()
    x = torch.from_numpy(st.task.sample(8, __import__("numpy").random.default_rng(0)).tokens)
    with torch.no_grad():
        ref = model(x)
        outs = {}
        for flag in (True, False):
            T.CPU_SDPA_FP32 = flag
            try:
                assert torch.equal(model(x), ref)  # no autocast: the switch changes nothing
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outs[flag] = model(x).float()
            finally:
                T.CPU_SDPA_FP32 = True
    for flag, o in outs.items():
        assert (o - ref).abs().max() < 0.05 * ref.abs().max(), flag
    assert not torch.equal(outs[True], outs[False])  # the switch really changes the attention's precision


def test_the_timed_step_is_the_training_loop(tmp_path):
    """Stage.run must be exactly Stage.train_step repeated (what the benchmark times): the same weights after the
    same number of steps, bit for bit."""
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    over = ["task.window=32", "model.d_model=32", "model.n_layer=1", "model.n_head=2", "batch_size=8", "threads=1",
            "steps=12", "eval.every=12", "eval.n=20"]
    cfg, _ = resolve(build_config("pretrain", "cpu", None, over))
    Stage(cfg, None, tmp_path / "run").run(progress=False)
    side = ck.read_sidecar(tmp_path / "run")
    ran = {k[len("model."):]: v for k, v in ck.load_tensors(tmp_path / "run", side)[1].items()
           if k.startswith("model.")}
    st = Stage(cfg, None, tmp_path / "unused")
    model, opt, _, _ = st._fresh()
    model.train()
    for s in range(12):
        st.train_step(model, opt, s)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ran[k]), k
