"""What the benchmarks share: the command-line options for the pipeline's params file and stage outputs, at their
dvc.yaml paths in this checkout, so each script declares only its own options; and the scores of a variant on a
family of dev orders."""
from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

import numpy as np

from fut.stats import r2_order_effect, rank_correlation

ROOT = Path(__file__).resolve().parents[1]

# option: (default under ROOT, help)
PIPELINE_PATHS = {
    "--params": ("params.yaml", "the params file"),
    "--data": ("data/prepared", "the prepare stage's output"),
    "--reference": ("data/reference", "the reference stage's output"),
    "--cache": ("data/cache", "the cache stage's output"),
    "--groundtruth": ("data/groundtruth", "the groundtruth stage's output"),
    "--sample-orders": ("data/sample_orders", "the sample_orders stage's output"),
    "--multi-epoch": ("data/multi_epoch", "the multi_epoch stage's output"),
}


def pipeline_paths(ap: ArgumentParser, *extra: str) -> None:
    """Adds --params, --data and --reference, then each option of `extra` (keys of PIPELINE_PATHS), as paths."""
    for option in ("--params", "--data", "--reference", *extra):
        default, help = PIPELINE_PATHS[option]
        ap.add_argument(option, type=Path, default=ROOT / default, help=help)


def scores(est: np.ndarray, truth: np.ndarray, naive: float, rows: list[int]) -> dict:
    """Estimated against true final eval losses on `rows`: R² of the order effect against the naive loss,
    Spearman, and the mean and mean absolute error in PPL."""
    e, t = est[rows], truth[rows]
    err = np.exp(e) - np.exp(t)
    return {"r2_order_effect": r2_order_effect(e, t, naive), "spearman": rank_correlation(e, t),
            "bias_ppl": float(np.mean(err)), "absdiff_ppl": float(np.mean(np.abs(err))), "n": len(rows)}
