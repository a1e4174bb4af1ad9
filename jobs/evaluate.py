"""Evaluation job: verification accuracy of an FR model, and the privacy of a released dataset.

    python jobs/evaluate.py --fr runs/x/export/weights.safetensors --set eval.bins=[data/lfw.bin]
    python jobs/evaluate.py --fr W --pairs-from data/synthetic          # pairs drawn from held-out identities
    python jobs/evaluate.py --judge J --released data/synthetic-masked-facemae --originals data/synthetic

Prints one JSON object: {"verification": {target: {accuracy, accuracy_std, tar, far, ...}},
"privacy": {image_leak@1, image_leak@5, identity_leak@1, identity_leak@5, ...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facemae.cli import job_parser, run_job
from facemae.sdk import evaluate

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="eval.pairs=1200")
    parser.add_argument("--fr", help="weights.safetensors of the FR model to verify")
    parser.add_argument("--pairs-from", help="dataset whose train-split originals the pairs are drawn from")
    parser.add_argument("--judge", help="weights.safetensors of the privacy judge (never the IRM teacher)")
    parser.add_argument("--released", help="released dataset to score")
    parser.add_argument("--originals", help="original dataset the release came from (default data.output)")
    args = parser.parse_args()
    return run_job("evaluate.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    result = evaluate(args.config, overrides=args.overrides, fr=args.fr, pairs_from=args.pairs_from,
                      judge=args.judge, released=args.released, originals=args.originals)
    print(json.dumps(result.summary(), indent=1))


if __name__ == "__main__":
    sys.exit(main())
