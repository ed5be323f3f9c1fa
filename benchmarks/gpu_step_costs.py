"""What one window step costs at the GPU profile's full size (T = 64 batches of 32 × 512 tokens): a training
step (the cost of a retrain step and of one cache gradient) against one full-space `fut-state:eig` replay step
batched over orders, one Hessian-vector product (the unit of the cache's Lanczos), and the default
`fut-subspace`'s closed-form replay of a whole window (fut/subspace.py, on the CPU, at the profile's basis size),
through the project's own Trainer, Adam kernels, LossFunction and Subspace. benchmarks/gpu_profile.py runs the
stages themselves at a small size.

  python benchmarks/gpu_step_costs.py [--params profiles/gpu-200m.yaml] [--orders 1 4 8]

Needs no prepared data: batches are seeded random tokens of the profile's shape (costs do not depend on the
text). Prints a table and writes benchmarks/results/gpu_step_costs.json. Runs on the CPU too with a CPU
profile (e.g. --params params.yaml), which is how it is tested.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's fut, not an installed one

from fut import config  # noqa: E402
from fut.adam import AdamHyper, adam_direction, adam_moments  # noqa: E402
from fut.cache import curvature_steps, subspace_checkpoints  # noqa: E402
from fut.costs import median_seconds  # noqa: E402
from fut.curvature import LossFunction  # noqa: E402
from fut.device import resolve_device  # noqa: E402
from fut.flat import ParamLayout  # noqa: E402
from fut.storage import atomic_write_json, versions  # noqa: E402
from fut.subspace import Subspace, SubspaceSources, basis_layout, build_subspace  # noqa: E402
from fut.training import Trainer  # noqa: E402


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def random_subspace(params: config.Params, gen: torch.Generator) -> Subspace:
    """fut-subspace's matrices at the params' basis size (pairs at the subspace checkpoints, own and after-step
    gradients, one eigenspace per corpus domain at each curvature checkpoint), built by fut.subspace from random
    basis vectors in a small stand-in parameter space: the replay's cost depends on the basis size, not on them."""
    T = params.window.steps
    groups = [f"domain{i}" for i in range(len(params.corpus.sources))]
    keys = [(c, g) for c in curvature_steps(params, T) for g in groups]
    rank, checkpoints = params.cache.curvature_rank, subspace_checkpoints(params, T)
    n = basis_layout(T, len(checkpoints), [rank] * len(keys))["size"]
    d = 2 * n
    basis, thetas = torch.randn(n, d, generator=gen) / d ** 0.5, torch.randn(T + 1, d, generator=gen)
    src = SubspaceSources(
        pair_checkpoints=checkpoints, eigen_keys=keys, eigen_values=[torch.rand(rank, generator=gen) for _ in keys],
        groups=[groups[j % len(groups)] for j in range(T)], rows=lambda cols: basis[:, cols], dim=d, chunk=d,
        theta=lambda t: thetas[t], precond=torch.ones(d), precond_drift=0.0, eval_grad=torch.randn(d, generator=gen),
        lrs=[params.window.lr] * T, adam_steps=[1000 + t + 1 for t in range(T)],
        hp=AdamHyper.from_config(params.optimizer))
    return build_subspace(src, None, 0.0, 0, params.cache.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="profiles/gpu-200m.yaml")
    ap.add_argument("--orders", type=int, nargs="+", default=[1, 4, 8], help="orders replayed together")
    ap.add_argument("--rank", type=int, default=None, help="eigenspace rank (default: cache.curvature_rank)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/gpu_step_costs.json")
    args = ap.parse_args()
    params = config.load(args.params)
    device = resolve_device(params.train)
    torch.set_num_threads(params.train.threads)
    gen = torch.Generator().manual_seed(0)
    b, L, vocab = params.window.batch_size, params.data.seq_len, params.tokenizer.vocab_size
    batch = torch.randint(vocab, (b, L), generator=gen)

    # Training step: the project's Trainer (AdamW, autocast per train.precision). Only vocab size and EOS id
    # are read from the prepared data, so a stand-in carries them.
    trainer = Trainer(params, SimpleNamespace(vocab_size=vocab, eos_id=0), None, params.window.lr, "constant", 1000)
    d = sum(p.numel() for p in trainer.named.values())
    train_s = median_seconds(lambda: trainer.step(batch), args.repeat, device)
    train_peak = peak_mb(device)

    # Hessian-vector product on a curvature batch (float32, as the cache computes it).
    layout = ParamLayout.of({k: p.detach() for k, p in trainer.named.items()})
    flat = layout.flatten({k: p.detach() for k, p in trainer.named.items()})
    loss = LossFunction(trainer.model, layout)
    cb = batch[: params.cache.curvature_batch].to(device)
    u = torch.randn(1, d, generator=gen).to(device)
    hvp_s = median_seconds(lambda: loss.hvp(flat, cb, u), max(2, args.repeat // 2), device)
    del trainer, loss, u
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # One fut-state:eig replay step for n orders: cached gradient (cache dtype) + eigenspace correction, then
    # the order's own Adam moments and the deviation update.
    hp = AdamHyper.from_config(params.optimizer)
    r = args.rank or params.cache.curvature_rank
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[params.cache.dtype]
    vecs = (torch.randn(r, d, generator=gen) / d ** 0.5).to(device)   # unit-norm rows; values do not change the cost
    vals = torch.randn(r, generator=gen).to(device)
    theta = flat.detach()
    rows = []
    for n in args.orders:
        g_cached = (torch.randn(n, d, generator=gen) * 1e-3).to(device, dt)
        m = torch.zeros(n, d, device=device)
        v = torch.full((n, d), 1e-6, device=device)
        delta = torch.zeros(n, d, device=device)
        ref = torch.zeros(d, device=device)

        def replay_step():
            nonlocal m, v, delta
            g = g_cached.float() + ((delta @ vecs.t()) * vals) @ vecs
            m, v = adam_moments(g, m, v, hp)
            est = adam_direction(m, v, 100, hp) + hp.weight_decay * (theta + delta)
            delta = delta - params.window.lr * (est - ref)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s = median_seconds(replay_step, args.repeat, device)
        rows.append({"orders": n, "replay_step_seconds": s, "per_order_seconds": s / n,
                     "train_steps_per_replay_step_per_order": train_s / (s / n), "peak_mb": peak_mb(device)})
        del g_cached, m, v, delta
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # fut-subspace: the closed-form replay of whole windows and its quadratic readout (CPU code at any device).
    sub = random_subspace(params, gen)
    T = params.window.steps
    subspace_rows = []
    for n in args.orders:
        sigma = torch.stack([torch.randperm(T, generator=gen) for _ in range(n)])
        s = median_seconds(lambda: sub.quadratic(sub.replay(sigma), 0.0), args.repeat)
        subspace_rows.append({"orders": n, "window_seconds": s, "per_order_seconds": s / n,
                              "retrain_steps_per_order": (T * train_s) / (s / n)})

    result = {"params": args.params, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "precision": params.train.precision, "n_params": d, "tokens_per_batch": b * L,
              "train_step_seconds": train_s, "train_peak_mb": train_peak,
              "train_tokens_per_second": b * L / train_s, "hvp_seconds": hvp_s,
              "hvp_batch_tokens": int(cb.numel()), "eig_rank": r, "cache_dtype": params.cache.dtype,
              "replay": rows, "subspace_basis": sub.dim, "window_steps": T, "subspace_replay": subspace_rows,
              "versions": versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(f"{result['device_name']} ({device}, {params.train.precision}); {d:,} parameters; batch {b}×{L} tokens")
    print(f"train step {train_s * 1e3:.1f} ms ({result['train_tokens_per_second']:,.0f} tokens/s), "
          f"HVP on {cb.shape[0]}×{L} tokens {hvp_s * 1e3:.1f} ms")
    print(f"{'orders':>6s} {'replay step ms':>15s} {'per order ms':>13s} {'train/replay':>13s}")
    for row in rows:
        print(f"{row['orders']:6d} {row['replay_step_seconds'] * 1e3:15.2f} {row['per_order_seconds'] * 1e3:13.2f} "
              f"{row['train_steps_per_replay_step_per_order']:12.1f}x")
    print(f"fut-subspace, whole window of {T} steps (basis of {sub.dim} vectors, CPU), replay + quadratic readout:")
    print(f"{'orders':>6s} {'window ms':>10s} {'per order ms':>13s} {'T train steps / per order':>26s}")
    for row in subspace_rows:
        print(f"{row['orders']:6d} {row['window_seconds'] * 1e3:10.2f} {row['per_order_seconds'] * 1e3:13.3f} "
              f"{row['retrain_steps_per_order']:25.0f}x")


if __name__ == "__main__":
    main()
