"""How the advantage grows: fut-subspace's speed-up and accuracy against a fair retrain as the tokens per batch
(512 to 8,192) and the model (about 1M to 20M parameters) grow, a few orders each.

Every point is one whole, small run through the pipeline's own stages (fut.sweep.run_point: prepare on the
default run's corpus text → reference → retrained orders → cache → estimates), with the cache holding only what
fut-subspace reads (pairs at checkpoints 0 and T) and a shorter warm start than the pipeline's, so the largest
point fits a benchmark's budget on 2 cores. Speed-up per order is the fair retrain over fut-subspace's seconds per
order (the quadratic readout; the exact readout beside it); the one-time cost is the cache build; accuracy is
measured on the point's own retrained random and structured orders (no test set: nothing is chosen here).

    python benchmarks/scaling.py [--points tokens=512 tokens=2048 ...] [--orders 4] [--warmstart-steps 100]

Prints a table and writes benchmarks/results/scaling.json (resumable: points already written with the same
params are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fut import config  # noqa: E402
from fut.model import count_parameters  # noqa: E402
from fut.storage import atomic_write_json, read_json  # noqa: E402
from fut.sweep import point_key, point_params, run_point  # noqa: E402

# Tokens per batch at the default model (window.batch_size sequences of data.seq_len tokens), and model sizes at
# the default tokens per batch: (hidden, intermediate, layers, heads).
TOKENS = (512, 2048, 8192)
MODELS = {"1M": (128, 344, 2, 4), "5M": (256, 688, 4, 4), "20M": (512, 1376, 6, 8)}
METHODS = ["naive", "fut-subspace", "fut-subspace:exact"]


def points() -> dict[str, dict]:
    out = {f"tokens={n}": {"tokens": n} for n in TOKENS}
    out.update({f"model={m}": {"model": m} for m in MODELS if m != "1M"})
    return out


def params_for(base: config.Params, knobs: dict, corpus: Path, orders: int, warmstart_steps: int) -> config.Params:
    p = point_params(base, {}, corpus)
    d = dataclasses.asdict(p)
    T = d["window"]["steps"]
    if "tokens" in knobs:
        d["window"]["batch_size"] = knobs["tokens"] // d["data"]["seq_len"]
    if "model" in knobs:
        hidden, inter, layers, heads = MODELS[knobs["model"]]
        d["model"].update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads)
    d["warmstart"]["steps"] = warmstart_steps
    d["groundtruth"].update(n_random=orders, structured=["reversed", "domain_blocks"])
    d["cache"].update(checkpoint_stride=T, eval_grad_stride=T)
    d["estimate"].update(methods=METHODS, default="fut-subspace")
    d["sweep"]["methods"] = METHODS
    d["memorization"]["methods"] = ["fut-subspace:exact"]
    return config.from_dict(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data/prepared/corpus")
    ap.add_argument("--points", nargs="+", default=list(points()), choices=list(points()))
    ap.add_argument("--orders", type=int, default=4, help="random orders retrained per point (default: 4)")
    ap.add_argument("--warmstart-steps", type=int, default=100, help="warm-start steps per point (default: 100)")
    ap.add_argument("--work", type=Path, default=ROOT / "data/scaling")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scaling.json")
    args = ap.parse_args()
    base = config.load(args.params)
    done = read_json(args.out)["points"] if args.out.is_file() else {}
    for name in args.points:
        p = params_for(base, points()[name], args.corpus, args.orders, args.warmstart_steps)
        key = point_key(p, base)
        if done.get(name, {}).get("params_key") != key:
            print(f"scaling point {name}: {p.window.batch_size * p.data.seq_len} tokens per batch, "
                  f"{count_parameters(p.model, p.tokenizer.vocab_size, p.data.seq_len) / 1e6:.1f}M parameters", flush=True)
            r = run_point(p, key, name, args.work, args.work / f"{name}.json")
            done[name] = {**r, "tokens_per_batch": p.window.batch_size * p.data.seq_len}
            atomic_write_json(args.out, {"warmstart_steps": args.warmstart_steps, "orders": args.orders, "points": done})
    print(f"{'point':<14}{'params':>8}{'tokens':>8}{'retrain s':>11}{'quad s/order':>14}{'speed-up':>10}"
          f"{'exact speed-up':>16}{'cache s':>9}{'break-even':>12}{'R² random':>11}{'R² all':>8}")
    for name, r in done.items():
        m = r["methods"]
        quad, exact = m["fut-subspace"]["seconds_per_order"], m["fut-subspace:exact"]["seconds_per_order"]
        retrain = r["retrain_seconds_per_order"]
        fams = m["fut-subspace"]["families"]
        r["speedup_per_order"] = retrain / quad
        r["break_even_orders"] = r["cache_seconds"] / (retrain - quad)
        print(f"{name:<14}{r['n_params'] / 1e6:>7.1f}M{r['tokens_per_batch']:>8}{retrain:>11.2f}{quad:>14.5f}"
              f"{retrain / quad:>10.0f}{retrain / exact:>16.1f}{r['cache_seconds']:>9.0f}{r['break_even_orders']:>12.1f}"
              f"{fams.get('random', {}).get('r2_order_effect') or float('nan'):>11.3f}"
              f"{fams['all']['r2_order_effect'] or float('nan'):>8.3f}")
    atomic_write_json(args.out, {"warmstart_steps": args.warmstart_steps, "orders": args.orders, "points": done})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
