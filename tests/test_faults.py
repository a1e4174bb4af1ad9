"""The main job from the command line, with a fault injected: its driver SIGKILLed mid-run; the same
command rerun resumes and finishes the job.

(A lost Ray Train worker is in test_train.py, `ray job stop` then resubmit in test_job_submit.py, a
killed generation driver in test_generate.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _steps(run_dir: Path) -> list[int]:
    log = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []


AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's agent processes, as they name themselves


def _alive(procs: list[psutil.Process]) -> list[str]:
    """Those of ``procs`` still running (the same process: PID and start time), as short descriptions."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120].rstrip()}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.ray
@pytest.mark.slow
def test_main_job_killed_driver_leaves_no_process_behind_and_the_same_command_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
               str(ROOT / "jobs" / "configs" / "train_smoke.yaml"), "--set", f"data.output={tmp_path / 'syn'}",
               "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", "train.metrics_port=0",
               "--set", "train.max_steps=20"]  # room to kill it part way: its workers outlive it by up to 8 steps
    run_dir = tmp_path / "runs" / "facemae-synthetic-smoke"  # checkpoints every 3 steps
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline and max(_steps(run_dir), default=0) < 4:
        time.sleep(0.1)
    assert driver.poll() is None, "the job ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
    tree = psutil.Process(driver.pid).children(recursive=True)  # its embedded Ray: GCS, raylet, workers
    assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in tree if p.is_running())
    os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as an OOM killer or a lost laptop session would
    driver.wait()
    # Its workers and Ray's own processes end within seconds. Ray's two agents notice their raylet is gone
    # at once but wait out a report to the dead GCS (60 s); they hold no port a new cluster takes, so the
    # rerun starts beside them, as a user's would, and they are checked for once it has finished.
    deadline = time.monotonic() + 180
    while [p for p in _alive(tree) if not p.endswith(AGENTS)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(p.endswith(AGENTS) for p in _alive(tree)), f"left behind by the killed driver: {_alive(tree)}"
    before = _steps(run_dir)  # read once every worker is gone: none can add a line after
    killed_at = max(before)

    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(tree), f"left behind by the killed driver: {_alive(tree)}"
    steps = _steps(run_dir)
    assert steps[:len(before)] == before
    resumed = steps[len(before):]
    # From the last checkpoint the killed run wrote (every 3 steps; the one before if the kill caught the
    # newest being written), not from step 0.
    start, newest = (resumed[0] - 1 if resumed else None), killed_at // 3 * 3
    assert start and start in (newest, newest - 3), (killed_at, steps)
    assert resumed == list(range(start + 1, 21)), (killed_at, steps)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m["attempt"] for m in lines[len(before):]} == {2}  # the rerun's lines say they are a second start

    # What the rerun sums up: every stage reused or finished, the teacher reused, not retrained.
    assert f"checkpoint {run_dir / 'checkpoint_00000020'}" in out.stdout
    assert (run_dir / "checkpoint_00000020" / "preview.png").is_file()
    assert (run_dir / "export" / "weights.safetensors").is_file()
    teacher = tmp_path / "runs" / "facemae-synthetic-smoke-teacher" / "export" / "weights.safetensors"
    assert teacher.is_file() and f"teacher  {teacher}" in out.stdout
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    masked = json.loads((tmp_path / "syn-masked" / "manifest.json").read_text())
    assert sum(manifest["counts"][split]["images"] for split in ("train", "val", "deploy")) == 12 * 6
    assert list(masked["splits"]) == ["deploy"]
    assert masked["counts"]["deploy"]["images"] == manifest["counts"]["deploy"]["images"]

    # Both runs' consoles are for a person: stage lines and bars; Ray, DeepSpeed and torch in the log file.
    first = (tmp_path / "first.log").read_text()
    for stage in ("dataset  ", "masked   ", "teacher  ", "embedded "):
        assert f"\n{stage}" in first, stage
    _assert_quiet(first)
    _assert_quiet(out.stdout + out.stderr)


def _assert_quiet(text: str) -> None:
    """A job's console: under 60 lines, no library chatter or warning, and a log file that holds them."""
    lines = text.split("\n")  # read with universal newlines: each progress-bar update counts as a line here
    assert len(lines) < 60, f"{len(lines)} console lines:\n{text[-3000:]}"
    log = Path(lines[0].split()[1])
    assert lines[0].startswith("log ") and log.is_file(), lines[0]
    rest = "\n".join(lines[1:])  # the first line names the log and what it holds
    for chatter in ("RayTrainWorker", "TrainController", "(raylet)", "DeepSpeed", "Warning", "WARNING", "INFO"):
        assert chatter not in rest, f"{chatter!r} on the console:\n{text[-3000:]}"
    assert "RayTrainWorker" in log.read_text()
