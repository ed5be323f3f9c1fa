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


def calibrated_scores(est: np.ndarray, truth: np.ndarray, naive: float, rows: list[int], k: int, draws: int,
                      seed: int) -> dict | None:
    """What calibrating an estimator on k retrained orders gives: for each of `draws` seeded draws of k of `rows`,
    the order effects (est − naive) of the other rows mapped by the least-squares line through the k orders'
    (estimated, true) effects (`affine`), or shifted by their mean residual (`shift`), and scored; the median over
    draws of each score. None when fewer than 3 rows would be left to score."""
    if len(rows) - k < 3:
        return None
    rng = np.random.default_rng(seed)
    runs: dict[str, list[dict]] = {"affine": [], "shift": []}
    for _ in range(draws):
        pick = rng.choice(rows, size=k, replace=False)
        taken = set(pick.tolist())
        rest = [r for r in rows if r not in taken]
        slope, offset = np.polyfit(est[pick] - naive, truth[pick] - naive, 1)
        mapped = {"affine": naive + offset + slope * (est - naive), "shift": est + np.mean(truth[pick] - est[pick])}
        for how, values in mapped.items():
            runs[how].append(scores(values, truth, naive, rest))
    return {how: {key: float(np.median([r[key] for r in rs])) for key in ("r2_order_effect", "spearman", "bias_ppl")}
            | {"n_scored": len(rows) - k, "k": k, "draws": draws} for how, rs in runs.items()}


def worse_family_r2(got: dict) -> float:
    """The house rule's score of a variant's per-family `scores`: the lower R² of the random and domain-block
    families (-inf where one is undefined, so such a variant is never chosen)."""
    r2 = [got[f]["r2_order_effect"] for f in ("random", "domain_blocks")]
    return min(float("-inf") if x is None else x for x in r2)
