"""Stage `reference`: the reference run, then one retrain of the identity order compared bit for bit with the
stored θ_T, m_T, v_T."""
from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..data import load_prepared
from ..evaluation import ppl
from ..groundtruth import Oracle
from ..reference import ReferenceRun, checkpoint_path, load_checkpoint, run_reference, states_equal
from ..storage import atomic_write_json


def run(params: Params, data_dir: Path, ref_dir: Path) -> tuple[dict, dict]:
    prepared = load_prepared(data_dir, params)
    summary = run_reference(params, prepared, ref_dir)
    atomic_write_json(Path(ref_dir) / "summary.json", summary)
    T = params.window.steps
    oracle = Oracle(ReferenceRun(params, data_dir, ref_dir))
    bitwise = states_equal(oracle.trainer(range(T)).state(), load_checkpoint(ref_dir, T, summary["reference_hash"]))
    metrics = {
        "n_params": summary["n_params"], "window_steps": T, "batch_size": params.window.batch_size,
        "seq_len": params.data.seq_len, "domains": prepared.domains,
        "eval_ppl_start": ppl(summary["eval_loss_start"]), "eval_ppl_end": ppl(summary["eval_loss_end"]),
        "domain_eval_ppl_end": {d: ppl(x) for d, x in summary["domain_eval_loss_end"].items()},
        "identity_retrain_bitwise": bitwise, "device": summary["device"],
        "warmstart_seconds": summary["warm_seconds"], "window_seconds": summary["window_seconds"],
        "checkpoint_bytes": sum(checkpoint_path(ref_dir, t).stat().st_size for t in range(T + 1)),
    }
    return summary, metrics
