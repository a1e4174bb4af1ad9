"""Frontier math against hand computations: the Pareto set, reading it at a leak, paired comparisons."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from facemae.eval.frontier import compare, pareto_frontier, verdict

ROOT = Path(__file__).resolve().parents[1]

# (leak, accuracy): ties in leak, an exact duplicate, dominated points on both axes.
POINTS = [(0.10, 0.80), (0.20, 0.85), (0.20, 0.90), (0.30, 0.88), (0.40, 0.95), (0.40, 0.95), (0.50, 0.95),
          (0.05, 0.70)]


def test_the_frontier_keeps_exactly_the_undominated_points_in_leak_order():
    front = pareto_frontier(*zip(*POINTS))
    # (0.2, 0.85) loses to (0.2, 0.9) at the same leak; (0.3, 0.88) to (0.2, 0.9) on both axes; the second
    # (0.4, 0.95) is a duplicate; (0.5, 0.95) leaks more for the same accuracy.
    assert front.members == (7, 0, 2, 4)
    assert_allclose(front.leak, [0.05, 0.10, 0.20, 0.40])
    assert_allclose(front.accuracy, [0.70, 0.80, 0.90, 0.95])


def test_reading_a_frontier_interpolates_inside_and_is_undefined_outside():
    front = pareto_frontier(*zip(*POINTS))
    assert front.accuracy_at(0.30) == pytest.approx(0.925)  # halfway from (0.2, 0.90) to (0.4, 0.95)
    assert front.accuracy_at(0.05) == pytest.approx(0.70) and front.accuracy_at(0.40) == pytest.approx(0.95)
    assert math.isnan(front.accuracy_at(0.45)) and math.isnan(front.accuracy_at(0.01))
    assert front.leak_at(0.85) == pytest.approx(0.15)  # halfway from (0.1, 0.80) to (0.2, 0.90)
    assert math.isnan(front.leak_at(0.99)) and math.isnan(front.leak_at(0.5))
    single = pareto_frontier([0.3], [0.9])
    assert single.accuracy_at(0.3) == pytest.approx(0.9) and math.isnan(single.accuracy_at(0.31))


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        pareto_frontier([], [])
    with pytest.raises(ValueError, match="finite"):
        pareto_frontier([0.1, math.nan], [0.5, 0.6])


def _point(seeds, leak, accuracy, **extra):
    return {"seeds": list(seeds), "identity_leak@1": list(leak), "accuracy": list(accuracy), **extra}


def test_the_paired_comparison_matches_a_hand_computation():
    seeds = [0, 1, 2]
    base_leak, base_acc = np.array([0.20, 0.21, 0.22]), np.array([0.83, 0.84, 0.85])
    baseline = [_point(seeds, base_leak, base_acc, ratio=0.9),
                _point(seeds, [0.50, 0.52, 0.48], [0.90, 0.91, 0.89], ratio=0.5),
                _point(seeds, [0.60, 0.60, 0.60], [0.85, 0.85, 0.85], ratio=0.4)]  # dominated: not compared
    method = [_point(seeds, [0.10, 0.10, 0.10], [0.80, 0.81, 0.82]),
              _point(seeds, [0.40, 0.40, 0.40], [0.92, 0.93, 0.94])]
    rows = compare(method, baseline)
    assert [r["baseline_point"] for r in rows] == [0, 1]
    # Seed s: the method's frontier is the line (0.1, a_s) -> (0.4, b_s); read it at the baseline's leak.
    a, b = np.array([0.80, 0.81, 0.82]), np.array([0.92, 0.93, 0.94])
    at_leak = a + (b - a) * (base_leak - 0.1) / 0.3
    expected = at_leak - base_acc
    assert_allclose(rows[0]["accuracy_gain"]["per_seed"], expected)
    t = 4.3027  # t_{0.975, 2}
    half = t * expected.std(ddof=1) / math.sqrt(3)
    assert_allclose([rows[0]["accuracy_gain"]["ci95_low"], rows[0]["accuracy_gain"]["ci95_high"]],
                    [expected.mean() - half, expected.mean() + half], rtol=1e-4)
    assert rows[0]["accuracy_gain_verdict"] == "above"  # +0.010, +0.014, +0.018
    # Leak at equal accuracy: the leak where the method's line reaches the baseline's accuracy.
    leak_at = 0.1 + 0.3 * (base_acc - a) / (b - a)
    assert_allclose(rows[0]["leak_gain"]["per_seed"], base_leak - leak_at)
    assert rows[0]["leak_gain_verdict"] == "above"  # the method leaks less in every seed, by a margin
    # A seed whose baseline accuracy lies below the method's lowest point: undefined, not extrapolated.
    low = compare(method, [_point(seeds, base_leak, [0.83, 0.82, 0.79])])[0]
    assert low["leak_gain"]["per_seed"][2] is None and low["leak_gain_verdict"] == "undefined"
    # The baseline's second point leaks more than the method's frontier reaches: undefined, not extrapolated.
    assert rows[1]["accuracy_gain_verdict"] == "undefined" and rows[1]["accuracy_gain"]["mean"] is None


def test_a_seed_missing_from_the_method_or_a_single_seed_is_undefined():
    baseline = [_point([0, 1], [0.3, 0.3], [0.8, 0.8])]
    assert compare([_point([0], [0.2], [0.9]), _point([0], [0.4], [0.95])], baseline)[0]["accuracy_gain_verdict"] \
        == "undefined"
    one = compare([_point([0], [0.2], [0.9]), _point([0], [0.4], [0.95])], [_point([0], [0.3], [0.8])])[0]
    assert one["accuracy_gain"]["per_seed"] == pytest.approx([0.125]) and one["accuracy_gain_verdict"] == "undefined"


def test_verdicts():
    assert verdict({"ci95_low": 0.01, "ci95_high": 0.03}) == "above"
    assert verdict({"ci95_low": -0.03, "ci95_high": -0.01}) == "below"
    assert verdict({"ci95_low": -0.01, "ci95_high": 0.02}) == "noise"
    assert verdict({"ci95_low": math.nan, "ci95_high": math.nan}) == "undefined"


def _sweep_points():
    """A small sweep in the frontier issue's schema: masked, MAE and FaceMAE at three mask ratios, 3 seeds."""
    rng = np.random.default_rng(0)
    points = []
    for method, lam, acc0, leak0 in (("masked", 0.0, 0.80, 0.05), ("mae", 0.0, 0.86, 0.30), ("facemae", 0.1, 0.88, 0.32)):
        for i, ratio in enumerate((0.9, 0.75, 0.5)):
            acc = acc0 + 0.04 * i + rng.normal(0, 0.003, 3)
            leak = leak0 + 0.15 * i + rng.normal(0, 0.01, 3)
            points.append({"method": method, "mask_ratio": ratio, "lambda_irm": lam, "options": {},
                           "seeds": [0, 1, 2], "accuracy": acc.tolist(), "identity_leak@1": leak.tolist(),
                           "image_leak@1": (leak / 3).tolist(), "psnr_masked": [17.0, 17.1, 16.9],
                           "hf_ratio": [1.0, 1.1, 0.9]})
    return points


def test_the_frontier_report_holds_every_point_the_comparison_and_a_verdict(tmp_path):
    import json

    from PIL import Image

    from facemae.eval.frontier import markdown, plot, summarise

    points = _sweep_points()
    result = summarise(points)
    assert result["points"] == points and len(result["comparison"]) == 3  # MAE's three points are its frontier
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # standard JSON: undefined is null, not NaN
    assert result["verdict"].startswith("Accuracy at equal leak, at each of mae's 3 frontier point(s): ")
    # FaceMAE's curve lies 0.02 above MAE's at slightly higher leak: above at MAE's two upper points, and
    # MAE's lowest-leak point lies below FaceMAE's range (undefined, not extrapolated).
    verdicts = [r["accuracy_gain_verdict"] for r in result["comparison"]]
    assert verdicts[0] == "undefined" and "above" in verdicts[1:], result["comparison"]
    text = "\n".join(markdown(result, meta={"commit": "abc1234"}))
    assert result["verdict"] in text and "| facemae | 0.75 | 0.1 | - | 3 |" in text and "- commit: abc1234" in text
    plot(points, str(tmp_path / "frontier.png"), ceiling=(1.0, 0.98))
    with Image.open(tmp_path / "frontier.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    with pytest.raises(ValueError, match="needs points of 'facemae' and of 'mae'"):
        summarise([p for p in points if p["method"] != "facemae"])


# --- the sweep's plan: which trials run, and where more seeds go ---------------------------------------------

def _plan_point(method, ratio, leak, acc, *, lam=0.0, paste=True):
    return {"method": method, "mask_ratio": ratio, "lambda_irm": lam,
            "options": {} if method == "masked" else {"paste_visible": paste},
            "seeds": [0], "accuracy": [acc], "identity_leak@1": [leak]}


def test_the_first_phase_has_one_trial_per_generator_and_seed():
    from facemae.config import load_config
    from facemae.frontier import generators

    config = load_config(None, ["frontier.mask_ratios=[0.5, 0.9]", "frontier.lambdas=[0.1, 0.3]",
                                "frontier.paste_visible=[true, false]"])
    trials = generators(config, [0])
    kinds = sorted((t["method"], t["mask_ratio"], t["lambda_irm"]) for t in trials)
    assert kinds == [("facemae", 0.5, 0.1), ("facemae", 0.5, 0.3), ("facemae", 0.9, 0.1), ("facemae", 0.9, 0.3),
                     ("mae", 0.5, 0.0), ("mae", 0.9, 0.0), ("masked", 0.5, 0.0), ("masked", 0.9, 0.0),
                     ("originals", 0.0, 0.0)]
    # A generator is trained once and released with every option; the masked faces have no option.
    assert all(t["paste_visible"] == ([True] if t["method"] in ("masked", "originals") else [True, False])
               for t in trials)


def test_more_seeds_go_to_the_frontier_points_and_their_neighbours_along_the_ratio():
    from facemae.config import load_config
    from facemae.frontier import deciding, more_seeds

    mae = [_plan_point("mae", r, leak, acc) for r, leak, acc in
           [(0.5, 0.60, 0.90), (0.6, 0.50, 0.80), (0.75, 0.40, 0.85), (0.85, 0.30, 0.70), (0.9, 0.20, 0.60)]]
    # (0.6) is dominated by (0.75): the frontier is 0.5, 0.75, 0.85, 0.9; every ratio is on it or next to it.
    # FaceMAE at lambda 0.3 is dominated everywhere by lambda 0.1 at 0.9, so only its 0.9 neighbour...
    face = [_plan_point("facemae", 0.5, 0.10, 0.95, lam=0.1), _plan_point("facemae", 0.9, 0.05, 0.90, lam=0.1),
            _plan_point("facemae", 0.5, 0.50, 0.50, lam=0.3), _plan_point("facemae", 0.75, 0.60, 0.40, lam=0.3),
            _plan_point("facemae", 0.9, 0.70, 0.30, lam=0.3)]
    picked = {(p["method"], p["mask_ratio"], p["lambda_irm"]) for p in deciding(mae + face)}
    assert {k for k in picked if k[0] == "mae"} == {("mae", r, 0.0) for r in (0.5, 0.6, 0.75, 0.85, 0.9)}
    # ... is not picked: lambda 0.3 has no point on FaceMAE's frontier (0.5 and 0.9 at lambda 0.1).
    assert {k for k in picked if k[0] == "facemae"} == {("facemae", 0.5, 0.1), ("facemae", 0.9, 0.1)}
    config = load_config(None, ["frontier.seeds=[0, 1, 2]"])
    trials = more_seeds(config, mae + face)
    assert sorted({t["seed"] for t in trials}) == [1, 2]
    assert len([t for t in trials if t["method"] == "originals"]) == 2  # the ceiling, every seed
    assert len(trials) == 2 * (1 + 5 + 2)
    assert more_seeds(load_config(None, ["frontier.seeds=[0]"]), mae + face) == []


def test_rows_of_seeds_merge_into_points_with_per_seed_lists():
    from facemae.frontier import collect

    rows = [{"method": "mae", "mask_ratio": 0.5, "lambda_irm": 0.0, "options": {"paste_visible": True}, "seed": s,
             "accuracy": 0.5 + s / 10, "identity_leak@1": 0.3, "image_leak@1": 0.1, "psnr_masked": 20.0,
             "hf_ratio": 1.0} for s in (2, 0, 1, 0)]
    (point,) = collect(rows)
    assert point["seeds"] == [0, 1, 2] and point["accuracy"] == [0.5, 0.6, 0.7]  # seed order, a repeat once


def test_the_report_names_how_each_point_was_released():
    from facemae.eval.frontier import _release_cell

    assert [_release_cell(_plan_point("mae", 0.5, 0.1, 0.9, paste=p)) for p in (True, False)] == ["pasted", "decoder"]
    assert _release_cell(_plan_point("masked", 0.5, 0.1, 0.9)) == "-"


def test_the_ledger_gives_back_finished_points_measured_with_the_same_settings_only(tmp_path):
    from facemae.config import load_config
    from facemae.frontier import record, recorded, settings_digest

    config = load_config(ROOT / "jobs" / "configs" / "frontier_smoke.yaml", [f"frontier.ledger={tmp_path / 'ledger'}"])
    trials = [{"method": "facemae", "mask_ratio": 0.5, "lambda_irm": 0.1, "seed": 1, "paste_visible": [True, False]},
              {"method": "originals", "mask_ratio": 0.0, "lambda_irm": 0.0, "seed": 1, "paste_visible": [True]},
              {"method": "mae", "mask_ratio": 0.9, "lambda_irm": 0.0, "seed": 1, "paste_visible": [True]}]
    rows = [{"method": "facemae", "mask_ratio": 0.5, "lambda_irm": 0.1, "options": {"paste_visible": p}, "seed": 1,
             "dataset": f"/x/{p}", "accuracy": 0.9 + p / 100, "identity_leak@1": 0.5, "image_leak@1": 0.4,
             "psnr_masked": 20.0, "hf_ratio": 3.0} for p in (True, False)]
    rows.append({"method": "originals", "mask_ratio": 0.0, "lambda_irm": 0.0, "options": {}, "seed": 1,
                 "dataset": "/x/o", "accuracy": 0.98, "identity_leak@1": 1.0, "image_leak@1": 1.0,
                 "psnr_masked": math.nan, "hf_ratio": math.nan})
    record(config, rows)
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == [
        "facemae-l0.1-nopaste-r0.5-s1.json", "facemae-l0.1-r0.5-s1.json", "originals-s1.json"]
    found, todo = recorded(config, trials)
    assert todo == trials[2:]  # never measured
    assert found[:2] == rows[:2] and math.isnan(found[2]["hf_ratio"]) and found[2]["accuracy"] == 0.98
    # Where it ran and what it is called do not change a point's numbers: still reused.
    moved = load_config(ROOT / "jobs" / "configs" / "frontier_smoke.yaml", [
        f"frontier.ledger={tmp_path / 'ledger'}", "name=elsewhere", "data.output=/elsewhere/data", "ray.num_cpus=8",
        "frontier.seeds=[0, 1, 2]"])
    assert settings_digest(moved) == settings_digest(config) and recorded(moved, trials)[1] == trials[2:]
    # Another FR recipe, another judge budget or IRM temperature: measured again.
    for override in ("experiment.fr_steps=7", "experiment.judge_steps=9", "loss.tau=0.2"):
        other = load_config(ROOT / "jobs" / "configs" / "frontier_smoke.yaml",
                            [f"frontier.ledger={tmp_path / 'ledger'}", override])
        assert recorded(other, trials) == ([], trials), override
    # A point missing one of its release options is run whole.
    (tmp_path / "ledger" / "facemae-l0.1-nopaste-r0.5-s1.json").unlink()
    assert recorded(config, trials)[1] == [trials[0], trials[2]]


def test_the_committed_ledger_still_serves_frontier_yaml():
    # A setting added since the rows were measured (model.head, ...) must not orphan them: frontier.yaml as it
    # stands finds every first-phase row in the committed ledger; a setting that changes the numbers does not.
    import dataclasses

    from facemae.config import load_config
    from facemae.frontier import generators, recorded, settings_digest

    config = load_config(ROOT / "jobs" / "configs" / "frontier.yaml")
    config = dataclasses.replace(config, frontier=dataclasses.replace(
        config.frontier, ledger=str(ROOT / "benchmarks" / "results" / "frontier-points")))
    trials = generators(config, [0])
    rows, todo = recorded(config, trials)
    assert len(trials) == 21 and len(rows) == 21 and not todo
    sharded = dataclasses.replace(config, model=dataclasses.replace(config.model, head="partial_fc"))
    assert settings_digest(sharded) != settings_digest(config)
    assert recorded(sharded, trials)[1] == trials
    shifted = dataclasses.replace(config, data=dataclasses.replace(config.data, domain="shifted"))
    assert settings_digest(shifted) != settings_digest(config)
    attacked = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, attacks=True))
    assert settings_digest(attacked) == settings_digest(config)  # attacks add columns, change no point's numbers
