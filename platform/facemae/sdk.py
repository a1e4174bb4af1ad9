"""The Python SDK: one typed function per job, and ``submit`` for a remote cluster.

    import facemae

    job = facemae.train("jobs/configs/train_smoke.yaml", overrides=["train.max_steps=50"])
    job.result.weights                        # the FaceMAE inference weights
    facemae.submit(["python", "jobs/train.py"], address="http://head:8265")

Every job function takes a :class:`~facemae.config.Config`, a YAML path or ``None`` (the defaults),
dotted ``overrides`` and an optional Ray ``address``, calls the layer that does the work and returns
its result object. torch and ray are imported inside the functions, so importing the SDK is cheap.
Ray connects once per process, when the first stage that needs it runs: to ``address``, to the
cluster of a ``ray job submit`` driver, or else to an embedded local cluster.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Sequence, TypeVar

from facemae import console, storage
from facemae.config import Config, _apply_override, from_dict, load_config

if TYPE_CHECKING:
    from facemae.data.shards import Manifest
    from facemae.experiment import ExperimentResult
    from facemae.frontier import FrontierResult
    from facemae.pipeline import JobResult
    from facemae.train.trainer import TrainResult
    from facemae.tune import SweepResult

__all__ = ["ConfigSource", "EvaluateResult", "GenerateResult", "JobFailedError", "SubmitResult", "evaluate",
           "experiment", "export_onnx", "frontier", "generate", "ingest", "mask", "resolve_config", "submit", "train",
           "train_run", "tune"]

ConfigSource = Config | str | Path | None
# Never uploaded with a submitted job: environments, datasets, reports (the cluster builds its own).
SUBMIT_EXCLUDES = (".venv", ".git", "data", "logs", "*.egg-info", "__pycache__", "reports")
FAILED_STATES = ("FAILED", "STOPPED")
TAIL_LINES = 20
T = TypeVar("T")


def resolve_config(config: ConfigSource = None, *, overrides: Sequence[str] = (),
                   address: str | None = None) -> Config:
    """The validated config a job runs with.

    Args:
        config: A config object (used as is), a YAML file, or ``None`` for the defaults.
        overrides: Dotted ``section.key=value`` assignments applied on top, in order.
        address: Ray cluster to join (``auto``, ``host:6379``, ``ray://host:10001``); sets
            ``ray.address`` and drops ``ray.num_cpus`` and ``ray.object_store_mib``, which only size an
            embedded cluster.

    Raises:
        ValueError: A file that is not YAML (naming its line and column), an unknown key, a wrong type
            or an impossible combination.
        FileNotFoundError: The YAML file does not exist.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    if isinstance(config, Config):
        resolved = _override(config, overrides) if overrides else config
    elif config is None or isinstance(config, (str, Path)):
        resolved = load_config(config, overrides)
    else:
        raise TypeError(f"config must be a facemae Config, a YAML path or None, got {type(config).__name__}")
    if address:
        resolved = dataclasses.replace(resolved, ray=dataclasses.replace(resolved.ray, address=address,
                                                                          num_cpus=None, object_store_mib=None))
    resolved = resolved.validate()
    storage.configure(**dataclasses.asdict(resolved.storage))  # the endpoint of every s3:// location it names
    return resolved


def _override(config: Config, overrides: Sequence[str]) -> Config:
    raw = config.to_dict()
    for item in overrides:
        _apply_override(raw, item)  # the same dotted syntax as load_config's
    return from_dict(Config, raw)


def ingest(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
           overwrite: bool = False, export_recordio: str | None = None, export_bin: str | None = None) -> Manifest:
    """Turns synthetic faces, an image folder or a RecordIO pack into Parquet shards (``data.output``);
    a folder's photos are aligned on the way (``data.align``).

    Args:
        export_recordio: Also write the dataset, every split, as an InsightFace ``.rec`` / ``.idx`` pack
            labelled by identity: align once, train with other tools.
        export_bin: Also write ``eval.pairs`` pairs drawn over its images (seed ``eval.pair_seed``) as a
            verification ``.bin``.

    Returns:
        The dataset's manifest (counts per split, identities, checksums, refused images).
    """
    from facemae.data.ingest import ingest as run
    from facemae.data.shards import SPLITS
    from facemae.eval.evaluate import export_verification_bin
    from facemae.generate.export import export_recordio as write_recordio

    resolved = resolve_config(config, overrides=overrides, address=address)
    manifest = run(resolved, overwrite=overwrite)
    if export_recordio:
        write_recordio(resolved.data.output, export_recordio, splits=SPLITS)
    if export_bin:
        export_verification_bin(resolved.data.output, export_bin, n_pairs=resolved.eval.pairs,
                                seed=resolved.eval.pair_seed)
    return manifest


def mask(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
         source: str | None = None, output: str | None = None, overwrite: bool = False) -> Manifest:
    """Owner-side masking: the masked twin of an original dataset.

    Args:
        source: Original dataset folder; defaults to ``data.output``.
        output: Masked dataset folder; defaults to ``mask.output`` or ``<data.output>-masked``.

    Returns:
        The masked dataset's manifest.
    """
    from facemae.data.owner import mask_dataset

    return mask_dataset(resolve_config(config, overrides=overrides, address=address), source=source,
                        output=output, overwrite=overwrite)


def train(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
          overwrite: bool = False, say: Callable[[str], None] = console.say) -> JobResult:
    """The main job (``jobs/train.py``): ingest, mask, train the IRM teacher when needed, train.

    Each stage reuses what an earlier run with the same settings finished, so a rerun resumes.

    Args:
        overwrite: Rebuild datasets made with other settings.
        say: Receives one line per finished stage.

    Returns:
        The datasets' manifests, the teacher run (``None`` without IRM) and the main run, whose
        ``checkpoint``, ``weights`` and last ``metrics`` are in ``result``.
    """
    from facemae.pipeline import run_training_job

    return run_training_job(resolve_config(config, overrides=overrides, address=address), overwrite=overwrite,
                            say=say)


def train_run(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
              dataset: str | None = None, split: str = "train") -> TrainResult:
    """One training run of ``train.task`` on a dataset that already exists (no data stages, no teacher).

    Args:
        dataset: Original, embedded or released dataset folder; defaults to ``data.output``.
        split: ``train``, or ``deploy`` for an FR model trained on a released set.
    """
    from facemae.train.trainer import train as run

    return run(resolve_config(config, overrides=overrides, address=address), dataset=dataset, split=split)


def tune(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
         restore: bool = True, say: Callable[[str], None] = console.say) -> SweepResult:
    """A Ray Tune sweep of the training loop (``jobs/tune.py``).

    Args:
        restore: Continue an interrupted sweep of the same name instead of starting over.

    Returns:
        The sweep folder, the best trial's config, metrics and checkpoint, the trial table and
        the report.
    """
    from facemae.tune import run_sweep

    return run_sweep(resolve_config(config, overrides=overrides, address=address), say=say, restore=restore)


@dataclass
class GenerateResult:
    """A released dataset and its optional exports."""

    masked: str  # the owner's masked dataset it was made from
    output: str  # the released dataset folder
    manifest: Manifest
    folder: str | None = None  # <folder>/<identity>/<image>.png export
    folder_images: int = 0
    recordio: str | None = None  # InsightFace train.rec (+ .idx) export
    recordio_records: int = 0


def generate(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
             masked: str | None = None, output: str | None = None, overwrite: bool = False,
             export_folder: str | None = None, export_recordio: str | None = None) -> GenerateResult:
    """Deployment (``jobs/generate.py``): a Ray Data actor pool reconstructs the owner's masked faces.

    Args:
        masked: Masked dataset; defaults to ``generate.masked`` or the config's masked output.
        output: Released dataset; defaults to ``generate.output`` or ``<masked>-<generate.method>``.
        overwrite: Regenerate even a finished release (otherwise finished shards are kept).
        export_folder: Also write the release as ``<folder>/<identity>/<image>.png``.
        export_recordio: Also write the release as an InsightFace ``.rec`` / ``.idx`` pack.
    """
    from facemae.generate.export import export_image_folder
    from facemae.generate.export import export_recordio as write_recordio
    from facemae.generate.release import generate_released, released_paths

    resolved = resolve_config(config, overrides=overrides, address=address)
    masked, output = released_paths(resolved, masked=masked, output=output)
    manifest = generate_released(resolved, masked=masked, output=output, overwrite=overwrite)
    result = GenerateResult(masked=masked, output=output, manifest=manifest)
    if export_folder:
        result.folder, result.folder_images = export_folder, export_image_folder(output, export_folder)
    if export_recordio:
        result.recordio, result.recordio_records = export_recordio, write_recordio(output, export_recordio)
    return result


@dataclass
class EvaluateResult:
    """Verification per target (``None`` when not asked) and privacy of a release (``None`` likewise)."""

    verification: dict[str, dict[str, Any]] | None
    privacy: dict[str, float] | None

    def summary(self) -> dict[str, Any]:
        """The numbers without the ROC curves (``tpr``, ``fpr``), as ``jobs/evaluate.py`` prints them."""
        out: dict[str, Any] = {}
        if self.verification is not None:
            out["verification"] = {target: {k: v for k, v in scores.items() if k not in ("tpr", "fpr")}
                                   for target, scores in self.verification.items()}
        if self.privacy is not None:
            out["privacy"] = self.privacy
        return out


def evaluate(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
             fr: str | None = None, pairs_from: str | None = None, judge: str | None = None,
             released: str | None = None, originals: str | None = None) -> EvaluateResult:
    """Verification accuracy of an FR model and / or the privacy of a released dataset.

    Args:
        fr: ``weights.safetensors`` of the FR model to verify on ``eval.bins`` and drawn pairs.
        pairs_from: Dataset whose ``train``-split originals ``eval.pairs`` pairs are drawn from.
        judge: ``weights.safetensors`` of the privacy judge (an FR model other than the IRM teacher).
        released: Released dataset to score; needs ``judge``.
        originals: The dataset the release came from; defaults to ``data.output``.

    Raises:
        ValueError: Nothing to evaluate, or ``judge`` without ``released`` (or the reverse).
        WeightsError: ``fr`` or ``judge`` is not an FR backbone; both are checked before any work.
    """
    from facemae.eval.evaluate import privacy, verify
    from facemae.models.weights import check_weights

    if bool(judge) != bool(released):
        raise ValueError("privacy needs both the judge's weights and the released dataset")
    if not fr and not judge:
        raise ValueError("nothing to evaluate: give fr weights (verification) and/or a judge with a released "
                         "dataset (privacy)")
    resolved = resolve_config(config, overrides=overrides, address=address)
    for weights in (fr, judge):  # a wrong judge is found before verification runs, not after
        if weights:
            check_weights(weights, task="fr")
    scores = verify(resolved, fr, pairs_from=pairs_from) if fr else None
    leak = privacy(resolved, judge, released=released, originals=originals or resolved.data.output) \
        if judge and released else None
    return EvaluateResult(verification=scores, privacy=leak)


def export_onnx(weights: str | Path, output: str | Path, *, opset: int | None = None) -> Path:
    """ONNX for deployment (``facemae export``): an FR backbone (``image -> embedding``) or a FaceMAE
    generator (``image, mask -> released, prediction``), batch axis dynamic, described in its metadata.
    No Ray, no config: see :func:`facemae.models.weights.export_onnx` for the inputs it expects.

    Args:
        weights: A training run's ``export/weights.safetensors`` (or that folder).
        output: The ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset; None: 18.

    Raises:
        WeightsError: The weights are missing, damaged or of no exportable model.
        ValueError: An opset the exporter does not write, or an output that is not a ``.onnx`` file.
    """
    from facemae.models.weights import export_onnx as export

    return export(weights, output, opset=opset)


def experiment(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
               say: Callable[[str], None] = console.say) -> ExperimentResult:
    """The paper's comparison (``jobs/experiment.py``): originals, masked, MAE and FaceMAE rows.

    Returns:
        The ``report.md`` path and every row's verification and privacy numbers.
    """
    from facemae.experiment import run_experiment

    return run_experiment(resolve_config(config, overrides=overrides, address=address), say=say)


def frontier(config: ConfigSource = None, *, overrides: Sequence[str] = (), address: str | None = None,
             restore: bool = True, say: Callable[[str], None] = console.say) -> FrontierResult:
    """The privacy-utility frontier sweep (``jobs/frontier.py``): masked, MAE and FaceMAE across mask ratios
    and IRM weights, one Ray Tune trial per generator.

    Args:
        restore: Continue an interrupted sweep of the same name instead of starting its phases over
            (finished runs, releases and scores are reused either way).

    Returns:
        The ``frontier.md`` path, the points (per-seed lists) and the comparison with its verdict.
    """
    from facemae.frontier import run_frontier

    return run_frontier(resolve_config(config, overrides=overrides, address=address), restore=restore, say=say)


@dataclass
class SubmitResult:
    """A job sent to a cluster."""

    submission_id: str
    status: str  # SUCCEEDED when followed to the end; PENDING or RUNNING when not followed
    logs: str  # the job's output as followed ("" when not followed)


class JobFailedError(RuntimeError):
    """A submitted job ended FAILED or STOPPED; ``str()`` holds the last log lines."""

    def __init__(self, submission_id: str, status: str, message: str, logs: str) -> None:
        self.submission_id, self.status, self.message, self.logs = submission_id, status, message, logs
        # Ray's message goes on with a copy of the log ("..., last available logs (truncated ...):\n...").
        reason = (message.splitlines() or [""])[0].split(", last available logs")[0]
        self.summary = f"job {submission_id} {status}: {reason}".rstrip(": ")
        tail = "\n".join(logs.rstrip("\n").splitlines()[-TAIL_LINES:])
        super().__init__(self.summary + (f"\nlast log lines:\n{tail}" if tail else ""))


def submit(entrypoint: str | Sequence[str], *, address: str, working_dir: str | Path = ".",
           runtime_env: dict[str, Any] | None = None, follow: bool = True, submission_id: str | None = None,
           on_log: Callable[[str], None] = console.say, timeout_s: float | None = None) -> SubmitResult:
    """Sends a command to a remote cluster through Ray's job submission API, as ``ray job submit`` does.

    Args:
        entrypoint: The command, e.g. ``["python", "jobs/train.py", "--config", "jobs/configs/train.yaml"]``.
        address: The cluster's dashboard, e.g. ``http://127.0.0.1:8265``.
        working_dir: Folder uploaded and run from; ``SUBMIT_EXCLUDES`` stay behind.
        runtime_env: Extra runtime environment (``pip``, ``env_vars``, ...); its keys win over the defaults.
        follow: Stream the job's log lines to ``on_log`` until it ends; otherwise return at once.
        submission_id: A unique id to give the job; Ray makes one up when ``None``.
        on_log: Receives each log line while following.
        timeout_s: Stop following after this long (the job goes on running).

    Raises:
        JobFailedError: The followed job ended FAILED or STOPPED.
        TimeoutError: The job was still running after ``timeout_s``.
        ConnectionError: Nothing answers at ``address``.
    """
    from ray.job_submission import JobSubmissionClient

    command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    if not command.strip():
        raise ValueError("submit needs an entrypoint, e.g. ['python', 'jobs/train.py']")
    if not Path(working_dir).is_dir():
        raise FileNotFoundError(f"working_dir {working_dir} is not a folder")
    env = {"working_dir": str(working_dir), "excludes": list(SUBMIT_EXCLUDES), **(runtime_env or {})}
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id)
    if not follow:
        return SubmitResult(submission_id=job_id, status=client.get_job_status(job_id).value, logs="")
    logs = _run_coroutine(_follow(client, job_id, on_log=on_log, timeout_s=timeout_s))
    info = client.get_job_info(job_id)
    deadline = time.monotonic() + 30
    while not info.status.is_terminal() and time.monotonic() < deadline:  # logs end a moment before the status
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = info.status.value
    if status in FAILED_STATES:
        raise JobFailedError(job_id, status, info.message or "", logs)
    return SubmitResult(submission_id=job_id, status=status, logs=logs)


async def _follow(client: Any, job_id: str, *, on_log: Callable[[str], None], timeout_s: float | None) -> str:
    """The job's whole log, handed to ``on_log`` line by line as the chunks arrive."""
    chunks: list[str] = []

    async def tail() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                on_log(line)
        if pending:
            on_log(pending)

    try:
        await asyncio.wait_for(tail(), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"job {job_id} was still running after {timeout_s} s; it goes on (stop it with "
                           f"`ray job stop {job_id}`)") from None
    return "".join(chunks)


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also from inside a running event loop (a notebook), in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
