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
from facemae.train.guard import DivergedError, NonFiniteLossError, StepGuard, global_loss, probe_loss
from facemae.train.tasks import build_task
from facemae.train.validation import Validator

PROGRESS = "progress.json"
__all__ = ["DivergedError", "NonFiniteLossError", "Progress", "run"]


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
    dtype = ds.engine_dtype(engine)
    validator = Validator.create(config, teacher=getattr(module, "teacher", None), device=ctx.device)
    guard = StepGuard(mode=train.nonfinite, max_nonfinite=train.max_nonfinite, diverge_factor=train.diverge_factor)
    progress = _restore(engine, ctx, guard)
    try:
        _train(config, ctx, engine, module, progress, validator=validator, guard=guard, dtype=dtype)
    finally:
        ctx.close()
    return progress


def _train(config: Config, ctx: WorkerContext, engine: Any, module: torch.nn.Module, progress: Progress, *,
           validator: Validator | None, guard: StepGuard, dtype: torch.dtype) -> None:
    """Steps until ``train.max_steps``, checkpointing and reporting on the way."""
    train = config.train
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
            loss = global_loss(out["loss"], world_size=ctx.world_size)  # every rank decides alike
            progress.batch_in_epoch += 1
            if not guard.admit(loss, _parts(out), step=progress.step):
                continue  # skipped before backward: no gradient of it reaches the weights
            boundary = engine.is_gradient_accumulation_boundary()  # asked before step(), which moves it on
            lr, scale = engine.get_lr()[0], ds.loss_scale(engine)  # what this step runs with: step() moves both
            engine.backward(out["loss"])
            engine.step()
            applied = boundary and engine.was_step_applied()
            head = module.step_head(lr=lr, loss_scale=scale, applied=applied) if boundary else {}
            if boundary and not applied:
                guard.overflowed(step=progress.step)  # DeepSpeed skipped it: the step counter stays
            elif applied:
                guard.accepted(loss)
            progress.step += applied
            ctx.observe(batch, out, step=progress.step, step_s=time.perf_counter() - started, wait_s=wait_s)
            if not applied:
                continue
            last = {**_log_metrics(out, engine, progress), **head, **guard.counters()}
            validated = validator is not None and validator.due(progress.step)
            if validated:
                last.update(validator(engine.module.mae, dtype=dtype))
            if progress.step % train.checkpoint_every == 0 or progress.step == train.max_steps:
                guard.check_state(probe_loss(engine, batch, world_size=ctx.world_size), step=progress.step)
                _checkpoint(engine, ctx, progress, last, guard=guard)
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


def _timed(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Yields each batch with the seconds the loop waited for it (data-wait time)."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def _parts(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """This rank's loss components, for an error message."""
    return {k: float(v.detach().float()) for k, v in out.items()}


def _log_metrics(out: dict[str, torch.Tensor], engine: Any, progress: Progress) -> dict[str, Any]:
    metrics = {k: float(v.detach().float()) for k, v in out.items()}
    metrics.update(step=progress.step, epoch=progress.epoch, lr=engine.get_lr()[0])
    return metrics


def _checkpoint(engine: Any, ctx: WorkerContext, progress: Progress, metrics: dict[str, Any], *,
                guard: StepGuard) -> None:
    tag = f"step{progress.step:08d}"
    with ctx.checkpoint_dir(progress.step) as directory:
        ds.save(engine, directory, tag=tag, rank=ctx.rank,
                client_state={"progress": asdict(progress), "guard": guard.state_dict()})
        engine.module.save_head(Path(directory) / tag)  # a Partial FC shard, beside DeepSpeed's files
        ctx.saved(engine, directory, progress.step)
        ctx.write_preview(engine, Path(directory))
        if ctx.rank == 0:
            (Path(directory) / PROGRESS).write_text(json.dumps(asdict(progress)) + "\n")
        ctx.report(metrics, directory)
    ctx.upload_logs()


def _restore(engine: Any, ctx: WorkerContext, guard: StepGuard) -> Progress:
    with ctx.restore_dir() as directory:
        if directory is None:
            return Progress()
        client_state = ds.load(engine, directory, rank=ctx.rank)
        engine.module.load_head(ds.tag_folder(directory))  # resliced when the worker count changed
        progress = Progress(**client_state["progress"])
        if "guard" in client_state:  # checkpoints written before the guard existed have none
            guard.load_state_dict(client_state["guard"])
        ctx.restored(engine, progress.step)
        return progress

