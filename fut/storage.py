"""Atomic writes and self-describing artefacts.

Every file is written to a temporary name in the same folder and renamed into place, so a killed run never
leaves a half-written file under the final name. Tensors go to safetensors with string metadata that records
provenance; `load_tensors` refuses a file whose metadata does not match what the caller expects.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, safe_open, save_file


class ArtefactMismatch(RuntimeError):
    """A stored artefact was built from other params, data or code than the current run."""


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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}


def check_metadata(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for key, want in expected.items():
        if found.get(key) != want:
            raise ArtefactMismatch(f"{path}: metadata {key!r} is {found.get(key)!r} but this run needs {want!r}; "
                                   "rebuild it (dvc repro) or point to the matching artefact")


def load_tensors(path: Path, expected: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the stage that builds it (dvc repro)")
    meta = read_metadata(path)
    check_metadata(path, meta, expected or {})
    return load_file(str(path)), meta
