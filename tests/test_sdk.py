"""The Python SDK (``import facemae``): each entry point on the smoke configs, results checked on disk.

The training stages run in the single-process local mode (``train.num_workers=0``) to keep the suite
fast; the same smoke job on Ray Train workers runs in test_cli.py and test_job_submit.py.
``facemae.submit`` is tested in test_job_submit.py, beside ``ray job submit``, sharing its head node;
``facemae.tune`` in test_tune.py, where it restores an interrupted sweep.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import facemae
from facemae.config import load_config
from facemae.data.shards import read_manifest, verify_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
SMOKE = CONFIGS / "train_smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_import_facemae_is_cheap():
    code = """
import sys, facemae
assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'import facemae pulled in ray or torch'
entry = [facemae.ingest, facemae.mask, facemae.evaluate, facemae.submit, facemae.train, facemae.resolve_config]
assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'looking up the SDK pulled in ray or torch'
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_entry_points_that_share_a_subpackage_name_are_that_subpackage_made_callable():
    import facemae.generate.release as release  # binds facemae.generate to the subpackage
    from facemae.train import trainer

    for name in ("train", "generate", "experiment"):
        assert callable(getattr(facemae, name)), name
    assert facemae.train.trainer is trainer and facemae.generate.release is release
    assert facemae.train.trainer.TrainResult.__module__ == "facemae.train.trainer"
    with pytest.raises(ValueError, match="unknown key"):
        facemae.train(SMOKE, overrides=["train.bogus=1"])  # the SDK function, not the module


def test_config_from_a_path_an_object_overrides_and_an_address():
    config = facemae.resolve_config(SMOKE, overrides=["train.max_steps=3"])
    assert (config.name, config.train.max_steps, config.ray.num_cpus) == ("facemae-synthetic-smoke", 3, 2)
    changed = facemae.resolve_config(config, overrides=["mask.ratio=0.5", "data.num_identities=20"])
    assert (changed.mask.ratio, changed.data.num_identities, changed.train.max_steps) == (0.5, 20, 3)
    assert config.mask.ratio == 0.75  # the caller's object is left alone
    remote = facemae.resolve_config(config, address="ray://head:10001")
    assert (remote.ray.address, remote.ray.num_cpus) == ("ray://head:10001", None)
    assert facemae.resolve_config(None).name == load_config(None).name
    with pytest.raises(ValueError, match=r"unknown key\(s\) train.max_step;"):
        facemae.resolve_config(SMOKE, overrides=["train.max_step=3"])
    with pytest.raises(FileNotFoundError, match="config file nowhere.yaml does not exist"):
        facemae.resolve_config("nowhere.yaml")
    with pytest.raises(TypeError, match="list of 'section.key=value' strings"):
        facemae.resolve_config(SMOKE, overrides="train.max_steps=3")


def test_ingest_and_mask_write_the_datasets(tmp_path):
    args = [f"data.output={tmp_path / 'syn'}", "data.workers=1", f"mask.output={tmp_path / 'masked'}"]
    original = facemae.ingest(SMOKE, overrides=args)
    masked = facemae.mask(SMOKE, overrides=args)
    assert original.kind == "original" and original.num_images() == 12 * 6
    assert original.num_images("deploy") == 3 * 6  # deploy_fraction 0.25 of 12 identities
    assert verify_dataset(tmp_path / "syn").num_images() == 72
    on_disk = verify_dataset(tmp_path / "masked")
    assert masked.kind == on_disk.kind == "masked" and list(on_disk.splits) == ["deploy"]
    assert on_disk.num_images() == 18 and on_disk.mask["keep"] == 49  # 196 patches of 8 px, 75% removed


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory, ray_cluster):
    """The main job on the smoke config, once per module: data, masked deploy split, teacher, FaceMAE."""
    root = tmp_path_factory.mktemp("sdk")
    overrides = [f"data.output={root / 'syn'}", f"train.storage_path={root / 'runs'}", "train.metrics_port=0",
                 "train.num_workers=0", "eval.pairs=80", "generate.batch_size=16"]
    said: list[str] = []
    job = facemae.train(SMOKE, overrides=overrides, say=said.append)
    return root, overrides, job, said


@pytest.mark.ray
def test_train_runs_the_main_job_and_returns_its_checkpoint(smoke_job):
    root, _, job, said = smoke_job
    run_dir = root / "runs" / "facemae-synthetic-smoke"
    assert job.result.checkpoint == str(run_dir / "checkpoint_00000006")
    assert (run_dir / "checkpoint_00000006" / "latest").is_file()
    assert Path(job.result.weights).is_file() and job.result.weights == str(run_dir / "export" / "weights.safetensors")
    assert job.result.metrics["step"] == 6 and math.isfinite(job.result.metrics["loss"])
    teacher = root / "runs" / "facemae-synthetic-smoke-teacher" / "export" / "weights.safetensors"
    assert job.teacher is not None and job.teacher.weights == str(teacher) and teacher.is_file()
    assert job.dataset.num_images() == 72 and job.masked.num_images() == job.dataset.num_images("deploy")
    assert f"checkpoint {job.result.checkpoint}" in said and f"teacher  {teacher}" in "\n".join(said)


@pytest.fixture(scope="module")
def released(smoke_job):
    root, overrides, job, _ = smoke_job
    return facemae.generate(SMOKE, overrides=overrides, export_folder=str(root / "faces"))


@pytest.mark.ray
def test_generate_releases_the_masked_deploy_split_with_the_trained_weights(smoke_job, released):
    root, _, job, _ = smoke_job
    assert released.output == str(root / "syn-masked-reconstruct")
    manifest = verify_dataset(released.output)
    assert manifest.kind == released.manifest.kind == "released"
    assert manifest.num_images() == job.masked.num_images() == 18
    assert manifest.source["weights"] == job.result.weights and manifest.source["method"] == "reconstruct"
    pngs = sorted((root / "faces").rglob("*.png"))
    assert released.folder_images == len(pngs) == 18 and pngs[0].read_bytes().startswith(PNG_MAGIC)


@pytest.mark.ray
def test_evaluate_verifies_an_fr_model_and_scores_a_release(smoke_job, released):
    root, overrides, job, _ = smoke_job
    # The teacher is the only FR model of the smoke job; the platform's judge would be trained apart.
    result = facemae.evaluate(SMOKE, overrides=overrides, fr=job.teacher.weights, pairs_from=str(root / "syn"),
                              judge=job.teacher.weights, released=released.output)
    pairs = result.verification["heldout_pairs"]
    assert pairs["n_pairs"] == 80 and 0.0 <= pairs["accuracy"] <= 1.0 and len(pairs["tpr"]) == len(pairs["fpr"])
    leak = result.privacy
    assert leak["n_queries"] == 18 and leak["n_gallery"] == 18
    for k in ("image", "identity"):
        assert 0.0 <= leak[f"{k}_leak@1"] <= leak[f"{k}_leak@5"] <= 1.0
    summary = result.summary()
    assert "tpr" not in summary["verification"]["heldout_pairs"] and summary["privacy"] == leak
    with pytest.raises(ValueError, match="nothing to evaluate"):
        facemae.evaluate(SMOKE, overrides=overrides)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.fixture(scope="module")
def smoke_experiment(tmp_path_factory, ray_cluster):
    """The two-seed smoke experiment, its folder (``syn``, ``runs``, ``report``) and its stage lines; the
    cross-dataset test trains on the same dataset and storage, so it reuses the generators trained here."""
    root, said = tmp_path_factory.mktemp("experiment"), []
    result = facemae.experiment(CONFIGS / "experiment_smoke.yaml", say=said.append, overrides=[
        f"data.output={root / 'syn'}", f"train.storage_path={root / 'runs'}",
        f"experiment.output={root / 'report'}", "experiment.seeds=[0, 1]"])
    return root, result, said


@pytest.mark.ray
def test_smoke_experiment_writes_a_finite_report_with_every_row(smoke_experiment):
    tmp_path, result, said = smoke_experiment
    out = tmp_path / "report"
    assert result.report == str(out / "report.md")
    assert result.seeds == [0, 1] and list(result.table) == ["originals", "masked", "mae", "facemae"]
    # The seeds loop: each seed trains its own FaceMAE, MAE and FR models; teacher and judge are shared.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if "-on-" not in p.name)  # not the cross test's
    assert [r for r in runs if r.endswith(("-teacher", "-judge"))] == [
        "facemae-experiment-smoke-judge", "facemae-experiment-smoke-teacher"]
    for seed in (0, 1):
        assert {f"facemae-experiment-smoke-{k}-s{seed}" for k in ("facemae", "mae", "fr-originals", "fr-masked",
                                                                   "fr-mae", "fr-facemae")} <= set(runs)
    assert result.runs[0]["mae"]["fr_weights"] != result.runs[1]["mae"]["fr_weights"]
    for row, metrics in result.rows.items():  # per-seed values in seed order, as the runs hold them
        for seed_index, seed in enumerate(result.seeds):
            run = result.runs[seed][row]
            assert metrics["identity_leak@1"][seed_index] == run["privacy"]["identity_leak@1"]
            assert metrics["accuracy"][seed_index] == run["verification"]["heldout_pairs"]["accuracy"]
    text = (out / "report.md").read_text()
    for row in result.table:
        assert f"| {row} |" in text
    assert "| facemae - mae |" in text and "psnr_masked" in text and "hf_ratio" in text
    numbers = _numbers(json.loads((out / "report.json").read_text())["runs"])
    assert len(numbers) > 100 and all(math.isfinite(n) for n in numbers)
    science = json.loads((out / "science.json").read_text())
    assert science["seeds"] == [0, 1] and set(science["rows"]) == set(result.table)
    summary = json.loads((out / "report.json").read_text())["summary"]
    acc = result.rows["facemae"]["accuracy"]
    assert summary["facemae"]["accuracy"]["mean"] == pytest.approx(sum(acc) / 2)
    t975 = math.tan(0.475 * math.pi)  # t_{0.975,1} in closed form (12.7062 in a table)
    half = t975 * abs(acc[0] - acc[1]) / math.sqrt(2) / math.sqrt(2)  # t_{0.975,1} * s / sqrt(n), s = |d|/sqrt(2)
    assert summary["facemae"]["accuracy"]["ci95_high"] - summary["facemae"]["accuracy"]["mean"] == \
        pytest.approx(half, abs=1e-9)
    for row in ("masked", "mae", "facemae"):  # the new fidelity columns, finite, one value per seed
        values = science["rows"][row]
        assert set(values) == {"accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio"}
        assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in values.values())
        # A 6-step model releases near-noise: against photo-like originals (Laplacian variance ~150) its
        # hf_ratio reads in the hundreds (130-230 seen); uniform noise over 0-255 would read ~700
        # (20 x its variance 5,400 / 150). The bound catches a broken metric, not a bad model.
        assert all(0 < x < 1000 for x in values["hf_ratio"]) and all(0 < x < 60 for x in values["psnr_masked"]), \
            values
    for png in ("reconstructions.png", "roc.png", "privacy_utility.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC), png
    for row, r in result.table.items():
        assert Path(r["fr_weights"]).is_file() and verify_dataset(r["dataset"]).num_images("deploy") > 0
        assert r["verification"]["heldout_pairs"]["n_pairs"] == 80
    # Releasing the originals leaks every image: the ceiling of the table.
    assert result.table["originals"]["privacy"]["image_leak@1"] == pytest.approx(1.0, abs=0.05)
    # A rerun reuses every finished run and every row's scores (kept beside each FR run under a
    # fingerprint of their inputs): the same numbers, nothing retrained.
    scores = sorted((tmp_path / "runs").glob("facemae-experiment-smoke-fr-*-s*/experiment_scores.json"))
    assert len(scores) == 8
    stamps = {p: p.stat().st_mtime_ns for p in scores}
    again = facemae.experiment(CONFIGS / "experiment_smoke.yaml", say=said.append, overrides=[
        f"data.output={tmp_path / 'syn'}", f"train.storage_path={tmp_path / 'runs'}",
        f"experiment.output={tmp_path / 'report'}", "experiment.seeds=[0, 1]"])
    assert again.rows == result.rows and {p: p.stat().st_mtime_ns for p in scores} == stamps
    assert any(line.startswith("report ") for line in said)


@pytest.mark.ray
def test_smoke_cross_dataset_experiment_releases_another_domain_with_generators_trained_on_the_first(
        smoke_experiment, tmp_path):
    said: list[str] = []
    # Dataset A is the smoke experiment's, with its storage: its seed-0 generators are reused, not retrained.
    # Dataset B is the smoke config's data (16 identities x 6 images...) but for its output and domain.
    a, _, _ = smoke_experiment
    name, on_b = "facemae-experiment-smoke", "facemae-experiment-smoke-on-shifted"
    exports = sorted((a / "runs").glob(f"{name}-*-s0/export/*"))
    assert exports
    stamps = {p: p.stat().st_mtime_ns for p in exports}
    before = {p.name for p in (a / "runs").iterdir()}
    deploy = [f"experiment.deploy.output={tmp_path / 'shifted'}", "experiment.deploy.domain=shifted"]
    result = facemae.experiment(CONFIGS / "experiment_smoke.yaml", say=said.append, overrides=[
        f"data.output={a / 'syn'}", f"train.storage_path={a / 'runs'}",
        f"experiment.output={tmp_path / 'report'}", *deploy, "experiment.attacks=true", "experiment.adaptive_steps=2"])
    rows = ["originals", "masked", "mae", "facemae", "mae-cross", "facemae-cross"]
    assert list(result.table) == rows and result.seeds == [0]
    assert read_manifest(str(tmp_path / "shifted")).source["domain"] == "shifted"
    assert read_manifest(str(a / "syn")).source["domain"] == "base"
    # B's own rows train on B (its teacher and judge); the -cross rows' generators are A's, with A's teacher:
    # every run the experiment added is B's, and A's runs are untouched.
    runs = {p.name for p in (a / "runs").iterdir()}
    assert all(r.startswith(on_b) for r in runs - before), sorted(runs - before)
    assert {f"{on_b}-judge", f"{on_b}-teacher", f"{on_b}-facemae-s0", f"{on_b}-mae-s0",
            f"{on_b}-fr-facemae-cross-s0", f"{on_b}-fr-mae-cross-s0"} <= runs - before
    assert {p: p.stat().st_mtime_ns for p in exports} == stamps
    for row in rows:  # every row released and scored on B's deployment identities, by B's judge and pairs
        released = result.table[row]["dataset"]
        assert released == str(tmp_path / "shifted") or released.startswith(str(tmp_path / "shifted-masked"))
        assert result.table[row]["verification"]["heldout_pairs"]["n_pairs"] == 80
    made = {row: read_manifest(result.table[row]["dataset"]).settings for row in ("facemae", "facemae-cross")}
    assert made["facemae"] != made["facemae-cross"]  # other generators: other releases
    for row in ("mae-cross", "facemae-cross"):
        assert result.table[row]["dataset"].endswith(f"-{row}-s0")
    out = tmp_path / "report"
    general = json.loads((out / "generalization.json").read_text())
    assert general["seeds"] == [0]
    assert (general["datasets"]["train"]["domain"], general["datasets"]["deploy"]["domain"]) == ("base", "shifted")
    assert set(general["rows"]) == {"in_domain", "cross_domain"}
    for scope in ("in_domain", "cross_domain"):
        assert set(general["rows"][scope]) == {"masked", "mae", "facemae"}
        for values in general["rows"][scope].values():
            assert len(values["accuracy"]) == 1 and all(math.isfinite(v[0]) for v in values.values())
    assert general["rows"]["cross_domain"]["facemae"]["accuracy"] == result.rows["facemae-cross"]["accuracy"]
    assert general["rows"]["in_domain"]["facemae"]["accuracy"] == result.rows["facemae"]["accuracy"]
    assert general["rows"]["cross_domain"]["masked"] == general["rows"]["in_domain"]["masked"]  # no generator
    text = (out / "report.md").read_text()
    assert "| facemae-cross |" in text and "| facemae-cross - facemae |" in text and "Cross-dataset" in text
    from facemae.experiment import ATTACK_METRICS

    # experiment.attacks: every row attacked, its numbers in attacks.json (the schema) and the report,
    # non-members drawn from B's own domain; releasing B's originals is found by membership inference.
    attacks = json.loads((out / "attacks.json").read_text())
    assert attacks["seeds"] == [0] and attacks["adaptive_steps"] == 2 and list(attacks["rows"]) == rows
    for row, values in attacks["rows"].items():
        assert set(values) == set(ATTACK_METRICS) and all(math.isfinite(v[0]) for v in values.values()), row
    assert attacks["rows"]["originals"]["mia_auc"][0] > 0.9
    assert read_manifest(str(tmp_path / "shifted-nonmembers")).source["domain"] == "shifted"
    assert "adaptive_identity_leak@1" in text and (out / "membership_roc.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.ray
def test_smoke_frontier_runs_through_tune_and_a_rerun_restores_it(tmp_path, ray_cluster):
    """2 mask ratios x masked / MAE / FaceMAE x 1 seed, each generator a Ray Tune trial: every point scored,
    finite, in frontier.json's schema; the same command again restores the sweep and retrains nothing."""
    said: list[str] = []
    overrides = [f"data.output={tmp_path / 'syn'}", f"train.storage_path={tmp_path / 'runs'}",
                 f"frontier.output={tmp_path / 'report'}"]
    result = facemae.frontier(CONFIGS / "frontier_smoke.yaml", say=said.append, overrides=overrides)
    assert result.errors == {} and result.report == str(tmp_path / "report" / "frontier.md")
    assert sorted((p["method"], p["mask_ratio"]) for p in result.points) == [
        ("facemae", 0.5), ("facemae", 0.9), ("mae", 0.5), ("mae", 0.9), ("masked", 0.5), ("masked", 0.9)]
    body = json.loads((tmp_path / "report" / "frontier.json").read_text())
    assert set(body) == {"points", "comparison", "verdict", "originals", "errors"}
    for p in body["points"]:
        assert p["seeds"] == [0] and p["lambda_irm"] == (0.1 if p["method"] == "facemae" else 0.0)
        for k in ("accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio"):
            assert len(p[k]) == 1 and math.isfinite(p[k][0]), (p["method"], k)
        assert 0 <= p["accuracy"][0] <= 1 and 0 <= p["identity_leak@1"][0] <= 1
    # The points are the runs' own scores: each FR run keeps them beside its weights.
    runs = tmp_path / "runs"
    scores = sorted(runs.glob("*-fr-*/experiment_scores.json"))
    assert len(scores) == 7  # 6 points and the originals' ceiling
    mae_09 = json.loads(next(runs.glob("*-r0.9-fr-mae-s0/experiment_scores.json")).read_text())["scores"]
    (point,) = [p for p in body["points"] if p["method"] == "mae" and p["mask_ratio"] == 0.9]
    assert point["identity_leak@1"] == [mae_09["privacy"]["identity_leak@1"]]
    assert body["comparison"] and body["verdict"].startswith("Accuracy at equal leak")
    assert body["originals"]["seeds"] == [0]
    for png in ("frontier.png", "reconstructions.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each point and seed is in the ledger, which alone continues a sweep (a fresh checkout has no runs).
    ledger = tmp_path / "report" / "points"
    assert len(list(ledger.glob("*.json"))) == 7
    assert json.loads((ledger / "mae-r0.9-s0.json").read_text())["row"]["identity_leak@1"] == \
        mae_09["privacy"]["identity_leak@1"]
    stamps = {p: p.stat().st_mtime_ns for p in scores}
    folders = sorted(p.name for p in runs.iterdir())
    again = facemae.frontier(CONFIGS / "frontier_smoke.yaml", say=said.append, overrides=overrides)
    assert again.points == result.points and {p: p.stat().st_mtime_ns for p in scores} == stamps
    assert sorted(p.name for p in runs.iterdir()) == folders
    assert any("7 rows from the ledger" in line for line in said) and not any(l.startswith("restoring ") for l in said)
    # Without the ledger, Tune restores the finished phase: nothing is trained again, the ledger is rewritten.
    for entry in ledger.glob("*.json"):
        entry.unlink()
    again = facemae.frontier(CONFIGS / "frontier_smoke.yaml", say=said.append, overrides=overrides)
    assert again.points == result.points and {p: p.stat().st_mtime_ns for p in scores} == stamps
    assert any(line.startswith("restoring ") for line in said) and len(list(ledger.glob("*.json"))) == 7
