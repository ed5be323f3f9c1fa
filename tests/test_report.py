"""The report lists every figure that exists with a caption, renders the tables it has metrics for, and says
which metrics are missing; the estimator's page and the applications' page each show their own."""
from fut.report import APPLICATION_SECTIONS, SECTIONS, build, build_applications, fmt, main, sig
from fut.storage import atomic_write_json


def test_every_figure_is_listed_and_missing_metrics_are_named(tmp_path):
    (tmp_path / "figures").mkdir()
    known = [stem for _, _, _, captions in SECTIONS for stem in captions]
    applied = [stem for _, _, _, captions in APPLICATION_SECTIONS for stem in captions]
    for stem in known[:3] + applied[:2] + ["a_new_figure"]:
        (tmp_path / "figures" / f"{stem}.png").write_bytes(b"\x89PNG")
    atomic_write_json(tmp_path / "metrics" / "groundtruth.json", {"n_orders": 48, "true_ppl_mean": 265.8})
    atomic_write_json(tmp_path / "metrics" / "curriculum.json", {
        "method": "fut-state:eig",
        "random": {"true_ppl": 263.0, "ci_low": 262.5, "ci_high": 263.5, "est_ppl": 263.1, "n_orders": 20,
                   "seconds": 44.0, "choose_seconds": 0.0, "peak_mb": 700.0},
        "genetic": {"true_ppl": 261.0, "ci_low": 261.0, "ci_high": 261.0, "est_ppl": None, "n_orders": 1,
                    "seconds": 60.0, "choose_seconds": 55.0, "peak_mb": 2000.0},
        "estimator_search": {"true_ppl": 261.0, "ci_low": 261.0, "ci_high": 261.0, "est_ppl": 261.2, "n_orders": 1,
                             "seconds": 60.0, "choose_seconds": 55.0, "peak_mb": 2000.0, "search": "genetic"},
        "rank_agreement": {"spearman": 0.8, "spearman_ci": [0.6, 0.9], "kendall": 0.6, "n_orders": 30},
        "gain_vs_random_ppl": 2.0, "gain_vs_random_ci": [1.5, 2.5],
        "costs": {"search": {"seconds": 50.0, "peak_mb": 2000.0, "n_orders": 48, "seconds_per_order": 1.0}}})
    assert main(["--reports", str(tmp_path)]) == 0
    assert main(["--reports", str(tmp_path), "--part", "applications"]) == 0
    text, applications = (tmp_path / "README.md").read_text(), (tmp_path / "applications.md").read_text()
    for stem in known[:3] + ["a_new_figure"]:
        assert f"![{stem}](figures/{stem}.png)" in text and f"figures/{stem}.png" not in applications
    for stem in applied[:2]:
        assert f"![{stem}](figures/{stem}.png)" in applications and f"figures/{stem}.png" not in text
    assert "## Other figures" in text and "*a new figure.*" in text
    assert "`metrics/estimators.json` has not been built" in text and "## Curriculum" not in text
    assert "`metrics/memorization.json` has not been built" in applications
    lines = applications.splitlines()
    rows = [l for l in lines if l.startswith(("| random", "| genetic", "| estimator_search"))]
    assert [r.split(" | ")[0] for r in rows] == ["| random", "| genetic", "| estimator_search (genetic)"]
    assert "| genetic | 261 | – | – |" in applications   # one deterministic order: no interval; null estimate: –
    assert build(tmp_path) == text and build_applications(tmp_path) == applications


def test_numbers_are_formatted_for_reading():
    assert fmt(None) == "–" and fmt(float("nan")) == "–" and fmt(True) == "yes"
    assert fmt(920192) == "920,192" and fmt(261.8739) == "261.874" and fmt(2e-6) == "2e-06"
    assert fmt([0.51, 0.886]) == "[0.51, 0.886]"


def test_running_text_gives_three_significant_digits():
    assert [sig(x) for x in (294.8775, 76.596, 5063.91, 0.012164, -0.114, 0.0, None)] == \
        ["295", "76.6", "5,060", "0.0122", "-0.114", "0", "–"]
