"""Privacy-utility frontiers: FaceMAE against MAE and the masked release across mask ratios and IRM weights.

    python jobs/frontier.py                                          # jobs/configs/frontier.yaml
    python jobs/frontier.py --config jobs/configs/frontier_smoke.yaml
    ray job submit --working-dir . -- python jobs/frontier.py --config jobs/configs/frontier.yaml

One Ray Tune trial per generator (method, mask ratio, lambda, seed): it trains the generator, releases the
deployment faces, trains the experiment's FR recipe on the release and scores it with the experiment's judge.
The first seed runs everywhere, the others at the points on or next to a frontier. Rerunning continues an
interrupted sweep: finished runs, releases and scores are reused. Writes <frontier.output>/frontier.json,
frontier.md, frontier.png and reconstructions.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facemae.cli import job_parser, run_job
from facemae.sdk import frontier

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "frontier.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="frontier.mask_ratios=[0.5,0.9]")
    parser.add_argument("--fresh", action="store_true", help="do not restore an earlier sweep of the same name")
    args = parser.parse_args()
    return run_job("frontier.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    result = frontier(args.config, overrides=args.overrides, restore=not args.fresh)
    print(Path(result.report).read_text())


if __name__ == "__main__":
    sys.exit(main())
