"""Divergence: non-finite losses, DeepSpeed's skipped steps and exploding losses, injected on purpose.

Each run diverges a real DeepSpeed engine in a process of its own (local mode) and then scans what it
wrote: no checkpoint and no exported weights may come from a diverged state.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_in_subprocess

from facemae.data.shards import Manifest, read_manifest, write_shard
from facemae.losses.irm import view_name
from facemae.train.guard import DivergedError, NonFiniteLossError, StepGuard

TINY = ["model.mae=facemae_vit_tiny_p8", "model.fr=fr_tiny", "model.teacher=fr_tiny", "model.embedding_size=64",
        "train.micro_batch=8", "train.metrics_port=0", "train.base_lr=0.016", "train.warmup_steps=2",
        "train.num_workers=0", "train.log_every=1"]


def test_guard_stops_or_skips_non_finite_losses_and_counts_them():
    stop = StepGuard(mode="stop", max_nonfinite=3, diverge_factor=100)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 5: \{'loss': nan\}.*nonfinite=skip"):
        stop.admit(float("nan"), {"loss": float("nan")}, step=4)
    skip = StepGuard(mode="skip", max_nonfinite=2, diverge_factor=100)
    assert skip.admit(1.0, {}, step=0) and skip.level() is None  # nothing accepted yet: no level
    skip.accepted(1.0)
    assert not skip.admit(float("inf"), {}, step=1) and not skip.admit(float("nan"), {}, step=1)
    skip.accepted(0.9)  # a good step ends the run of bad ones
    skip.overflowed(step=2)
    assert not skip.admit(float("nan"), {}, step=2)
    assert skip.counters() == {"nonfinite_skipped": 3, "overflow_skipped": 1}
    with pytest.raises(NonFiniteLossError, match=r"3 micro-batches in a row skipped.*max_nonfinite=2"):
        skip.overflowed(step=2)


def test_guard_level_is_a_running_median_floored_by_the_initial_loss():
    guard = StepGuard(mode="stop", max_nonfinite=3, diverge_factor=100)
    for loss in (40.0, 30.0, 20.0, 10.0, 5.0):  # initial median 20: floor 2
        guard.accepted(loss)
    assert guard.level() == 20.0
    for _ in range(60):  # a well-fitted run: the window forgets the start, the floor does not
        guard.accepted(0.01)
    assert guard.level() == pytest.approx(2.0)
    assert guard.admit(150.0, {}, step=70)  # a spike a healthy ArcFace run can show: not divergence
    with pytest.raises(DivergedError, match=r"step 71: loss 201 is over 100x its running level 2"):
        guard.admit(201.0, {}, step=70)
    with pytest.raises(DivergedError, match="not checkpointed"):
        guard.check_state(1e21, step=70)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        guard.check_state(float("inf"), step=70)
    again = StepGuard(mode="stop", max_nonfinite=3, diverge_factor=100)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # as a checkpoint keeps it
    assert again.level() == guard.level() and again.counters() == guard.counters()
    off = StepGuard(mode="stop", max_nonfinite=3, diverge_factor=0)
    off.accepted(1.0)
    assert off.admit(1e30, {}, step=1)


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return train_in_subprocess(*TINY, f"train.storage_path={tmp_path}", *overrides)


def _written(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []


def test_an_fp32_run_at_a_huge_learning_rate_stops_before_checkpointing_its_ruined_weights(tmp_path, tiny_dataset):
    """The reported case: lr 1e6 in fp32 keeps the loss finite (1e19) while the weights are ruined;
    DeepSpeed then skipped every step and the run exported them. Now the step-1 checkpoint is refused."""
    out = _train(tmp_path, f"data.output={tiny_dataset}", "name=huge", "loss.lambda_irm=0", "train.zero_stage=2",
                 "train.base_lr=1e6", "train.max_steps=6", "train.checkpoint_every=1")
    assert out.returncode != 0
    assert "DivergedError: training diverged at step 1: the loss of its weights (not checkpointed)" in out.stderr
    assert _written(tmp_path / "huge") == []  # no checkpoint, no export, not even a metrics line


def test_deepspeed_overflow_skips_count_and_do_not_advance_the_step(tmp_path, tiny_dataset):
    """With the divergence check off, DeepSpeed's ZeRO-2 overflow check skips the ruined steps: each one
    counts as non-finite, the step counter stays, and max_nonfinite in a row stop the run."""
    out = _train(tmp_path, f"data.output={tiny_dataset}", "name=ovf", "loss.lambda_irm=0", "train.zero_stage=2",
                 "train.base_lr=1e6", "train.diverge_factor=0", "train.max_nonfinite=3", "train.max_steps=6",
                 "train.checkpoint_every=100")
    assert out.returncode != 0
    assert ("NonFiniteLossError: 4 micro-batches in a row skipped, the last for gradient overflow, optimizer "
            "step 2 skipped by DeepSpeed") in out.stderr
    lines = [json.loads(x) for x in (tmp_path / "ovf" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1]
    assert _written(tmp_path / "ovf") == ["metrics.jsonl"]


def _with_teacher_embeddings(source: str, out: Path, *, nan_row: int) -> str:
    """``source``'s shards with stored teacher embeddings (random unit vectors), one row's all NaN."""
    manifest, rng = read_manifest(source), np.random.default_rng(0)
    splits, row = {}, 0
    for split, shards in manifest.splits.items():
        splits[split] = []
        for s in shards:
            table = pq.read_table(Path(source) / s.file)
            emb = rng.standard_normal((table.num_rows, 64)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            if split == "train" and row <= nan_row < row + table.num_rows:
                emb[nan_row - row] = np.nan
            row += table.num_rows if split == "train" else 0
            column = pa.array(list(emb), type=pa.list_(pa.float32()))
            splits[split].append(write_shard(out, s.file, table.append_column("teacher_emb", column)))
    source_info = {**manifest.source, "embedded_from": source, "teacher": "random vectors",
                   "teacher_view": view_name("blur", 1.5)}
    Manifest(kind=manifest.kind, source=source_info, splits=splits, report=manifest.report,
             settings=manifest.settings, identity_names=manifest.identity_names).write(out)
    return str(out)


def test_skip_mode_trains_past_a_nan_batch_and_counts_it(tmp_path, tiny_dataset, tiny_teacher):
    """One stored teacher embedding is NaN: its batch's IRM loss is NaN. ``skip`` leaves it out before
    backward (the weights stay finite) and counts it; ``stop`` names the step."""
    embedded = _with_teacher_embeddings(tiny_dataset, tmp_path / "emb", nan_row=37)
    # 96 training faces, 12 batches of 8: 11 steps use all of epoch 0, the NaN batch skipped once.
    common = [f"data.output={embedded}", f"train.teacher={tiny_teacher}", "loss.lambda_irm=1", "loss.irm_start=0",
              "loss.irm_ramp=0", "train.max_steps=11", "train.checkpoint_every=11"]
    stopped = _train(tmp_path, *common, "name=stop")
    assert stopped.returncode != 0 and "NonFiniteLossError: loss is not finite at step" in stopped.stderr
    assert "'irm_loss': nan" in stopped.stderr
    skipped = _train(tmp_path, *common, "name=skip", "train.nonfinite=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    result = json.loads(skipped.stdout.strip().splitlines()[-1])
    assert result["metrics"]["step"] == 11 and result["metrics"]["nonfinite_skipped"] == 1
    assert result["metrics"]["overflow_skipped"] == 0
    from facemae.models.weights import read_weights

    state, _ = read_weights(result["weights"])
    assert all(torch.isfinite(v).all() for v in state.values())
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 12)) and all(math.isfinite(m["loss"]) for m in lines)
