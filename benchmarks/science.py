"""The seeded FaceMAE comparison, recorded: runs ``jobs/experiment.py``'s comparison and files the result.

Writes ``benchmarks/results/science.json`` (per-seed values of every row, the schema of issue 9, plus
the date, machine, commit and command), ``science.md`` (the report's tables: means with 95% intervals,
paired differences, the targets), ``science_reconstructions.png`` (the first seed's releases:
masked, MAE, FaceMAE, originals, one column per deployment face), ``science_roc.png`` and
``science_privacy_utility.png``.

    python benchmarks/science.py [--config jobs/configs/experiment.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from facemae.config import load_config
from facemae.experiment import run_experiment
from provenance import RESULTS, provenance



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/experiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output", default=str(RESULTS / "science"))
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    meta = provenance()
    started = time.monotonic()
    result = run_experiment(config, say=lambda s: print(s, flush=True))
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


if __name__ == "__main__":
    main()
