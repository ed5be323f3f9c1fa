"""dvc.yaml and applications/dvc.yaml against the code: every stage's fut/ dependencies are exactly the import closure of what it runs (its
notebook's code cells, or the module its command runs), so an edit to any module a stage imports reruns that stage
and no other; no import circles in the library; every stage reads its params through sections it lists."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fut"


def module_file(name: str) -> Path | None:
    """fut.x.y -> fut/x/y.py or fut/x/y/__init__.py (None outside the package)."""
    if name != "fut" and not name.startswith("fut."):
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Modules of fut that `source` (the text of `module`) imports, relative imports resolved."""
    out = set()
    base = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{parent}.{node.module}" if node.module else parent
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}     # `from fut import x` imports module fut.x
    return {m for m in out if module_file(m)}


def closure(roots: set[str]) -> set[Path]:
    """Every file of fut imported, directly or not, by the modules `roots` (packages' __init__ included)."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts)):                 # importing fut.a.b runs fut/__init__ and fut/a/__init__
            todo.append(".".join(parts[:i]))
        if name in seen or module_file(name) is None:
            continue
        path = seen[name] = module_file(name)
        todo += imports_of(path.read_text(), name, path.name == "__init__.py")
    return set(seen.values())


def notebook_imports(path: Path) -> set[str]:
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    return imports_of(code, "__notebook__", False)


PIPELINES = ("dvc.yaml", "applications/dvc.yaml")


def stages() -> dict[str, dict]:
    """Every stage of both pipelines, named as DVC names them (`applications/dvc.yaml:curriculum`)."""
    out = {}
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            out[name if pipeline == "dvc.yaml" else f"{pipeline}:{name}"] = stage
    return out


def test_application_stages_run_from_the_root_with_its_params():
    """applications/dvc.yaml's paths, params file and notebooks are the root's, as in dvc.yaml."""
    for name, stage in stages().items():
        assert stage.get("wdir", ".") == (".." if name.startswith("applications/") else "."), name


def stage_roots(stage: dict) -> set[str]:
    cmd = stage["cmd"]
    found = re.search(r"papermill (notebooks/\S+\.ipynb)", cmd)
    if found:
        return notebook_imports(ROOT / found.group(1))
    found = re.search(r"python -m (fut(?:\.\w+)*)", cmd)
    assert found, f"cannot tell what `{cmd}` runs"
    return {found.group(1)}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_dependencies_are_its_import_closure(name):
    stage = stages()[name]
    deps = {ROOT / d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("fut/")}
    want = closure(stage_roots(stage))
    missing = sorted(str(p.relative_to(ROOT)) for p in want - deps)
    extra = sorted(str(p.relative_to(ROOT)) for p in deps - want)
    assert not missing and not extra, f"stage {name}: add to deps {missing}; not imported, remove {extra}"


def test_library_has_no_import_circles():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        # `from . import x` needs the package only for x: edges to packages themselves are not imports of code
        graph[name] = {m for m in imports_of(path.read_text(), name, path.name == "__init__.py")
                       if module_file(m).name != "__init__.py" and m != name}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            assert nxt not in stack, "import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            if nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])


def test_no_output_is_ignored_by_dvcignore():
    ignored = [line.strip() for line in (ROOT / ".dvcignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages().values() for o in s.get("outs", [])]
    assert not [o for o in outs for pattern in ignored if Path(o).match(pattern) or o == pattern.strip("/")]


def test_worker_counts_are_no_stage_param():
    for name, stage in stages().items():
        assert not [p for p in stage.get("params", []) if str(p).startswith("parallel")], name
