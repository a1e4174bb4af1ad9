"""Tune sweep: many FaceMAE trainings (each a Ray Train run with DeepSpeed workers), ASHA early stopping.

    python jobs/tune.py                                              # jobs/configs/tune.yaml
    python jobs/tune.py --config jobs/configs/tune_smoke.yaml
    python jobs/tune.py --set 'tune.space={mask.ratio: {choice: [0.5, 0.75, 0.9]}}' --set tune.num_samples=6
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune.yaml

Rerunning the same config restores the sweep (Tuner.restore): finished trials are kept, unfinished ones
resume from their own checkpoints; --fresh starts a new sweep under the same name instead.
Writes <tune.output>/pareto.md (every trial, the privacy-utility Pareto front marked), pareto.png and
trials.json, and prints the best trial's values, checkpoint and weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facemae.cli import job_parser, run_job
from facemae.sdk import tune

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tune.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="tune.num_samples=8")
    parser.add_argument("--fresh", action="store_true", help="do not restore an earlier sweep of the same name")
    args = parser.parse_args()
    return run_job("tune.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    result = tune(args.config, overrides=args.overrides, restore=not args.fresh)
    print(f"checkpoint {result.best_checkpoint}")
    print(f"weights  {result.best_weights}")
    print(Path(result.report).read_text())


if __name__ == "__main__":
    sys.exit(main())
