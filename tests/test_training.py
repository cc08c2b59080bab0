"""The stage loop: schedules, losses, parents, exact resume, and the rules the paper sets on stages."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from safetensors.torch import load_file

from wrapperlab.training import ConfigError, Stage, build_config, resolve
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.schedules import lr_at
from wrapperlab.training.stage import build_model, compute_loss


def make(stage, *overrides, parent=None, preset="cpu"):
    """Tiny shapes for stages that start from scratch; a child stage inherits them from its parent."""
    base = [o for o in TINY if not parent or not o.startswith(("model.", "task."))]
    ov = base + list(overrides) + ([f"parent={parent}"] if parent else [])
    return resolve(build_config(stage, preset, overrides=ov))


def test_lr_schedule_matches_formula():
    peak, total, warm, floor = 1e-3, 1000, 200, 0.01
    assert lr_at(0, total, peak, warm, floor) == pytest.approx(peak / warm)
    assert lr_at(199, total, peak, warm, floor) == pytest.approx(peak)
    mid = 200 + 400  # halfway through the cosine part
    assert lr_at(mid, total, peak, warm, floor) == pytest.approx(peak * floor + (peak - peak * floor) * 0.5)
    assert lr_at(total, total, peak, warm, floor) == pytest.approx(peak * floor)
    assert lr_at(500, total, peak, 0, 0.0, "constant") == peak


def test_paper_preset_is_the_paper():
    """paper App. C.2, checked field by field."""
    raw = build_config("pretrain", "paper")
    cfg, _ = resolve(raw)
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head) == (192, 6, 6)
    assert cfg.task.window == 250 and cfg.task.o2["count"] == 40 and cfg.task.o2["index-of-occurrence"] == 6
    assert cfg.train.lr == 1e-3 and cfg.train.warmup_frac == 0.2 and cfg.train.loss == "lm"
    assert cfg.train.steps == 200_000 and cfg.train.optimizer == "adamw"
    ft = build_config("finetune", "paper", overrides=["lr=L"])
    assert ft["train"]["lr"] == 1e-4 and ft["train"]["batch_size"] == 96 and ft["train"]["steps"] == 10_000
    assert ft["train"]["min_lr_frac"] == 0.01 and ft["train"]["warmup_frac"] == 0.2
    assert build_config("finetune", "paper", overrides=["lr=M"])["train"]["lr"] == 1e-5
    assert build_config("finetune", "paper", overrides=["lr=S"])["train"]["lr"] == 1e-6


def test_answer_loss_is_cross_entropy_at_the_answer_slot():
    cfg, _ = make("pretrain")
    st = Stage(cfg, None, "/nonexistent")
    model = build_model(cfg, st.task)
    b = st.task.sample(6, np.random.default_rng(0))
    tokens = torch.from_numpy(b.tokens)
    logits = model(tokens)  # full forward, then pick the ART position by hand
    art = st.task.seq_len - 3
    assert st.task.vocab.tokens[int(b.tokens[0, art])] == "="
    expected = F.cross_entropy(logits[:, art], torch.from_numpy(b.answer))
    got = compute_loss(model, st.task, tokens, torch.from_numpy(b.answer), "answer")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lm_loss_ignores_padding():
    cfg, _ = make("pretrain", "task.window=250", "task.o2.count=16", "task.o2.token-value=16",
                  "task.o2.count-composition=16")
    st = Stage(cfg, None, "/nonexistent")
    model = build_model(cfg, st.task)
    b = st.task.sample(64, np.random.default_rng(1))
    pad = st.task.vocab.pad_id
    assert (b.tokens == pad).any(), "window 250 should leave some strings padded"
    tokens = torch.from_numpy(b.tokens)
    logits = model(tokens[:, :-1])
    total, count = 0.0, 0
    for i in range(tokens.shape[0]):  # brute force: every (input, target) pair with neither a PAD
        for j in range(tokens.shape[1] - 1):
            if tokens[i, j] != pad and tokens[i, j + 1] != pad:
                total += F.cross_entropy(logits[i, j][None], tokens[i, j + 1][None]).item()
                count += 1
    got = compute_loss(model, st.task, tokens, torch.from_numpy(b.answer), "lm")
    assert got.item() == pytest.approx(total / count, rel=1e-4)


def test_finetune_starts_from_parent_and_trains_on_o_ft(pretrained):
    cfg, parent = make("finetune", "steps=5", "c_train=1", "eval.every=5", parent=pretrained)
    assert cfg.train.family == "count" and cfg.train.operand == "b" and cfg.train.loss == "answer"
    assert cfg.task.window == 32  # inherited from the parent
    st = Stage(cfg, parent, "/nonexistent")
    model, *_ = st._fresh()
    _, tensors = ck.load_tensors(pretrained)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[f"model.{k}"]), k


def test_stage_rules(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="parent"):
        make("finetune", "steps=5")
    with pytest.raises(ConfigError, match="parent"):
        make("reft", "steps=5", parent=pretrained)  # reft needs a finetune parent, not a pretrain run
    ft_dir = tmp_path / "ft"
    cfg, parent = make("finetune", "steps=4", "eval.every=4", "lr=1e-4", parent=pretrained)
    Stage(cfg, parent, ft_dir).run(progress=False)
    with pytest.raises(ConfigError, match="smaller"):
        make("reft", "steps=4", "lr=1e-4", parent=ft_dir)  # paper App. D: reFT LR < FT LR
    cfg, _ = make("reft", "steps=4", "lr=1e-5", parent=ft_dir)
    assert cfg.train.operand == "a"


def _weights(run_dir):
    side = ck.read_sidecar(run_dir)
    return side, load_file(str(run_dir / side["checkpoint"]["file"]))


def test_resume_is_bit_identical(tmp_path):
    """Stop after a checkpoint (as a crash would), rerun, and compare with an uninterrupted run."""
    cfg, _ = make("pretrain", "steps=24", "eval.every=8")
    whole = tmp_path / "whole"
    Stage(cfg, None, whole).run(progress=False)
    part = tmp_path / "part"
    st = Stage(cfg, None, part)
    # emulate an interruption: run to step 16 by raising from the log callback after the step-16 eval
    class Stop(Exception):
        pass

    def stop_at_16(line):
        if line.startswith("step     16"):
            raise Stop

    with pytest.raises(Stop):
        st.run(progress=False, log=stop_at_16)
    side_mid = ck.read_sidecar(part)
    assert side_mid["status"] == "running" and side_mid["step"] == 8  # the step-16 save never happened
    Stage(cfg, None, part).run(progress=False)
    (sa, wa), (sb, wb) = _weights(whole), _weights(part)
    assert sa["step"] == sb["step"] == 24 and sb["status"] == "done"
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["metrics"] == sb["metrics"]
    # the time spent evaluating is recorded beside the wall time, and a resumed run adds to what it had
    assert 0 < sa["eval_s"] < sa["wall_s"] and side_mid["eval_s"] < sb["eval_s"] < sb["wall_s"]


def test_different_config_in_same_dir_is_refused(tmp_path):
    cfg, _ = make("pretrain", "steps=4", "eval.every=4")
    Stage(cfg, None, tmp_path / "r").run(progress=False)
    cfg2, _ = make("pretrain", "steps=4", "eval.every=4", "seed=1")
    with pytest.raises(ConfigError, match="different run"):
        Stage(cfg2, None, tmp_path / "r").existing()


def test_corrupt_checkpoint_is_detected(tmp_path):
    cfg, _ = make("pretrain", "steps=4", "eval.every=4")
    run = tmp_path / "r"
    Stage(cfg, None, run).run(progress=False)
    side = ck.read_sidecar(run)
    f = run / side["checkpoint"]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.load_tensors(run)


def test_sgd_optimizer_available():
    cfg, _ = make("pretrain", "train.optimizer=sgd", "train.momentum=0.9")
    from wrapperlab.training.stage import make_optimizer
    opt = make_optimizer(build_model(cfg, Stage(cfg, None, "/x").task), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_training_batches_depend_only_on_seed_and_step():
    cfg, _ = make("pretrain")
    st = Stage(cfg, None, "/x")
    a = st.task.sample(8, np.random.default_rng([0, 5]))
    b = st.task.sample(8, np.random.default_rng([0, 5]))
    c = st.task.sample(8, np.random.default_rng([0, 6]))
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_child_stage_refuses_shape_changes_but_takes_allowed_task_keys(pretrained):
    with pytest.raises(ConfigError, match="task.window"):
        resolve(build_config("finetune", "cpu", overrides=[f"parent={pretrained}", "task.window=48"]))
    with pytest.raises(ConfigError, match="model.d_model"):
        resolve(build_config("finetune", "cpu", overrides=[f"parent={pretrained}", "model.d_model=64"]))
    cfg, _ = resolve(build_config("finetune", "cpu", overrides=[f"parent={pretrained}", "task.q=2"]))
    assert cfg.task.q == 2 and cfg.task.window == 32  # q taken, the window inherited from the parent


def test_cpu_preset_adjusts_batch_for_two_operand_priors_unless_user_sets_it():
    cfg, _ = resolve(build_config("pretrain", "cpu", overrides=["prior=high"]))
    assert (cfg.train.batch_size, cfg.train.steps) == (128, 6000)
    cfg, _ = resolve(build_config("pretrain", "cpu", overrides=["prior=high", "batch_size=32", "steps=10"]))
    assert (cfg.train.batch_size, cfg.train.steps) == (32, 10)
    cfg, _ = resolve(build_config("pretrain", "cpu", overrides=["prior=low"]))
    assert (cfg.train.batch_size, cfg.train.steps) == (64, 4500)
    cfg, _ = resolve(build_config("pretrain", "paper", overrides=["prior=high"]))
    assert cfg.train.batch_size == 96  # the paper preset is never adjusted


def test_divergence_stops_with_status_diverged_and_keeps_last_checkpoint(tmp_path):
    cfg, _ = make("pretrain", "steps=6", "eval.every=2", "lr=1e30", "train.grad_clip=null", "train.warmup_frac=0")
    side = Stage(cfg, None, tmp_path / "r").run(progress=False)
    assert side["status"] == "diverged"
    on_disk = ck.read_sidecar(tmp_path / "r") if (tmp_path / "r" / ck.SIDECAR).exists() else None
    if on_disk is not None:  # a good checkpoint was written before the loss blew up
        assert on_disk["status"] == "diverged" and on_disk["step"] < 6
        ck.load_tensors(tmp_path / "r")  # and it is still complete and verifiable


def test_stop_margin_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path):
    """eval.stop_margin: the run is the uninterrupted run cut at the first evaluation whose O_PT accuracy reaches the
    majority rate plus the margin (same metrics up to there, bit-identical weights to a run paused at that step)."""
    counting = ["family=count", "operand=a", "steps=300", "batch_size=64", "lr=3e-3", "eval.n=200", "eval.every=20"]
    cfg, _ = make("scratch", *counting)
    whole = Stage(cfg, None, tmp_path / "whole").run(progress=False)
    head = [r for r in whole["metrics"] if (r["family"], r["operand"], r["c_test"]) == ("count", "a", 0.0)]
    above = [r["acc"] - r["majority"] for r in head]
    assert max(above) > above[0] + 0.2, "the tiny model should learn to count within the run"
    margin = round((above[0] + max(above)) / 2, 3)  # a level the run crosses part-way
    expect = next(r["step"] for r, a in zip(head, above, strict=True) if a >= margin)
    assert 0 < expect < 300

    stopped_cfg, _ = make("scratch", *counting, f"eval.stop_margin={margin}")
    assert stopped_cfg.run_id() != cfg.run_id() and "stop_margin" not in cfg.identity()["eval"]
    lines = []
    side = Stage(stopped_cfg, None, tmp_path / "stopped").run(progress=False, log=lines.append)
    assert side["status"] == "done" and side["step"] == expect and side["stopped"]["step"] == expect
    assert side["metrics"] == [r for r in whole["metrics"] if r["step"] <= expect]
    assert "eval.stop_margin" in lines[-1]
    Stage(cfg, None, tmp_path / "paused").run(progress=False, stop_after=expect)
    (_, wa), (_, wb) = _weights(tmp_path / "paused"), _weights(tmp_path / "stopped")
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.startswith("model."))
    again = Stage(stopped_cfg, None, tmp_path / "stopped").run(progress=False)  # done: nothing retrained
    assert again["step"] == expect and again["checkpoint"] == side["checkpoint"]
