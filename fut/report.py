"""The suite's report: every table (from reports/metrics/*.json) and every figure (reports/figures/*.png) with a
one-line caption saying what it shows, section by section, one page per pipeline.

    python -m fut.report [--reports reports]                        # `report` of dvc.yaml: reports/README.md
    python -m fut.report --reports reports --part applications      # of applications/dvc.yaml: applications.md

A metrics file that is missing leaves its section saying so; a figure the captions of neither page know is still
listed, under "Other figures" of README.md, so the report never hides one.
"""
from __future__ import annotations

import argparse
import math
import subprocess
from pathlib import Path
from typing import Any, Callable

from .storage import atomic_write_json, atomic_write_text, read_json


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
    rows = [[split, b["n_orders"], b["true_ppl_mean"], b["true_ppl_std"], b["true_ppl_min"], b["true_ppl_max"],
             ", ".join(f"{f} {v['n']} (std {fmt(v['true_ppl_std'])})" for f, v in b["families"].items()),
             b["retrain_seconds_per_order"]] for split, b in m.items() if isinstance(b, dict) and "families" in b]
    lines = table(rows, ["split", "orders", "true PPL mean", "std", "min", "max", "families (orders, PPL std)",
                         "s per retrain (with its readouts, one worker)"])
    floor = m.get("noise_floor") or {}
    lines += ["", *key_values(floor, [(k, f"noise floor: {k}") for k in floor])]
    return ("Retrained orders, dev (every choice is made on them) and test (the final table only): the spread of "
            "true PPL the estimators must explain, and the float-noise floor.", lines)


def cache(m: dict) -> tuple[str, list[str]]:
    lines = key_values(m, [("gradients", "gradient evaluations"), ("seconds", "build seconds (all ranks' work)"),
                           ("seconds_per_gradient", "seconds per gradient"), ("grad_seconds", "of which gradients"),
                           ("eval_grad_seconds", "of which eval gradients"),
                           ("curvature_seconds", "of which Lanczos eigenspaces"),
                           ("subspace_seconds", "of which fut-subspace's matrices and probes"),
                           ("dtype", "gradient dtype"), ("curvature_rank", "eigenspace rank"),
                           ("curvature_iterations", "Lanczos iterations"), ("curvature_checkpoints", "at checkpoints"),
                           ("checkpoint_stride", "pairs stride"), ("workers", "torchrun ranks"),
                           ("wall_seconds", "wall seconds")])
    lines += [f"| bytes: {k} | {fmt(v)} |" for k, v in (m.get("bytes") or {}).items()]
    plan = m.get("plan") or {}
    lines += [f"| plan: {k} | {fmt(plan.get(k))} |" for k in ("bytes", "estimated_seconds") if k in plan]
    return "The one-time cache: what it cost to build, what it stores, and what the plan said before the build.", lines


FAMILY_ORDER = ("random", "domain_blocks", "structured", "all")


def family_table(block: dict, methods: list[str] | None = None) -> list[str]:
    """One row per (family, method): the accuracy of a split's block with its intervals."""
    rows = []
    for fam in FAMILY_ORDER:
        for name, x in block.get("families", {}).get(fam, {}).items():
            if methods is None or name in methods:
                rows.append([fam, name, x.get("n"), with_ci(x.get("r2_order_effect"), x.get("r2_order_effect_ci")),
                             with_ci(x.get("spearman"), x.get("spearman_ci")), x.get("kendall"),
                             with_ci(x.get("bias_ppl"), x.get("bias_ppl_ci")), x.get("absdiff_ppl"), x.get("rel_err"),
                             x.get("n_non_finite")])
    return table(rows, ["family", "method", "orders", "R² vs naive [CI]", "Spearman [CI]", "Kendall",
                        "bias PPL [CI]", "mean abs ΔPPL", "rel. error", "diverged"])


def estimators(m: dict) -> tuple[str, list[str]]:
    costs = [[name, x.get("family"), x.get("scored_on"), x.get("seconds_per_order"), x.get("speedup_vs_retrain"),
              x.get("one_time_seconds"), x.get("break_even_orders"), x.get("mean_abs_loss_error_along_steps"),
              x.get("param_error")] for name, x in m["methods"].items()]
    lines = ["**Test orders (the final table, scored once):**", "", *family_table(m["test"]), "",
             "**Dev orders (every choice was made on these):**", "", *family_table(m["dev"]), "",
             f"**Costs** against a retrain of {fmt(m.get('retrain_seconds_per_order'))} s (the window and the final "
             "eval loss, median of the timed retrains, same process); one-time: the cache work the method reads; "
             "along the steps and parameter error: on the dev trajectory orders, for estimate.trajectory_methods.", "",
             *table(costs, ["method", "family", "scored on", "s/order", "speed-up", "one-time s", "break-even orders",
                            "mean abs Δloss along steps", "param error"])]
    r = m.get("readouts") or {}
    if r:
        lines += ["", f"fut-subspace's readouts on the test orders: the quadratic one ranks them as evaluating the "
                      f"estimated parameters does with Spearman {fmt(r['quadratic_vs_exact_spearman'])} (mean |Δloss| "
                      f"{fmt(r['quadratic_vs_exact_mean_abs_loss'])}), at {fmt(r['quadratic_seconds_per_order'])} s "
                      f"per order against {fmt(r['exact_seconds_per_order'])} s."]
    caption = (f"Every estimator against retraining, per order family and pooled (R² of the order effect is a skill "
               f"score against `naive`; bias: mean signed error in PPL; 95% bootstrap intervals, stratified by family, "
               f"in brackets; small families give wide intervals). Default `{m.get('default_method')}`; full-space "
               f"replays on {m.get('replay_orders')} orders of each split, exact-curvature references on "
               f"{m.get('expensive_orders')} test orders.")
    return caption, lines


def ablations(m: dict) -> tuple[str, list[str]]:
    lines = []
    keys = ("r2_order_effect", "spearman", "bias_ppl", "absdiff_ppl")
    head = ["random R²", "random Spearman", "random bias PPL", "random abs ΔPPL", "all R²", "all Spearman"]
    for method, by_k in (m.get("projection_k") or {}).items():
        rows = [[k, *(s["random"][x] for x in keys), *(s["all"][x] for x in keys[:2])] for k, s in by_k.items()]
        lines += ["", f"*projection size k* (`{method}`, prefixes of one stored projection)", ""]
        lines += table(rows, ["k", *head])
    for knob in ("subspace_readout", "subspace_pair_stride"):
        if m.get(knob):
            rows = [[v, *(s["random"][x] for x in keys), *(s["all"][x] for x in keys[:2])] for v, s in m[knob].items()]
            lines += ["", f"*fut-subspace: {knob.split('_', 1)[1].replace('_', ' ')}*", ""]
            lines += table(rows, ["value", *head])
    rows = [[name, fam, *(v[fam][x] for x in keys)] for name, v in (m.get("methods") or {}).items()
            for fam in FAMILY_ORDER if fam in v]
    lines += ["", "*Adam state × curvature (the estimate stage's dev block)*", ""]
    lines += table(rows, ["method", "family", "R²", "Spearman", "bias PPL", "mean abs ΔPPL"])
    for knob, block in m.items():
        if isinstance(block, dict) and isinstance(block.get("values"), dict) and "param" in block:
            rows = [[value, method, fam, *(x.get(k) for k in keys), s.get("true_ppl_std")]
                    for value, s in block["values"].items() for method, v in s["methods"].items()
                    for fam, x in v["families"].items() if fam in ("random", "all")]
            lines += ["", f"*{knob}* (`{block['param']}`, one whole run per value, every retrained order scored)", ""]
            lines += table(rows, ["value", "method", "family", "R²", "Spearman", "bias PPL", "mean abs ΔPPL",
                                  "true PPL std of the run"])
    if m.get("secant_raw"):
        g = m["secant_raw"]
        lines += ["", f"*Why `fut:secant-raw` diverges*: η_t·J of the paper's elementwise secant J = ΔΓ/Δθ over every "
                  f"checkpoint and batch ({g['factors']} factors on {g['coordinates']} sampled coordinates). Each step "
                  f"multiplies δ by (1 − η J): the factor exceeds 1 in magnitude for {fmt(g['share_amplifying'])} of them "
                  f"and 10 for {fmt(g['share_factor_above_10'])}.", ""]
        lines += table([[q, g["eta_j_quantiles"][q], g["window_gain_quantiles"][q]] for q in g["eta_j_quantiles"]],
                       ["quantile", "η·J", "Π_t |1 − η_t J| over the window (a random batch per step)"])
    if m.get("sweep_stale_points"):
        lines += ["", f"Sweep points computed with other params, left out: {', '.join(m['sweep_stale_points'])}."]
    return (f"Ablations on the {m.get('n_orders')} dev orders (the test orders are the final table's): what one "
            "cache answers, and the knobs that change the reference run, one whole run per value "
            "(`python -m fut sweep`).", lines)


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
              f"the truth over {fmt(ra.get('n'))} verified orders: Spearman "
              f"{with_ci(ra.get('spearman'), ra.get('spearman_ci'))}, "
              f"Kendall {fmt(ra.get('kendall'))}; over the search candidates alone: Spearman "
              f"{fmt((m.get('rank_agreement_search_candidates') or {}).get('spearman'))}. Exploring and ranking the "
              f"finalists cost {fmt(costs.get('search_vs_retraining_all'))} of retraining every order scored.", ""]
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


def error_proxy(m: dict) -> tuple[str, list[str]]:
    rho = m.get("spearman_with_true_error") or {}
    lines = table([[k, v] for k, v in rho.items()], ["indicator", "Spearman with |true error| (all runs pooled)"])
    if m.get("test_only"):
        lines += ["", "On the default run's test orders alone: "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in m["test_only"].items()) + "."]
    rows = [["default (test orders)", fmt(m["default_run"].get("predicted_r2")), "–",
             m["default_run"].get("flagged")]] if m.get("default_run") else []
    rows += [[p, v.get("predicted_r2"), v.get("r2_order_effect"), v.get("flagged")]
             for p, v in (m.get("points") or {}).items()]
    lines += ["", *table(rows, ["run", "R² predicted by the indicators", "true R² vs naive", "flagged"])]
    missed = sorted(set(m.get("failing") or []) - set(m.get("flagged") or []))
    lines += ["", f"Failing sweep points (true R² < 0.5): {', '.join(m.get('failing') or []) or 'none'}; flagged: "
              f"{', '.join(m.get('flagged') or []) or 'none'}; failing but not flagged: {', '.join(missed) or 'none'}."]
    return (f"When not to trust `{m.get('method')}`: its per-order error indicator against the true absolute error "
            f"over {m.get('n_orders')} orders of {m.get('n_runs')} runs (the default run's test orders and every sweep "
            "point's), and each run's verdict; the indicator's scale was set on the dev orders.", lines)


def sample_orders(m: dict) -> tuple[str, list[str]]:
    lines = ["**Test orders (scored once):**", "", *family_table(m["test"]), "",
             "**Dev orders:**", "", *family_table(m["dev"]), "",
             *key_values(m, [("cache_bytes", "sample-level cache, bytes (per-sequence gradients and its subspace)"),
                             ("cache_seconds", "sample-level cache, build seconds"),
                             ("batch_cache_bytes", "batch-level cache, bytes (its curvature is shared)"),
                             ("batch_cache_seconds", "batch-level cache, build seconds"),
                             ("seconds_per_order", "fut-subspace, seconds per order (batched)"),
                             ("retrain_seconds_per_order", "retrain, seconds per order (mean of the ground truth)"),
                             ("error_indicator_spearman_test", "error indicator vs |true error|, Spearman (test)")])]
    cur = m.get("curriculum") or {}
    if cur:
        lines += ["", f"**Curriculum over sample-level orders** (verified by retraining; the dev random re-batchings' "
                      f"true PPL: mean {fmt(cur['random_true_ppl_mean'])}, best {fmt(cur['random_true_ppl_min'])}; "
                      f"estimate vs truth over these strategies: Spearman {fmt(cur['spearman_est_true'])}):", "",
                  *table([[k, v["est_ppl"], v["true_ppl"]] for k, v in sorted(cur["strategies"].items(),
                                                                          key=lambda kv: kv[1]["true_ppl"])],
                         ["strategy", "est PPL", "true PPL"])]
    mem = m.get("memorization") or {}
    if mem:
        lines += ["", f"**One sequence's final loss by the step it is trained at** (truth at steps "
                      f"{mem['true_positions']}): Spearman {fmt(mem['spearman'])}, mean abs error {fmt(mem['mae'])}; "
                      "loss when trained last minus first:", "",
                  *table([[i, v["est"], v["true"]] for i, v in mem["effect_last_minus_first"].items()],
                         ["sequence", "estimated", "true"])]
    return ("Sample-level orders (the window's sequences re-batched: random, domain-pure blocks, domain-mixed, by "
            f"difficulty): `{m['method']}` over sequence units against retraining, per family (R² of the order "
            "effect against naive; 95% bootstrap intervals in brackets).", lines)


def multi_epoch(m: dict) -> tuple[str, list[str]]:
    growth = [[g["epochs"], g.get("damping"), g.get("random_r2_order_effect"), g.get("random_spearman"),
               g.get("all_r2_order_effect"), g.get("all_absdiff_ppl"), g.get("naive_absdiff_ppl_all"),
               g.get("all_bias_ppl")]
              for g in m["error_growth"]]
    lines = table(growth, ["epochs", "damping λ", "random R²", "random Spearman", "all R²", "all mean abs ΔPPL",
                           "naive's mean abs ΔPPL", "all bias PPL"])
    for e, blk in m["by_epochs"].items():
        lines += ["", f"**{e} epochs, test orders (scored once):**", "", *family_table(blk["test"]), "",
                  f"**{e} epochs, dev orders:**", "", *family_table(blk["dev"]), "",
                  f"Cache: {fmt(blk['cache_bytes'])} bytes, {fmt(blk['cache_seconds'])} s (the E-epoch reference run, "
                  f"its gradients and the subspace); {fmt(blk['seconds_per_order'])} s per order against a "
                  f"{fmt(blk['retrain_seconds_per_order'])} s retrain."]
    d = m.get("domain_order") or {}
    if d.get("n_orders"):
        lines += ["", f"**Domain order over {d['epochs']} epochs** ({d['n_orders']} block orders, the same every epoch; "
                      f"Spearman over the retrained ones {fmt(d['spearman_verified'])}):", "",
                  *table([[r["sequence"], r["est_rank"], r["est_ppl"], r["true_ppl"]] for r in d["rows"]
                          if r["true_ppl"] is not None], ["domain order", "est rank", "est PPL", "true PPL"])]
    return (f"Several epochs: `{m['method']}` over E passes of the window against retraining E-epoch orders (a new "
            "permutation every epoch, the same one every epoch, domain blocks, difficulty, alternating), and how "
            "its test error grows with E.", lines)


# (section title, metrics file, renderer, figures with captions): the estimator and its validation (dvc.yaml)
Section = tuple[str, str, Callable[[dict], tuple[str, list[str]]], dict[str, str]]
SECTIONS: list[Section] = [
    ("Corpus", "prepare.json", corpus, {
        "corpus_tokens": "Tokens per domain in the prepared corpus."}),
    ("Reference run", "reference.json", reference, {
        "reference_curves": "Warm-start training loss and the window's eval loss in the reference order."}),
    ("Ground truth", "groundtruth.json", groundtruth, {
        "groundtruth_ppl": "True eval PPL after the window for every retrained order, by family and split; dashed: "
                           "the reference (identity) order.",
        "groundtruth_trajectories": "True eval PPL along the window for the dev orders retrained with their curve."}),
    ("Cache", "cache.json", cache, {
        "cache_cost": "Where the cache's build time and storage go."}),
    ("Estimator accuracy and cost", "estimators.json", estimators, {
        "estimates_scatter": "Estimated vs true eval PPL of the test orders, one panel per method, coloured by "
                             "family; dashed: exact; counts of off-scale or diverged estimates on their panels.",
        "estimate_trajectories": "Eval PPL along the window: estimate.trajectory_methods against retraining, on "
                                 "random and structured dev orders."}),
    ("Ablations", "ablations.json", ablations, {
        "ablations": "R² of the order effect on the dev orders (random and all) as the projection size, "
                     "fut-subspace's readout and pair checkpoints, and the Adam state × curvature change; values "
                     "below -1 are marked with their value.",
        "ablations_sweep": "Estimator accuracy as the knobs that change the reference run vary (one run each)."}),
    ("Error indicator", "error_proxy.json", error_proxy, {}),
]
# ... and the applications (applications/dvc.yaml)
APPLICATION_SECTIONS: list[Section] = [
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
    ("Sample-level orders", "sample_orders.json", sample_orders, {
        "sample_orders": "Estimated vs true PPL of the sample-level dev and test orders, by family; dashed: exact.",
        "sample_memorization": "One window sequence's final loss by the step it is trained at, estimated (exact "
                               "readout) and retrained."}),
    ("Several epochs", "multi_epoch.json", multi_epoch, {
        "multi_epoch": "Estimated vs true PPL of the E-epoch dev and test orders, one panel per E and split; "
                       "dashed: exact."}),
]


HEADLINE = ("r2_order_effect", "spearman", "bias_ppl", "absdiff_ppl", "n")


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "fut", "params.yaml"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def summary(reports: Path, params_file: Path) -> dict:
    """The headline numbers: the default method on the test orders per family, its costs, and where they come
    from (commit, params hash, device, date). summary.json, a few keys for `dvc exp show`."""
    metrics = Path(reports) / "metrics"
    out: dict[str, Any] = {}
    if (metrics / "estimators.json").is_file():
        e = read_json(metrics / "estimators.json")
        d = e["default_method"]
        fams = e["test"]["families"]
        out["default_method"] = d
        out["test"] = {f: {**{k: fams[f][d].get(k) for k in HEADLINE},
                           "naive_absdiff_ppl": fams[f]["naive"]["absdiff_ppl"] if "naive" in fams[f] else None}
                       for f in FAMILY_ORDER if d in fams.get(f, {})}
        out.update({k: e.get(k) for k in ("params_hash", "speedup_per_order", "break_even_orders",
                                          "retrain_seconds_per_order", "default_seconds_per_order", "measured_at")})
        out["from_scratch_1000_speedup"] = (e.get("from_scratch") or {}).get("1000", {}).get("speedup")
        sur = e.get("surrogate") or {}
        out["surrogate_orders_per_second"] = sur.get("orders_per_second")
        out["estimator_orders_per_second"] = sur.get("estimator_orders_per_second")
        out["surrogate_random_r2"] = ((sur.get("families") or {}).get("random") or {}).get("surrogate", {}).get(
            "r2_order_effect")
    if (metrics / "reference.json").is_file():
        out["device"] = read_json(metrics / "reference.json").get("device")
    out["commit"] = _commit(Path(params_file).resolve().parent)
    return out


def summary_lines(s: dict) -> list[str]:
    if "test" not in s:
        return ["*The estimate stage has not run: no summary yet.*", ""]
    rows = [[f, x["n"], x["r2_order_effect"], x["spearman"], x["bias_ppl"], x["absdiff_ppl"], x["naive_absdiff_ppl"]]
            for f, x in s["test"].items()]
    scratch = s.get("from_scratch_1000_speedup")
    return [f"The default estimator, `{s['default_method']}`, on the test orders (never used for a choice), by order "
            "family; R² is a skill score against the naive \"order does not matter\" estimate (1: exact, 0: no better); "
            "bias is the mean signed error in PPL; intervals in the tables below.", "",
            *table(rows, ["family", "orders", "R² vs naive", "Spearman", "bias PPL", "mean abs ΔPPL",
                          "naive mean abs ΔPPL"]), "",
            f"Per order it takes {sig(s.get('default_seconds_per_order'))} s end to end against a retrain of "
            f"{sig(s.get('retrain_seconds_per_order'))} s ({sig(s.get('speedup_per_order'))}× faster); its one-time cache "
            f"breaks even after {sig(s.get('break_even_orders'))} orders, and scoring 1,000 orders from scratch is "
            f"{sig(scratch)}× faster than retraining them. In one batched call it scores "
            f"{sig(s.get('estimator_orders_per_second'))} orders per second; its additive surrogate for searches scores "
            f"{sig(s.get('surrogate_orders_per_second'))} per second with R² {sig(s.get('surrogate_random_r2'))} on the "
            "test random orders.", "",
            f"Provenance: commit `{s['commit']}`, hash of the params the estimates depend on "
            f"`{s.get('params_hash')}`, device `{s.get('device')}`, "
            f"estimated at {s.get('measured_at')}.", ""]


def sig(x: float | None, digits: int = 3) -> str:
    """`x` to `digits` significant digits, with thousands separators (for numbers in running text)."""
    if x is None or not math.isfinite(x) or x == 0:
        return fmt(x)
    places = digits - 1 - math.floor(math.log10(abs(x)))
    return f"{round(x, places):,.{max(places, 0)}f}"


def sections(reports: Path, parts: list[Section]) -> tuple[list[str], set[str]]:
    """The sections' tables and figures, and the figures shown."""
    figures = {p.stem for p in (Path(reports) / "figures").glob("*.png")}
    lines, shown = [], set()
    for title, metrics_file, render, captions in parts:
        lines += [f"## {title}", ""]
        path = Path(reports) / "metrics" / metrics_file
        if path.is_file():
            caption, body = render(read_json(path))
            lines += [f"*{caption}* (`metrics/{metrics_file}`)", "", *body, ""]
        else:
            lines += [f"*`metrics/{metrics_file}` has not been built.*", ""]
        for stem, caption in captions.items():
            if stem in figures:
                lines += [f"![{stem}](figures/{stem}.png)", f"*{caption}*", ""]
                shown.add(stem)
    return lines, shown


def build(reports: Path, headline: dict | None = None) -> str:
    """reports/README.md: the estimator and its validation, a pointer to the applications' page, and every figure
    neither page captions."""
    reports = Path(reports)
    body, shown = sections(reports, SECTIONS)
    lines = ["# fut: results", "",
             "Generated by `python -m fut.report` (the `report` stage of `dvc repro`) from `reports/metrics/*.json` and "
             "`reports/figures/`; do not edit by hand. Executed notebooks: `reports/notebooks/`; plot data for "
             "`dvc plots show`: `reports/plots/`. The applications (curriculum, memorization, domain order, "
             "sample-level orders, several epochs) are on [applications.md](applications.md), built by "
             "`dvc repro applications/dvc.yaml`.", "", "## Summary", "", *summary_lines(headline or {}), *body]
    others = sorted({p.stem for p in (reports / "figures").glob("*.png")} - shown
                    - {stem for *_, captions in APPLICATION_SECTIONS for stem in captions})
    if others:
        lines += ["## Other figures", ""]
        for stem in others:
            lines += [f"![{stem}](figures/{stem}.png)", f"*{stem.replace('_', ' ')}.*", ""]
    return "\n".join(lines)


def build_applications(reports: Path) -> str:
    """reports/applications.md: what the estimator is for, each application against retraining."""
    body, _ = sections(reports, APPLICATION_SECTIONS)
    return "\n".join(["# fut: applications", "",
                      "Generated by `python -m fut.report --part applications` (the `report` stage of "
                      "`applications/dvc.yaml`) from `reports/metrics/*.json` and `reports/figures/`; do not edit by "
                      "hand. The estimator they use and its accuracy: [README.md](README.md).", "", *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fut.report", description=__doc__.split("\n")[0])
    parser.add_argument("--reports", default=Path("reports"), type=Path, help="the reports folder (default: %(default)s)")
    parser.add_argument("--params", default=Path("params.yaml"), type=Path, help="the params file (default: %(default)s)")
    parser.add_argument("--part", choices=("estimator", "applications"), default="estimator",
                        help="estimator: README.md and metrics/summary.json (dvc.yaml); applications: applications.md "
                             "(applications/dvc.yaml) (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.part == "applications":
        atomic_write_text(args.reports / "applications.md", build_applications(args.reports))
        return 0
    headline = summary(args.reports, args.params)
    atomic_write_json(args.reports / "metrics" / "summary.json", headline)
    atomic_write_text(args.reports / "README.md", build(args.reports, headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
