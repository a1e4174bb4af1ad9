"""The seeded FaceMAE comparison, recorded: runs ``jobs/experiment.py``'s comparison and files the result.

Writes ``benchmarks/results/science.json`` (per-seed values of every row, the schema of issue 9, plus
the date, machine, commit and command), ``science.md`` (the report's tables: means with 95% intervals,
paired differences, the targets), ``science_reconstructions.png`` (the first seed's releases:
masked, MAE, FaceMAE, originals, one column per deployment face), ``science_roc.png`` and
``science_privacy_utility.png``.

    python benchmarks/science.py [--config jobs/configs/experiment.yaml] [--set key=value ...] [--cost]

With ``--cost`` (the run must start from nothing: an empty ``train.storage_path`` and no dataset at
``data.output``, so that every model is trained and every row scored) the wall time is also filed as
``experiment_cost`` in ``benchmarks/results/performance.{json,md}`` (goal <= 90 minutes for the 3-seed
``experiment.yaml`` run on a 2-core machine), with this run's date, machine, commit and command.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from facemae import console, storage
from facemae.cli import job_console, job_parser
from facemae.config import Config, load_config
from facemae.experiment import run_experiment
from provenance import RESULTS, provenance

COST_GOAL_MINUTES = 90


def main() -> None:
    parser = job_parser(__doc__, default_config="jobs/configs/experiment.yaml", example="experiment.seeds=[0]")
    parser.add_argument("--output", default=str(RESULTS / "science"))
    parser.add_argument("--cost", action="store_true",
                        help="file the wall time as experiment_cost (a run from nothing)")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if args.cost and (reused := _reusable(config)):
        parser.error(f"--cost times a run from nothing, but {reused} already holds work it would reuse; "
                     "point train.storage_path and data.output at new folders")
    meta = provenance()
    started = time.monotonic()
    with job_console("science", verbose=args.verbose):
        result = run_experiment(config, say=console.say)
    meta["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    report = Path(result.report)
    science = json.loads((report.parent / "science.json").read_text())
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**science, **meta, "config": args.config}, indent=1) + "\n")
    body = report.read_text()
    for figure in ("reconstructions.png", "roc.png", "privacy_utility.png"):
        shutil.copyfile(report.parent / figure, out.parent / f"{out.name}_{figure}")
        body = body.replace(f"({figure})", f"({out.name}_{figure})")
    png = out.parent / f"{out.name}_reconstructions.png"
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    out.with_suffix(".md").write_text(body.replace("\n", f"\n\n{header}\n", 1))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {png} ({meta['wall_minutes']} min)")
    if args.cost:
        print(f"wrote {record_cost({**science, **meta, 'config': args.config})}")


def _reusable(config: Config) -> str:
    """The folder of ``config`` that holds finished work (runs or a dataset), or ``""``."""
    for folder in (config.train.storage_path, config.data.output):
        if storage.exists(folder) and storage.list_files(folder):
            return folder
    return ""


def record_cost(science: dict) -> Path:
    """Files a from-nothing run's wall time (``science``: a written ``science.json``) as ``experiment_cost`` in
    ``performance.{json,md}``, beside the figures of ``run_all.py``, with its own provenance; returns the table."""
    import run_all

    perf = json.loads((RESULTS / "performance.json").read_text())
    figures = perf.pop("figures")
    minutes = float(science["wall_minutes"])
    figures["experiment_cost"] = {
        "value": minutes, "baseline": None, "ratio": None, "goal": f"<= {COST_GOAL_MINUTES}",
        "met": minutes <= COST_GOAL_MINUTES, "unit": "min",
        "how": (f"{science['config']}, seeds {science['seeds']}: every model trained and every row scored from "
                f"nothing, wall time of `{science['command']}` at commit {science['commit']} on "
                f"{science['date'][:10]}"),
        **{k: science[k] for k in ("date", "machine", "commit", "command")}}
    return run_all.write_results(figures, perf)


if __name__ == "__main__":
    main()
