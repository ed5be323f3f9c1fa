"""Domain order (DESIGN §1): which ordering of the domains, trained as blocks, gives the best mixed eval PPL
and the best PPL on each domain? Every ordering is estimated; the truth of the top and bottom few by estimate
comes from the ground truth where it retrained them (it retrains every block order by default), else from
retraining here. Orders the ground truth holds beyond those few are compared too: their truth is free.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .applications import estimated_readouts, truth_for
from .config import Params
from .costs import measured
from .estimators import EstimationContext
from .evaluation import ppl, ppl_or_none
from .orders import domain_block_orders
from .protocol import dev_truth
from .reference import ReferenceRun
from .stats import rank_correlation


def sequence(name: str, domains: list[str]) -> list[str]:
    """The domain names of a block order's name, `domains-2-0-1` -> [domains[2], domains[0], domains[1]]."""
    return [domains[int(x)] for x in name.split("-")[1:]]


def domain_order(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path,
                 out_dir: Path) -> tuple[dict, dict]:
    dc, method = params.domain_order, params.estimate.default
    ctx = EstimationContext(ReferenceRun(params, data_dir, ref_dir), cache_dir)
    prepared = ctx.prepared
    if min(prepared.window_domains) < 0 or len(prepared.domains) < 2:
        return {"rows": []}, {"method": method, "n_orders": 0,
                              "skipped": "the window has no domain-pure batches (window.batches = mixed)"}
    orders = domain_block_orders(prepared.window_domains, len(prepared.domains), dc.max_orders, dc.seed)
    names = list(orders)
    readouts = {d: prepared.eval_sets[d] for d in prepared.domains}
    with measured() as estimation:
        est = estimated_readouts(ctx, [orders[n] for n in names], method, readouts=readouts)

    ranked = [names[k] for k in np.argsort(np.where(np.isfinite(est["eval_loss"]), est["eval_loss"], np.inf),
                                           kind="stable")]
    few = min(dc.verify, len(ranked) // 2) or 1
    ends = {n: orders[n] for n in ranked[:few] + ranked[-few:]}
    truth_gt = dev_truth(gt_dir)
    with measured() as verification:
        truth, retrained = truth_for(params, ends, truth_gt, data_dir, ref_dir, Path(out_dir) / "orders", "verify",
                                     needs=("eval_loss", "domain_eval_loss"))
    known = {tuple(r["order"]): r for r in truth_gt.values()}
    truth.update({n: known[tuple(o)] for n, o in orders.items() if n not in truth and tuple(o) in known})

    true_ranked = sorted((n for n in names if n in truth), key=lambda n: truth[n]["eval_loss"])
    rows = []
    for k, n in enumerate(names):
        row = {"order": n, "sequence": " → ".join(sequence(n, prepared.domains)), "est_rank": ranked.index(n) + 1,
               "true_rank": true_ranked.index(n) + 1 if n in truth else None,
               "est_ppl": ppl_or_none(est["eval_loss"][k]),
               "true_ppl": truth[n]["eval_ppl"] if n in truth else None, "verified": n in ends}
        for d in prepared.domains:
            row[f"est_ppl_{d}"] = ppl_or_none(est[d][k])
            row[f"true_ppl_{d}"] = ppl(truth[n]["domain_eval_loss"][d]) if n in truth else None
        rows.append(row)

    def best(key: str) -> dict:
        """The order the estimate ranks best on `key` and the truly best among orders with a truth."""
        with_est = [r for r in rows if r[f"est_{key}"] is not None]
        with_true = [r for r in rows if r[f"true_{key}"] is not None]
        e = min(with_est, key=lambda r: r[f"est_{key}"]) if with_est else None
        t = min(with_true, key=lambda r: r[f"true_{key}"])
        both = [r for r in with_true if r[f"est_{key}"] is not None]
        return {"est_best": e and {"order": e["order"], "sequence": e["sequence"], "est_ppl": e[f"est_{key}"],
                                   "true_ppl": e[f"true_{key}"]},
                "true_best": {"order": t["order"], "sequence": t["sequence"], "true_ppl": t[f"true_{key}"],
                              "est_ppl": t[f"est_{key}"]},
                "est_best_is_true_best": bool(e and e["order"] == t["order"]),
                # Where the estimate's pick truly ranks among the orders with a truth (1: it is the best).
                "est_best_true_rank": (1 + sorted(r[f"true_{key}"] for r in with_true).index(e[f"true_{key}"])
                                       if e and e[f"true_{key}"] is not None else None),
                "spearman": rank_correlation([r[f"est_{key}"] for r in both], [r[f"true_{key}"] for r in both]),
                "n_true": len(with_true)}

    metrics = {
        "method": method, "n_orders": len(names), "n_verified": len(ends), "n_with_truth": len(truth),
        "n_retrained": len(retrained), "mixed": best("ppl"),
        "per_domain": {d: best(f"ppl_{d}") for d in prepared.domains},
        "top": [r for n in ranked[:few] for r in rows if r["order"] == n],
        "bottom": [r for n in ranked[-few:] for r in rows if r["order"] == n],
        "costs": {"estimation": {**estimation.as_dict(), "seconds_per_order": estimation.seconds / len(names)},
                  "verification": verification.as_dict()},
    }
    return {"rows": rows}, metrics
