"""Deployment job: reconstruct the owner's masked faces with a trained FaceMAE into the released dataset.

    python jobs/generate.py                                   # this config's run: masked deploy split -> released
    python jobs/generate.py --config jobs/configs/train_smoke.yaml --export-folder out/released
    python jobs/generate.py --set generate.method=masked     # the masked-faces baseline
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/train_gpu.yaml

Rerunning skips the shards already complete (checksummed) and never duplicates a row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facemae.config import load_config
from facemae.generate.export import export_image_folder, export_recordio
from facemae.generate.release import generate_released, released_paths

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set generate.actors=4 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even a finished release")
    parser.add_argument("--export-folder", help="also write the release as <folder>/<identity>/<image>.png")
    parser.add_argument("--export-recordio", help="also write the release as an InsightFace train.rec/.idx")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        released = generate_released(config, overwrite=args.overwrite)
        _, output = released_paths(config)
        print(f"released {released.num_images()} faces ({released.source['method']}) into {output}")
        if args.export_folder:
            print(f"exported {export_image_folder(output, args.export_folder)} images to {args.export_folder}")
        if args.export_recordio:
            print(f"exported {export_recordio(output, args.export_recordio)} records to {args.export_recordio}")
    except ValueError as exc:
        print(f"generate.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
