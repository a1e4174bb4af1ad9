"""Checks that need a CUDA device: skipped on CPU machines (CI), run where a GPU is lent.

    python -m pytest -m gpu tests/test_gpu.py

fp16 trains only on a GPU (DeepSpeed's CPU accelerator has no fp16 engine), so its loss scaler's overflow
path is checked here: a real Ray Train worker on the GPU, a real DeepSpeed ZeRO-2 fp16 engine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import train_in_subprocess

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = ["model.mae=facemae_vit_tiny_p8", "model.fr=fr_tiny", "model.teacher=fr_tiny", "model.embedding_size=64",
        "train.micro_batch=8", "train.metrics_port=0", "train.warmup_steps=2", "train.log_every=1",
        "train.num_workers=1", "train.use_gpu=true", "train.cpus_per_worker=1", "train.val_every=0",
        "ray.address=null", "loss.lambda_irm=0", "train.zero_stage=2"]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return train_in_subprocess(*TINY, f"train.storage_path={tmp_path}", *overrides)


def _saved(run_dir: Path) -> list[str]:
    """What a run left that a later step could load: checkpoints and exported weights."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.name in ("progress.json", "model.safetensors") or p.suffix == ".safetensors")


def test_fp16_zero2_at_a_huge_learning_rate_counts_overflow_skips_stops_and_saves_nothing(tmp_path, tiny_dataset):
    out = _train(tmp_path, f"data.output={tiny_dataset}", "name=fp16", "train.precision=fp16",
                 "train.base_lr=1e6", "train.diverge_factor=0", "train.max_nonfinite=3", "train.max_steps=20",
                 "train.checkpoint_every=1")
    report = out.stderr[-4000:]
    assert out.returncode != 0, report
    # Either guard may stop it first: fp16's ruined weights give a NaN probe loss after the step (seen on an
    # H200: "the weights after step 1 give a non-finite loss (nan)"), or the loss scaler skips steps for
    # gradient overflow until max_nonfinite in a row.
    assert ("NonFiniteLossError: the weights after step" in out.stderr
            or "the last for gradient overflow" in out.stderr), report
    assert _saved(tmp_path / "fp16") == [], report
    metrics = tmp_path / "fp16" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert all(m["step"] <= 1 + m.get("overflow_skipped", 0) for m in lines), lines  # skipped steps don't count

def test_bf16_zero2_trains_on_the_gpu_and_exports_finite_weights(tmp_path, tiny_dataset):
    out = _train(tmp_path, f"data.output={tiny_dataset}", "name=bf16", "train.precision=bf16",
                 "train.base_lr=0.016", "train.max_steps=4", "train.checkpoint_every=4")
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["metrics"]["step"] == 4 and result["metrics"]["overflow_skipped"] == 0
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(m["gpu_mem_peak_gib"] > 0 for m in lines)
    from facemae.models.weights import read_weights

    state, _ = read_weights(result["weights"])
    assert all(torch.isfinite(v.float()).all() for v in state.values())
