"""Experiment tracking against a real MLflow tracking server (sqlite, artifacts served over HTTP) on
localhost: the smoke training through Ray Train and the smoke sweep, read back with ``MlflowClient``;
TensorBoard events read back from their files."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import free_ports
from facemae.config import Config, load_config
from facemae.models.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SMOKE = ROOT / "jobs" / "configs" / "train_smoke.yaml"
TUNE_SMOKE = ROOT / "jobs" / "configs" / "tune_smoke.yaml"
# scripts/setup.sh installs the server apart from the project: its package pins a pyarrow the project's is newer than.
MLFLOW = Path(sys.prefix) / "mlflow-server" / "bin" / "mlflow"


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2):
            return True
    except OSError:
        return False


def _stop(server: subprocess.Popen) -> None:
    """Ends the server's own process group: `mlflow server` and the uvicorn worker it started."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """One real MLflow tracking server for the module, on a port of its own; yields its URI."""
    if not MLFLOW.exists():
        pytest.fail(f"{MLFLOW} is missing: run scripts/setup.sh, which installs the MLflow server into its own venv")
    root = tmp_path_factory.mktemp("mlflow")
    (port,) = free_ports(1)
    log_path = root / "server.log"
    # Job execution (on by default) starts seven more processes that each import MLflow: 90 s to start
    # on two busy cores instead of about 12.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while not _healthy(uri):
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            pytest.fail(f"mlflow server on port {port} did not answer /health within 240 s "
                        f"(exit {server.returncode}); its log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    _stop(server)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> str:
    """The privacy judge of the sweep: an fr_tiny initialised apart from the teacher (mechanics only)."""
    from facemae.models.registry import build_fr

    torch.manual_seed(1)
    return str(save_weights(build_fr("fr_tiny", embedding_size=64), tmp_path_factory.mktemp("judge"),
                            {"task": "fr", "model": "fr_tiny", "embedding_size": 64}))


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _expected_params(config: Config) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in _flatten(config.to_dict()).items()}


def _lines(run_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client: Any, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


def _tensorboard(folder: Path, tag: str) -> list[tuple[int, Any]]:
    """``(step, value)`` of one tag over every event file of ``folder``: a scalar's float, an image's PNG
    bytes (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    values = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            values += [(event.step, v.image.encoded_image_string if v.HasField("image") else v.simple_value)
                       for v in event.summary.value if v.tag == tag]
    return sorted(values)


def _smoke_training(tmp_path: Path, dataset: str, teacher: str, uri: str, *overrides: str) -> Config:
    return load_config(TRAIN_SMOKE, [f"data.output={dataset}", f"train.teacher={teacher}",
                                     f"train.storage_path={tmp_path / 'runs'}", "train.metrics_port=0",
                                     f"tracking.mlflow_uri={uri}", "tracking.mlflow_experiment=smoke-training",
                                     *overrides])


@pytest.mark.parametrize("uri, message", [
    ("file:///tmp/mlruns", "must be an MLflow tracking server's http"),
    ("sqlite:///mlflow.db", "file and database stores need the full mlflow package"),
    ("127.0.0.1:5000", "must be an MLflow tracking server's http"),
])
def test_uris_mlflow_cannot_use_from_ray_workers_are_refused(uri, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [f"tracking.mlflow_uri={uri}"])
    assert load_config(None, []).tracking.mlflow_uri == ""  # off by default


def test_mlflow_is_an_optional_extra_imported_only_when_tracking_is_on(tmp_path, monkeypatch):
    code = ("import sys, facemae.train.trainer, facemae.tune.sweep, facemae.experiment; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported with tracking off'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    from facemae.tracking import open_run

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    config = load_config(None, ["tracking.mlflow_uri=http://127.0.0.1:5000"])
    with pytest.raises(ValueError, match=r"^tracking.mlflow_uri=http://127.0.0.1:5000 needs the MLflow client: "
                                         r"pip install mlflow-skinny \(or run scripts/setup.sh\)$"):
        open_run(config, folder=tmp_path, name="run", kind="train")


def test_two_starts_within_one_second_keep_an_event_file_each(tmp_path, monkeypatch):
    """A resume or rerun can start within the second of the one before (a one-process smoke run takes less):
    each start's events stay in a file of their own."""
    import tensorboardX.event_file_writer as writer

    from facemae.tracking import _EventFile

    monkeypatch.setattr(writer.time, "time", lambda: 1796281377.25)  # both starts in the same second
    for step in (1, 2):
        _EventFile(str(tmp_path)).write({"loss": float(step)}, step=step, when=1796281377.25, preview=None)
    assert len(list(tmp_path.glob("events.out.tfevents.1796281377.*"))) == 2
    assert _tensorboard(tmp_path, "loss") == [(1, 1.0), (2, 2.0)]


def test_a_closed_port_fails_before_training_in_one_line(tmp_path, tiny_dataset, tiny_teacher):
    from facemae.train.trainer import train

    (port,) = free_ports(1)  # free a moment ago: nothing listens there
    config = _smoke_training(tmp_path, tiny_dataset, tiny_teacher, f"http://127.0.0.1:{port}",
                             "name=closed", "train.num_workers=0")
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"tracking.mlflow_uri=http://127.0.0.1:{port}: no MLflow tracking "
                                         "server answers there") as caught:
        train(config)
    assert "\n" not in str(caught.value)
    assert time.monotonic() - started < 30  # MLflow's own client would retry for minutes
    assert not (tmp_path / "runs" / "closed").exists()  # nothing trained


def test_a_server_lost_mid_run_is_warned_about_once_and_training_goes_on(tmp_path, monkeypatch):
    from facemae.tracking import ReportLogger, TrackedRun

    (port,) = free_ports(1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after retries
    logger = ReportLogger(TrackedRun(uri=f"http://127.0.0.1:{port}", experiment_id="1", run_id="gone"),
                          tensorboard_dir=tmp_path / "tensorboard")
    with pytest.warns(UserWarning, match="logging step 1 to MLflow run gone failed, the run goes on without MLflow"):
        logger.log({"step": 1, "loss": 0.5, "time": time.time()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no exception
        logger.log({"step": 2, "loss": 0.4, "time": time.time()})
    assert [s for s, _ in _tensorboard(tmp_path / "tensorboard", "loss")] == [1, 2]  # TensorBoard goes on


@pytest.mark.ray
@pytest.mark.slow
def test_ray_training_logs_the_config_every_report_at_its_step_the_previews_and_the_weights(
        tmp_path, tiny_dataset, tiny_teacher, ray_cluster, mlflow_server):
    from facemae.train.trainer import train

    config = _smoke_training(tmp_path, tiny_dataset, tiny_teacher, mlflow_server, "tracking.tensorboard=true")
    assert (config.train.num_workers, config.train.max_steps) == (2, 6)
    result = train(config)

    client = _client(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke-training").experiment_id])
    assert (run.info.run_name, run.info.status) == ("facemae-synthetic-smoke", "FINISHED")
    assert json.loads((Path(result.run_dir) / "mlflow.json").read_text())["run_id"] == run.info.run_id

    # Params: the whole config, dotted, each value as --set reads it.
    assert run.data.params == _expected_params(config) and len(run.data.params) > 100
    assert run.data.params["train.max_steps"] == "6" and run.data.params["train.num_workers"] == "2"

    # Metrics: every report of rank 0, at its step, with the numbers of metrics.jsonl.
    lines = _lines(result.run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert _history(client, run.info.run_id, "loss") == [(m["step"], m["loss"]) for m in lines]
    reported = {k for k in lines[-1] if k not in ("step", "time", "attempt")}
    assert set(run.data.metrics) == reported >= {"loss", "recon_loss", "irm_loss", "lr", "images_trained"}
    for key in reported:
        assert _history(client, run.info.run_id, key) == [(m["step"], float(m[key])) for m in lines], key

    # Artifacts: each checkpoint's preview, byte for byte; the exported weights' path and info.
    artifacts = _artifacts(client, run.info.run_id)
    previews = [p for p in artifacts if p.startswith("previews/")]
    assert previews == ["previews/step00000003/preview.png", "previews/step00000006/preview.png"]
    logged = client.download_artifacts(run.info.run_id, previews[-1], str(tmp_path / "download"))
    assert Path(logged).read_bytes() == (Path(result.checkpoint) / "preview.png").read_bytes()
    assert run.data.tags["facemae.weights"] == result.weights and "export/weights.json" in artifacts

    # TensorBoard: the same loss scalars (float32), and the previews as images.
    events = Path(result.run_dir) / "tensorboard"
    scalars = _tensorboard(events, "loss")
    assert [s for s, _ in scalars] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([v for _, v in scalars]), torch.tensor([m["loss"] for m in lines]))
    images = _tensorboard(events, "preview")
    assert [s for s, _ in images] == [3, 6] and all(png[:4] == b"\x89PNG" for _, png in images)


def test_a_rerun_of_the_same_name_continues_its_mlflow_run(tmp_path, tiny_dataset, tiny_teacher, mlflow_server):
    """Resuming is the driver's business, the same in the local mode as on Ray (cheaper here)."""
    from facemae.train.trainer import train

    common = ["name=resumed", "train.num_workers=0", "tracking.mlflow_experiment=resume"]
    first = train(_smoke_training(tmp_path, tiny_dataset, tiny_teacher, mlflow_server, *common, "train.max_steps=2"))
    second = train(_smoke_training(tmp_path, tiny_dataset, tiny_teacher, mlflow_server, *common, "train.max_steps=3"))

    client = _client(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert json.loads((Path(first.run_dir) / "mlflow.json").read_text())["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(m["step"], m["loss"]) for m in _lines(second.run_dir)]
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [1, 2, 3]
    # MLflow params cannot change: the first start's stays, the change is tagged.
    assert run.data.params["train.max_steps"] == "2" and run.data.tags["changed.train.max_steps"] == "3 (was 2)"
    assert run.data.tags["facemae.weights"] == second.weights


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_is_a_parent_run_with_one_nested_run_per_trial(tmp_path, tiny_teacher, judge, ray_cluster,
                                                                mlflow_server):
    from facemae.tracking import flat_params
    from facemae.tune.sweep import run_sweep

    config = load_config(TUNE_SMOKE, [f"data.output={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                                      f"tune.output={tmp_path / 'report'}", f"train.teacher={tiny_teacher}",
                                      f"train.judge={judge}", f"tracking.mlflow_uri={mlflow_server}",
                                      "tracking.mlflow_experiment=smoke-sweep"])
    result = run_sweep(config, say=lambda line: None)

    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("smoke-sweep")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs.pop("facemae-tune-smoke-sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["facemae.kind"] == "sweep"
    reports = {"report/pareto.md", "report/pareto.png", "report/trials.json"}
    assert reports <= set(_artifacts(client, parent.info.run_id))
    assert json.loads(parent.data.tags["facemae.best_config"]) == result.best_config

    assert len(result.table) == 2 and set(runs) == {f"facemae-tune-smoke-sweep-{r['trial']}" for r in result.table}
    for row in result.table:
        run = runs[f"facemae-tune-smoke-sweep-{row['trial']}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED", row  # a trial ASHA stopped is ended by the sweep's callback
        if row["status"] == "STOPPED":
            assert run.data.tags["facemae.tune_status"] == "STOPPED"
        # Params: the trial's whole config, as prepared by the sweep, its sampled values included.
        params = run.data.params
        assert set(params) == set(flat_params(config))
        assert {k: params[k] for k in row["params"]} == {k: json.dumps(v) for k, v in row["params"].items()}
        assert (params["name"], params["train.teacher"], params["train.val_every"]) == \
            (run.info.run_name, tiny_teacher, "3")
        # Metric history: each validation report, as metrics.jsonl has it (a trial ASHA stopped may have
        # logged a line as it was being killed: MLflow's history is then the same up to there).
        val = [(m["step"], m["val_objective"]) for m in _lines(tmp_path / "runs" / run.info.run_name)
               if "val_objective" in m]
        history = _history(client, run.info.run_id, "val_objective")
        assert history and history == val[:len(history)]
        if "facemae.tune_status" not in run.data.tags:  # the trial ended its run itself: trained and exported
            assert history == val and [s for s, _ in history] == [3, 6]
            assert run.data.tags["facemae.weights"] == row["weights"]
        assert "val_identity_leak_at_1" in run.data.metrics  # "@" is not in MLflow's alphabet



def test_an_experiment_is_a_parent_run_of_its_training_runs_with_its_report(tmp_path, monkeypatch, mlflow_server):
    import facemae.experiment as experiment
    from facemae.tracking import tracked_run

    config = load_config(None, [f"train.storage_path={tmp_path / 'runs'}", f"experiment.output={tmp_path / 'report'}",
                                f"tracking.mlflow_uri={mlflow_server}", "tracking.mlflow_experiment=experiment"])

    def comparison(config: Config, say: Any) -> experiment.ExperimentResult:
        """Stands in for hours of training: one training run of the job, then the report."""
        with tracked_run(config, folder=tmp_path / "runs" / "facemae-teacher", name="facemae-teacher", kind="train"):
            pass
        out = Path(config.experiment.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("# FaceMAE experiment\n")
        (out / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        return experiment.ExperimentResult(report=str(out / "report.md"), seeds=[0], rows={}, runs={})

    monkeypatch.setattr(experiment, "_experiment", comparison)
    for _ in range(2):  # a rerun continues the same two runs
        experiment.run_experiment(config, say=lambda line: None)

    client = _client(mlflow_server)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("experiment").experiment_id])}
    assert set(runs) == {"facemae", "facemae-teacher"}
    parent, child = runs["facemae"], runs["facemae-teacher"]
    assert parent.data.tags["facemae.kind"] == "experiment" and parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert _artifacts(client, parent.info.run_id) == ["report/report.md", "report/roc.png"]


def test_a_trial_tune_stopped_has_its_run_ended_by_the_sweeps_callback(tmp_path, mlflow_server):
    """ASHA ends a trial's process before its training can end its run: Tune's logger callback does."""
    from types import SimpleNamespace

    from facemae.tracking import end_run, open_run
    from facemae.tune.callbacks import EndTrialRuns, tracking_callbacks

    base = load_config(None, [f"train.storage_path={tmp_path / 'runs'}", f"tracking.mlflow_uri={mlflow_server}",
                              "tracking.mlflow_experiment=stopped", "name=sweep"])
    stopped, finished = (open_run(base, folder=Path(base.train.run_dir_for(f"sweep-sweep-{t}")), name=t, kind="train")
                         for t in ("t_00000", "t_00001"))
    client = _client(mlflow_server)
    client.set_terminated(finished.run_id, status="FINISHED")  # as a trial that trained to the end does
    (callback,) = tracking_callbacks(base)
    assert isinstance(callback, EndTrialRuns)
    callback.log_trial_end(SimpleNamespace(trial_id="t_00000"), failed=False)
    callback.log_trial_end(SimpleNamespace(trial_id="t_00001"), failed=False)
    callback.log_trial_end(SimpleNamespace(trial_id="t_00002"), failed=True)  # never started a run: nothing to end

    ended = client.get_run(stopped.run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["facemae.tune_status"] == "STOPPED"
    end_run(stopped, status="FAILED")  # the stopped trial's training unwinding after the callback ended its run
    assert client.get_run(stopped.run_id).info.status == "FINISHED"
    assert "facemae.tune_status" not in client.get_run(finished.run_id).data.tags
