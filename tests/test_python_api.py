"""The notebook API as README.md shows it: the README's Python block runs as written (on a tiny run), and Run.load
opens every kind of run."""

import re
from pathlib import Path

import pytest
from conftest import wl

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text()
    section = text[text.index("## In Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_block_runs(pretrained, tmp_path, capsys):
    ft = tmp_path / "ft"
    r = wl("finetune", "--preset", "cpu", "batch_size=8", "eval.n=40", "threads=1", f"parent={pretrained}", "steps=10",
           "eval.every=5", "c_train=1",
           "--out", str(ft), "--no-progress")
    assert r.returncode == 0, r.stderr
    code = _readme_block().replace("runs/ft-low/S-c1", str(ft))
    code = code.replace('analyze("probe", run)', 'analyze("probe", run, n_train=200, n_test=100, iters=20)')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.match(r"^(wrapper|deletion|amplification|unchanged|undetermined) - ", out.strip().splitlines()[-1])
    run = namespace["run"]
    assert run.stage == "finetune" and run.lineage() == [ft, Path(pretrained)]
    assert run.parent().stage == "pretrain" and run.metrics[-1]["step"] == 10
    assert {x["model"] for x in namespace["probe"].rows} == {"finetune", "pretrained", "random-init"}
    assert namespace["maps"].arrays["pattern"].ndim == 4  # (layers, heads, query, key)


def test_run_load_opens_tracr_and_story_runs(tmp_path):
    from wrapperlab import Run

    tr = tmp_path / "tr"
    r = wl("tracr", "finetune", "--program", "counter", "steps=4", "train.warmup_steps=1", "eval.every=2",
           "eval.n=20", "--out", str(tr), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = Run.load(tr)
    assert run.config.task.kind == "tracr" and run.config.model.family == "tracr" and len(run.task.vocab) == 11
    pytest.importorskip("sentencepiece")
    shards, st = tmp_path / "shards", tmp_path / "st"
    assert wl("stories", "generate", "--out", str(shards), "--shards", "3", "--per-shard", "80").returncode == 0
    r = wl("stories", "pretrain", "--data", str(shards), "--out", str(st), "steps=2", "eval_every=2", "eval_n=1",
           "max_new_tokens=4", "vocab_size=360", "model.d_model=16", "model.n_layer=1", "model.n_head=2",
           "model.seq_len=32", "batch_size=2", "threads=1", "--no-progress")
    assert r.returncode == 0, r.stderr
    run = Run.load(st)
    assert run.config.task.kind == "story" and run.config.model.family == "llama"
    assert run.task.tokenizer.vocab_size == 360 and run.model.cfg.seq_len == 32
