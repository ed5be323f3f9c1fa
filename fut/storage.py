"""Atomic writes and self-describing, self-checking artefacts.

Every file is written to a temporary name in the same folder and renamed into place, so a killed run never
leaves a half-written file under the final name, only a `.NAME.*.tmp` that the stage's next run removes.
Tensors go to safetensors with string metadata that records provenance and, per tensor, its dtype, shape and
the sha256 of its bytes. `load_tensors` refuses a file whose provenance does not match what the caller expects
(naming what differs) and a tensor whose bytes or shape do not match their record (flipped bytes, a truncated
or rewritten file), naming the file and the tensor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)


class ArtefactMismatch(RuntimeError):
    """A stored artefact was built from other params, data or code than the current run."""


class CorruptArtefact(ArtefactMismatch):
    """A stored artefact's bytes or shapes do not match what was recorded when it was written."""


class InsufficientDisk(RuntimeError):
    """The disk cannot hold what a stage is about to write."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed run left in `folder` (never read, but they would fill the disk and
    DVC would track them). Only one run of a stage may use its folder at a time."""
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    _atomic(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: NaN is not JSON; a diverged number must be recorded as null explicitly.
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def format_bytes(n: int) -> str:
    return next(f"{n / f:.1f} {unit}" for f, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                if n >= f or f == 1)


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, when the disk of `folder` has less free space than `needed` bytes."""
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise InsufficientDisk(f"{folder}: {what} needs about {format_bytes(needed)} ({needed} bytes) but only "
                               f"{format_bytes(free)} ({free} bytes) is free on its disk; free space or move the "
                               "folder to a larger disk")


# All metadata under one key, as sorted JSON: safetensors writes a metadata map in hash order, which differs
# from run to run, and the same artefact must be the same bytes (DVC hashes them).
META_KEY = "fut"
# Reserved key inside it: per tensor {"dtype", "shape", "sha256"} as written.
TENSORS_KEY = "tensors"

# What each provenance key stands for, to name what differs when an artefact is refused.
PROVENANCE = {
    "format": "file format (written by an older version of fut)",
    "prepare_hash": "prepared data: corpus, tokenizer and data params, window shape, a pretrained model's tokenizer",
    "tokenizer_sha256": "tokenizer",
    "reference_hash": ("reference run: its prepared data, a pretrained model's weights and model, optimizer, "
                       "warmstart, window, train params"),
    "trajectory_sha256": "reference trajectory: the stored values of θ_T, m_T, v_T",
    "cache_params": "cache params",
    "projector": "projection",
    "dtype": "dtype",
    "dim": "parameter count",
    "versions": "library versions",
    "t": "checkpoint index",
    "window_step": "checkpoint index",
}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype, bfloat16 included)."""
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _record(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": tensor_digest(t)}


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    if TENSORS_KEY in metadata:
        raise ValueError(f"metadata key {TENSORS_KEY!r} is reserved for the tensors' checksums")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    records = {k: _record(t) for k, t in tensors.items()}
    meta = {META_KEY: json.dumps({**metadata, TENSORS_KEY: records}, sort_keys=True)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _unreadable(path: Path, err: Exception) -> CorruptArtefact:
    return CorruptArtefact(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupted; "
                           "rebuild it (dvc repro)")


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, dict] | None, dict[str, dict]]:
    """(metadata, tensor records as written or None for a file without them, dtype and shape of each tensor
    as the file's header has them now). Reads the header only."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
            layout = {name: {"dtype": fh.get_slice(name).get_dtype(), "shape": list(fh.get_slice(name).get_shape())}
                      for name in fh.keys()}
    except (SafetensorError, json.JSONDecodeError) as err:
        raise _unreadable(path, err) from err
    records = meta.pop(TENSORS_KEY, None)
    return meta, records, layout


def read_metadata(path: Path) -> dict[str, Any]:
    return read_header(path)[0]


# safetensors' header dtype names, as torch names them in the records.
_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def check_layout(path: Path, records: dict[str, dict] | None, layout: dict[str, dict]) -> None:
    """The file's tensors are the ones written, with the dtypes and shapes written (a cheap header check)."""
    if records is None:
        raise CorruptArtefact(f"{path} has no tensor checksums (written by an older fut or another tool); "
                              "rebuild it (dvc repro)")
    if set(records) != set(layout):
        raise CorruptArtefact(f"{path} holds tensors {sorted(layout)} but was written with {sorted(records)}; "
                              "rebuild it (dvc repro)")
    for name, rec in records.items():
        dtype = layout[name]["dtype"]
        now = {"dtype": _HEADER_DTYPES.get(dtype, dtype), "shape": layout[name]["shape"]}
        if now != {"dtype": rec["dtype"], "shape": rec["shape"]}:
            raise CorruptArtefact(f"{path}: tensor {name!r} is {now['dtype']}{now['shape']} but was written as "
                                  f"{rec['dtype']}{rec['shape']}; the file was altered; rebuild it (dvc repro)")


def verify_tensor(path: Path, name: str, tensor: torch.Tensor, record: Mapping[str, Any]) -> None:
    if tensor_digest(tensor) != record["sha256"]:
        raise CorruptArtefact(f"{path}: tensor {name!r} does not match the sha256 recorded when it was written "
                              "(the file is corrupted); rebuild it (dvc repro)")


def check_metadata(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse an artefact whose provenance differs from what this run needs, naming every difference."""
    diffs = [f"{PROVENANCE.get(key, key)} [metadata {key!r} is {found.get(key)!r} but this run needs {want!r}]"
             for key, want in expected.items() if found.get(key) != want]
    if diffs:
        raise ArtefactMismatch(f"{path} was built for another run; it differs in: " + "; ".join(diffs)
                               + ". Rebuild it (dvc repro) or point to the matching artefact")


def load_tensors(path: Path, expected: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of `path` and its metadata, after checking its provenance against `expected` and every
    tensor against its recorded dtype, shape and sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the stage that builds it (dvc repro)")
    meta, records, layout = read_header(path)
    check_metadata(path, meta, expected or {})
    check_layout(path, records, layout)
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise _unreadable(path, err) from err
    for name, t in tensors.items():
        verify_tensor(path, name, t, records[name])
    return tensors, meta
