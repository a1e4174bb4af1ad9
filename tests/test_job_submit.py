"""Job submission against a `ray start --head` that this module starts and stops (conftest's `ray_head`):
`ray job submit` of the main job, `facemae.submit` and `facemae submit`, all on the one head."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import facemae

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _working_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "greeting.txt").write_text("hello from the cluster\n")
    return folder


@pytest.mark.ray
def test_submit_uploads_the_working_dir_and_follows_the_log(tmp_path, ray_head):
    address, _ = ray_head
    lines: list[str] = []
    submission_id = f"facemae-sdk-{uuid.uuid4().hex[:8]}"
    result = facemae.submit(["python", "-c", "print(open('greeting.txt').read().strip())"], address=address,
                            working_dir=_working_dir(tmp_path), submission_id=submission_id, on_log=lines.append)
    assert (result.submission_id, result.status) == (submission_id, "SUCCEEDED")
    assert "hello from the cluster" in lines and "hello from the cluster" in result.logs


@pytest.mark.ray
def test_a_failing_submitted_job_raises_with_its_last_log_lines(tmp_path, ray_head):
    address, _ = ray_head
    with pytest.raises(facemae.JobFailedError) as failed:
        facemae.submit("python -c \"import sys; print('about to fail'); sys.exit(3)\"", address=address,
                       working_dir=_working_dir(tmp_path), on_log=lambda line: None)
    assert failed.value.status == "FAILED" and "about to fail" in str(failed.value)
    assert failed.value.summary == (f"job {failed.value.submission_id} FAILED: Job entrypoint command failed "
                                    "with exit code 3")


@pytest.mark.ray
def test_facemae_submit_command_follows_the_log_and_fails_clearly(tmp_path, ray_head):
    address, env = ray_head
    cli = [str(BIN / "facemae"), "submit", "--address", address, "--working-dir", str(_working_dir(tmp_path)), "--"]
    out = subprocess.run([*cli, "python", "-c", "print(open('greeting.txt').read().strip())"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "hello from the cluster" in lines and json.loads(lines[-1])["status"] == "SUCCEEDED"
    out = subprocess.run([*cli, "python", "-c", "import sys; sys.exit(3)"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # after Ray's own INFO lines (upload, end of the log stream)
    assert last.startswith("facemae submit: error: job ") and last.endswith(" FAILED: Job entrypoint command "
                                                                             "failed with exit code 3")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_the_main_job_and_a_stopped_job_resubmitted_resumes(tmp_path, ray_head):
    """`ray job submit` of the main job; `ray job stop` part way, then the same submission with a nearer
    `train.max_steps`: it resumes from the last checkpoint, finishes, and leaves the checkpoint and the
    exported weights. The first run is far longer than the stop can take to land (with a 30-step first
    run, 7 of its 0.1-0.2 s steps passed between step 4 and the stop here; a faster machine could finish
    first), so "part way" holds on any machine."""
    import time

    address, env = ray_head
    runs = tmp_path / "runs"
    never = 100_000  # the first run's length: it is stopped long before

    def job(max_steps: int) -> list[str]:
        return ["--", "python", "jobs/train.py", "--config", "jobs/configs/train_smoke.yaml",
                "--set", f"train.storage_path={runs}", "--set", f"data.output={tmp_path / 'data'}",
                "--set", "loss.lambda_irm=0",  # plain MAE: no teacher run, the job mechanics at half the time
                "--set", f"train.max_steps={max_steps}", "--set", "train.checkpoint_every=3"]
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "data", "*.egg-info", "__pycache__"]})]
    first = f"facemae-stop-{uuid.uuid4().hex[:8]}"
    out = subprocess.run([*submit, "--submission-id", first, "--no-wait", *job(never)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = runs / "facemae-synthetic-smoke"

    def steps() -> list[int]:
        log = run_dir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []

    deadline = time.monotonic() + 600
    while max(steps(), default=0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    out = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, first], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "stopped" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    time.sleep(5)  # the stopped driver's workers go with it; nothing may add a line after this
    before = steps()
    assert 4 <= before[-1] < never, before
    last = before[-1] + 4  # past the last checkpoint (a multiple of 3 at most 3 back) by 4 to 7 steps
    out = subprocess.run([*submit, *job(last)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout + out.stderr)[-4000:]
    after = steps()
    assert after[:len(before)] == before
    start = after[len(before)] - 1
    assert start % 3 == 0 and before[-1] - 3 <= start <= before[-1], after  # the last checkpoint, not step 0
    assert after[len(before):] == list(range(start + 1, last + 1))
    checkpoint = run_dir / f"checkpoint_{last:08d}"
    assert f"checkpoint {checkpoint}" in out.stdout  # the job's own log, followed by the CLI
    assert (checkpoint / "latest").is_file() and (checkpoint / "progress.json").is_file()
    assert (run_dir / "export" / "weights.safetensors").is_file()
