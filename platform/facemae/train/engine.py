"""The one module that imports DeepSpeed (lazily): engine, optimizer, schedule, checkpoints.

On a machine without a GPU DeepSpeed picks its CPU accelerator and gloo by itself; with GPUs, nccl.
The optimizer is always a torch ``AdamW`` handed to DeepSpeed (a config optimizer without
``torch_adam`` JIT-compiles a fused CPU op for minutes; REFERENCE.md table, row E).
"""

from __future__ import annotations

import math
import os
import random
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from facemae.config import TrainConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

PRECISIONS = ("fp32", "bf16", "fp16")


def deepspeed_config(train: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for ``train`` (ZeRO stage, precision, batch sizes, clipping)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.global_batch(world_size),
        "zero_optimization": {"stage": train.zero_stage},
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 1 << 30,  # the loop logs; DeepSpeed's own prints would interleave
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
    }
    if train.zero_stage == 3:
        # Small models: gathering every parameter beats prefetch bookkeeping; big ones keep the defaults.
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 1e4})
    return config


def ensure_process_group() -> None:
    """A one-rank gloo group for the single-process local mode.

    Ray Train sets up the group (and RANK, WORLD_SIZE, ...) on its workers; without it DeepSpeed
    would fall back to MPI discovery and fail (REFERENCE.md section 2).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def lr_lambda(train: TrainConfig):
    """Linear warmup then cosine decay to ``min_lr_ratio``, as a multiplier of the peak lr."""
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(model: nn.Module, train: TrainConfig, *, world_size: int) -> "DeepSpeedEngine":
    """Wraps ``model`` in a DeepSpeed engine with AdamW and the warmup-cosine schedule.

    Biases and norm weights (1-D parameters) get no weight decay, as in MAE.
    """
    import deepspeed

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.peak_lr(world_size), betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, world_size=world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train)))
    return engine


def engine_dtype(engine: "DeepSpeedEngine") -> torch.dtype:
    """The dtype the engine's module computes in; inputs must be cast to it (bf16 / fp16)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: "DeepSpeedEngine", directory: str | os.PathLike, *, tag: str, rank: int,
         client_state: dict[str, Any]) -> None:
    """DeepSpeed's checkpoint of this rank (collective: every rank calls it) plus this rank's RNG."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    torch.save(rng_state(), Path(directory) / tag / f"rng_rank{rank:03d}.pt")


def load(engine: "DeepSpeedEngine", directory: str | os.PathLike, *, rank: int) -> dict[str, Any]:
    """Restores weights, optimizer moments, scheduler, step counter and this rank's RNG.

    Returns:
        The ``client_state`` saved with the checkpoint.

    Raises:
        ValueError: ``directory`` holds no DeepSpeed checkpoint.
    """
    path, client_state = engine.load_checkpoint(str(directory))
    if path is None:
        raise ValueError(f"{directory} holds no DeepSpeed checkpoint (no 'latest' tag file); pass the folder "
                         "of a checkpoint this platform wrote")
    rng_file = Path(path).parent / f"rng_rank{rank:03d}.pt"  # path is the tag's model-states file
    if rng_file.exists():  # a checkpoint of another world size has no file for the new ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def state_snapshot(engine: "DeepSpeedEngine") -> dict[str, Any]:
    """Everything a resume must restore, as plain tensors: module weights, optimizer state (this
    rank's ZeRO partition), scheduler, step counters and RNG. For audits (``train.debug_state_dir``)."""
    return {"module": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "rng": rng_state()}
