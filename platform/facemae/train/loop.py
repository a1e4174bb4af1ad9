"""The training loop every worker runs, the same on Ray Train workers and in the local mode.

The loop talks to its surroundings through a small context (STYLE.md 6): ``ctx.batches(epoch)``,
``ctx.restore_dir()``, ``ctx.report(metrics, checkpoint)``. :class:`facemae.train.context.RayContext`
serves clusters, :class:`facemae.train.context.LocalContext` one process with no Ray at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from facemae.config import Config
from facemae.train import engine as ds
from facemae.train.context import WorkerContext
from facemae.train.tasks import build_task
from facemae.train.validation import Validator

PROGRESS = "progress.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message gives the step and the loss components."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already trained on


def run(config: Config, ctx: WorkerContext) -> Progress:
    """Trains ``config.train.task`` until ``config.train.max_steps`` optimizer steps.

    Resumes from ``ctx.restore_dir()`` when it names a checkpoint (weights, optimizer moments,
    scheduler, step counter, RNG, data position to the epoch and micro-batch count).
    """
    train = config.train
    torch.manual_seed(train.seed + ctx.rank)
    module = build_task(config, num_classes=ctx.num_classes, device=ctx.device)
    engine = ds.build_engine(module, train, world_size=ctx.world_size)
    progress = _restore(engine, ctx)
    dtype = ds.engine_dtype(engine)
    validator = Validator.create(config, teacher=getattr(module, "teacher", None), device=ctx.device)
    last: dict[str, Any] = {}
    while progress.step < train.max_steps:
        seen = 0
        for batch, wait_s in _timed(ctx.batches(progress.epoch, skip=progress.batch_in_epoch)):
            seen += 1
            started = time.perf_counter()
            batch = {k: v.to(ctx.device, dtype if v.is_floating_point() and k == "image" else v.dtype)
                     for k, v in batch.items()}
            module.step = progress.step  # IRM's schedule (loss.irm_start / irm_ramp) reads it
            out = engine(batch)
            _check_finite(out, step=progress.step)
            engine.backward(out["loss"])
            engine.step()
            progress.batch_in_epoch += 1
            boundary = engine.is_gradient_accumulation_boundary()
            progress.step += boundary
            ctx.observe(batch, out, step=progress.step, step_s=time.perf_counter() - started, wait_s=wait_s)
            if not boundary:
                continue
            last = _log_metrics(out, engine, progress)
            validated = validator is not None and validator.due(progress.step)
            if validated:
                last.update(validator(engine.module.mae, dtype=dtype))
            if progress.step % train.checkpoint_every == 0 or progress.step == train.max_steps:
                _checkpoint(engine, ctx, progress, last, batch)
            elif progress.step % train.log_every == 0 or validated:
                ctx.report(last, None)
            if progress.step >= train.max_steps:
                break
        else:
            if seen == 0 and progress.batch_in_epoch == 0:
                raise ValueError("the training split yields no full batch per worker; lower train.micro_batch "
                                 "or train.num_workers, or ingest more images")
            progress.epoch += 1
            progress.batch_in_epoch = 0
    return progress


def _timed(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Yields each batch with the seconds the loop waited for it (data-wait time)."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def _check_finite(out: dict[str, torch.Tensor], *, step: int) -> None:
    if not torch.isfinite(out["loss"]).all():
        parts = {k: float(v) for k, v in out.items()}
        raise NonFiniteLossError(f"loss is not finite at step {step + 1}: {parts}; lower train.base_lr, raise "
                                 "train.warmup_steps or use precision fp32/bf16 instead of fp16")


def _log_metrics(out: dict[str, torch.Tensor], engine: Any, progress: Progress) -> dict[str, Any]:
    metrics = {k: float(v.detach().float()) for k, v in out.items()}
    metrics.update(step=progress.step, epoch=progress.epoch, lr=engine.get_lr()[0])
    return metrics


def _checkpoint(engine: Any, ctx: WorkerContext, progress: Progress, metrics: dict[str, Any],
                batch: dict[str, torch.Tensor]) -> None:
    tag = f"step{progress.step:08d}"
    with ctx.checkpoint_dir(progress.step) as directory:
        ds.save(engine, directory, tag=tag, rank=ctx.rank, client_state={"progress": asdict(progress)})
        ctx.saved(engine, directory, progress.step)
        ctx.write_preview(engine, batch, Path(directory))
        if ctx.rank == 0:
            (Path(directory) / PROGRESS).write_text(json.dumps(asdict(progress)) + "\n")
        ctx.report(metrics, directory)


def _restore(engine: Any, ctx: WorkerContext) -> Progress:
    with ctx.restore_dir() as directory:
        if directory is None:
            return Progress()
        client_state = ds.load(engine, directory, rank=ctx.rank)
        progress = Progress(**client_state["progress"])
        ctx.restored(engine, progress.step)
        return progress

