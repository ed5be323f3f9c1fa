"""Bad inputs on tiny params: each must be refused before any work, with its message, leaving the output
folder unchanged (the README's table of refusals)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import yaml

from fut import cli, config
from fut.cache import UpdateCache
from fut.projected import ProjectedStore
from fut.config import ConfigError
from fut.corpus import SourceUnavailable
from fut.data import load_prepared
from fut.orders import OrderError
from fut.reference import ReferenceRun, checkpoint_path, load_checkpoint, reference_hash, save_checkpoint
from fut.stages import cache as cache_stage, prepare as prepare_stage, reference as reference_stage
from fut.storage import ArtefactMismatch, InsufficientDisk, load_tensors, save_tensors

from .runs import Run, edited
from .tiny import ROOT


class Refused(RuntimeError):
    """The command line refused its input (exit status 2, message on stderr)."""


REFUSALS = (ConfigError, OrderError, SourceUnavailable, InsufficientDisk, ArtefactMismatch, Refused)


def _cli(*args: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(args))
    if status != 0:
        raise Refused(err.getvalue().strip())


@dataclass(frozen=True)
class BadInput:
    """`setup(run, folder)` writes the bad input under `folder` and returns the call that must refuse it
    (before any work: nothing under `folder` may change); `message` is a fragment of the refusal."""
    name: str
    message: str
    setup: Callable[[Run, Path], Callable[[], object]]


def _retrain_with_params(edit: Callable[[dict], None]):
    def setup(run: Run, folder: Path):
        (folder / "params.yaml").write_text(yaml.safe_dump(edited(run, edit)))
        (folder / "orders.txt").write_text(",".join(map(str, range(run.params.window.steps))) + "\n")
        return lambda: _cli("retrain", "--params", str(folder / "params.yaml"), "--orders", str(folder / "orders.txt"),
                            "--data", str(run.dirs["prepare"]), "--reference", str(run.dirs["reference"]))
    return setup


def _retrain_with_orders(text: str | None):
    def setup(run: Run, folder: Path):
        (folder / "params.yaml").write_text(config.to_yaml(run.params))
        if text is not None:
            (folder / "orders.txt").write_text(text)
        return lambda: _cli("retrain", "--params", str(folder / "params.yaml"), "--orders", str(folder / "orders.txt"),
                            "--data", str(run.dirs["prepare"]), "--reference", str(run.dirs["reference"]))
    return setup


def _prepare_with_sources(edit: Callable[[dict, Path], None]):
    def setup(run: Run, folder: Path):
        d = dataclasses.asdict(run.params)
        (folder / "text").mkdir()
        edit(d["corpus"]["sources"], folder / "text")
        return lambda: prepare_stage.run(config.from_dict(d), folder / "prepared")
    return setup


def _gpu_profile(run: Run, folder: Path):
    params = config.load(ROOT / "profiles" / "gpu-200m.yaml")

    def call():
        with mock.patch("torch.cuda.is_available", return_value=False):   # a machine without a GPU
            prepare_stage.run(params, folder / "prepared")
    return call


def _bf16_without_gpu(run: Run, folder: Path):
    params = config.from_dict(edited(run, lambda d: d["train"].update(device="auto", precision="bf16")))

    def call():
        with mock.patch("torch.cuda.is_available", return_value=False):
            reference_stage.run(params, run.dirs["prepare"], folder / "reference")
    return call


def _small_disk(stage: str):
    def setup(run: Run, folder: Path):
        def call():
            with mock.patch("shutil.disk_usage", return_value=SimpleNamespace(free=10**6)):   # 1 MB free
                if stage == "reference":
                    reference_stage.run(run.params, run.dirs["prepare"], folder / "reference")
                else:
                    cache_stage.run(run.params, run.dirs["prepare"], run.dirs["reference"], folder / "cache")
        return call
    return setup


def _open_cache(edit: Callable[[dict], None]):
    def setup(run: Run, folder: Path):
        params = config.from_dict(edited(run, edit))
        return lambda: UpdateCache(ReferenceRun(params, run.dirs["prepare"], run.dirs["reference"]), run.dirs["cache"])
    return setup


def _open_projected(edit: Callable[[dict], None]):
    def setup(run: Run, folder: Path):
        params = config.from_dict(edited(run, edit))
        store = UpdateCache(ReferenceRun(params, run.dirs["prepare"], run.dirs["reference"]), run.dirs["cache"])
        return lambda: ProjectedStore(params, store, run.dirs["projection"])
    return setup


def _cache_of_other_trajectory(run: Run, folder: Path):
    """The run's cache opened against a reference run whose stored θ_T differs in one value."""
    ref = folder / "reference"
    shutil.copytree(run.dirs["reference"], ref)
    prepared = load_prepared(run.dirs["prepare"], run.params)
    T, h = run.params.window.steps, reference_hash(run.params, prepared)
    state = load_checkpoint(ref, T, h)
    _, meta = load_tensors(checkpoint_path(ref, T))
    name = next(iter(state.theta))
    state.theta[name] = state.theta[name].clone()
    state.theta[name].view(-1)[0] += 1e-3
    save_checkpoint(ref, T, state, h, {k: v for k, v in meta.items() if k in ("train_loss", "eval_loss")})
    return lambda: UpdateCache(ReferenceRun(run.params, run.dirs["prepare"], ref), run.dirs["cache"])


def _cache_of_other_tokenizer(run: Run, folder: Path):
    """A cache whose shards record another tokenizer (as one built from another corpus would)."""
    cache = folder / "cache"
    shutil.copytree(run.dirs["cache"], cache)
    for shard in sorted(cache.glob("shard_*.safetensors")):
        tensors, meta = load_tensors(shard)
        save_tensors(shard, tensors, {**meta, "tokenizer_sha256": hashlib.sha256(b"another tokenizer").hexdigest()})
    return lambda: UpdateCache(ReferenceRun(run.params, run.dirs["prepare"], run.dirs["reference"]), cache)


def _set(section: str, **values) -> Callable[[dict], None]:
    return lambda d: d[section].update(values)


def _missing(sources: dict, text: Path) -> None:
    sources["genesis"]["path"] = str(text / "missing.txt")


def _empty(sources: dict, text: Path) -> None:
    (text / "empty.txt").write_text("\n\n")
    sources["genesis"]["path"] = str(text / "empty.txt")


def _no_match(sources: dict, text: Path) -> None:
    sources["genesis"].update(path=str(text), include="**/*.rst")


def _all_optional_missing(sources: dict, text: Path) -> None:
    for src in sources.values():
        src.update(path=str(text / "missing.txt"), optional=True)


BAD_INPUTS = [
    BadInput("params: unknown key", "params: unknown key window.stepz; allowed keys here: steps, batch_size",
             _retrain_with_params(lambda d: d["window"].update(stepz=6))),
    BadInput("params: value of the wrong type", "params: window.steps = 'six' is not allowed; expected an int",
             _retrain_with_params(_set("window", steps="six"))),
    BadInput("params: value out of range", "params: window.steps = 1 is not allowed; expected an int >= 2",
             _retrain_with_params(_set("window", steps=1))),
    BadInput("params: a method whose eigenspaces the cache does not hold",
             "is not allowed; expected a method whose eigenspaces the cache holds",
             _retrain_with_params(_set("cache", curvature=["window"]))),
    BadInput("params: a strided cache with a method that needs every checkpoint",
             "estimate.methods[3] = 'fut:secant-raw' is not allowed; expected one of naive, fut-subspace",
             _retrain_with_params(_set("cache", checkpoint_stride=2))),
    BadInput("params: the params file is missing", "missing.yaml' not found", lambda run, folder: lambda: _cli(
        "retrain", "--params", str(folder / "missing.yaml"), "--orders", str(folder / "orders.txt"))),
    BadInput("orders: the file is missing", "orders.txt': file not found", _retrain_with_orders(None)),
    BadInput("orders: the file holds no order", "the orders file holds no order", _retrain_with_orders("# none\n")),
    BadInput("orders: an order of the wrong length", "line 1: order has 5 entries; window.steps = 6 requires exactly 6",
             _retrain_with_orders("0,1,2,3,4\n")),
    BadInput("orders: a batch index out of range", "line 2: order[5] = 6 is not a batch index; allowed: integers 0..5",
             _retrain_with_orders("0,1,2,3,4,5\n0,1,2,3,4,6\n")),
    BadInput("orders: a line that is not integers", "line 1: '0,1,two,3,4,5' is not comma-separated integers",
             _retrain_with_orders("0,1,two,3,4,5\n")),
    BadInput("corpus: a source file that does not exist", "missing.txt not found", _prepare_with_sources(_missing)),
    BadInput("corpus: a source file that is empty", "corpus.sources.genesis: the source yielded no text",
             _prepare_with_sources(_empty)),
    BadInput("corpus: a source glob that matches no file", "corpus.sources.genesis: no files match '**/*.rst'",
             _prepare_with_sources(_no_match)),
    BadInput("corpus: no source available at all", "corpus.sources: no domain is available on this machine",
             _prepare_with_sources(_all_optional_missing)),
    BadInput("GPU profile (profiles/gpu-200m.yaml) on a machine without a GPU",
             "params: train.device = 'cuda' but no CUDA device is visible", _gpu_profile),
    BadInput("train.precision: bf16 on a machine without a GPU",
             "params: train.precision = 'bf16' needs a CUDA device", _bf16_without_gpu),
    BadInput("disk: too little free space for the reference trajectory", "the reference trajectory (7 checkpoints",
             _small_disk("reference")),
    BadInput("disk: too little free space for the cache", "is free on its disk; free space, move cache_dir",
             _small_disk("cache")),
    BadInput("projected terms: built with another projection size", "projection [metadata 'projector' is",
             _open_projected(_set("projection", k=32))),
    BadInput("projected terms: built with another projection kind", "projection [metadata 'projector' is",
             _open_projected(_set("projection", kind="gaussian"))),
    BadInput("cache: built with another dtype", "dtype [metadata 'dtype' is 'float32' but this run needs "
             "'bfloat16']", _open_cache(_set("cache", dtype="bfloat16"))),
    BadInput("cache: built for a reference run with other params", "reference run: its prepared data, a pretrained "
             "model's weights and model, optimizer, warmstart, window, train params [metadata 'reference_hash'",
             _open_cache(_set("optimizer", weight_decay=0.5))),
    BadInput("cache: built for another stored reference trajectory", "reference trajectory: the stored values of "
             "θ_T, m_T, v_T [metadata 'trajectory_sha256'", _cache_of_other_trajectory),
    BadInput("cache: built with another tokenizer", "tokenizer [metadata 'tokenizer_sha256'",
             _cache_of_other_tokenizer),
]


@dataclass
class BadInputResult:
    name: str
    refused: bool
    message: str
    changed: list[str]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def check_bad_input(bad: BadInput, run: Run, folder: Path) -> BadInputResult:
    """Refused with the expected message, with nothing under `folder` changed by the refused call."""
    folder.mkdir(parents=True, exist_ok=True)
    call = bad.setup(run, folder)
    before = _snapshot(folder)
    try:
        call()
        message = ""
    except REFUSALS as err:
        message = str(err)
    after = _snapshot(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return BadInputResult(bad.name, bool(message) and bad.message in message and not changed, message, changed)
