"""`ray job submit` of the main job against a `ray start --head` started (and stopped) by the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A head node of its own: own temp dir and ports, token auth off for server and client
    (REFERENCE.md table, rows F and G). `--block` keeps `ray start` in the foreground, so ending it
    stops exactly the processes it started; `ray stop` would kill every Ray on the machine."""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="fm-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail("ray start --head did not come up")
            time.sleep(1)
    yield address, env
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


@pytest.mark.ray
def test_ray_job_submit_runs_the_main_job_and_leaves_a_checkpoint(tmp_path, ray_head):
    address, env = ray_head
    runs, data = tmp_path / "runs", tmp_path / "data"
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "data", "*.egg-info", "__pycache__"]}),
         "--", "python", "jobs/train.py", "--config", "jobs/configs/train_smoke.yaml",
         "--set", f"train.storage_path={runs}", "--set", f"data.output={data / 'smoke'}",
         "--set", "loss.lambda_irm=0"],  # plain MAE: no teacher run, the job mechanics at half the time
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in out.stdout
    run_dir = runs / "facemae-synthetic-smoke"
    checkpoint = run_dir / "checkpoint_00000006"
    assert f"checkpoint {checkpoint}" in out.stdout  # the job's own log, followed by the CLI
    assert (checkpoint / "latest").is_file() and (checkpoint / "progress.json").is_file()
    assert (run_dir / "export" / "weights.safetensors").is_file()
