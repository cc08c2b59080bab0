"""Training-step throughput: wrapperlab's own stage loop against the hand-written reference step, on the
identical model shape and batch, timed alternately in the same run; the fine-tuning step
(answer-only loss) against the same step running the vocabulary head at every position; and this
CPU's measured matmul peak in fp32 and bf16, so achieved GFLOP/s can be read as a fraction of it.

Each measurement runs in a fresh process (same thread count for both sides):
- the reference is ``reference_gpt_train.py`` (a verbatim copy of ``shared/bench/reference_gpt_train.py``:
  eager fp32 minGPT step, fused SDPA, AdamW, next-token loss over the whole sequence);
- wrapperlab's side calls ``Stage.train_step`` — the exact body of the training loop: the schedule's LR, a
  freshly sampled PCFG batch, the stage's loss, gradient clipping, AdamW — at the preset's precision.

    python -m wrapperlab.bench.train ours --shape paper --steps 5       # one worker measurement (JSON)
    python -m wrapperlab.bench.train peak                               # matmul peak fp32 / bf16 (JSON)
    wrapperlab bench train --shape paper --json                         # the comparison (one JSON object)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from wrapperlab.bench.common import alternate, run_json, worker

REFERENCE = Path(__file__).with_name("reference_gpt_train.py")
SHAPES = ("paper", "cpu")


def stage_for(shape: str, kind: str = "pretrain", precision: str | None = None, loss: str | None = None,
              batch: int | None = None, threads: int = 0, device: str = "cpu"):
    """The Stage whose step is timed. ``kind=finetune`` times the fine-tuning step (answer-only loss, batch 96)
    on a freshly initialised model: the step's cost does not depend on where the weights came from, so a
    ``scratch`` stage with the fine-tuning recipe stands in for it (no parent run needed)."""
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    over = []
    if kind == "finetune":
        over += ["batch_size=96", "loss=answer", "family=count", "operand=b"]
    if precision:
        over.append(f"train.precision={precision}")
    if loss:
        over.append(f"loss={loss}")
    if batch:
        over.append(f"batch_size={batch}")
    if threads:
        over.append(f"threads={threads}")
    if device != "cpu":
        over.append(f"device={device}")
    stage = "scratch" if kind == "finetune" else "pretrain"
    cfg, _ = resolve(build_config(stage, shape, None, over))
    return Stage(cfg, None, "/nonexistent/bench-run")


def step_flops(model, batch: int, t: int, head_positions: int) -> float:
    """Training FLOPs of one step, the reference's estimate (6 per matmul weight per token, plus attention
    scores and weighted sum), with the vocabulary head counted only where it runs."""
    n_head_w = model.head.weight.numel()
    n_matmul = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and not n.startswith(("tok_emb", "pos_emb", "head")))
    d, layers = model.cfg.d_model, model.cfg.n_layer
    tokens = batch * t
    return (6 * n_matmul * tokens + 6 * n_head_w * batch * head_positions
            + 12 * layers * t * d * tokens / 2)


def measure_ours(shape: str, steps: int, warmup: int, kind: str = "pretrain", precision: str | None = None,
                 loss: str | None = None, batch: int | None = None, threads: int = 0,
                 head_everywhere: bool = False, device: str = "cpu") -> dict:
    """Time ``steps`` training steps after ``warmup``, exactly as ``Stage.run`` does them."""
    st = stage_for(shape, kind, precision, loss, batch, threads, device)
    cfg = st.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, opt, _, _ = st._fresh()
    model.train()
    if head_everywhere:  # the naive answer-only step: logits at every position, then pick the readout
        full = model.forward
        model.forward = lambda tokens, positions=None: full(tokens)[:, positions] if positions is not None \
            else full(tokens)
    lm = cfg.train.loss == "lm"
    t = st.task.seq_len - 1 if lm else st.task.answer_inputs(
        torch.zeros(1, st.task.seq_len, dtype=torch.long)).shape[1]
    for s in range(warmup):
        st.train_step(model, opt, s)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        st.train_step(model, opt, s)
    dt = (time.perf_counter() - t0) / steps  # each step reads its loss (.item()), so a GPU is synchronised
    b = cfg.train.batch_size
    flops = step_flops(model, b, t, t if (lm or head_everywhere) else 1)
    return {"impl": "wrapperlab", "shape": shape, "kind": kind, "loss": cfg.train.loss,
            "precision": cfg.train.precision, "head_everywhere": head_everywhere,
            "d_model": cfg.model.d_model, "n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head,
            "seq_len": t, "batch": b, "vocab": len(st.task.vocab), "threads": torch.get_num_threads(),
            "device": cfg.device, "params": model.n_params(), "step_s": round(dt, 5),
            "tokens_per_s": round(b * t / dt, 1),
            "gflop_per_s": round(flops / dt / 1e9, 1), "torch": torch.__version__}


def profile_step(shape: str, precision: str | None = None, steps: int = 2, warmup: int = 1, threads: int = 0,
                 top: int = 12) -> dict:
    """Where one training step's time goes: torch.profiler's self CPU time per operator over ``steps`` steps,
    the ``top`` operators and the rest, as fractions of the total."""
    from torch.profiler import ProfilerActivity, profile

    st = stage_for(shape, "pretrain", precision, None, None, threads)
    if st.cfg.threads:
        torch.set_num_threads(st.cfg.threads)
    model, opt, _, _ = st._fresh()
    model.train()
    for s in range(warmup):
        st.train_step(model, opt, s)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(warmup, warmup + steps):
            st.train_step(model, opt, s)
    rows = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(t for _, t in rows) or 1.0
    out = [{"op": k, "share": round(t / total, 3), "ms_per_step": round(t / steps / 1e3, 1)} for k, t in rows[:top]]
    rest = sum(t for _, t in rows[top:])
    out.append({"op": "(rest)", "share": round(rest / total, 3), "ms_per_step": round(rest / steps / 1e3, 1)})
    return {"shape": shape, "precision": st.cfg.train.precision, "loss": st.cfg.train.loss,
            "step_ms": round(total / steps / 1e3, 1), "ops": out}


def matmul_peak(n: int = 2048, repeats: int = 10, threads: int = 0) -> dict:
    """Best-of-``repeats`` GFLOP/s of an n x n x n matmul in fp32 and in bf16 (AMX where the CPU has it)."""
    if threads:
        torch.set_num_threads(threads)
    out = {"n": n, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflop_per_s"] = round(2 * n ** 3 / best / 1e9, 1)
    return out


# ----------------------------------------------------------------------------- the comparison
def reference_cmd(ours: dict, steps: int, warmup: int, threads: int) -> list[str]:
    import sys

    return [sys.executable, str(REFERENCE), "--d-model", str(ours["d_model"]), "--n-layer", str(ours["n_layer"]),
            "--n-head", str(ours["n_head"]), "--seq-len", str(ours["seq_len"]), "--batch", str(ours["batch"]),
            "--vocab", str(ours["vocab"]), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(threads)]


def ours_cmd(shape: str, steps: int, warmup: int, threads: int, kind: str = "pretrain",
             precision: str | None = None, head_everywhere: bool = False) -> list[str]:
    args = ["ours", "--shape", shape, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
            "--kind", kind]
    if precision:
        args += ["--precision", precision]
    if head_everywhere:
        args.append("--head-everywhere")
    return worker("train", *args)


def compare(shape: str = "paper", rounds: int = 3, steps: int = 5, warmup: int = 2, threads: int = 2,
            precision: str | None = None, finetune: bool = True, peak: bool = True,
            log=lambda s: None) -> dict:
    """The whole training benchmark as one JSON-able dict; ``ratio_vs_reference`` = wrapperlab's tokens/s over
    the reference's (median of per-round ratios, the two alternating)."""
    if shape not in SHAPES:
        raise ValueError(f"shape: choose from {', '.join(SHAPES)}, not {shape!r}")
    probe = run_json(ours_cmd(shape, 1, 0, threads, precision=precision))  # shape, vocab, seq_len of ours
    ref_cmd = reference_cmd(probe, steps, warmup, threads)
    log(f"train/{shape}: wrapperlab vs reference, {rounds} alternating rounds of {steps} steps")
    pre = alternate(lambda: run_json(ours_cmd(shape, steps, warmup, threads, precision=precision)),
                    lambda: run_json(ref_cmd), rounds, "tokens_per_s")
    res = {"benchmark": "train", "shape": shape, "threads": threads, "rounds": rounds, "steps": steps,
           "model": f"d{probe['d_model']} L{probe['n_layer']} H{probe['n_head']}", "seq_len": probe["seq_len"],
           "batch": probe["batch"], "loss": probe["loss"], "precision": probe["precision"],
           "tokens_per_s": pre["a_median"], "reference_tokens_per_s": pre["b_median"],
           "ratio_vs_reference": pre["ratio"], "round_ratios": pre["ratios"],
           "gflop_per_s": sorted(r["gflop_per_s"] for r in pre["a"])[len(pre["a"]) // 2],
           "reference_gflop_per_s": sorted(r["gflop_per_s"] for r in pre["b"])[len(pre["b"]) // 2]}
    if precision is None and probe["precision"] != "fp32":  # what the preset's precision buys, same run
        log(f"train/{shape}: preset precision {probe['precision']} vs fp32")
        p32 = alternate(lambda: run_json(ours_cmd(shape, steps, warmup, threads)),
                        lambda: run_json(ours_cmd(shape, steps, warmup, threads, precision="fp32")), rounds,
                        "tokens_per_s")
        res["ratio_vs_own_fp32"] = p32["ratio"]
    if finetune:
        log(f"train/{shape}: fine-tuning step, answer-only head vs head at every position")
        ft = alternate(lambda: run_json(ours_cmd(shape, steps, warmup, threads, "finetune", precision)),
                       lambda: run_json(ours_cmd(shape, steps, warmup, threads, "finetune", precision, True)),
                       rounds, "tokens_per_s")
        res["finetune_tokens_per_s"] = ft["a_median"]
        res["finetune_ratio_vs_head_everywhere"] = ft["ratio"]
    if peak:
        pk = run_json(worker("train", "peak", "--threads", str(threads)))
        res["peak_fp32_gflop_per_s"] = pk["fp32_gflop_per_s"]
        res["peak_bf16_gflop_per_s"] = pk["bf16_gflop_per_s"]
        peak_own = pk["bf16_gflop_per_s"] if res["precision"] == "bf16" else pk["fp32_gflop_per_s"]
        res["fraction_of_peak"] = round(res["gflop_per_s"] / peak_own, 3)
        res["reference_fraction_of_fp32_peak"] = round(res["reference_gflop_per_s"] / pk["fp32_gflop_per_s"], 3)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description="training-step benchmark workers (one JSON line each)")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ours", help="time wrapperlab's Stage.train_step")
    o.add_argument("--shape", choices=SHAPES, default="paper")
    o.add_argument("--kind", choices=("pretrain", "finetune"), default="pretrain")
    o.add_argument("--steps", type=int, default=5)
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--precision", choices=("fp32", "bf16"))
    o.add_argument("--loss", choices=("lm", "answer"))
    o.add_argument("--batch", type=int)
    o.add_argument("--head-everywhere", action="store_true")
    o.add_argument("--device", default="cpu")
    k = sub.add_parser("peak", help="matmul peak, fp32 and bf16")
    k.add_argument("--n", type=int, default=2048)
    k.add_argument("--threads", type=int, default=0)
    f = sub.add_parser("profile", help="where one step's time goes (torch.profiler, self CPU time per op)")
    f.add_argument("--shape", choices=SHAPES, default="paper")
    f.add_argument("--precision", choices=("fp32", "bf16"))
    f.add_argument("--steps", type=int, default=2)
    f.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.cmd == "profile":
        print(json.dumps(profile_step(a.shape, a.precision, a.steps, threads=a.threads)))
    elif a.cmd == "peak":
        print(json.dumps(matmul_peak(a.n, threads=a.threads)))
    else:
        print(json.dumps(measure_ours(a.shape, a.steps, a.warmup, a.kind, a.precision, a.loss, a.batch, a.threads,
                                      a.head_everywhere, a.device)))


if __name__ == "__main__":
    main()
