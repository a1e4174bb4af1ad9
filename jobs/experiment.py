"""The paper's comparison in one command: teacher, judge, FaceMAE, MAE, released sets, FR per row, report.

    python jobs/experiment.py                                        # jobs/configs/experiment.yaml
    python jobs/experiment.py --config jobs/configs/experiment_smoke.yaml
    ray job submit --working-dir . -- python jobs/experiment.py --config jobs/configs/experiment.yaml

Writes <experiment.output>/report.md (the table), report.json (every number), reconstructions.png,
roc.png and privacy_utility.png. Rerunning resumes: finished datasets and runs are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facemae.cli import job_parser, run_job
from facemae.sdk import experiment

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "experiment.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="experiment.fr_steps=100")
    args = parser.parse_args()
    return run_job("experiment.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    result = experiment(args.config, overrides=args.overrides)
    print(Path(result.report).read_text())


if __name__ == "__main__":
    sys.exit(main())
