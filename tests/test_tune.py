"""Ray Tune sweeps: the validation objective, the search space, the Pareto front, and a real sweep
on a real local Ray cluster that is interrupted (SIGINT, as Ctrl+C) and restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.models.weights import save_weights
from facemae.tune.report import pareto_front

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "tune_smoke.yaml"


@pytest.fixture(scope="module")
def frozen_nets(tmp_path_factory) -> dict[str, str]:
    """Teacher and judge: two independently initialised fr_tiny (no training: the mechanics only)."""
    from facemae.models.registry import build_fr

    out = {}
    for seed, role in ((0, "teacher"), (1, "judge")):
        torch.manual_seed(seed)
        out[role] = str(save_weights(build_fr("fr_tiny", embedding_size=64), tmp_path_factory.mktemp(role),
                                     {"task": "fr", "model": "fr_tiny", "embedding_size": 64}))
    return out


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    points = [(0.1, 0.9), (0.2, 0.5), (0.3, 0.6), (0.5, 0.1), (0.2, 0.5), (None, 0.0), (0.6, 0.1)]
    # (0.3, 0.6) is beaten by (0.2, 0.5); (0.6, 0.1) by (0.5, 0.1); equal points do not beat each other.
    assert pareto_front(points) == [True, True, False, True, True, False, False]


def test_search_space_becomes_tune_domains_and_bad_values_fail_before_training():
    from ray.tune.search.sample import Categorical, Float, Integer

    from facemae.tune.sweep import _check_space, count_trials, search_space, trial_config

    config = load_config(SMOKE, ["tune.space={mask.ratio: {choice: [0.5, 0.75]}, train.base_lr: "
                                 "{loguniform: [1e-3, 1e-2]}, loss.lambda_irm: {grid: [0.0, 0.5, 1.0]}, "
                                 "train.seed: {randint: [0, 10]}}", "tune.num_samples=2"])
    space = search_space(config.tune.space)
    assert isinstance(space["mask.ratio"], Categorical) and space["mask.ratio"].categories == [0.5, 0.75]
    assert isinstance(space["train.base_lr"], Float) and (space["train.base_lr"].lower, space["train.base_lr"].upper) \
        == (1e-3, 1e-2)
    assert space["loss.lambda_irm"] == {"grid_search": [0.0, 0.5, 1.0]}
    assert isinstance(space["train.seed"], Integer)
    assert count_trials(config.tune) == 6
    trial = trial_config(config.to_dict(), {"mask.ratio": 0.5, "loss.lambda_irm": 0.0}, trial_id="abc_00001")
    assert (trial.name, trial.mask.ratio, trial.mask.keep, trial.loss.lambda_irm) == \
        ("facemae-tune-smoke-sweep-abc_00001", 0.5, 98, 0.0)

    bad = load_config(SMOKE, ["tune.space={mask.ratio: {choice: [0.5, 1.0]}}"])
    with pytest.raises(ValueError, match=r"tune.space.mask.ratio: the value 1.0 makes an invalid trial: "
                                         r"mask.ratio=1.0 must be in \[0, 1\)"):
        _check_space(bad)
    bad = load_config(SMOKE, ["tune.space={model.mae: {choice: [facemae_vit_tiny_p16]}}"])
    with pytest.raises(ValueError, match="uses patch size 16 but mask.patch_size=8"):
        _check_space(bad)
    with pytest.raises(ValueError, match="tune.space.mask.ratoi: unknown key mask.ratoi"):
        load_config(SMOKE, ["tune.space={mask.ratoi: {choice: [0.5]}}"])


def test_validation_metrics_match_a_direct_computation_from_the_exported_weights(tmp_path, frozen_nets):
    """The loop's val_* numbers at the last step (computed inside the DeepSpeed engine), recomputed
    outside it from the exported weights."""
    from facemae.measures.privacy import retrieval_leak
    from facemae.losses.irm import irm_loss
    from facemae.models.weights import load_fr_backbone, load_mae
    from facemae.train.trainer import train
    from facemae.train.validation import VAL_TAU, load_validation_set

    config = load_config(SMOKE, [f"data.output={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                                 "train.num_workers=0", "train.max_steps=4", "train.val_every=2",
                                 "train.checkpoint_every=4", f"train.teacher={frozen_nets['teacher']}",
                                 f"train.judge={frozen_nets['judge']}", "tune.privacy_weight=0.5"])
    ingest(config)
    result = train(config)
    logged = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in logged if "val_irm" in m]
    assert [m["step"] for m in val] == [2, 4]

    data = load_validation_set(config, device=torch.device("cpu"))
    assert len(data.image_id) == 12 and (data.mask.sum(1) == 196 - 49).all()  # the 2 validation identities
    mae, teacher, judge = load_mae(result.weights), load_fr_backbone(frozen_nets["teacher"]), \
        load_fr_backbone(frozen_nets["judge"])
    with torch.no_grad():
        loss, pred, _ = mae(data.images, mask=data.mask)
        released = mae.compose(data.images, pred, data.mask)
        irm = float(irm_loss(teacher(data.images), teacher(released), tau=VAL_TAU))
        queries, gallery = judge(released).numpy(), judge(data.images).numpy()
    ids = data.identity.numpy()
    leak = retrieval_leak(queries, gallery, query_source=np.arange(len(ids)), query_identity=ids,
                          gallery_identity=ids, ks=(1,))
    last = val[-1]
    assert last["val_irm"] == pytest.approx(irm, rel=1e-4, abs=1e-6)
    assert last["val_recon_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert last["val_identity_leak@1"] == pytest.approx(leak["identity_leak@1"])
    assert last["val_image_leak@1"] == pytest.approx(leak["image_leak@1"])
    assert last["val_objective"] == pytest.approx(irm + 0.5 * leak["identity_leak@1"], rel=1e-4)


def _wait_for(predicate, *, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_asha_sweep_restores_and_runs_only_the_remaining_trials(tmp_path, frozen_nets, ray_cluster):
    import facemae

    overrides = [f"data.output={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                 f"tune.output={tmp_path / 'report'}", f"train.teacher={frozen_nets['teacher']}",
                 f"train.judge={frozen_nets['judge']}"]
    runs = tmp_path / "runs"

    def run_dirs() -> list[Path]:
        return sorted(runs.glob("facemae-tune-smoke-sweep-*_0000*"))

    # 1. The sweep as a user runs it, interrupted with Ctrl+C once the second trial has started: with
    #    max_concurrent 1 the first one has ended by then (finished, or stopped early by ASHA).
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(SMOKE),
                             *[a for o in overrides for a in ("--set", o)]],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    _wait_for(lambda: len(run_dirs()) == 2, proc=proc, timeout=600, what="the second trial started")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    first, second = run_dirs()
    first_log = (first / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in first_log.splitlines()] in ([3], [3, 6])  # ASHA may stop it
    assert not (second / "export").exists(), "the second trial finished before the interrupt"
    assert "Tuner.restore" in out or "interrupted" in out.lower(), out[-3000:]

    # 2. Restored in this process through the SDK: the finished trial is kept as it is, the other one
    #    runs to the end.
    result = facemae.tune(SMOKE, overrides=overrides)
    assert (first / "metrics.jsonl").read_text() == first_log  # not trained again
    assert (second / "export" / "weights.safetensors").is_file()
    assert len(result.table) == 2 and {r["params"]["loss.lambda_irm"] for r in result.table} == {0.0, 1.0}
    for row in result.table:
        assert row["val_irm"] is not None and row["val_identity_leak@1"] is not None, row
        assert np.isfinite(row["val_objective"])
        assert row["val_objective"] == pytest.approx(row["val_irm"] + row["val_identity_leak@1"])
    best = min(result.table, key=lambda r: r["val_objective"])
    assert result.best_config == best["params"]
    assert result.best_metrics["val_objective"] == best["val_objective"]
    assert Path(result.best_checkpoint, "latest").is_file() and Path(result.best_weights).is_file()
    assert any(r["pareto"] for r in result.table)
    assert "| yes |" in Path(result.report).read_text()
    assert Path(result.pareto_png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = json.loads((tmp_path / "report" / "trials.json").read_text())
    assert [t["trial"] for t in trials] == [r["trial"] for r in result.table]
