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

from facemae.cli import job_parser, run_job
from facemae.sdk import generate

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train.yaml"


def main() -> int:
    parser = job_parser(__doc__, default_config=str(DEFAULT_CONFIG), example="generate.actors=4")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even a finished release")
    parser.add_argument("--export-folder", help="also write the release as <folder>/<identity>/<image>.png")
    parser.add_argument("--export-recordio", help="also write the release as an InsightFace train.rec/.idx")
    args = parser.parse_args()
    return run_job("generate.py", lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> None:
    out = generate(args.config, overrides=args.overrides, overwrite=args.overwrite,
                   export_folder=args.export_folder, export_recordio=args.export_recordio)
    corrupt = out.manifest.report.get("corrupt", 0)
    print(f"released {out.manifest.num_images()} faces ({out.manifest.source['method']}) into {out.output}"
          + (f", {corrupt} corrupt masked records skipped (listed in its manifest)" if corrupt else ""))
    if out.folder:
        print(f"exported {out.folder_images} images to {out.folder}")
    if out.recordio:
        print(f"exported {out.recordio_records} records to {out.recordio}")


if __name__ == "__main__":
    sys.exit(main())
