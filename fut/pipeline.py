"""The DVC stages as functions: each reads params, builds its artefacts and returns its metrics.
Notebooks call these, draw the figures and write the metrics."""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

from . import config, corpus, data
from .evaluation import ppl
from .groundtruth import Oracle, noise_floor, run_groundtruth
from .orders import groundtruth_orders
from .reference import checkpoint_path, load_checkpoint, run_reference, states_equal
from .storage import atomic_write_json, read_json

log = logging.getLogger(__name__)


def prepare(params: config.Params, out_dir: Path) -> dict:
    """Corpus text per domain, the BPE tokenizer, and the packed splits."""
    out_dir = Path(out_dir)
    files = corpus.write_domains(params.corpus, out_dir / "corpus", params.data.seed)
    tokenizer = data.train_tokenizer(files, params.tokenizer.vocab_size, params.tokenizer.min_frequency,
                                     out_dir / data.TOKENIZER_DIR)
    packed = data.pack_domains(files, tokenizer, params.data.seq_len)
    splits = data.split(packed, params)
    domains = list(files)
    data.write_prepared(out_dir, splits, domains, data.window_plan(domains, params), tokenizer, params)
    return {"domains": domains, "vocab_size": len(tokenizer),
            "sequences_per_domain": {d: int(packed[d].shape[0]) for d in domains},
            "tokens_per_domain": {d: int(packed[d].numel()) for d in domains},
            "warmstart_sequences": int(splits["warmstart"].shape[0]),
            "window_shape": list(splits["window"].shape),
            "missing_domains": [d for d in params.corpus.sources if d not in files]}


def reference(params: config.Params, data_dir: Path, ref_dir: Path) -> tuple[dict, dict]:
    """Reference run, then one retrain of the identity order compared bit for bit with the stored θ_T, m_T, v_T."""
    prepared = data.load_prepared(data_dir, params)
    summary = run_reference(params, prepared, ref_dir)
    atomic_write_json(Path(ref_dir) / "summary.json", summary)
    T = params.window.steps
    oracle = Oracle(params, data_dir, ref_dir)
    bitwise = states_equal(oracle.retrain_trainer(range(T)).state(),
                           load_checkpoint(ref_dir, T, summary["reference_hash"]))
    metrics = {
        "n_params": summary["n_params"], "window_steps": T, "batch_size": params.window.batch_size,
        "seq_len": params.data.seq_len, "domains": prepared.domains,
        "eval_ppl_start": ppl(summary["eval_loss_start"]), "eval_ppl_end": ppl(summary["eval_loss_end"]),
        "domain_eval_ppl_end": {d: ppl(x) for d, x in summary["domain_eval_loss_end"].items()},
        "identity_retrain_bitwise": bitwise, "warmstart_seconds": summary["warm_seconds"],
        "window_seconds": summary["window_seconds"],
        "checkpoint_bytes": sum(checkpoint_path(ref_dir, t).stat().st_size for t in range(T + 1)),
    }
    return summary, metrics


def groundtruth(params: config.Params, data_dir: Path, ref_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """Retrain the seeded order set; returns per-order results and summary metrics."""
    prepared = data.load_prepared(data_dir, params)
    summary = read_json(Path(ref_dir) / "summary.json")
    g = params.groundtruth
    orders = groundtruth_orders(params.window.steps, g.n_random, g.seed, g.structured, prepared.window_domains,
                                len(prepared.domains), summary["batch_losses_start"])
    results = run_groundtruth(params, orders, data_dir, ref_dir, Path(out_dir) / "orders", g.eval_every, g.workers)
    ppls = [r["eval_ppl"] for r in results.values()]
    random_ppls = [r["eval_ppl"] for n, r in results.items() if n.startswith("random-")]
    metrics = {
        "n_orders": len(results), "n_random": len(random_ppls),
        "true_ppl_mean": statistics.fmean(ppls), "true_ppl_std": statistics.pstdev(ppls),
        "true_ppl_min": min(ppls), "true_ppl_max": max(ppls),
        "random_ppl_std": statistics.pstdev(random_ppls) if random_ppls else None,
        "identity_ppl": results["identity"]["eval_ppl"],
        "retrain_seconds_per_order": statistics.fmean(r["seconds"] for r in results.values()),
        "workers": g.workers,
        "noise_floor": noise_floor(Oracle(params, data_dir, ref_dir)),
    }
    return results, metrics
