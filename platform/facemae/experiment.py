"""The paper's comparison end to end on one dataset split (``jobs/experiment.py``).

Train the IRM teacher and, apart from it, the privacy judge on the training identities; train
FaceMAE and plain MAE (lambda = 0); release the deployment identities as masked faces, MAE
reconstructions and FaceMAE reconstructions (originals are the ceiling); train one identical FR model
on each; report verification accuracy and retrieval leak per row, with a reconstruction grid, ROC
curves and the privacy-utility plane. Every stage reuses finished work, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facemae.config import Config
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.eval.evaluate import privacy, verify
from facemae.generate.embed import embed_dataset, embedded_output
from facemae.generate.release import generate_released, released_paths
from facemae.train.pipeline import judge_config, teacher_config
from facemae.train.trainer import train

ROWS = ("originals", "masked", "mae", "facemae")


@dataclass
class ExperimentResult:
    """Where the report went and its numbers, per row."""

    report: str
    table: dict[str, dict[str, Any]]


def _with(config: Config, *, name: str, **train: Any) -> Config:
    return dataclasses.replace(config, name=name, train=dataclasses.replace(config.train, **train))


def _trained_models(config: Config, say: Callable[[str], None]) -> dict[str, str]:
    """Teacher, judge, FaceMAE and MAE weights (each a run of its own name)."""
    teacher = train(teacher_config(config)).weights
    judge = train(judge_config(config)).weights
    say(f"teacher {teacher}\njudge   {judge}")
    embedded = embedded_output(config.data.output, teacher)
    embed_dataset(config, source=config.data.output, weights=teacher, output=embedded)
    facemae = train(_with(config, name=f"{config.name}-facemae", task="mae", teacher=teacher), dataset=embedded)
    mae_config = dataclasses.replace(_with(config, name=f"{config.name}-mae", task="mae", teacher=""),
                                     loss=dataclasses.replace(config.loss, lambda_irm=0.0))
    mae = train(mae_config).weights
    say(f"facemae {facemae.weights}\nmae     {mae}")
    return {"teacher": teacher, "judge": judge, "facemae": facemae.weights, "mae": mae}


def _released_sets(config: Config, models: dict[str, str]) -> dict[str, str]:
    """Dataset folder of each row's deployment faces."""
    mask_dataset(dataclasses.replace(config, mask=dataclasses.replace(config.mask, splits=["deploy"])))
    sets = {"originals": config.data.output}
    for row, method, weights in (("masked", "masked", ""), ("mae", "reconstruct", models["mae"]),
                                 ("facemae", "reconstruct", models["facemae"])):
        g = dataclasses.replace(config.generate, method=method, weights=weights, output="")
        row_config = dataclasses.replace(config, generate=g)
        masked, _ = released_paths(row_config)
        out = f"{masked.rstrip('/')}-{row}"
        generate_released(row_config, output=out)
        sets[row] = out
    return sets


def run_experiment(config: Config, *, say: Callable[[str], None] = print) -> ExperimentResult:
    """Runs the comparison and writes the report to ``experiment.output``."""
    config.check_mae_patch_size()
    ingest(config)
    models = _trained_models(config, say)
    sets = _released_sets(config, models)
    table: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        fr = train(_with(config, name=f"{config.name}-fr-{row}", task="fr", fr_backbone=config.model.fr,
                         max_steps=config.experiment.fr_steps, base_lr=config.experiment.fr_base_lr,
                         teacher=""), dataset=sets[row], split="deploy")
        scores = verify(config, fr.weights, pairs_from=config.data.output)
        leak = privacy(config, models["judge"], released=sets[row], originals=config.data.output)
        table[row] = {"verification": scores, "privacy": leak, "fr_weights": fr.weights, "dataset": sets[row]}
        main = scores.get("heldout_pairs") or next(iter(scores.values()))
        say(f"{row:9s} accuracy {main['accuracy']:.4f} identity_leak@1 {leak['identity_leak@1']:.3f}")
    report = write_report(config, table, sets)
    say(f"report  {report}")
    return ExperimentResult(report=str(report), table=table)


def write_report(config: Config, table: dict[str, dict[str, Any]], sets: dict[str, str]) -> Path:
    """``report.md`` (the table), ``report.json`` (every number), and three PNGs."""
    from facemae.report import plot_privacy_utility, plot_roc, reconstruction_grid

    out = Path(config.experiment.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(table, indent=1, default=float) + "\n")
    reconstruction_grid(sets, out / "reconstructions.png")
    plot_roc(table, out / "roc.png")
    plot_privacy_utility(table, out / "privacy_utility.png")
    lines = [f"# FaceMAE experiment: {config.name}", "",
             f"Data: {config.data.output} ({config.data.source}); mask ratio {config.mask.ratio}, patch "
             f"{config.mask.patch_size}; FaceMAE {config.model.mae}, lambda {config.loss.lambda_irm}, tau "
             f"{config.loss.tau}; FR {config.model.fr}, {config.experiment.fr_steps} steps per row.", "",
             "| training data | " + " | ".join(f"{t} acc" for t in _targets(table)) +
             " | TAR@FAR | image_leak@1 | image_leak@5 | identity_leak@1 | identity_leak@5 |",
             "|---" * (len(_targets(table)) + 6) + "|"]
    for row, r in table.items():
        accs = " | ".join(f"{r['verification'][t]['accuracy']:.4f} ± {r['verification'][t]['accuracy_std']:.4f}"
                          for t in _targets(table))
        main = r["verification"][_targets(table)[0]]
        leak = r["privacy"]
        lines.append(f"| {row} | {accs} | {main['tar']:.4f} | {leak['image_leak@1']:.3f} | {leak['image_leak@5']:.3f} "
                     f"| {leak['identity_leak@1']:.3f} | {leak['identity_leak@5']:.3f} |")
    lines += ["", f"Chance: identity_leak@1 {next(iter(table.values()))['privacy']['identity_chance@1']:.3f}, "
              f"image_leak@1 {next(iter(table.values()))['privacy']['image_chance@1']:.4f}. Lower leak is more "
              "private; the judge is an FR model trained apart from the IRM teacher.", "",
              "![reconstructions](reconstructions.png) ![ROC](roc.png) ![privacy-utility](privacy_utility.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _targets(table: dict[str, dict[str, Any]]) -> list[str]:
    return list(next(iter(table.values()))["verification"])


def finite(table: dict[str, dict[str, Any]]) -> bool:
    """Every number of the table is finite."""
    values = [v for r in table.values() for t in r["verification"].values()
              for k, v in t.items() if isinstance(v, float)]
    values += [v for r in table.values() for v in r["privacy"].values()]
    return bool(values) and bool(np.isfinite(values).all())
