"""The paper's comparison end to end on one dataset split (``jobs/experiment.py``).

Train the IRM teacher and, apart from it, the privacy judge on the training identities; train
FaceMAE and plain MAE (lambda = 0); release the deployment identities as masked faces, MAE
reconstructions and FaceMAE reconstructions (originals are the ceiling); train one identical FR model
on each; report verification accuracy, retrieval leak and release fidelity per row, with a
reconstruction grid, ROC curves and the privacy-utility plane. ``experiment.seeds`` repeats all but
the teacher and the judge per seed; the report gives means with 95% t intervals and the paired
differences FaceMAE - MAE and FaceMAE - masked. Every stage reuses finished work (runs by name,
datasets by their settings), so a rerun resumes and a run of more seeds trains only the new ones.

With ``experiment.deploy`` (another dataset B: a synthetic domain, a folder, a RecordIO file) the table is
B's: the experiment above runs on B (its generators trained on B's own training identities: in-domain),
and beside it FaceMAE and MAE trained on ``data`` (dataset A) release B's deployment identities with no
retraining (cross-domain rows ``mae-cross`` and ``facemae-cross``), scored by the same judge, pairs and
FR recipe as B's own rows. ``generalization.json`` holds both, per seed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facemae import console, storage
from facemae.attacks import attack_scores
from facemae.config import Config, DataConfig
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.shards import MANIFEST, atomic_write_text, sha256_file
from facemae.eval.evaluate import privacy, verify
from facemae.eval.fidelity import release_fidelity
from facemae.eval.stats import mean_ci, paired_difference
from facemae.generate.embed import embed_dataset, embedded_output
from facemae.generate.release import generate_released, released_paths
from facemae.tracking import job_run, log_folder
from facemae.train.roles import judge_config, teacher_config
from facemae.train.trainer import train

ROWS = ("originals", "masked", "mae", "facemae")
# Per-seed numbers of each row; science.json keeps SCIENCE_METRICS (the schema), report.json all.
METRICS = ("accuracy", "tar", "identity_leak@1", "identity_leak@5", "image_leak@1", "image_leak@5",
           "psnr_masked", "hf_ratio")
SCIENCE_METRICS = ("accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio")
# With experiment.attacks: the stronger attackers' numbers per row and seed (attacks.json's schema).
ATTACK_METRICS = ("identity_leak@1", "adaptive_identity_leak@1", "adaptive_image_leak@1", "mia_auc", "mia_tpr@1%fpr",
                  "adaptive_mia_auc", "adaptive_mia_tpr@1%fpr")
# With experiment.deploy: the releases of generators trained on the other dataset (data), in-domain row beside.
CROSS_ROWS = {"mae-cross": "mae", "facemae-cross": "facemae"}
# Paired differences the report gives: (method, baseline).
PAIRS = (("facemae", "mae"), ("facemae", "masked"), ("facemae-cross", "facemae"), ("mae-cross", "mae"),
         ("facemae-cross", "mae-cross"))


@dataclass
class ExperimentResult:
    """Where the report went and its numbers.

    Attributes:
        report: ``report.md``.
        seeds: The seeds, in run order.
        rows: ``row -> metric -> [value per seed]`` (:data:`METRICS`; originals have no fidelity).
        runs: ``seed -> row -> {verification, privacy, fidelity, fr_weights, dataset}``: every number.
    """

    report: str
    seeds: list[int]
    rows: dict[str, dict[str, list[float]]]
    runs: dict[int, dict[str, dict[str, Any]]]

    @property
    def table(self) -> dict[str, dict[str, Any]]:
        """The first seed's rows (``verification``, ``privacy``, ``fidelity``, ``fr_weights``, ``dataset``)."""
        return self.runs[self.seeds[0]]


def _with(config: Config, *, name: str, **train: Any) -> Config:
    return dataclasses.replace(config, name=name, train=dataclasses.replace(config.train, **train))


def shared_models(config: Config, say: Callable[[str], None]) -> dict[str, str]:
    """The IRM teacher, the judge and the teacher-embedded dataset: trained once, shared by every seed
    (the judge is part of the evaluation, which must be identical across seeds and rows)."""
    judge = train(judge_config(config)).weights
    return {**_teacher(config, say), "judge": judge}


def _teacher(config: Config, say: Callable[[str], None]) -> dict[str, str]:
    """The IRM teacher of ``config.data`` and that dataset embedded by it (FaceMAE's training input)."""
    teacher = train(teacher_config(config)).weights
    say(f"teacher {teacher}")
    embedded = embedded_output(config.data.output, teacher, config.loss)
    embed_dataset(config, source=config.data.output, weights=teacher, output=embedded)
    return {"teacher": teacher, "embedded": embedded}


def deploy_config(config: Config) -> Config:
    """The experiment on ``experiment.deploy`` (dataset B): B's data and masks, runs named apart from ``data``'s."""
    deploy = config.experiment.deploy
    assert deploy is not None
    tag = deploy.output.rstrip("/").rsplit("/", 1)[-1]
    return dataclasses.replace(config, name=f"{config.name}-on-{tag}", data=deploy,
                               mask=dataclasses.replace(config.mask, output=""),
                               experiment=dataclasses.replace(config.experiment, deploy=None))


def autoencoder_config(config: Config, seed: int, row: str, *, teacher: str = "") -> Config:
    """The training run of one seed's ``facemae`` (IRM against ``teacher``) or ``mae`` (lambda 0)."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    if row == "facemae":
        return _with(config, name=f"{config.name}-facemae-s{seed}", task="mae", teacher=teacher)
    return dataclasses.replace(_with(config, name=f"{config.name}-mae-s{seed}", task="mae", teacher=""),
                               loss=dataclasses.replace(config.loss, lambda_irm=0.0))


def fr_config(config: Config, seed: int, row: str) -> Config:
    """The downstream FR run of one row and seed: the same recipe for every row."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    return _with(config, name=f"{config.name}-fr-{row}-s{seed}", task="fr", fr_backbone=config.model.fr,
                 max_steps=config.experiment.fr_steps, base_lr=config.experiment.fr_base_lr, teacher="")


def _autoencoders(config: Config, seed: int, shared: dict[str, str], say: Callable[[str], None]) -> dict[str, str]:
    """FaceMAE and plain MAE (lambda = 0) weights of one seed (``train.seed`` is that seed)."""
    facemae = train(autoencoder_config(config, seed, "facemae", teacher=shared["teacher"]), dataset=shared["embedded"])
    mae = train(autoencoder_config(config, seed, "mae")).weights
    say(f"seed {seed}: facemae {facemae.weights}\nseed {seed}: mae     {mae}")
    return {"facemae": facemae.weights, "mae": mae}


def release(config: Config, seed: int, row: str, weights: str = "") -> str:
    """Releases the deployment faces for one row (``masked``: no model; ``mae`` / ``facemae`` and their
    ``-cross`` twins: the seed's weights) and returns the dataset folder; the masked view does not depend on
    the seed."""
    method = "masked" if row == "masked" else "reconstruct"
    row_config = dataclasses.replace(config, generate=dataclasses.replace(config.generate, method=method,
                                                                          weights=weights, output=""))
    masked, _ = released_paths(row_config)
    out = f"{masked.rstrip('/')}-{row}" + ("" if row == "masked" else f"-s{seed}")
    generate_released(row_config, output=out)
    return out


def _released_sets(config: Config, seed: int, models: dict[str, str]) -> dict[str, str]:
    """Dataset folder of each row's deployment faces."""
    return {"originals": config.data.output, **{row: release(config, seed, row, models.get(row, ""))
                                                 for row in ("masked", "mae", "facemae")}}


def _row_metrics(detail: dict[str, Any]) -> dict[str, float]:
    main = detail["verification"].get("heldout_pairs") or next(iter(detail["verification"].values()))
    out = {"accuracy": main["accuracy"], "tar": main["tar"]}
    out.update({k: detail["privacy"][k] for k in METRICS if k in detail["privacy"]})
    out.update(detail.get("fidelity") or {})
    out.update({k: v for k, v in (detail.get("attacks") or {}).items() if k in ATTACK_METRICS})
    return {k: float(out[k]) for k in dict.fromkeys((*METRICS, *ATTACK_METRICS)) if k in out}


def _run_seed(config: Config, seed: int, shared: dict[str, str],
              say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every row of the table for one seed: its autoencoders, releases, FR models and scores."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    models = _autoencoders(config, seed, shared, say)
    sets = _released_sets(config, seed, models)
    return {row: _row(config, seed, row, released=sets[row], weights=models.get(row, ""), judge=shared["judge"],
                      say=say) for row in ROWS}


def _row(config: Config, seed: int, row: str, *, released: str, weights: str, judge: str,
         say: Callable[[str], None]) -> dict[str, Any]:
    """One row of one seed: the FR model trained on its release, its scores (and attacks), said on the console."""
    fr = train(fr_config(config, seed, row), dataset=released, split="deploy")
    out = {**_scores(config, row, fr.weights, dataset=released, judge=judge, cache=fr.run_dir),
           "fr_weights": fr.weights, "dataset": released}
    if config.experiment.attacks:
        out["attacks"] = row_attacks(config, row, seed, judge=judge, weights=weights, released=released,
                                     cache=fr.run_dir)
    m = _row_metrics(out)
    say(f"seed {seed}: {row:13s} accuracy {m['accuracy']:.4f} identity_leak@1 {m['identity_leak@1']:.3f}"
        + (f" psnr_masked {m['psnr_masked']:.2f} dB hf_ratio {m['hf_ratio']:.2f}" if row != "originals" else "")
        + (f" adaptive_identity_leak@1 {m['adaptive_identity_leak@1']:.3f} mia_auc {m['mia_auc']:.3f} "
           f"adaptive_mia_auc {m['adaptive_mia_auc']:.3f}" if "mia_auc" in m else ""))
    return out


def _cross_rows(config: Config, target: Config, seed: int, source: dict[str, str], judge: str,
                say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The ``-cross`` rows of one seed: ``config.data``'s FaceMAE and MAE (``source``: its teacher) release
    ``target``'s deployment faces, scored as ``target``'s own rows are."""
    models = _autoencoders(dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed)), seed,
                           source, say)
    target = dataclasses.replace(target, train=dataclasses.replace(target.train, seed=seed))
    return {row: _row(target, seed, row, released=release(target, seed, row, models[base]), weights=models[base],
                      judge=judge, say=say) for row, base in CROSS_ROWS.items()}


def row_attacks(config: Config, row: str, seed: int, *, judge: str, weights: str, released: str, cache: str,
                name: str = "") -> dict[str, Any]:
    """:func:`facemae.attacks.attack_scores` of one row and seed, kept in ``<cache>/attack_scores.json`` under a
    fingerprint of what they depend on (judge, generator, release, originals, the attacker's budget, ``eval``).
    ``name`` names the attacker's runs (default ``<row>-s<seed>``)."""
    inputs = {"judge": sha256_file(judge), "generator": sha256_file(weights) if weights else "",
              "steps": config.experiment.adaptive_steps, "nonmembers": config.experiment.nonmembers,
              "eval": dataclasses.asdict(config.eval),
              **{k: sha256_file(storage.join(d, MANIFEST)) for k, d in (("released", released),
                                                                   ("originals", config.data.output))}}
    path = storage.join(cache, "attack_scores.json")
    if storage.is_file(path) and (kept := json.loads(storage.read_text(path))).get("inputs") == inputs:
        return kept["scores"]
    scores = attack_scores(config, row=row, seed=seed, judge=judge, weights=weights, released=released,
                           gallery_cache=_gallery_cache(config), name=name or f"{row}-s{seed}")
    atomic_write_text(path, json.dumps({"inputs": inputs, "scores": scores}, default=float) + "\n")
    return scores


def _scores(config: Config, row: str, weights: str, *, dataset: str, judge: str, cache: str) -> dict[str, Any]:
    """Verification, privacy and fidelity of one row, kept in ``<cache>/experiment_scores.json`` under a
    fingerprint of everything they depend on (the FR weights, the judge, the datasets, ``eval``), so a
    rerun or a run of more seeds scores only what changed."""
    masked = config.masked_output()
    inputs = {"fr": sha256_file(weights), "judge": sha256_file(judge), "eval": dataclasses.asdict(config.eval),
              **{k: sha256_file(storage.join(d, MANIFEST)) for k, d in (("released", dataset),
                                                                   ("originals", config.data.output),
                                                                   ("masked", masked))}}
    path = storage.join(cache, "experiment_scores.json")
    if storage.is_file(path) and (kept := json.loads(storage.read_text(path))).get("inputs") == inputs:
        return kept["scores"]
    fidelity = None if row == "originals" else {
        k: v for k, v in release_fidelity(dataset, originals=config.data.output, masked=masked).items() if k != "images"}
    scores = {"verification": verify(config, weights, pairs_from=config.data.output),
              "privacy": privacy(config, judge, released=dataset, originals=config.data.output,
                                 gallery_cache=_gallery_cache(config)), "fidelity": fidelity}
    atomic_write_text(path, json.dumps({"inputs": inputs, "scores": scores}, default=float) + "\n")
    return scores


def _gallery_cache(config: Config) -> str | None:
    """Where the judge's embeddings of the originals are kept for every row to share (keyed by the judge and
    the originals inside): beside the runs when they are local."""
    root = config.train.storage_root()
    return None if storage.is_remote(root) else str(Path(root) / "judge-galleries")


def run_experiment(config: Config, *, say: Callable[[str], None] = console.say) -> ExperimentResult:
    """Runs the comparison over ``experiment.seeds`` and writes the report to ``experiment.output``.

    With tracking on, the experiment is one MLflow run (its id kept in ``<train.storage_path>/<name>-experiment``):
    every training run of it nests under it, and the report folder is logged as its artifacts.
    """
    config.check_mae_patch_size()
    folder = config.train.run_dir_for(f"{config.name}-experiment")
    with job_run(config, folder=folder, name=config.name, kind="experiment") as job:
        result = _experiment(config, say)
        log_folder(job, config.experiment.output, artifact_path="report")
    return result


def _experiment(config: Config, say: Callable[[str], None]) -> ExperimentResult:
    """The comparison proper: the shared models, every seed's rows, the report. With ``experiment.deploy``,
    on that dataset, with the cross-domain rows of generators trained on ``data`` beside."""
    source = config if config.experiment.deploy is not None else None
    if source is not None:
        ingest(source)
        config = deploy_config(source)
        say(f"cross-dataset: generators trained on {source.data.output} release {config.data.output}")
    ingest(config)
    shared = shared_models(config, say)
    source_models = _teacher(source, say) if source is not None else {}
    mask_dataset(dataclasses.replace(config, mask=dataclasses.replace(config.mask, splits=["deploy"])))
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in config.experiment.seeds:
        started = time.monotonic()
        runs[seed] = _run_seed(config, seed, shared, say)
        if source is not None:
            runs[seed].update(_cross_rows(source, config, seed, source_models, shared["judge"], say))
        say(f"seed {seed} done in {time.monotonic() - started:.0f} s")
    seeds = list(config.experiment.seeds)
    rows = {row: {k: [_row_metrics(runs[s][row])[k] for s in seeds] for k in _row_metrics(runs[seeds[0]][row])}
            for row in runs[seeds[0]]}
    result = ExperimentResult(report="", seeds=seeds, rows=rows, runs=runs)
    result.report = str(write_report(config, result, source=source))
    say(f"report  {result.report}")
    return result


def summarise(rows: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Mean and 95% CI per row and metric, and the paired differences of :data:`PAIRS`."""
    summary = {row: {k: mean_ci(v).to_dict() for k, v in metrics.items()} for row, metrics in rows.items()}
    paired = {f"{a} - {b}": {k: paired_difference(rows[a][k], rows[b][k]).to_dict()
                             for k in rows[a] if k in rows[b]}
              for a, b in PAIRS if a in rows and b in rows}
    return {"summary": summary, "paired": paired}


def target_checks(rows: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """The science targets (issue 9) as ``{target, value, goal, met}`` rows, from per-seed values."""
    mean = {row: {k: float(np.mean(v)) for k, v in m.items()} for row, m in rows.items()}
    gain = paired_difference(rows["facemae"]["accuracy"], rows["mae"]["accuracy"])
    error = {row: 1 - mean[row]["accuracy"] for row in ROWS}
    f, m = mean["facemae"], mean["mae"]
    return [
        {"target": "accuracy: FaceMAE - MAE, paired 95% CI above 0", "value": gain.format(),
         "goal": "CI low > 0", "met": bool(gain.low > 0)},
        {"target": "error: FaceMAE / masked", "value": f"{error['facemae'] / max(error['masked'], 1e-12):.3f}",
         "goal": "<= 0.5", "met": error["facemae"] <= 0.5 * error["masked"]},
        {"target": "identity_leak@1: FaceMAE vs MAE", "value": f"{f['identity_leak@1']:.3f} vs {m['identity_leak@1']:.3f}",
         "goal": "<=", "met": f["identity_leak@1"] <= m["identity_leak@1"]},
        {"target": "identity_leak@1: FaceMAE / originals",
         "value": f"{f['identity_leak@1'] / max(mean['originals']['identity_leak@1'], 1e-12):.3f}",
         "goal": "<= 1/3", "met": f["identity_leak@1"] <= mean["originals"]["identity_leak@1"] / 3},
        {"target": "psnr_masked: FaceMAE - MAE (dB)", "value": f"{f['psnr_masked'] - m['psnr_masked']:+.2f}",
         "goal": ">= -1", "met": f["psnr_masked"] >= m["psnr_masked"] - 1},
        {"target": "hf_ratio: FaceMAE", "value": f"{f['hf_ratio']:.3f}", "goal": "in [0.5, 2.0]",
         "met": 0.5 <= f["hf_ratio"] <= 2.0},
    ]


def science_json(config: Config, result: ExperimentResult) -> dict[str, Any]:
    """The per-seed values in the schema of ``benchmarks/results/science.json``."""
    return {"config": config.name, "seeds": result.seeds,
            "rows": {row: {k: v for k, v in m.items() if k in SCIENCE_METRICS} for row, m in result.rows.items()}}


def attacked(result: ExperimentResult) -> bool:
    """Whether the rows carry the stronger attackers' numbers (``experiment.attacks``)."""
    return "mia_auc" in result.rows["facemae"]


def crossed(result: ExperimentResult) -> bool:
    """Whether the rows carry the cross-domain releases (``experiment.deploy``)."""
    return all(row in result.rows for row in CROSS_ROWS)


def generalization_json(config: Config, result: ExperimentResult, source: Config) -> dict[str, Any]:
    """The per-seed values in the schema of ``benchmarks/results/generalization.json``: ``in_domain`` (generators
    trained on the deployed dataset's own training identities) and ``cross_domain`` (trained on ``source``'s);
    the masked release has no generator, so its row is the same in both."""
    keep = ("accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio")
    rows = {scope: {row: {k: result.rows[name][k] for k in keep if k in result.rows[name]}
                    for row, name in names.items()}
            for scope, names in (("in_domain", {"masked": "masked", "mae": "mae", "facemae": "facemae"}),
                                 ("cross_domain", {"masked": "masked", **{b: c for c, b in CROSS_ROWS.items()}}))}
    return {"config": config.name, "seeds": result.seeds,
            "datasets": {"train": _describe(source.data), "deploy": _describe(config.data)}, "rows": rows}


def _describe(data: DataConfig) -> dict[str, Any]:
    """What a dataset of the generalization table is, in the words of its config."""
    if data.source == "synthetic":
        return {"source": "synthetic", "output": data.output, "domain": data.domain, "style": data.style,
                "seed": data.seed, "identities": data.num_identities}
    return {"source": data.source, "output": data.output, "path": data.path}


def attacks_json(config: Config, result: ExperimentResult) -> dict[str, Any]:
    """The per-seed attack numbers in the schema of ``benchmarks/results/attacks.json``."""
    return {"config": config.name, "seeds": result.seeds, "adaptive_steps": config.experiment.adaptive_steps,
            "rows": {row: {k: m[k] for k in ATTACK_METRICS if k in m} for row, m in result.rows.items()}}


def write_report(config: Config, result: ExperimentResult, *, source: Config | None = None) -> str:
    """``report.md`` (means, CIs, paired differences, targets), ``report.json`` (every number, per seed),
    ``science.json`` (per-seed values), and three PNGs (the first seed's releases and ROC), into
    ``experiment.output`` (a local folder or an object-store location); with ``source`` (the dataset the
    ``-cross`` rows' generators trained on), ``generalization.json`` too.

    Returns:
        The location of ``report.md``.
    """
    from facemae.report import plot_membership_roc, plot_privacy_utility, plot_roc, reconstruction_grid

    stats = summarise(result.rows)
    checks = target_checks(result.rows)
    everything = {**science_json(config, result), "rows": result.rows, **stats, "targets": checks,
                  "runs": {str(s): t for s, t in result.runs.items()}}
    with storage.output_folder(config.experiment.output) as out:
        (out / "report.json").write_text(json.dumps(everything, indent=1, default=float) + "\n")
        (out / "science.json").write_text(json.dumps(science_json(config, result), indent=1) + "\n")
        if attacked(result):
            (out / "attacks.json").write_text(json.dumps(attacks_json(config, result), indent=1) + "\n")
            plot_membership_roc(result.table, out / "membership_roc.png")
        if source is not None and crossed(result):
            (out / "generalization.json").write_text(
                json.dumps(generalization_json(config, result, source), indent=1) + "\n")
        first = result.table
        reconstruction_grid({row: r["dataset"] for row, r in first.items()}, out / "reconstructions.png",
                            order=("masked", "mae", "facemae", *CROSS_ROWS, "originals"))
        plot_roc(first, out / "roc.png")
        plot_privacy_utility(stats["summary"], out / "privacy_utility.png",
                             chance=first["originals"]["privacy"]["identity_chance@1"])
        (out / "report.md").write_text("\n".join(report_lines(config, result, stats, checks, source=source)))
    return storage.join(config.experiment.output, "report.md")


def report_lines(config: Config, result: ExperimentResult, stats: dict[str, Any],
                 checks: list[dict[str, Any]], *, source: Config | None = None) -> list[str]:
    """The Markdown of ``report.md``."""
    seeds = result.seeds
    metrics = [k for k in METRICS if k in result.rows["facemae"]]
    loss = config.loss
    lines = [f"# FaceMAE experiment: {config.name}", "",
             f"Data: {config.data.output} ({config.data.source}); mask ratio {config.mask.ratio}, patch "
             f"{config.mask.patch_size}; FaceMAE {config.model.mae}, lambda {loss.lambda_irm}, tau {loss.tau}, "
             f"IRM view {loss.irm_view}" + (f" (sigma {loss.irm_blur_sigma})" if loss.irm_view == "blur" else "")
             + f", IRM on from {loss.irm_start:.0%} of the steps, at full weight from "
             f"{loss.irm_start + loss.irm_ramp:.0%}; FR {config.model.fr}, "
             f"{config.experiment.fr_steps} steps per row.", "",
             f"Seeds {seeds}: each seed trains its own FaceMAE, MAE and every row's FR model; the IRM teacher and "
             f"the privacy judge are trained once (seed {config.train.seed}) and shared by every seed and row, so "
             "the evaluation (judge, pairs, FR recipe) is identical across the table. Cells: mean ± half-width "
             f"of the 95% t interval over {len(seeds)} seed(s).", "",
             "| training data | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    if source is not None:
        lines[4:4] = [f"Cross-dataset: the `-cross` rows release these deployment identities with FaceMAE and MAE "
                      f"trained on {source.data.output} ({_said(source.data)}), with no retraining; `mae` and "
                      f"`facemae` are trained on {config.data.output}'s own training identities "
                      f"({_said(config.data)}). Same judge, pairs and FR recipe for every row.", ""]
    for row in result.rows:
        cells = [_cell(stats["summary"][row].get(k)) for k in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed), mean ± 95% CI:", "",
              "| difference | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, diffs in stats["paired"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(diffs.get(k)) for k in metrics) + " |")
    if attacked(result):
        lines += ["", f"Stronger attackers (DESIGN.md \"Who sees what\"): the adaptive attacker fine-tunes the judge for "
                  f"{config.experiment.adaptive_steps} steps on the public faces released by the row's own method; "
                  "membership inference tells released identities from never-released ones by each face's nearest "
                  "released face (AUC 0.5 is guessing; TPR at 1% FPR: members found while flagging 1% of outsiders).",
                  "", "| training data | " + " | ".join(ATTACK_METRICS) + " |", "|---" * (len(ATTACK_METRICS) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(_cell(stats["summary"][row].get(k)) for k in ATTACK_METRICS) + " |"
                  for row in result.rows]
        lines += ["", "![membership inference ROC](membership_roc.png)"]
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']} | {c['goal']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
    privacy_row = result.table["originals"]["privacy"]
    lines += ["", f"Chance: identity_leak@1 {privacy_row['identity_chance@1']:.3f}, image_leak@1 "
              f"{privacy_row['image_chance@1']:.4f}. Lower leak is more private. psnr_masked: dB over the masked "
              "patches only; hf_ratio: Laplacian variance of released over original faces (1.0 = as sharp as "
              "real faces, above 2 a noise texture, below 0.5 a blur).", "",
              f"![reconstructions](reconstructions.png) ![ROC, seed {seeds[0]}](roc.png) "
              "![privacy-utility](privacy_utility.png)", ""]
    return lines


def _said(data: DataConfig) -> str:
    described = _describe(data)
    return ", ".join(f"{k} {v}" for k, v in described.items() if k != "output")


def _cell(interval: dict[str, float] | None) -> str:
    if interval is None:
        return "-"
    half = (interval["ci95_high"] - interval["ci95_low"]) / 2
    if interval["n"] < 2:
        return f"{interval['mean']:.4f}"
    return f"{interval['mean']:.4f} ± {half:.4f}"


def finite(result: ExperimentResult) -> bool:
    """Every per-seed number of the table is finite."""
    values = [v for m in result.rows.values() for vs in m.values() for v in vs]
    return bool(values) and bool(np.isfinite(values).all())
