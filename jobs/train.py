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

from facemae.sdk import train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild datasets made with other settings")
    args = parser.parse_args()
    try:
        train(args.config, overrides=args.overrides, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
