"""The DVC remote: the project's default one, and a push/pull round trip on a tiny DVC project (one seconds-long
stage with params and a folder output, as the real stages have), between a repository and a fresh clone of it."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MAKE = """\
import json, random, sys
from pathlib import Path
import yaml
p = yaml.safe_load(Path("params.yaml").read_text())["make"]
out = Path("data/made")
out.mkdir(parents=True)
(out / "tokens.bin").write_bytes(random.Random(p["seed"]).randbytes(p["n_bytes"]))
(out / "meta.json").write_text(json.dumps(p))
"""


@pytest.fixture
def dvc_env(tmp_path) -> dict:
    """DVC and git isolated from this machine's configuration and caches, analytics off."""
    (tmp_path / "gitconfig").write_text("[user]\n\tname = fut\n\temail = fut@example.invalid\n")
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
            "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "global"), "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "system"),
            "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"), "GIT_CONFIG_NOSYSTEM": "1"}


def run(env: dict, cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(env: dict, cwd: Path, *args: str) -> str:
    return run(env, cwd, sys.executable, "-m", "dvc", *args)


def test_default_remote_is_a_folder_beside_the_checkout(dvc_env):
    config = dict(line.split("=", 1) for line in dvc(dvc_env, ROOT, "config", "--list", "--project").splitlines())
    url = Path(config[f"remote.{config['core.remote']}.url"])   # resolved by DVC against .dvc/
    assert url.is_absolute() and url.parent == ROOT.parent, url


@pytest.mark.slow   # about 15 s of DVC commands: an environment check, not part of the edit loop
def test_push_then_pull_into_a_fresh_clone_restores_the_outputs(tmp_path, dvc_env):
    origin, clone, remote = tmp_path / "origin", tmp_path / "clone", tmp_path / "remote"
    origin.mkdir()
    (origin / "make.py").write_text(MAKE)
    (origin / "params.yaml").write_text("make:\n  n_bytes: 65536\n  seed: 7\n")
    (origin / "dvc.yaml").write_text(
        f"stages:\n  make:\n    cmd: {shlex.quote(sys.executable)} make.py\n"
        "    deps: [make.py]\n    params: [make]\n    outs: [data/made]\n")
    run(dvc_env, origin, "git", "init", "-q")
    dvc(dvc_env, origin, "init", "-q")
    dvc(dvc_env, origin, "remote", "add", "-d", "store", str(remote))
    dvc(dvc_env, origin, "repro")
    run(dvc_env, origin, "git", "add", "-A")
    run(dvc_env, origin, "git", "commit", "-qm", "tiny pipeline")
    dvc(dvc_env, origin, "push")
    assert json.loads(dvc(dvc_env, origin, "status", "--cloud", "--json")) == {}   # everything is in the remote

    # A fresh clone has the code, params and dvc.lock, and neither the outputs nor a DVC cache.
    run(dvc_env, tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "made").exists() and not (clone / ".dvc" / "cache").exists()
    dvc(dvc_env, clone, "pull")
    for name in ("tokens.bin", "meta.json"):
        assert (clone / "data" / "made" / name).read_bytes() == (origin / "data" / "made" / name).read_bytes()
    assert json.loads(dvc(dvc_env, clone, "status", "--json")) == {}   # `dvc repro` there would run nothing
