"""The library is laid out like the workflow: one subpackage per stage of rules/, plumbing at the
top, and imports that only ever point to earlier stages or to the plumbing."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib" / "vlmdiff"
# plumbing, in the order its modules may import each other
PLUMBING = ["files", "logs", "config", "plots", "inputs", "hooks", "faults"]
# the stages in import order: sources (the paper preset's importers) converts into the SAE class,
# so it follows sae although its rules sit beside world and models in the DAG
STAGES = ["world", "models", "cache", "sae", "sources", "features", "causal", "interp"]
MAX_LINES = 510


def rank(module: str) -> tuple[int, int]:
    top = module.split(".")[1]
    if top in PLUMBING:
        return 0, PLUMBING.index(top)
    return 1, STAGES.index(top)


def modules() -> dict[str, Path]:
    out = {}
    for path in LIB.rglob("*.py"):
        parts = path.relative_to(LIB.parent).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


def vlmdiff_imports(path: Path) -> set[str]:
    """Every vlmdiff module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmdiff."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlmdiff.")}
    return found


def test_every_module_sits_in_a_stage_or_the_plumbing():
    assert {m.split(".")[1] for m in modules() if m != "vlmdiff"} == set(PLUMBING) | set(STAGES)
    for stage in STAGES:
        assert (LIB / stage / "__init__.py").is_file()
        assert (LIB.parents[1] / "rules" / f"{stage}.smk").is_file() or stage in (
            "sources", "interp")


def test_imports_point_only_to_earlier_stages_and_the_plumbing():
    backward = []
    for name, path in modules().items():
        if name == "vlmdiff":
            continue
        for target in vlmdiff_imports(path):
            same_stage = target.split(".")[1] == name.split(".")[1] and rank(name)[0] == 1
            if not same_stage and rank(target) > rank(name):
                backward.append(f"{name} -> {target}")
    assert not backward, backward


def test_no_module_is_much_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}


def test_log_and_regimes_are_defined_once():
    defined = {"Log": [], "REGIMES": []}
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id in defined:
                    defined[t.id].append(name)
    assert defined == {"Log": ["vlmdiff.logs"], "REGIMES": ["vlmdiff.sae.adaptation"]}


def test_workflow_scripts_and_benchmarks_import_names_that_exist():
    """A renamed or moved function fails here, not after the DAG has run for an hour."""
    import importlib

    root = LIB.parents[1]
    missing = []
    for folder in ("workflow_scripts", "benchmarks", "research"):
        for path in sorted((root / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module
                        and node.module.startswith("vlmdiff")):
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)]
    assert not missing
