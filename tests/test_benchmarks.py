"""The benchmark scripts' own bookkeeping: figures filed by one script survive another's rewrite."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    """``science`` and ``run_all`` writing into ``tmp_path`` instead of ``benchmarks/results``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all
    import science

    for module in (run_all, science):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    meta = {"date": "2026-12-04T10:50:25+00:00", "machine": "vm", "commit": "1ea0be8",
            "command": "python benchmarks/run_all.py"}
    timed = {"value": 0.25, "baseline": 0.2, "ratio": 1.25, "goal": "<= 1.10", "met": False, "unit": "s/step",
             "how": "medians"}
    run_all.write_results({"irm_overhead": timed}, meta)
    yield science, run_all, meta, timed
    sys.modules.pop("science", None)
    sys.modules.pop("run_all", None)


@pytest.mark.parametrize("minutes, met", [(74.6, True), (90.0, True), (131.2, False)])
def test_experiment_cost_is_filed_beside_the_figures_with_its_own_provenance(scripts, tmp_path, minutes, met):
    science, run_all, meta, timed = scripts
    run = {"wall_minutes": minutes, "seeds": [0, 1, 2], "config": "jobs/configs/experiment.yaml",
           "date": "2026-12-06T03:01:00+00:00", "machine": "vm2", "commit": "7c88aa6",
           "command": "python benchmarks/science.py --cost"}
    table = science.record_cost(run)
    body = json.loads((tmp_path / "performance.json").read_text())
    assert {k: body[k] for k in meta} == meta  # the table's header stays run_all's
    assert body["figures"]["irm_overhead"] == timed
    cost = body["figures"]["experiment_cost"]
    assert (cost["value"], cost["goal"], cost["met"], cost["unit"]) == (minutes, "<= 90", met, "min")
    assert (cost["commit"], cost["date"], cost["command"]) == ("7c88aa6", run["date"], run["command"])
    row = next(line for line in table.read_text().splitlines() if line.startswith("| experiment_cost |"))
    assert f"| {minutes:.4g} min | - | - | <= 90 | {'yes' if met else 'no'} |" in row and "7c88aa6" in row
    # run_all rewrites its own figures and keeps the one science.py filed; one it measures again replaces it.
    run_all.write_results({"irm_overhead": {**timed, "value": 0.21, "ratio": 1.05, "met": True}}, meta)
    again = json.loads((tmp_path / "performance.json").read_text())["figures"]
    assert again["experiment_cost"] == cost and again["irm_overhead"]["value"] == 0.21


def test_cost_refuses_a_run_that_would_reuse_work(scripts, tmp_path):
    science, *_ = scripts
    from facemae.config import load_config

    runs, data = tmp_path / "runs", tmp_path / "data"
    config = load_config(None, [f"train.storage_path={runs}", f"data.output={data}"])
    assert science._reusable(config) == ""
    runs.mkdir()
    assert science._reusable(config) == ""  # an empty folder holds nothing to reuse
    (runs / "judge").mkdir()
    (runs / "judge" / "weights.safetensors").write_bytes(b"x")
    assert science._reusable(config) == str(runs)


def test_the_attacks_ledger_is_reused_under_its_settings_and_a_changed_setting_measures_again(tmp_path, monkeypatch):
    """benchmarks/attacks.py outlives a session through its committed ledger: a row and seed it holds under the
    same settings is not measured again (no teacher or judge trained for it); one measured with another attacker
    budget is."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import attacks

    from facemae.config import load_config

    monkeypatch.setattr(attacks, "LEDGER", tmp_path / "points")
    monkeypatch.setattr(attacks, "RESULTS", tmp_path)
    config = load_config(BENCHMARKS.parent / "jobs" / "configs" / "frontier.yaml", [])
    rc = attacks._ratio_config(config, 0.9, 1)
    (tmp_path / "points").mkdir()
    for i, row in enumerate(attacks.ROWS):
        path = attacks._point(rc, row, ratio=0.9, lam=0.3, seed=1)
        path.write_text(json.dumps({**attacks._settings(rc), "scores": {"adaptive_identity_leak@1": i / 10}}))
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == [
        "facemae-l0.3-r0.9-s1.json", "mae-r0.9-s1.json", "masked-r0.9-s1.json", "originals-r0.9-s1.json"]

    def untouchable() -> dict[str, str]:
        raise AssertionError("trained the shared models for a row the ledger holds")

    rows = attacks.seed_rows(config, untouchable, ratio=0.9, lam=0.3, seed=1)
    assert {row: s["adaptive_identity_leak@1"] for row, s in rows.items()} == {
        "originals": 0.0, "masked": 0.1, "mae": 0.2, "facemae": 0.3}

    measured: list[str] = []
    monkeypatch.setattr(attacks, "_measure", lambda config, rc, row, shared, **kw: measured.append(row) or {"x": 1})
    more = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, adaptive_steps=400))
    attacks.seed_rows(more, lambda: {}, ratio=0.9, lam=0.3, seed=1)
    assert measured == list(attacks.ROWS)  # another budget: every row again, each recorded under the new one
    entry = json.loads(attacks._point(rc, "mae", ratio=0.9, lam=0.3, seed=1).read_text())
    assert entry["adaptive_steps"] == 400 and entry["scores"] == {"x": 1}
    sys.modules.pop("attacks", None)
