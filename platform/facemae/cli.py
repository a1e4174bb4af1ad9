"""The ``facemae`` command: a thin layer over :mod:`facemae.sdk`.

Every job subcommand takes ``--config FILE``, repeatable ``--set section.key=value`` and ``--address``;
its own flags are shorthands for overrides and are applied after them. Stages print one line each
and each stage shows a progress bar (on stderr); the last line on stdout is one JSON object that sums
up the result. A mistake in the input prints one line to stderr and exits with status 2. Ray, DeepSpeed
and library output goes to a log file named on the first line (:mod:`facemae.console`); ``--verbose``
shows it on the console instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from facemae import console, sdk
from facemae.cluster import input_errors_unwrapped, shutdown_embedded
from facemae.config import ALIGNERS, Config
from facemae.data.images import CorruptImageError
from facemae.data.shards import DatasetError, Manifest, verify_dataset
from facemae.train.guard import NonFiniteLossError

# Errors a user fixes (input, config, a diverged run's learning rate): one line and exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ConnectionError,
               TimeoutError, sdk.JobFailedError, NonFiniteLossError)
# What fixes each file-system refusal, after the path and the system's reason.
PATH_FIXES = {PermissionError: "give this user access to it (chmod / chown) or choose another location",
              IsADirectoryError: "a file is needed there, not a folder: give the file's path",
              NotADirectoryError: "a part of the path is a file, not a folder: fix the path"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see jobs/configs/); defaults apply without it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.num_identities=50 (repeatable)")
    parser.add_argument("--address", help="Ray cluster to run on (auto, host:6379, ray://host:10001); default: "
                                          "the cluster of a `ray job submit`, else an embedded local one")


def _verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray, DeepSpeed and library output here instead of in the log file")


def _flag_overrides(args: argparse.Namespace, table: dict[str, str]) -> list[str]:
    out = []
    for attr, key in table.items():
        value = getattr(args, attr, None)
        if isinstance(value, list):
            out.append(f"{key}={json.dumps(value)}")  # a YAML flow list
        elif value is not None and value is not False:
            out.append(f"{key}={'true' if value is True else value}")
    return out


INGEST_FLAGS = {"source": "data.source", "path": "data.path", "output": "data.output",
                "skip_corrupt": "data.skip_corrupt", "resize": "data.resize", "convert_rgb": "data.convert_rgb",
                "align": "data.align", "workers": "data.workers", "deploy_fraction": "data.deploy_fraction"}
MASK_FLAGS = {"patch_size": "mask.patch_size", "ratio": "mask.ratio", "seed": "mask.seed", "output": "mask.output"}
TRAIN_FLAGS = {"name": "name", "data": "data.output", "storage_path": "train.storage_path",
               "max_steps": "train.max_steps", "num_workers": "train.num_workers", "use_gpu": "train.use_gpu"}
GENERATE_FLAGS = {"weights": "generate.weights", "method": "generate.method", "masked": "generate.masked",
                  "output": "generate.output", "actors": "generate.actors", "use_gpu": "generate.use_gpu"}
EVALUATE_FLAGS = {"bins": "eval.bins", "pairs": "eval.pairs"}
EXPERIMENT_FLAGS = {"name": "name", "data": "data.output", "storage_path": "train.storage_path",
                    "output": "experiment.output"}
TUNE_FLAGS = {"output": "tune.output"}
FRONTIER_FLAGS = {"name": "name", "data": "data.output", "storage_path": "train.storage_path",
                  "output": "frontier.output"}
COMMANDS = {
    "ingest": "turn synthetic faces, an image folder or a RecordIO pack into Parquet shards",
    "mask": "owner-side masking: keep only visible patches' pixels and the mask",
    "verify": "check a dataset folder against its manifest's checksums",
    "train": "the main job: ingest, mask, train the IRM teacher, train FaceMAE (Ray Train + DeepSpeed)",
    "generate": "reconstruct the owner's masked faces with a trained FaceMAE into the released dataset",
    "evaluate": "verification accuracy of an FR model and/or the privacy of a released dataset",
    "export": "write exported weights (FR backbone or FaceMAE generator) as ONNX for onnxruntime deployments",
    "experiment": "the paper's comparison: originals, masked, MAE and FaceMAE rows, with a report",
    "tune": "a Ray Tune sweep of the training loop, with a report of the best trial",
    "frontier": "privacy-utility frontiers of masked, MAE and FaceMAE releases across mask ratios (Ray Tune)",
    "submit": "send a command to a remote Ray cluster (job submission) and follow its logs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemae", description="FaceMAE on Ray: privacy-preserving face datasets.",
        epilog="Run `facemae <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (options, run, flags) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name] + ".")
        if flags is not None:
            _common(p)
        options(p)
        _verbose(p)
        p.set_defaults(run=run, flags=flags)
    return parser


def _ingest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["synthetic", "folder", "recordio"], help="input kind (data.source)")
    p.add_argument("--path", help="input folder (<identity>/<image>) or train.rec (data.path)")
    p.add_argument("--output", help="dataset folder to write (data.output)")
    p.add_argument("--deploy-fraction", type=float, help="share of identities held out for deployment")
    p.add_argument("--workers", type=int, help="parallel Ray tasks; 0 = by size, 1 = one process")
    p.add_argument("--skip-corrupt", action="store_true", help="count bad images in the manifest and go on")
    p.add_argument("--resize", action="store_true", help="center-crop and resize images that are not 112x112")
    p.add_argument("--convert-rgb", action="store_true", help="convert grayscale / RGBA images to RGB")
    p.add_argument("--align", nargs="?", const="mtcnn", choices=ALIGNERS,
                   help="detect the face of each photo that is not 112x112 and align it to InsightFace's "
                        "112x112 template (data.align; --align alone means mtcnn; default auto: mtcnn for a "
                        "folder read without --resize)")
    p.add_argument("--export-recordio", help="also write the dataset as an InsightFace train.rec/.idx")
    p.add_argument("--export-bin", help="also write eval.pairs pairs over its images as a verification .bin")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset in the output folder")


def _mask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="original dataset folder (defaults to data.output)")
    p.add_argument("--output", help="masked dataset folder (mask.output)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels (mask.patch_size, default 8)")
    p.add_argument("--ratio", type=float, help="fraction of patches removed (mask.ratio, default 0.75)")
    p.add_argument("--seed", type=int, help="mask seed (mask.seed)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished masked dataset")


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset folder")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="run name; a rerun with the same name resumes (name)")
    p.add_argument("--data", help="dataset folder (data.output)")
    p.add_argument("--storage-path", help="folder of all training runs (train.storage_path)")
    p.add_argument("--max-steps", type=int, help="optimizer steps of the run (train.max_steps)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers; 0 = one local process (train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument("--overwrite", action="store_true", help="rebuild datasets made with other settings")


def _generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="FaceMAE weights.safetensors (generate.weights; default: this run's export)")
    p.add_argument("--method", choices=["reconstruct", "masked"],
                   help="release FaceMAE reconstructions, or the masked view itself as a baseline (generate.method)")
    p.add_argument("--masked", help="the owner's masked dataset to read (generate.masked)")
    p.add_argument("--output", help="released dataset folder (generate.output; default <masked>-<method>)")
    p.add_argument("--actors", type=int, help="actors in the Ray Data pool, one model each (generate.actors)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor (generate.use_gpu)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even a finished release")
    p.add_argument("--export-folder", help="also write the release as <folder>/<identity>/<image>.png")
    p.add_argument("--export-recordio", help="also write the release as an InsightFace train.rec/.idx")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fr", help="weights.safetensors of the FR model to verify")
    p.add_argument("--bin", dest="bins", action="append", metavar="FILE",
                   help="InsightFace verification .bin to verify on (eval.bins; repeatable)")
    p.add_argument("--pairs-from", help="dataset whose train-split originals verification pairs are drawn from")
    p.add_argument("--pairs", type=int, help="pairs drawn there, a multiple of 20 (eval.pairs)")
    p.add_argument("--judge", help="weights.safetensors of the privacy judge (never the IRM teacher)")
    p.add_argument("--released", help="released dataset to score for privacy (needs --judge)")
    p.add_argument("--originals", help="original dataset the release came from (default data.output)")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="weights.safetensors (or the export folder holding it) of an FR backbone or a FaceMAE")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write (replaced atomically)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 (the default) or newer")


def _experiment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="name of the experiment's runs (name)")
    p.add_argument("--data", help="dataset folder (data.output)")
    p.add_argument("--storage-path", help="folder of all training runs (train.storage_path)")
    p.add_argument("--output", help="report folder (experiment.output)")


def _tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="sweep report folder (tune.output)")
    p.add_argument("--no-restore", dest="restore", action="store_false",
                   help="start the sweep over instead of continuing an interrupted one of the same name")


def _frontier_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="name of the sweep's runs (name)")
    p.add_argument("--data", help="dataset folder (data.output)")
    p.add_argument("--storage-path", help="folder of all training runs (train.storage_path)")
    p.add_argument("--output", help="report folder (frontier.output)")
    p.add_argument("--no-restore", dest="restore", action="store_false",
                   help="start the sweep's phases over (finished runs, releases and scores are reused anyway)")


def _submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="folder uploaded and run from (default: %(default)s); "
                                                      f"{', '.join(sdk.SUBMIT_EXCLUDES)} stay behind")
    p.add_argument("--runtime-env-json", metavar="JSON", help='extra runtime environment, e.g. \'{"pip": ["x"]}\'')
    p.add_argument("--submission-id", help="a unique id for the job (default: Ray makes one up)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="return once the job is submitted instead of following its logs to the end")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop following after this long")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="the command after `--`, e.g. -- python jobs/train.py --config jobs/configs/train.yaml")


def _config(args: argparse.Namespace) -> Config:
    return sdk.resolve_config(args.config, overrides=[*args.overrides, *_flag_overrides(args, args.flags)],
                              address=args.address)


def summarize(manifest: Manifest) -> dict[str, Any]:
    """A dataset in one line: kind, counts per split, the corrupt-record count and, for an ingested
    folder, the hidden files (``.DS_Store``, ``._x.jpg``) left out."""
    counts = manifest.to_json()["counts"]
    summary = {"kind": manifest.kind, "counts": counts, "corrupt": manifest.report.get("corrupt", 0)}
    if "hidden_skipped" in manifest.report:
        summary["hidden_skipped"] = manifest.report["hidden_skipped"]
    return summary


def _ingest(args: argparse.Namespace) -> dict[str, Any]:
    config = _config(args)
    manifest = sdk.ingest(config, overwrite=args.overwrite, export_recordio=args.export_recordio,
                          export_bin=args.export_bin)
    out = summarize(manifest)
    if args.export_recordio:
        out.update(recordio=args.export_recordio, recordio_records=manifest.num_images())
    if args.export_bin:
        out.update(bin=args.export_bin, bin_pairs=config.eval.pairs)
    return out


def _mask(args: argparse.Namespace) -> dict[str, Any]:
    return summarize(sdk.mask(_config(args), source=args.input, overwrite=args.overwrite))


def _verify(args: argparse.Namespace) -> dict[str, Any]:
    return summarize(verify_dataset(args.path))


def _train(args: argparse.Namespace) -> dict[str, Any]:
    job = sdk.train(_config(args), overwrite=args.overwrite, say=_say)
    r = job.result
    return {"run_dir": r.run_dir, "checkpoint": r.checkpoint, "weights": r.weights, "metrics": r.metrics,
            "teacher": job.teacher.weights if job.teacher else None}


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    out = sdk.generate(_config(args), overwrite=args.overwrite, export_folder=args.export_folder,
                       export_recordio=args.export_recordio)
    return {"output": out.output, "images": out.manifest.num_images(), "method": out.manifest.source["method"],
            "corrupt": out.manifest.report.get("corrupt", 0), "folder": out.folder,
            "folder_images": out.folder_images, "recordio": out.recordio,
            "recordio_records": out.recordio_records}


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    return sdk.evaluate(_config(args), fr=args.fr, pairs_from=args.pairs_from, judge=args.judge,
                        released=args.released, originals=args.originals).summary()


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from facemae.models.weights import read_onnx_description  # torch: loaded only by this command

    written = read_onnx_description(sdk.export_onnx(args.weights, args.onnx, opset=args.opset))
    return {k: v for k, v in written.items() if k != "input_normalisation"}  # that text is in the model


def _experiment(args: argparse.Namespace) -> dict[str, Any]:
    result = sdk.experiment(_config(args), say=_say)
    rows = {row: {k: float(sum(m[k]) / len(m[k])) for k in ("accuracy", "identity_leak@1")}
            for row, m in result.rows.items()}
    return {"report": result.report, "seeds": result.seeds, "rows": rows}


def _tune(args: argparse.Namespace) -> dict[str, Any]:
    result = sdk.tune(_config(args), restore=args.restore, say=_say)
    return {"path": result.path, "best_config": result.best_config, "best_metrics": result.best_metrics,
            "best_checkpoint": result.best_checkpoint, "best_weights": result.best_weights,
            "report": result.report}


def _frontier(args: argparse.Namespace) -> dict[str, Any]:
    result = sdk.frontier(_config(args), restore=args.restore, say=_say)
    return {"report": result.report, "verdict": (result.summary or {}).get("verdict"), "errors": result.errors,
            "points": [{k: p[k] for k in ("method", "mask_ratio", "lambda_irm", "options", "seeds")}
                       for p in result.points]}


def _submit(args: argparse.Namespace) -> dict[str, Any]:
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        raise ValueError("no command to submit: put it after `--`, e.g. facemae submit --address URL -- "
                         "python jobs/train.py")
    try:
        runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--runtime-env-json is not JSON: {exc}") from None
    result = sdk.submit(entrypoint, address=args.address, working_dir=args.working_dir, runtime_env=runtime_env,
                        follow=args.follow, submission_id=args.submission_id, on_log=_say, timeout_s=args.timeout)
    return {"submission_id": result.submission_id, "status": result.status}


def _say(line: str) -> None:
    console.say(line)  # stages interleave with the progress bars on stderr


Options = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], dict[str, Any]]
# name -> (its options, what runs it, its flag -> config key shorthands; None: no config at all)
SUBCOMMANDS: dict[str, tuple[Options, Run, dict[str, str] | None]] = {
    "ingest": (_ingest_options, _ingest, INGEST_FLAGS),
    "mask": (_mask_options, _mask, MASK_FLAGS),
    "verify": (_verify_options, _verify, None),
    "train": (_train_options, _train, TRAIN_FLAGS),
    "generate": (_generate_options, _generate, GENERATE_FLAGS),
    "evaluate": (_evaluate_options, _evaluate, EVALUATE_FLAGS),
    "export": (_export_options, _export, None),
    "experiment": (_experiment_options, _experiment, EXPERIMENT_FLAGS),
    "tune": (_tune_options, _tune, TUNE_FLAGS),
    "frontier": (_frontier_options, _frontier, FRONTIER_FLAGS),
    "submit": (_submit_options, _submit, None),
}


def one_line(exc: BaseException) -> str:
    """A user error's message on one line (a failed job's summary: its log was already followed; a refused
    path as ``<path>: <reason>; <fix>`` rather than Python's ``[Errno 13] Permission denied: '<path>'``)."""
    fix = next((text for kind, text in PATH_FIXES.items() if isinstance(exc, kind)), None)
    if fix and isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {(exc.strerror or type(exc).__name__).lower()}; {fix}"
    message = exc.summary if isinstance(exc, sdk.JobFailedError) else str(exc)
    return " ".join(line.strip() for line in message.splitlines() if line.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with job_console(args.command, verbose=args.verbose):
        try:
            with input_errors_unwrapped():  # a corrupt row found on a Ray worker: its message, not Ray's wrapper
                summary = args.run(args)
        except USER_ERRORS as exc:  # user input: one clear line, no traceback
            kind = "bad input" if isinstance(exc, (CorruptImageError, DatasetError)) else "error"
            console.error(f"facemae {args.command}: {kind}: {one_line(exc)}")
            return 2
        except KeyboardInterrupt:
            after = "the job goes on on the cluster" if args.command == "submit" else "a rerun resumes"
            console.error(f"facemae {args.command}: interrupted; {after}")
            return 130
        console.say(json.dumps(summary, default=str))
    return 0


@contextlib.contextmanager
def job_console(name: str, *, verbose: bool) -> Iterator[None]:
    """A command's quiet console (:func:`facemae.console.quiet`): its first line names the log file, and an
    embedded Ray cluster the command started is stopped inside it, so that Ray's last words go to the log.

    Args:
        name: Names the log file, e.g. ``train``.
        verbose: Show library output on the console instead.
    """
    with console.quiet(console.default_log_path(name), verbose=verbose) as log:
        if log:
            console.say(console.describe(log))
        try:
            yield
        finally:
            shutdown_embedded()


def job_parser(doc: str, *, default_config: str, example: str) -> argparse.ArgumentParser:
    """The arguments every script in ``jobs/`` shares: ``--config`` (with the job's default YAML),
    repeatable ``--set`` and ``--verbose``; the job adds its own.

    Args:
        doc: The job's module docstring (usage examples).
        default_config: The YAML the job reads without ``--config``.
        example: One override shown in ``--set``'s help, e.g. ``train.max_steps=50``.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
    _verbose(parser)
    return parser


def run_job(name: str, body: Callable[[], None], *, verbose: bool = False) -> int:
    """Runs a job's body with the quiet console; a mistake in the user's input prints one line and gives
    exit status 2.

    Args:
        name: The job's script, e.g. ``train.py``; also names its log file.
        body: The job.
        verbose: Show library output on the console instead of in the log file.
    """
    with job_console(Path(name).stem, verbose=verbose):
        try:
            body()
        except USER_ERRORS as exc:
            console.error(f"{name}: {one_line(exc)}")
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
