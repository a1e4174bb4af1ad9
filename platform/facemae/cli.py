"""The ``facemae`` command: a thin layer over the SDK functions.

Every subcommand takes ``--config FILE`` and repeatable ``--set section.key=value``; its own flags
are shorthands for overrides and are applied after them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from facemae.config import Config, load_config
from facemae.data.images import CorruptImageError
from facemae.data.shards import DatasetError, Manifest, verify_dataset


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see jobs/configs/); defaults apply without it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.num_identities=50 (repeatable)")


def _flag_overrides(args: argparse.Namespace, table: dict[str, str]) -> list[str]:
    out = []
    for attr, key in table.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            out.append(f"{key}={'true' if value is True else value}")
    return out


INGEST_FLAGS = {"source": "data.source", "path": "data.path", "output": "data.output",
                "skip_corrupt": "data.skip_corrupt", "resize": "data.resize", "convert_rgb": "data.convert_rgb",
                "workers": "data.workers", "deploy_fraction": "data.deploy_fraction"}
MASK_FLAGS = {"patch_size": "mask.patch_size", "ratio": "mask.ratio", "seed": "mask.seed", "output": "mask.output"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facemae", description="FaceMAE on Ray: privacy-preserving face datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="turn synthetic faces, an image folder or a RecordIO pack into Parquet shards")
    _common(p)
    p.add_argument("--source", choices=["synthetic", "folder", "recordio"], help="input kind (data.source)")
    p.add_argument("--path", help="input folder (<identity>/<image>) or train.rec (data.path)")
    p.add_argument("--output", help="dataset folder to write (data.output)")
    p.add_argument("--deploy-fraction", type=float, help="share of identities held out for deployment")
    p.add_argument("--workers", type=int, help="parallel Ray tasks; 0 = by size, 1 = one process")
    p.add_argument("--skip-corrupt", action="store_true", help="count bad images in the manifest and go on")
    p.add_argument("--resize", action="store_true", help="center-crop and resize images that are not 112x112")
    p.add_argument("--convert-rgb", action="store_true", help="convert grayscale / RGBA images to RGB")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset in the output folder")
    p.set_defaults(run=_ingest, flags=INGEST_FLAGS)

    p = sub.add_parser("mask", help="owner-side masking: keep only visible patches' pixels and the mask")
    _common(p)
    p.add_argument("--input", help="original dataset folder (defaults to data.output)")
    p.add_argument("--output", help="masked dataset folder (mask.output)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels (mask.patch_size, default 8)")
    p.add_argument("--ratio", type=float, help="fraction of patches removed (mask.ratio, default 0.75)")
    p.add_argument("--seed", type=int, help="mask seed (mask.seed)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished masked dataset")
    p.set_defaults(run=_mask, flags=MASK_FLAGS)

    p = sub.add_parser("verify", help="check a dataset folder against its manifest's checksums")
    p.add_argument("path", help="dataset folder")
    p.set_defaults(run=_verify, flags=None)
    return parser


def _ingest(args: argparse.Namespace, config: Config) -> Manifest:
    from facemae.data.ingest import ingest

    return ingest(config, overwrite=args.overwrite)


def _mask(args: argparse.Namespace, config: Config) -> Manifest:
    from facemae.data.owner import mask_dataset

    return mask_dataset(config, source=args.input, overwrite=args.overwrite)


def _verify(args: argparse.Namespace, config: Config | None) -> Manifest:
    return verify_dataset(args.path)


def summarize(manifest: Manifest) -> str:
    """One JSON line per dataset: counts per split and the corrupt-record count."""
    counts = manifest.to_json()["counts"]
    return json.dumps({"kind": manifest.kind, "counts": counts, "corrupt": manifest.report.get("corrupt", 0)})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Config | None], Manifest] = args.run
    try:
        config = None
        if args.flags is not None:
            config = load_config(args.config, [*args.overrides, *_flag_overrides(args, args.flags)])
        manifest = run(args, config)
    except (ValueError, FileNotFoundError) as exc:  # user input: one clear line, no traceback
        kind = "bad input" if isinstance(exc, (CorruptImageError, DatasetError)) else "error"
        print(f"facemae {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2
    print(summarize(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
