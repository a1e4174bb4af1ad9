"""Shared fixtures: one real local Ray cluster per test session, small image helpers."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_cluster():
    """A real embedded Ray cluster shared by the session's Ray tests.

    ``address="local"`` never attaches to another Ray on the machine, and its own temp dir keeps
    it apart from any `ray start` a test or a user runs (REFERENCE.md table, row G). Four logical
    CPUs on two cores leave room for Ray Data tasks beside two task slots (row A).
    """
    import ray

    from facemae.cluster import EMBEDDED_ENV

    os.environ.update(EMBEDDED_ENV)
    temp_dir = tempfile.mkdtemp(prefix="facemae-ray-")
    ray.init(address="local", num_cpus=4, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """Synthetic faces for tiny training runs: 18 identities x 8; 4 held out for deployment and 2 for
    validation, which leaves 12 to train on (96 images in 3 shards of 32 rows)."""
    from facemae.config import load_config
    from facemae.data.ingest import ingest

    root = tmp_path_factory.mktemp("train-data") / "ds"
    ingest(load_config(None, [f"data.output={root}", "data.num_identities=18", "data.images_per_identity=8",
                              "data.deploy_fraction=0.22", "data.val_fraction=0.1", "data.rows_per_shard=32",
                              "data.workers=1"]))
    return str(root)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A frozen fr_tiny with its initial weights: enough for IRM's mechanics, made in milliseconds."""
    import torch

    from facemae.models.registry import build_fr
    from facemae.models.weights import save_weights

    torch.manual_seed(0)
    return str(save_weights(build_fr("fr_tiny", embedding_size=64), tmp_path_factory.mktemp("teacher"),
                            {"task": "fr", "model": "fr_tiny", "embedding_size": 64}))


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# On SIGTERM `ray start --block` drains its node first, waiting up to 30 s for actors to leave; the detached
# actors Ray Data leaves behind (_StatsActor) never do, so every head took 32 s to stop instead of 2.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _start_head(env: dict[str, str]) -> tuple[subprocess.Popen | None, str, Path]:
    """One `ray start --head --block`; ``(process, dashboard address, log)``, the process ``None`` if it
    did not come up."""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="fm-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while head.poll() is None and time.monotonic() < deadline:
        # The dashboard can answer while the node is still starting (or failing): wait for both.
        if "Ray runtime started" in log_path.read_text():
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                return head, address, log_path
            except OSError:
                pass
        time.sleep(1)
    _stop(head)
    return None, address, log_path


def _stop(head: subprocess.Popen) -> None:
    head.terminate()  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


@pytest.fixture(scope="module")
def ray_head():
    """A head node of the test module's own, with the job submission API: own temp dir and ports,
    token auth off for server and client (REFERENCE.md table, rows F and G). `--block` keeps
    `ray start` in the foreground, so ending it stops exactly the processes it started; `ray stop`
    would kill every Ray on the machine. On a loaded machine the raylet can give up waiting for the
    dashboard agent (15 s), so a failed start is retried. Yields ``(dashboard address, environment
    for clients)``."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1", **NO_DRAIN}
    for _ in range(3):
        head, address, log = _start_head(env)
        if head is not None:
            break
        said = log.read_text()[-3000:]
        shutil.rmtree(log.parent, ignore_errors=True)
    else:
        pytest.fail(f"ray start --head did not come up in 3 tries; the last said:\n{said}")
    yield address, env
    _stop(head)
    shutil.rmtree(log.parent, ignore_errors=True)  # the session's logs and spilled objects


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def noise_face(seed: int, size: int = 112) -> np.ndarray:
    """Random pixels: every 24-byte pixel row is unique, so a leaked row can be found byte for byte."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_folder(root: Path, identities: int, images: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes ``<root>/<identity>/<image>.png`` noise faces; returns ``{image_id: pixels}``."""
    out = {}
    for i in range(identities):
        (root / f"person_{i:02d}").mkdir(parents=True)
        for k in range(images):
            pixels = noise_face(seed * 100_000 + i * 1000 + k)
            (root / f"person_{i:02d}" / f"{k:03d}.png").write_bytes(png_bytes(pixels))
            out[f"person_{i:02d}/{k:03d}.png"] = pixels
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on this 2-core box, shared with other work, two OpenMP threads that wait on
    each other made a 2 s training loop take 50 s; one thread stays within about 2x of its best."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # tests talk only to clusters they start (REFERENCE row F)
# Jobs' log files (facemae.console) go to one folder of the test session, not into the checkout; it is kept
# for reading when a test failed, removed when all passed.
_LOGS = None
if "FACEMAE_LOG_DIR" not in os.environ:
    _LOGS = os.environ["FACEMAE_LOG_DIR"] = tempfile.mkdtemp(prefix="facemae-test-logs-")


# Copies of objects (facemae.storage.cached_file) go to a cache of the session, not the user's ~/.cache.
_CACHE = None
if "FACEMAE_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["FACEMAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="facemae-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _LOGS is not None and (exitstatus == 0 or not any(Path(_LOGS).iterdir())):  # nothing to read: gone too
        shutil.rmtree(_LOGS, ignore_errors=True)
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on localhost for the session (moto's standalone server, in a thread)
    with one empty bucket. The AWS test credentials and region are set in the environment while it
    runs, and restored after. Yields ``(endpoint URL, bucket name, a boto3 S3 client)``."""
    import boto3
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    endpoint, bucket = f"http://127.0.0.1:{port}", "facemae-test"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    yield endpoint, bucket, client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def train_in_subprocess(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``facemae.train.trainer.train`` of ``overrides`` in a fresh process (a diverging engine must not take
    the test session with it); its last stdout line is the result as JSON (checkpoint, weights, metrics)."""
    script = ("import json, sys\nfrom facemae.config import load_config\nfrom facemae.train.trainer import train\n"
              "r = train(load_config(None, sys.argv[1:]))\n"
              "print(json.dumps({'checkpoint': r.checkpoint, 'weights': r.weights, 'metrics': r.metrics}))\n")
    return subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True,
                          timeout=timeout)
