"""A user's own checkpoint as the model whose fine-tuning order is studied (`model.pretrained`): a local Hugging
Face causal LM with its tokenizer. Only safetensors weights are read (a pickled checkpoint would run code when
loaded), no code from the folder runs (trust_remote_code stays off), and nothing is downloaded."""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

CONFIG = "config.json"
WEIGHTS = "*.safetensors"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files a tokenizer is built from: tokenizer.json (fast), or a slow tokenizer's vocabulary.
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
TOKENIZER_FILES = TOKENIZER_SOURCES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                                       "added_tokens.json")
LOCAL = {"local_files_only": True, "trust_remote_code": False}


def problem(path: Path) -> str | None:
    """What a checkpoint folder lacks to be studied, phrased as what is expected; None when it is usable. Cheap:
    it reads JSON and the tokenizer, not the weights."""
    path = Path(path)
    if not path.is_dir():
        return "an existing folder holding a Hugging Face causal-LM checkpoint (config.json, *.safetensors, tokenizer)"
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict):
        return f"a folder with a valid {CONFIG}, as save_pretrained writes it"
    if not list(path.glob(WEIGHTS)):
        pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
        found = f" ({', '.join(pickled)} refused: loading a pickled checkpoint can run code)" if pickled else ""
        return (f"*.safetensors weights in the folder{found}. Convert it where you trust it: "
                "model.save_pretrained(folder, safe_serialization=True)")
    for name in (CONFIG, "tokenizer_config.json"):
        if "auto_map" in (_read_json(path / name) or {}):
            return (f"an architecture that transformers ships: {name} has auto_map (code from the checkpoint "
                    "folder), and trust_remote_code stays off")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return (f"a model_type that AutoModelForCausalLM loads, not {config.get('model_type')!r}; the supported ones "
                "are the keys of transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if not any((path / name).is_file() for name in TOKENIZER_SOURCES):
        return (f"the checkpoint's tokenizer beside it (one of {', '.join(TOKENIZER_SOURCES)}, with the files "
                "tokenizer.save_pretrained(folder) writes)")
    try:
        eos = load_tokenizer(path).eos_token_id
    except (OSError, ValueError) as err:
        return f"a tokenizer that AutoTokenizer loads from the folder ({err})"
    if eos is None:
        return ("a tokenizer with an EOS token, which joins the paragraphs of the text; set tokenizer.eos_token "
                "and save_pretrained it again")
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **LOCAL)


def load_config(path: Path):
    """The checkpoint's config, without dropout: the order study needs a deterministic step (every retrain of
    the identity order must reproduce the reference run), and no generation cache."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), **LOCAL)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    config.use_cache = False
    return config


def max_positions(path: Path) -> int | None:
    """The longest sequence the model takes, where its config says so."""
    return getattr(load_config(path), "max_position_embeddings", None)


def meta_model(path: Path) -> torch.nn.Module:
    """The architecture on the meta device: its shapes without reading or allocating weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(path), attn_implementation="eager",
                                                trust_remote_code=False)


def vocab_rows(path: Path) -> int:
    """Rows of the input embedding: every token id must be below it (the tokenizer may count fewer or more)."""
    return meta_model(path).get_input_embeddings().num_embeddings


def load_model(path: Path) -> tuple[torch.nn.Module, list[str]]:
    """The model in float32 with eager attention (SDPA breaks double backward and forward-mode AD, which the
    estimators use), and the names of parameters the checkpoint lacks (from_pretrained would start them random)."""
    from transformers import AutoModelForCausalLM

    with _no_progress_bar():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=load_config(path), attn_implementation="eager", use_safetensors=True,
            dtype=torch.float32, output_loading_info=True, **LOCAL)
    return model, sorted(info["missing_keys"])


@contextmanager
def _no_progress_bar():
    """Every retrain loads the model: a progress bar each time would flood the stage's log."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def digest(path: Path, weights: bool = True) -> str:
    """sha256 over the checkpoint's config, tokenizer files and (with `weights`) safetensors: what was built from
    it is refused once its contents change, not only its path."""
    path = Path(path)
    files = [path / CONFIG] + [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    files += sorted(path.glob(WEIGHTS)) if weights else []
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{_file_sha256(str(f), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too: a stage asks for the digest of the same unchanged files many times."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
