"""The architecture holds: data flows one way (package data, fileio, the registry mechanism -> tasks -> models ->
training -> analysis -> experiments -> report -> bench -> cli), so no module imports a higher layer, not even
inside a function."""

import ast
from pathlib import Path

import wrapperlab

ORDER = ["data", "fileio", "registry", "tasks", "models", "training", "analysis", "experiments", "report", "bench",
         "cli"]
ROOT = Path(wrapperlab.__file__).parent


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "wrapperlab":
        return None
    if len(parts) == 1:
        return len(ORDER)  # the package itself re-exports from every layer
    head = "cli" if parts[1].startswith("cli") else parts[1]
    return ORDER.index(head) if head in ORDER else None


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_no_module_imports_a_higher_layer():
    seen, bad = 0, []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mine = _layer(module)
        assert mine is not None, f"{module} is in no layer: add it to ORDER"
        for imported in _imports(path):
            theirs = _layer(imported)
            seen += theirs is not None
            if theirs is not None and theirs > mine:
                bad.append(f"{module} imports {imported}")
    assert seen > 100  # the walk really read the package's imports
    assert not bad, bad


def test_the_walk_catches_an_upward_import(tmp_path):
    """The checker itself: a module of the tasks layer that imports training is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from wrapperlab.training.stage import Stage\n")
    assert [m for m in _imports(f) if _layer(m) > _layer("wrapperlab.tasks.task")] == ["wrapperlab.training.stage"]
