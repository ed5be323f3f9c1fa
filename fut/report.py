"""The suite's report: reports/README.md, every table (from reports/metrics/*.json) and every figure
(reports/figures/*.png) with a one-line caption saying what it shows, section by section.

    python -m fut.report [--reports reports]      # the `report` stage

A metrics file that is missing leaves its section saying so; a figure the captions below do not know is
still listed, under "Other figures", so the report never hides one.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from .storage import atomic_write_text, read_json


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if abs(x) < 1 or abs(x) >= 1e5:        # three significant digits for small effects and big counts
            return f"{x:.{digits}g}"
        return f"{x:,.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) or v is None for v in x):
        return f"[{fmt(x[0])}, {fmt(x[1])}]"
    return str(x)


def table(rows: list[list[Any]], header: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def key_values(m: dict, keys: list[tuple[str, str]]) -> list[str]:
    return table([[label, m.get(k)] for k, label in keys if k in m], ["", "value"])


def with_ci(x: Any, ci: Any) -> str:
    return fmt(x) + (f" {fmt(ci)}" if ci else "")


# --- one renderer per metrics file: (caption, markdown lines) -------------------------------------------

def corpus(m: dict) -> tuple[str, list[str]]:
    rows = [[d, m["sequences_per_domain"][d], m["tokens_per_domain"][d]] for d in m["domains"]]
    missing = ", ".join(m.get("missing_domains") or []) or "none"
    return (f"Sequences and tokens per domain after BPE packing (optional domains missing: {missing}).",
            table(rows, ["domain", "sequences", "tokens"]))


def reference(m: dict) -> tuple[str, list[str]]:
    lines = key_values(m, [("n_params", "parameters"), ("window_steps", "window steps T"), ("batch_size", "batch size b"),
                           ("seq_len", "tokens per sequence"), ("eval_ppl_start", "eval PPL at the window start"),
                           ("eval_ppl_end", "eval PPL at the window end"),
                           ("identity_retrain_bitwise", "identity retrain reproduces θ_T, m_T, v_T bit for bit"),
                           ("warmstart_seconds", "warm start (s)"), ("window_seconds", "window (s)")])
    lines += [f"| eval PPL at the end, {d} | {fmt(x)} |" for d, x in m.get("domain_eval_ppl_end", {}).items()]
    return "The reference run: model size, window shape, eval perplexity, and the bitwise replay check.", lines


def groundtruth(m: dict) -> tuple[str, list[str]]:
    lines = key_values(m, [("n_orders", "orders retrained"), ("n_random", "random orders"),
                           ("true_ppl_mean", "true PPL mean"), ("true_ppl_std", "true PPL std"),
                           ("true_ppl_min", "true PPL min"), ("true_ppl_max", "true PPL max"),
                           ("random_ppl_std", "true PPL std over random orders"), ("identity_ppl", "reference order PPL"),
                           ("retrain_seconds_per_order", "seconds per retrain (one worker)")])
    lines += [f"| noise floor: {k} | {fmt(v)} |" for k, v in (m.get("noise_floor") or {}).items()]
    return "Retrained orders: the spread of true PPL the estimators must explain, and the float-noise floor.", lines


def cache(m: dict) -> tuple[str, list[str]]:
    lines = key_values(m, [("pairs", "(t, j) pairs"), ("seconds", "build seconds"),
                           ("seconds_per_pair", "seconds per pair"),
                           ("curvature_seconds", "of which curvature (s)"), ("projection", "projection"), ("k", "k"),
                           ("dtype", "gradient dtype"), ("curvature_rank", "eigenspace rank"),
                           ("curvature_stride", "eigenspace stride"), ("checkpoint_stride", "pairs stride"),
                           ("workers", "torchrun ranks"), ("wall_seconds", "wall seconds")])
    lines += [f"| bytes: {k} | {fmt(v)} |" for k, v in (m.get("bytes") or {}).items()]
    plan = m.get("plan") or {}
    lines += [f"| plan: {k} | {fmt(plan.get(k))} |" for k in ("bytes", "estimated_seconds") if k in plan]
    return "The one-time cache: what it cost to build, what it stores, and what the plan said before the build.", lines


def scale(m: dict) -> tuple[str, list[str]]:
    lines = key_values(m, [("pairs_per_second", "pairs per second (one process)"),
                           ("limit_pairs_per_second", "limit: one training step per pair"),
                           ("throughput_fraction_of_limit", "fraction of the limit"),
                           ("projection_overhead", "projection overhead"),
                           ("workers_equivalence", "ranks build the same tensors"), ("workers", "ranks"),
                           ("workers_speedup", "speed-up of the ranks over one process"),
                           ("plan_bytes", "plan bytes"), ("actual_bytes", "bytes written"),
                           ("bfloat16_max_abs_eval_loss_shift", "bfloat16 gradients: max shift of an estimate")])
    rows = [[dtype, x.get("spearman"), x.get("r2_order_effect"), x.get("absdiff_ppl"), x.get("cache_bytes"),
             x.get("estimate_peak_mb")] for dtype, x in (m.get("dtype") or {}).items()]
    lines += ["", *table(rows, ["gradient dtype", "Spearman", "R² order effect", "mean abs ΔPPL", "cache bytes",
                                "estimation peak MB"])]
    return ("The cache at its limits, from `benchmarks/cache_scale.py` (run after `dvc repro`; not a stage, so "
            "`dvc repro -f report` shows a newer run): throughput, ranks, plan against the bytes written, storage "
            "dtype.", lines)


def estimators(m: dict) -> tuple[str, list[str]]:
    rows = [[name, with_ci(x.get("spearman"), x.get("spearman_ci")), x.get("kendall"),
             with_ci(x.get("r2_order_effect"), x.get("r2_order_effect_ci")), x.get("absdiff_ppl"),
             x.get("n_non_finite"), x.get("seconds_per_order"), x.get("speedup_vs_retrain"), x.get("cache_bytes")]
            for name, x in m["methods"].items()]
    caption = (f"Every estimator on the {m.get('held_out_orders')} held-out orders against retraining "
               f"({fmt(m.get('retrain_seconds_per_order'))} s per retrain); default `{m.get('default_method')}`; "
               "95% bootstrap intervals in brackets.")
    return caption, table(rows, ["method", "Spearman", "Kendall", "R² order effect", "mean abs ΔPPL", "non-finite",
                                 "s/order", "speed-up", "cache bytes"])


def ablations(m: dict) -> tuple[str, list[str]]:
    lines = []
    for knob, block in m.items():
        if not isinstance(block, dict) or not isinstance(block.get("values"), dict):
            continue
        values = {v: s for v, s in block["values"].items() if isinstance(s, dict)}
        if any("methods" in s for s in values.values()):      # a sweep knob: one whole run per value
            rows = [[value, method, x.get("spearman"), x.get("r2_order_effect"), x.get("absdiff_ppl"),
                     x.get("seconds_per_order"), s.get("true_ppl_std")]
                    for value, s in values.items() for method, x in s["methods"].items()]
            lines += ["", f"*{knob}* (`{block.get('param', knob)}`, one whole run per value)", ""]
            lines += table(rows, ["value", "method", "Spearman", "R² order effect", "mean abs ΔPPL", "s/order",
                                  "true PPL std of the run"])
        else:
            rows = [[value, s.get("spearman"), s.get("r2_order_effect"), s.get("absdiff_ppl"), s.get("seconds_per_order")]
                    for value, s in values.items()]
            lines += ["", f"*{knob}* ({block.get('method', '')})", ""]
            lines += table(rows, ["value", "Spearman", "R² order effect", "mean abs ΔPPL", "s/order"])
    return ("Ablations, one table per knob: those one cache answers on the held-out orders, and those that change "
            "the reference run, one whole run per value (`python -m fut sweep`).", lines)


def curriculum(m: dict) -> tuple[str, list[str]]:
    # The random baseline first, the heuristics, then the searches and the search's choice.
    rank = lambda k: (k != "random") + (m[k].get("choose_seconds", 0) > 0) + (k == "estimator_search")
    strategies = sorted((k for k, v in m.items() if isinstance(v, dict) and "true_ppl" in v), key=lambda k: (rank(k), k))
    ci = lambda s: [s["ci_low"], s["ci_high"]] if s["ci_high"] > s["ci_low"] else None
    rows = [[k + (f" ({m[k]['search']})" if "search" in m[k] else ""), m[k]["true_ppl"], ci(m[k]),
             m[k].get("est_ppl"), m[k].get("n_orders"), m[k]["seconds"], m[k]["peak_mb"]] for k in strategies]
    ra, costs = m.get("rank_agreement", {}), m.get("costs", {})
    lines = table(rows, ["strategy", "true PPL", "95% CI", "est PPL", "orders", "seconds", "peak MB"])
    lines += ["", f"Search choice vs mean random order: {fmt(m.get('gain_vs_random_ppl'))} PPL better, 95% CI "
              f"{fmt(m.get('gain_vs_random_ci'))} (resampling the random orders). Rank agreement of the estimator with "
              f"the truth over {fmt(ra.get('n_orders'))} verified orders: Spearman "
              f"{with_ci(ra.get('spearman'), ra.get('spearman_ci'))}, "
              f"Kendall {fmt(ra.get('kendall'))}; over the search candidates alone: Spearman "
              f"{fmt((m.get('rank_agreement_search_candidates') or {}).get('spearman'))}. The search cost "
              f"{fmt(costs.get('search_vs_retraining_all'))} of retraining every order it scored (CPU seconds).", ""]
    lines += table([[k, v.get("seconds"), v.get("cpu_seconds"), v.get("worker_peak_mb") or v.get("peak_mb"),
                     v.get("n_orders", v.get("n_retrained")), v.get("seconds_per_order", v.get("retrain_seconds_per_order"))]
                    for k, v in costs.items() if isinstance(v, dict)],
                   ["step", "seconds", "CPU seconds (stage process)", "peak MB (a retrain worker's for verification)",
                    "orders", "seconds per order"])
    caption = (f"Curricula: true eval PPL per strategy (random: mean over the random orders, 95% bootstrap CI over "
               f"them; one order: no interval, training is deterministic), the estimate of `{m.get('method')}`, and "
               "what choosing and verifying each cost.")
    return caption, lines


def memorization(m: dict) -> tuple[str, list[str]]:
    g = m.get("grid", {})
    rows = [[name, s.get("mse"), s.get("mae"), s.get("spearman"), s.get("spearman_placement"), s.get("n"),
             (s.get("cost") or {}).get("seconds_per_order")] for name, s in m["estimators"].items()]
    caption = (f"Memorization M[i, j] (loss on B_i placed at position j, others in the order of `{m.get('base_order')}`) "
               f"on {g.get('true_cells')} retrained cells (batches {g.get('batches')} at positions "
               f"{g.get('true_positions')}); `placement`: Spearman after centring each batch's row, i.e. the "
               "effect of the position alone.")
    return caption, table(rows, ["estimator", "MSE", "MAE", "Spearman", "Spearman placement", "cells", "s/order"])


def generalization(m: dict) -> tuple[str, list[str]]:
    gm = m["generalization"]
    rows = [[name, s.get("mse"), s.get("mae"), s.get("spearman"), s.get("n")] for name, s in gm["estimators"].items()]
    lines = table(rows, ["estimator", "MSE", "MAE", "Spearman", "effects"])
    groups = gm.get("groups") or sorted(gm.get("true_mean_effect", {}))
    effect_rows = [["truth"] + [with_ci(gm["true_mean_effect"][k]["mean"], gm["true_mean_effect"][k]["ci"])
                                for k in groups]]
    effect_rows += [[name] + [s.get("mean_effect", {}).get(k) for k in groups] for name, s in gm["estimators"].items()]
    lines += ["", "Mean placement effect (loss with B_i last minus B_i first; negative: late placement helps):", ""]
    lines += table(effect_rows, ["", *groups])
    caption = ("Generalization: the placement effect of B_i on held-out text of its domain vs the other domains, and "
               f"on the {fmt(gm.get('similar_fraction'))} of eval sequences most vs least similar to B_i (TF-IDF "
               "cosine), estimated vs true.")
    return caption, lines


def domain_order(m: dict) -> tuple[str, list[str]]:
    if not m.get("n_orders"):
        return f"Domain order: {m.get('skipped', 'not run')}.", []
    def row(name: str, b: dict) -> list:
        e = b["est_best"] or {}
        return [name, e.get("sequence"), e.get("true_ppl"), b.get("est_best_true_rank"), b["true_best"]["sequence"],
                b["true_best"]["true_ppl"], b["spearman"]]

    rows = [row("mixed eval", m["mixed"])] + [row(d, b) for d, b in m["per_domain"].items()]
    lines = table(rows, ["eval set", "best by estimate", "its true PPL", "its true rank", "truly best", "true PPL",
                         "Spearman"])
    lines += ["", "Best and worst few by estimate:", ""]
    lines += table([[r["sequence"], r["est_rank"], r.get("true_rank"), r["est_ppl"], r["true_ppl"]]
                    for r in m["top"] + m["bottom"]], ["domain order", "est rank", "true rank", "est PPL", "true PPL"])
    caption = (f"Domain order: {m['n_orders']} orderings of the domains as blocks estimated by `{m['method']}`; truth "
               f"for {m['n_with_truth']} of them ({m['n_retrained']} retrained here, the rest from the ground truth).")
    return caption, lines


# Metrics that a benchmark writes, not a stage: missing until it runs.
BENCHMARKS = {"scale.json": "python benchmarks/cache_scale.py"}

# (section title, metrics file, renderer, figures with captions)
SECTIONS: list[tuple[str, str, Callable[[dict], tuple[str, list[str]]], dict[str, str]]] = [
    ("Corpus", "prepare.json", corpus, {
        "corpus_tokens": "Tokens per domain in the prepared corpus."}),
    ("Reference run", "reference.json", reference, {
        "reference_curves": "Warm-start training loss and the window's eval loss in the reference order."}),
    ("Ground truth", "groundtruth.json", groundtruth, {
        "groundtruth_ppl": "True eval PPL after the window for every retrained order, by family; dashed: reference.",
        "groundtruth_trajectories": "True eval loss along the window for every retrained order."}),
    ("Cache", "cache.json", cache, {
        "cache_cost": "Where the cache's build time and storage go."}),
    ("Cache at scale", "scale.json", scale, {}),
    ("Estimator accuracy and cost", "estimators.json", estimators, {
        "estimates_scatter": "Estimated vs true eval PPL of the held-out orders, one panel per method; dashed: exact.",
        "estimate_trajectories": "Eval PPL along the window, default estimator vs retraining, for a few orders."}),
    ("Ablations", "ablations.json", ablations, {
        "ablations": "Spearman and R² of the order effect as projection size, readout, curvature and the "
                     "checkpoint stride of the cached pairs change.",
        "ablations_sweep": "Estimator accuracy as the knobs that change the reference run vary (one run each)."}),
    ("Curriculum", "curriculum.json", curriculum, {
        "curriculum_search": "Search progress: best estimated PPL so far per estimator call, each search; "
                             "crosses: true PPL of the verified candidates; band: random orders' true PPL.",
        "curriculum_strategies": "True PPL per curriculum strategy with 95% bootstrap intervals."}),
    ("Memorization", "memorization.json", memorization, {
        "memorization_heatmaps": "M[i, j] true and estimated side by side (top), and centred per batch to show "
                                 "the placement effect alone (bottom); blank: not computed or diverged."}),
    ("Generalization", "memorization.json", generalization, {
        "generalization": "Placement effect (B_i last minus first) on B_i itself and on similar/dissimilar and "
                          "same/other-domain held-out text, true and estimated."}),
    ("Domain order", "domain_order.json", domain_order, {
        "domain_order": "Estimated vs true mixed and per-domain PPL of every domain ordering (blocks)."}),
]


def build(reports: Path) -> str:
    reports = Path(reports)
    figures = {p.stem for p in (reports / "figures").glob("*.png")}
    lines = ["# fut: results", "",
             "Generated by `python -m fut.report` (the `report` stage of `dvc repro`) from `reports/metrics/*.json` and "
             "`reports/figures/`; do not edit by hand. Executed notebooks: `reports/notebooks/`; plot data for "
             "`dvc plots show`: `reports/plots/`.", ""]
    shown = set()
    for title, metrics_file, render, captions in SECTIONS:
        lines += [f"## {title}", ""]
        path = reports / "metrics" / metrics_file
        if path.is_file():
            caption, body = render(read_json(path))
            lines += [f"*{caption}* (`metrics/{metrics_file}`)", "", *body, ""]
        elif metrics_file in BENCHMARKS:
            lines += [f"*Not measured in this checkout: `{BENCHMARKS[metrics_file]}` writes `metrics/{metrics_file}`.*", ""]
        else:
            lines += [f"*`metrics/{metrics_file}` has not been built.*", ""]
        for stem, caption in captions.items():
            if stem in figures:
                lines += [f"![{stem}](figures/{stem}.png)", f"*{caption}*", ""]
                shown.add(stem)
    others = sorted(figures - shown)
    if others:
        lines += ["## Other figures", ""]
        for stem in others:
            lines += [f"![{stem}](figures/{stem}.png)", f"*{stem.replace('_', ' ')}.*", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fut.report", description=__doc__.split("\n")[0])
    parser.add_argument("--reports", default=Path("reports"), type=Path)
    args = parser.parse_args(argv)
    atomic_write_text(args.reports / "README.md", build(args.reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
