"""Several epochs (DESIGN §9): for each E, the E-epoch reference run and fut-subspace over its E·T steps
(fut/epochs.py), scored against retraining dev and test E-epoch orders (a new permutation every epoch, the same
one every epoch, domain blocks redrawn every epoch, difficulty and alternating orders), and how the error grows
with E."""
from __future__ import annotations

from pathlib import Path

from . import protocol
from .config import Params
from .epochs import EpochReference, reference_order
from .estimators import EstimationContext
from .evaluation import ppl
from .groundtruth import retrain_all
from .order_study import score_study
from .orders import domain_block_orders
from .reference import ReferenceRun
from .schedules import as_units, epoch_order_set
from .storage import read_json
from .stats import rank_correlation
from .subspace import Subspace


def order_sets(params: Params, run: ReferenceRun, epochs: int, batch_losses: list[float]) -> dict[str, dict]:
    """Dev (with the E-epoch reference order, `identity`) and test E-epoch orders, each from its own seed."""
    me, T, domains = params.multi_epoch, run.T, run.prepared.window_domains
    return {protocol.DEV: {"identity": reference_order(T, epochs),
                           **epoch_order_set(T, epochs, domains, batch_losses, me.dev, me.seed + epochs)},
            protocol.TEST: epoch_order_set(T, epochs, domains, batch_losses, me.test, me.test_seed + epochs,
                                           prefix="test-")}


def domain_order(params: Params, run: ReferenceRun, sub: Subspace, naive: float, epochs: int, data_dir: Path,
                 ref_dir: Path, out_dir: Path) -> dict:
    """The domain-order study over epochs: every ordering of the domains as blocks (a seeded sample of
    `domain_order.max_orders`), the same every epoch, estimated; the best and worst `domain_order.verify` by
    estimate retrained."""
    dc, prepared = params.domain_order, run.prepared
    if min(prepared.window_domains) < 0 or len(prepared.domains) < 2:
        return {"n_orders": 0, "skipped": "the window has no domain-pure batches (window.batches = mixed)"}
    blocks = domain_block_orders(prepared.window_domains, len(prepared.domains), dc.max_orders, dc.seed)
    orders = {name: order * epochs for name, order in blocks.items()}
    est = dict(zip(orders, sub.quadratic(sub.replay(as_units(list(orders.values()))), naive).tolist()))
    ranked = sorted(orders, key=est.get)
    k = min(dc.verify, len(ranked) // 2)
    verify = ranked[:k] + ranked[len(ranked) - k:]
    truth = retrain_all(params, {n: orders[n] for n in verify}, data_dir, ref_dir, out_dir,
                        (), 0, f"{epochs}-epoch domain order")
    names = lambda n: [prepared.domains[int(x)] for x in n.split("-")[1:]]
    rows = [{"sequence": " > ".join(names(n)), "est_rank": r + 1, "est_ppl": ppl(est[n]),
             "true_ppl": ppl(truth[n]["eval_loss"]) if n in truth else None} for r, n in enumerate(ranked)]
    have = [r for r in rows if r["true_ppl"] is not None]
    return {"epochs": epochs, "n_orders": len(orders), "rows": rows,
            "est_best": rows[0], "true_best_of_verified": min(have, key=lambda r: r["true_ppl"]),
            "spearman_verified": rank_correlation([r["est_ppl"] for r in have], [r["true_ppl"] for r in have])}


def multi_epoch(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, out_dir: Path
                ) -> tuple[list[dict], dict]:
    """The per-order rows (all E) and the metrics (reports/metrics/multi_epoch.json): the blocks of the first E in
    `multi_epoch.epochs` at the top level, every E's under `by_epochs`, `error_growth` per E, and the domain-order
    study over the first E's epochs. Under `out_dir`: cache/, groundtruth/epochs_E/{dev,test}, domain_order/."""
    out_dir = Path(out_dir)
    run = ReferenceRun(params, data_dir, ref_dir)
    ctx = EstimationContext(run, cache_dir)
    batch_losses = read_json(Path(ref_dir) / "summary.json")["batch_losses_start"]
    rows, by_epochs, growth = [], {}, []
    for E in params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, out_dir / "cache")
        sub, record = ref.load_or_build()
        naive = record["eval_loss"]
        splits = order_sets(params, run, E, batch_losses)
        mine, scores = score_study(params, sub, naive, splits, data_dir, ref_dir,
                                   out_dir / "groundtruth" / f"epochs_{E}", f"{E}-epoch ground truth")
        rows += [{**r, "epochs": E} for r in mine]
        by_epochs[str(E)] = {"epochs": E, "damping": sub.damping, "naive_eval_loss": naive, **scores,
                             "cache_bytes": ref.bytes(),
                             "cache_seconds": record["train_seconds"] + record["grad_seconds"]
                             + record["subspace_seconds"], "cache": record}
        fams = scores[protocol.TEST]["families"]
        growth.append({"epochs": E, "damping": sub.damping, **{f"{f}_{k}": fams.get(f, {}).get("fut-subspace", {}).get(k)
                                       for f in ("random", "all")
                                       for k in ("r2_order_effect", "spearman", "absdiff_ppl", "bias_ppl")},
                       "naive_absdiff_ppl_all": fams["all"]["naive"]["absdiff_ppl"]})
        if E == params.multi_epoch.epochs[0]:
            study = domain_order(params, run, sub, naive, E, data_dir, ref_dir, out_dir / "domain_order")
    first = by_epochs[str(params.multi_epoch.epochs[0])]
    metrics = {"method": "fut-subspace", "readout": "quadratic", "epochs": first["epochs"],
               protocol.DEV: first[protocol.DEV], protocol.TEST: first[protocol.TEST],
               "cache_bytes": first["cache_bytes"], "cache_seconds": first["cache_seconds"],
               "by_epochs": by_epochs, "error_growth": growth, "domain_order": study}
    return rows, metrics
