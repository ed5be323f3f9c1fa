"""The pretrained-model path on the default corpus: a model saved locally with `save_pretrained` (the default
run's own warm-started model at the window start, with its tokenizer) goes through the whole pipeline as
`model.pretrained`, with no warm start, so the window is a fine-tuning run of that checkpoint.

The run is one whole point through the pipeline's own stages (fut.sweep.run_point: prepare on the default run's
corpus text → reference → retrained orders → cache → projection → estimates), with the sweep's ground truth
(`sweep.n_random` random orders and `sweep.structured`). It checks that the window starts from the checkpoint's
weights exactly (the checkpoint's eval PPL equals the default run's at its window start, when the default run's
data is the same), and reports the estimators' accuracy against retraining and their speed-up.

    python benchmarks/pretrained_finetune.py [--params params.yaml] [--data data/prepared] [--reference data/reference]

Prints a table and writes benchmarks/results/pretrained_finetune.json, with the default method's verdict from its
own indicators (fut.ablations.flagged, at the indicator scale of reports/metrics/error_proxy.json). A rerun reuses
that file when the run's params and the checkpoint's files are unchanged, wherever the checkout lies. Needs
`dvc repro` through the reference stage (the checkpoint is the reference run's window start) and the ablations
stage (the scale).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config  # noqa: E402
from fut.ablations import flagged  # noqa: E402
from fut.model import build_model  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json, read_json  # noqa: E402
from fut.sweep import point_key, point_params, run_point  # noqa: E402


def save_checkpoint(ref: ReferenceRun, folder: Path) -> Path:
    """The reference run's window-start model and its tokenizer, as a user's `save_pretrained` folder."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    p = ref.params
    model = build_model(p.model, ref.prepared.vocab_size, p.data.seq_len, ref.prepared.eos_id)
    missing, unexpected = model.load_state_dict(ref.start.theta, strict=False)
    tied = {"lm_head.weight"} if p.model.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the stored θ_0 does not match the model: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(folder, safe_serialization=True)
    for f in (ref.data_dir / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def checkpoint_key(params: config.Params, base: config.Params, checkpoint: Path) -> str:
    """The run's provenance with the checkpoint named by its files' contents, not by where it lies."""
    digest = hashlib.sha256()
    for f in sorted(Path(checkpoint).iterdir()):
        digest.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    named = dataclasses.replace(params.model, pretrained=f"sha256:{digest.hexdigest()}")
    return point_key(dataclasses.replace(params, model=named), base)


def fmt(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else format("–", spec[0] + spec[1:].split(".")[0])


def finetune_params(base: config.Params, checkpoint: Path, corpus: Path) -> config.Params:
    d = dataclasses.asdict(point_params(base, {}, corpus))
    d["model"]["pretrained"] = str(checkpoint.resolve())
    d["warmstart"]["enabled"] = False
    return config.from_dict(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap)
    ap.add_argument("--work", type=Path, default=ROOT / "data/pretrained_finetune")
    ap.add_argument("--error-proxy", type=Path, default=ROOT / "reports/metrics/error_proxy.json",
                    help="the ablations stage's metrics (the indicator's scale)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretrained_finetune.json")
    args = ap.parse_args()
    base = config.load(args.params)
    ref = ReferenceRun(base, args.data, args.reference)
    checkpoint = save_checkpoint(ref, args.work / "checkpoint")
    start_ppl = math.exp(read_json(args.reference / "summary.json")["eval_loss_start"])
    params = finetune_params(base, checkpoint, args.data / "corpus")
    key = checkpoint_key(params, base, checkpoint)
    r = read_json(args.out) if args.out.is_file() else {}
    if r.get("params_key") != key:
        r = run_point(params, key, "pretrained", args.work, args.work / "pretrained.json")
    r["default_run_window_start_ppl"] = start_ppl
    r["starts_from_checkpoint_exactly"] = r["eval_ppl_start"] == start_ppl
    retrain = r["retrain_seconds_per_order"]
    print(f"checkpoint: {checkpoint} ({r['n_params'] / 1e6:.2f}M parameters); window start PPL "
          f"{r['eval_ppl_start']:.4f} (default run: {start_ppl:.4f}), end {r['eval_ppl_end']:.4f}; "
          f"identity retrain bitwise: {r['identity_retrain_bitwise']}")
    print(f"{'method':<22}{'family':<12}{'n':>4}{'Spearman':>10}{'R² vs naive':>13}{'bias PPL':>11}"
          f"{'|ΔPPL|':>11}{'s/order':>10}{'speed-up':>10}")
    for method, m in r["methods"].items():
        for fam, s in m["families"].items():
            print(f"{method:<22}{fam:<12}{s['n']:>4}{fmt(s['spearman'], '>10.3f')}{fmt(s['r2_order_effect'], '>13.4g')}"
                  f"{fmt(s['bias_ppl'], '>11.4g')}{fmt(s['absdiff_ppl'], '>11.4g')}"
                  f"{m['seconds_per_order']:>10.4f}{fmt(retrain / m['seconds_per_order'] if m['seconds_per_order'] else None, '>10.1f')}")
    trust = r["trust"]
    if trust:   # the default method's own verdict (fut/ablations.py), as the sweep's points get it
        v = r["verdict"] = flagged(trust, math.exp(r["naive_eval_loss"]), read_json(args.error_proxy)["scale"])
        print(f"{r['default_method']}'s verdict: {'flagged' if v['flagged'] else 'not flagged'} (predicted R² "
              f"{v['predicted_r2']:.3g}, precond_drift {v['precond_drift']:.3f}, {v['diverged']} of {len(trust)} "
              "estimates diverged)")
    atomic_write_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
