"""Experiment tracking: MLflow runs and TensorBoard events of training runs, sweeps and experiments.

Off by default; ``tracking.mlflow_uri`` (an MLflow tracking server) and ``tracking.tensorboard`` turn it
on (:class:`facemae.config.TrackingConfig`).

- A training run (:func:`facemae.train.trainer.train`: FaceMAE, a teacher, a judge, an FR model, a Tune
  trial) is one MLflow run named after its run folder. The driver opens it before any worker starts, so
  a server that does not answer stops the job at once with one line, and logs the whole config as
  params (dotted keys, values as ``--set`` reads them). Rank 0 logs each report's metrics at its step,
  the same dict it appends to ``metrics.jsonl`` (the local mode and Ray Train alike; nothing passes
  through Train's controller), and each checkpoint's preview as ``previews/step<N>/preview.png``. The
  driver tags the exported weights' path (``facemae.weights``) and ends the run.
- A sweep or an experiment is a parent run: the runs it trains are nested under it, and its report is
  logged as artifacts.
- The run id is kept in ``<folder>/mlflow.json``, so a rerun of the same name continues the same MLflow
  run. MLflow params cannot change: a value changed since is tagged ``changed.<key>``.
- Metric names keep to MLflow's alphabet: ``@`` becomes ``_at_`` (``val_identity_leak_at_1``).
- ``tracking.tensorboard``: rank 0 writes the same scalars and previews to ``<run>/tensorboard``.

A logging call that fails mid-run (the server went away) is warned about once and the run goes on
untracked, its metrics still in ``metrics.jsonl``: losing the tracking server does not cost a training.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import uuid
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from facemae import console, storage
from facemae.config import Config

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"
TENSORBOARD_DIR = "tensorboard"
PREVIEWS = "previews"
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_VALUE_LENGTH = 6000  # of a param or tag value (MLflow 3)
NOT_METRICS = ("step", "time")  # each report's x-axis and timestamp
# Set unless the user set them: MLflow prints "🏃 View run ..." to stdout when a run ends and, on import,
# gives its loggers a stderr handler of their own; without it their records go where the application's
# logging sends them.
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_CONFIGURE_LOGGING": "false"}
# Rank 0 logs inside the training loop: a lost server fails a call after seconds of retries, not the
# minutes of MLflow's defaults (7 retries, 120 s timeout).
WORKER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run: where it lives and which it is (picklable: it travels to the workers)."""

    uri: str
    experiment_id: str
    run_id: str


_PARENT: contextvars.ContextVar[TrackedRun | None] = contextvars.ContextVar("facemae_mlflow_parent", default=None)


def flat_params(config: Config) -> dict[str, str]:
    """The whole config as MLflow params: dotted keys, each value as ``--set key=value`` reads it."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in _flatten(config.to_dict())}


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def metric_key(name: str) -> str:
    """``name`` in MLflow's alphabet (letters, digits, ``_ - . : /`` and space); ``@`` becomes ``_at_``."""
    return re.sub(r"[^\w\-.:/ ]", "_", name.replace("@", "_at_"))


def _client(uri: str) -> Any:
    """An ``MlflowClient`` of ``uri``; mlflow is an optional extra, imported only when tracking is on."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ValueError(f"tracking.mlflow_uri={uri} needs the MLflow client: pip install mlflow-skinny "
                         "(or run scripts/setup.sh)") from None
    return MlflowClient(tracking_uri=uri)


def _check_server(uri: str) -> None:
    """Fails at once when nothing answers at ``uri`` (MLflow's client would retry for minutes first)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # something answers (a proxy may not route /health); MLflow's own calls will tell the rest
    except OSError as exc:  # URLError, refused, timed out
        raise ValueError(f"tracking.mlflow_uri={uri}: no MLflow tracking server answers there "
                         f"({getattr(exc, 'reason', exc)}); start one (mlflow server --port 5000) or unset "
                         "tracking.mlflow_uri") from None


def open_run(config: Config, *, folder: str | os.PathLike, name: str, kind: str) -> TrackedRun | None:
    """Continues the MLflow run ``<folder>/mlflow.json`` names, or starts one (nested under the enclosing
    job's run), and logs the config as params; None when ``tracking.mlflow_uri`` is empty.

    Args:
        config: The run's config; ``tracking`` says where to log.
        folder: The run's folder (its checkpoints, or a sweep's or experiment's own folder).
        name: The MLflow run name.
        kind: ``train``, ``sweep`` or ``experiment`` (the tag ``facemae.kind``).

    Raises:
        ValueError: The MLflow client is not installed, no server answers at ``tracking.mlflow_uri``, or
            it refuses the run (authentication, a deleted experiment...).
    """
    uri = config.tracking.mlflow_uri
    if not uri:
        return None
    client = _client(uri)  # first: without mlflow installed, its error names the fix
    _check_server(uri)
    from mlflow.exceptions import MlflowException

    parent = _PARENT.get()
    try:
        run = _continue_or_start(client, config, folder=folder, name=name, kind=kind, parent=parent)
    except MlflowException as exc:
        raise ValueError(f"tracking.mlflow_uri={uri}: the MLflow server refused run {name}: "
                         f"{_first_line(exc)}") from exc
    line = f"tracking mlflow run {run.run_id} ({name}) at {uri}"
    if parent is None:
        console.say(line)
    else:  # a job says its own run's line, not one per run it trains
        log.info(line)
    return run


def _continue_or_start(client: Any, config: Config, *, folder: str | os.PathLike, name: str, kind: str,
                       parent: TrackedRun | None) -> TrackedRun:
    uri, params = config.tracking.mlflow_uri, flat_params(config)
    run = _resumable(client, folder, uri)
    if run is not None:
        client.update_run(run.run_id, status="RUNNING")
        _log_params(client, run.run_id, params, logged=client.get_run(run.run_id).data.params)
        return run
    tags = {"facemae.kind": kind, "facemae.folder": str(folder)}
    if parent is not None and parent.uri == uri:
        tags["mlflow.parentRunId"] = parent.run_id
    info = client.create_run(_experiment_id(client, config.tracking.mlflow_experiment), run_name=name,
                             tags=tags).info
    run = TrackedRun(uri=uri, experiment_id=info.experiment_id, run_id=info.run_id)
    _write_run_file(folder, run)
    _log_params(client, run.run_id, params, logged={})
    return run


def _resumable(client: Any, folder: str | os.PathLike, uri: str) -> TrackedRun | None:
    """The run ``<folder>/mlflow.json`` names, if it is on this server and not deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = TrackedRun(**json.loads(storage.read_text(storage.join(folder, RUN_FILE))))
    except (OSError, ValueError, TypeError):  # none yet, or not ours
        return None
    if run.uri != uri:
        return None
    try:
        return run if client.get_run(run.run_id).info.lifecycle_stage == "active" else None
    except MlflowException:  # deleted for good, or another server now answers at this address
        return None


def _write_run_file(folder: str | os.PathLike, run: TrackedRun) -> None:
    storage.write_text(storage.join(folder, RUN_FILE), json.dumps(asdict(run)) + "\n")


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another trial of the sweep created it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise ValueError(f"tracking.mlflow_experiment={name!r} is deleted on {client.tracking_uri}; restore it "
                         "in the MLflow UI or choose another name")
    return found.experiment_id


def _log_params(client: Any, run_id: str, params: dict[str, str], *, logged: dict[str, str]) -> None:
    """Logs the params not logged yet; one whose value changed since becomes the tag ``changed.<key>``."""
    from mlflow.entities import Param, RunTag

    params = {k: v[:MAX_VALUE_LENGTH] for k, v in params.items()}
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for i in range(0, len(new), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_CALL])
    changed = [RunTag(f"changed.{k}", f"{v} (was {logged[k]})"[:MAX_VALUE_LENGTH])
               for k, v in params.items() if k in logged and logged[k] != v]
    if changed:
        client.log_batch(run_id, tags=changed)
        log.info("tracking: resumed run %s with %s changed", run_id, ", ".join(t.key[8:] for t in changed))


def end_run(run: TrackedRun | None, *, status: str = "FINISHED") -> None:
    """Ends ``run`` with ``status`` (FINISHED, FAILED or KILLED) if it is still RUNNING; a failure to reach
    the server is warned.

    A run something else ended keeps its status: a sweep's callback ends the run of a trial ASHA stops
    (FINISHED, ``facemae.tune_status=STOPPED``) before Tune stops the trial's process, whose training then
    unwinds with an error and would otherwise mark its run FAILED.
    """
    if run is not None:
        _best_effort(f"ending run {run.run_id}", lambda: _end_if_running(_client(run.uri), run.run_id, status))


@contextlib.contextmanager
def tracked_run(config: Config, *, folder: str | os.PathLike, name: str, kind: str) -> Iterator[TrackedRun | None]:
    """:func:`open_run` for the block, ended FINISHED, FAILED on an error, KILLED on Ctrl+C; yields None
    when MLflow is off. Also checks ``tracking.tensorboard`` can write before anything runs.

    Raises:
        ValueError: As :func:`open_run`, or ``tracking.tensorboard`` without tensorboardX.
    """
    if config.tracking.tensorboard:
        _require_tensorboard()
    run = open_run(config, folder=folder, name=name, kind=kind)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(run, status=status)


@contextlib.contextmanager
def job_run(config: Config, *, folder: str | os.PathLike, name: str, kind: str) -> Iterator[TrackedRun | None]:
    """:func:`tracked_run` of a job that trains several runs (a sweep, an experiment): the runs opened
    inside the block are nested under it."""
    with tracked_run(config, folder=folder, name=name, kind=kind) as run, nested_under(run):
        yield run


@contextlib.contextmanager
def nested_under(run: TrackedRun | None) -> Iterator[None]:
    """Runs opened inside the block are children of ``run`` (a Tune trial's process is handed its sweep's)."""
    token = _PARENT.set(run)
    try:
        yield
    finally:
        _PARENT.reset(token)


def log_weights(run: TrackedRun | None, weights: str | None) -> None:
    """Tags the exported weights' path (``facemae.weights``) and logs their small ``weights.json``."""
    if run is None or not weights:
        return
    from facemae.models.weights import WEIGHTS_INFO

    def log_them() -> None:
        client = _client(run.uri)
        client.set_tag(run.run_id, "facemae.weights", weights)
        info = f"{weights.rsplit('/', 1)[0]}/{WEIGHTS_INFO}" if storage.is_remote(weights) else \
            str(Path(weights).with_name(WEIGHTS_INFO))
        if storage.is_file(info):
            client.log_artifact(run.run_id, storage.cached_file(info), artifact_path="export")

    _best_effort(f"logging the weights of run {run.run_id}", log_them)


def log_folder(run: TrackedRun | None, folder: str | os.PathLike, *, artifact_path: str,
               tags: dict[str, str] | None = None) -> None:
    """Logs every file of ``folder`` (a report; local or on an object store) as artifacts under
    ``artifact_path``, and ``tags``."""
    if run is None:
        return

    def log_it() -> None:
        client = _client(run.uri)
        with storage.local_folder(folder) as local:
            client.log_artifacts(run.run_id, local, artifact_path=artifact_path)
        for key, value in (tags or {}).items():
            client.set_tag(run.run_id, key, value[:MAX_VALUE_LENGTH])

    _best_effort(f"logging {folder} to run {run.run_id}", log_it)


def end_if_running(folder: str | os.PathLike, *, uri: str, status: str, tags: dict[str, str]) -> None:
    """Ends the run ``<folder>/mlflow.json`` names if it is still RUNNING, with ``tags``: a Tune trial that
    ASHA stops ends with its process, before its own :func:`tracked_run` could end its run."""
    path = storage.join(folder, RUN_FILE)
    if not uri or not storage.is_file(path):
        return
    run = TrackedRun(**json.loads(storage.read_text(path)))
    if run.uri != uri:
        return

    _best_effort(f"ending run {run.run_id}", lambda: _end_if_running(_client(uri), run.run_id, status, tags))


def _end_if_running(client: Any, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tags and ends run ``run_id`` with ``status`` if the server still has it RUNNING."""
    if client.get_run(run_id).info.status != "RUNNING":
        return
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def _best_effort(what: str, call: Any) -> None:
    """Runs ``call``; a tracking server that fails is warned about, not raised: the job's results stand."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except (MlflowException, OSError) as exc:
        warnings.warn(f"tracking: {what} failed, the job goes on: {_first_line(exc)}", stacklevel=2)


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def _require_tensorboard() -> None:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ValueError("tracking.tensorboard needs tensorboardX: pip install tensorboardX (ray[tune] "
                         "installs it; or run scripts/setup.sh)") from None


class ReportLogger:
    """Rank 0's side: each report's metrics at their step, and each checkpoint's preview, to MLflow and
    TensorBoard. A failing MLflow call is warned about once; the run goes on without MLflow."""

    def __init__(self, run: TrackedRun | None, *, tensorboard_dir: str | None) -> None:
        self._run = run
        self._client = None
        if run is not None:
            for key, value in WORKER_ENV.items():
                os.environ.setdefault(key, value)
            try:
                self._client = _client(run.uri)
            except ValueError as exc:  # the driver has mlflow, this worker's node not
                warnings.warn(f"{exc}, on this worker's node too: the run goes on without MLflow", stacklevel=2)
        self._events = _EventFile(tensorboard_dir) if tensorboard_dir is not None else None

    @classmethod
    def create(cls, config: Config, run: TrackedRun | None, *, rank: int, run_dir: str) -> ReportLogger | None:
        """Rank 0's logger when tracking is on, else None."""
        if rank != 0 or (run is None and not config.tracking.tensorboard):
            return None
        return cls(run, tensorboard_dir=storage.join(run_dir, TENSORBOARD_DIR) if config.tracking.tensorboard else None)

    def log(self, metrics: dict[str, Any], *, preview: Path | None = None) -> None:
        """Logs every numeric value of one report but ``step`` (the x-axis) and ``time`` (the timestamp)."""
        step, when = int(metrics["step"]), float(metrics.get("time", time.time()))
        values = {k: float(v) for k, v in metrics.items()
                  if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._events is not None:
            self._events.write(values, step=step, when=when, preview=preview)
        if self._client is not None:
            self._mlflow(values, step=step, when=when, preview=preview)

    def close(self) -> None:
        """Closes the event file (its local copy of a run on an object store is removed)."""
        if self._events is not None:
            self._events.close()

    def _mlflow(self, values: dict[str, float], *, step: int, when: float, preview: Path | None) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        millis = int(when * 1000)
        try:
            self._client.log_batch(self._run.run_id, metrics=[Metric(metric_key(k), v, millis, step)
                                                               for k, v in values.items()])
            if preview is not None:
                self._client.log_artifact(self._run.run_id, str(preview), artifact_path=f"{PREVIEWS}/step{step:08d}")
        except (MlflowException, OSError) as exc:
            self._client = None
            warnings.warn(f"tracking: logging step {step} to MLflow run {self._run.run_id} failed, the run goes "
                          f"on without MLflow (its metrics stay in metrics.jsonl): {_first_line(exc)}", stacklevel=2)


class _EventFile:
    """A TensorBoard event file written as reports come: ``SummaryWriter`` queues events to a thread that
    writes them out every two minutes, so a worker that ends first would lose its last reports. In a run
    folder on an object store the file is written locally and uploaded whole after each report."""

    def __init__(self, folder: str) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self._remote = folder if storage.is_remote(folder) else None
        local = storage.scratch("tensorboard", folder=True) if self._remote else folder
        Path(local).mkdir(parents=True, exist_ok=True)
        # events.out.tfevents.<time>.<host>.<random>, one per start: tensorboardX's name alone has a resolution
        # of one second, and a second start within it (a resume, a rerun) overwrote the first's file.
        self._writer = EventsWriter(str(Path(local) / "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        # Every report uploads the file whole, so the local copy of a remote run's file is scratch: removed on
        # close, or when the process exits without closing (a worker Ray ends after its last report).
        self._finalizer = weakref.finalize(self, _close_events, self._writer, local if self._remote else None)

    def close(self) -> None:
        self._finalizer()

    def write(self, values: dict[str, float], *, step: int, when: float, preview: Path | None) -> None:
        """One event of every scalar of a report (and the checkpoint's preview image), on disk on return."""
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        parts = [summary.scalar(key, value) for key, value in values.items()]
        if preview is not None:
            import numpy as np
            from PIL import Image

            with Image.open(preview) as image:
                parts.append(summary.image("preview", np.asarray(image.convert("RGB")), dataformats="HWC"))
        merged = Summary(value=[value for part in parts for value in part.value])
        self._writer.write_event(Event(wall_time=when, step=step, summary=merged))
        self._writer.flush()
        if self._remote:
            local = Path(self._writer._file_name)  # noqa: SLF001  tensorboardX names it per start; no getter
            storage.upload_file(local, storage.join(self._remote, local.name))


def _close_events(writer: Any, scratch: str | None) -> None:
    writer.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
