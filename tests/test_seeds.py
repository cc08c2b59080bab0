"""Seeds as replicates: a run derived from a seed-s run (a fine-tune, its reFT, the revival baselines planned for
it) is itself a seed-s run unless its config names another seed, so a seed axis on the root runs of a spec gives N
independent replicates of the whole experiment, baselines included."""

import json

from conftest import TINY, wl
from test_experiments import tiny_spec

from wrapperlab.experiments.plan import build_plan
from wrapperlab.experiments.spec import parse_spec
from wrapperlab.training import checkpoint as ck


def _revival_spec(**extra) -> dict:
    spec = tiny_spec(**extra)
    spec["runs"]["pt"]["grid"] = {"seed": [0, 3]}
    spec["analyses"] = [{"tool": "revival", "on": "ft", "where": {"lr": "M", "c_train": 1},
                         "settings": {"steps": 10, "scratch_steps": 10, "baselines": ["scr+ft", "scr"]}}]
    return spec


def test_every_run_below_a_seeded_root_inherits_its_seed_baselines_included(tmp_path):
    plan = build_plan(parse_spec(_revival_spec()), tmp_path)
    runs = plan.runs()
    seed_of = {n.key: n.side["config"]["train"]["seed"] for n in runs}
    for n in runs:
        if n.deps:  # a child run: its parent's seed
            assert seed_of[n.key] == seed_of[n.deps[0]], n.label
    baselines = [n for n in runs if n.group.startswith("revival:")]
    # reFT, the O_FT scratch model, Scr.+FT and Scr. for each of the two seeds: none shared across seeds
    assert sorted((n.group, seed_of[n.key]) for n in baselines) == sorted(
        (g, s) for g in ("revival:reft", "revival:scratch-b", "revival:scratch-ft", "revival:scratch")
        for s in (0, 3))
    assert len({n.run_id for n in baselines}) == 8


def test_a_seed_in_the_defaults_gives_the_baselines_a_new_run_id(tmp_path):
    ids = {}
    for seed in (None, 11):
        spec = _revival_spec()
        del spec["runs"]["pt"]["grid"]
        if seed is not None:
            spec["defaults"]["seed"] = seed
        plan = build_plan(parse_spec(spec), tmp_path / str(seed))
        ids[seed] = {n.group: (n.run_id, n.side["config"]["train"]["seed"]) for n in plan.runs()
                     if n.group.startswith("revival:")}
    for group, (rid, seed) in ids[11].items():
        assert seed == 11 and ids[None][group][1] == 0
        assert rid != ids[None][group][0], group


def test_a_stage_inherits_its_parents_seed_unless_it_names_one(tmp_path):
    pt = tmp_path / "pt"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=2", "eval.every=2", "seed=3", "--no-progress", "--out",
           str(pt))
    assert r.returncode == 0, r.stderr
    for extra, seed in (([], 3), (["seed=5"], 5)):
        ft = tmp_path / f"ft{seed}"
        r = wl("finetune", "--preset", "cpu", f"parent={pt}", "steps=2", "eval.every=2", "eval.n=40", "threads=1",
               *extra, "--no-progress", "--out", str(ft))
        assert r.returncode == 0, r.stderr
        assert ck.read_sidecar(ft)["config"]["train"]["seed"] == seed


def test_seed_zero_children_keep_their_run_ids(tmp_path):
    """Inheriting seed 0 from a seed-0 parent gives the run ids a child had when it took the preset's seed 0, so
    existing stores keep their ids."""
    inherited = build_plan(parse_spec(tiny_spec()), tmp_path / "a")
    spec = tiny_spec()
    for name in ("ft", "reft"):
        spec["runs"][name]["set"]["seed"] = 0  # the preset default, given explicitly: no inheritance involved
    explicit = build_plan(parse_spec(spec), tmp_path / "b")
    assert sorted(n.run_id for n in inherited.runs()) == sorted(n.run_id for n in explicit.runs())


def test_a_seeds_list_replicates_every_root_group_and_everything_below_it(tmp_path):
    one = build_plan(parse_spec(_revival_spec()), tmp_path / "a")
    spec = _revival_spec(seeds=[0, 3])
    del spec["runs"]["pt"]["grid"]
    both = build_plan(parse_spec(spec), tmp_path / "b")
    # the spec's seed axis and `seeds:` plan the same runs and analyses
    assert sorted(n.key for n in both.nodes.values()) == sorted(n.key for n in one.nodes.values())
    assert {n.point["train.seed"] for n in both.runs("ft")} == {0, 3}


def test_seeds_that_clash_with_a_seed_set_elsewhere_are_one_line(tmp_path):
    from wrapperlab.experiments.spec import SpecError

    for spec, needle in ((_revival_spec(seeds=[0, 1]), "runs.pt sets its own seed"),
                         (tiny_spec(seeds=[1, 1]), "distinct"),
                         (tiny_spec(seeds=[0, 1], defaults={"seed": 4}), "the defaults set a seed")):
        try:
            parse_spec(spec)
        except SpecError as e:
            assert needle in str(e)
        else:
            raise AssertionError(needle)


def test_run_seeds_on_the_command_line(tmp_path):
    import yaml
    from conftest import one_line_error

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    r = wl("run", str(spec), "--out", str(tmp_path / "s"), "--seeds", "2", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    r1 = wl("run", str(spec), "--out", str(tmp_path / "s"), "--dry-run", "--json")
    assert len(plan["nodes"]) == 2 * len(json.loads(r1.stdout)["nodes"])
    one_line_error(wl("run", str(spec), "--out", str(tmp_path / "s"), "--seeds", "0"), "--seeds")
    assert not (tmp_path / "s").exists()
