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

from facemae.sdk import experiment

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "experiment.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set experiment.fr_steps=100 (repeatable)")
    args = parser.parse_args()
    try:
        result = experiment(args.config, overrides=args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"experiment.py: {exc}", file=sys.stderr)
        return 2
    print(Path(result.report).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
