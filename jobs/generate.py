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

from facemae.sdk import generate

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
        out = generate(args.config, overrides=args.overrides, overwrite=args.overwrite,
                       export_folder=args.export_folder, export_recordio=args.export_recordio)
    except (ValueError, FileNotFoundError) as exc:
        print(f"generate.py: {exc}", file=sys.stderr)
        return 2
    print(f"released {out.manifest.num_images()} faces ({out.manifest.source['method']}) into {out.output}")
    if out.folder:
        print(f"exported {out.folder_images} images to {out.folder}")
    if out.recordio:
        print(f"exported {out.recordio_records} records to {out.recordio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
