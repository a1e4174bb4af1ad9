"""Main job: data (ingest, owner-side masking), the IRM teacher, then FaceMAE on Ray Train + DeepSpeed.

    python jobs/train.py                                    # embedded default: synthetic faces, local Ray
    python jobs/train.py --config jobs/configs/train_smoke.yaml --set train.max_steps=50
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml

Rerunning with the same config resumes: finished datasets are reused and each run continues from
its latest checkpoint in <train.storage_path>/<name>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facemae.cli import job_parser, run_job
from facemae.sdk import train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="train.max_steps=50")
    parser.add_argument("--overwrite", action="store_true", help="rebuild datasets made with other settings")
    args = parser.parse_args()
    return run_job("train.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    train(args.config, overrides=args.overrides, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
