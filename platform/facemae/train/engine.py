"""The one module that imports DeepSpeed (lazily): engine, optimizer, schedule, checkpoints.

On a machine without a GPU DeepSpeed picks its CPU accelerator and gloo by itself; with GPUs, nccl.
The optimizer is always a torch ``AdamW`` handed to DeepSpeed (a config optimizer without
``torch_adam`` JIT-compiles a fused CPU op for minutes; REFERENCE.md table, row E).

DeepSpeed unpickles checkpoints with ``weights_only=False``, so a crafted ``.pt`` file would run its
code on load. :func:`check_checkpoint` reads every file of a folder with ``weights_only=True`` first
and refuses any that holds more than tensors, containers and the few types a checkpoint is made of.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from facemae.config import TrainConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

PRECISIONS = ("fp32", "bf16", "fp16")
LATEST = "latest"  # DeepSpeed's file naming the checkpoint's tag folder
_TAG = re.compile(r"[\w.-]+")  # a tag DeepSpeed or this platform writes: one folder name, no separators
_GLOBAL = re.compile(r"GLOBAL (\S+)")  # how torch's weights-only unpickler names a refused global
_ZIP_MAGIC = b"PK\x03\x04"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.save's archive format; DeepSpeed writes it too (checkpoint_serialization)


class UntrustedCheckpointError(ValueError):
    """A checkpoint file that is not what DeepSpeed or this platform writes, so loading it could run
    code; or a ``latest`` tag or link that leads out of the checkpoint folder. The message names the file."""


def import_deepspeed() -> ModuleType:
    """``deepspeed``, imported without the MLflow its autotuner imports as the package loads.

    ``deepspeed.autotuning.autotuner`` runs ``import mlflow`` at import time for the autotuner's own
    logging (``deepspeed --autotuning``, which this platform never runs). With MLflow installed beside
    it, that was 1.8 of the 2.4 s ``import deepspeed`` took in every training process. The import is
    refused for that moment, so the autotuner records ``has_mlflow = False``; MLflow imports as usual
    afterwards, and a process that had imported it already is left as it is.
    """
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # ``import mlflow`` raises ImportError meanwhile
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", False) is None:  # not if the import above loaded it another way
                del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


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


@contextlib.contextmanager
def own_build_tools() -> Iterator[None]:
    """The environment's own ``ninja`` and extension cache while DeepSpeed loads its CPU ops.

    DeepSpeed compiles its shared-memory op on first use (35-80 s on 2 cores) with the first ``ninja`` on
    PATH, into torch's cache that every environment of the user shares (``~/.cache/torch_extensions``),
    and ninja recompiles it whenever the last build's ninja or command differ: the environment's ninja
    1.13 and a system 1.11 each read the other's build log as stale, and two environments differ in
    every include path. Jobs started as ``.venv/bin/python``, from an activated environment or on a Ray
    cluster, ``scripts/setup.sh``'s prebuild and a second checkout took turns rebuilding it. Here the
    interpreter's ``bin`` folder comes first on PATH, as in an activated environment, and a virtual
    environment keeps the op it built against its own torch (``<env>/torch_extensions``); a
    ``TORCH_EXTENSIONS_DIR`` already set, or an environment that is not writable, keeps torch's choice.
    """
    saved = {key: os.environ.get(key) for key in ("PATH", "TORCH_EXTENSIONS_DIR")}
    bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lr_lambda(train: TrainConfig):
    """Linear warmup then cosine decay to ``min_lr_ratio``, as a multiplier of the peak lr."""
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def adamw(model: nn.Module, train: TrainConfig, *, world_size: int) -> torch.optim.AdamW:
    """The training optimizer: AdamW at ``train``'s peak lr, betas (0.9, 0.95) as in MAE; biases and norm
    weights (1-D parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=train.peak_lr(world_size), betas=(0.9, 0.95))


def build_engine(model: nn.Module, train: TrainConfig, *, world_size: int) -> "DeepSpeedEngine":
    """Wraps ``model`` in a DeepSpeed engine with :func:`adamw` and the warmup-cosine schedule."""
    deepspeed = import_deepspeed()
    optimizer = adamw(model, train, world_size=world_size)
    with own_build_tools():  # initialize builds the CPU communication op on first use
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


def loss_scale(engine: "DeepSpeedEngine") -> float:
    """The factor the engine's backward multiplies the loss by: fp16's dynamic loss scale, else 1."""
    if not engine.fp16_enabled():
        return 1.0
    return float(getattr(engine.optimizer, "loss_scale", None) or engine.optimizer.cur_scale)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA), as ints, lists and tensors only:
    ``torch.load(weights_only=True)`` reads them back without allowing any other type."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned (numpy's keys as a list, or as an array in older files)."""
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

    Every file of the folder is checked (:func:`check_checkpoint`) before DeepSpeed unpickles any.

    Returns:
        The ``client_state`` saved with the checkpoint.

    Raises:
        UntrustedCheckpointError: A file of the folder could run code when loaded (the message names it).
        ValueError: ``directory`` holds no DeepSpeed checkpoint.
    """
    tag_dir = check_checkpoint(directory)
    # The checked folder and tag, not `latest` read again: the files loaded are the files checked.
    with weights_only_loads():  # and DeepSpeed's own loads allow no more: a file swapped since is refused too
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise ValueError(f"{tag_dir} holds no DeepSpeed model states; pass the folder of a checkpoint this "
                         "platform wrote")
    rng_file = tag_dir / f"rng_rank{rank:03d}.pt"
    if rng_file.exists():  # a checkpoint of another world size has no file for the new ranks
        set_rng_state(read_checkpoint_file(rng_file))
    return client_state or {}


def _checkpoint_globals() -> list[Any]:
    """The only non-tensor types a checkpoint file of this platform holds; the allow-list of every load.

    Found by writing checkpoints of ZeRO 0-3 in fp32 and bf16 and listing what
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` names; fp16 (GPU only) adds its loss scaler.
    """
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler,  # ZeRO 1-3 optimizer states: the static scaler of fp32 and bf16 runs
            DynamicLossScaler,  # ZeRO 1-3 optimizer states of fp16 runs (fp16/loss_scaler.py, CreateLossScaler)
            ZeroStageEnum,  # ZeRO 1-3 optimizer states: the stage that wrote them
            fragment_address,  # ZeRO 1-2 optimizer states: each parameter's slice of the flat partition
            # RNG files written before rng_state() kept numpy's keys as a list held a uint32 array:
            np.empty(0).__reduce__()[0],  # numpy's array reconstructor (numpy._core; numpy.core before 2.0)
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load`` of one checkpoint file that builds tensors, containers and the types of
    :func:`_checkpoint_globals` only, so the file cannot run code.

    Args:
        mmap: Leave tensor data on disk (zip archives only); checking a file then costs its pickle, not its size.
    """
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included (which pass ``weights_only=False``), builds only
    what :func:`read_checkpoint_file` allows. Closes the window between :func:`check_checkpoint` and the
    load, in which a file could be swapped. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is read at each load."""
    before = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = before


def check_checkpoint(directory: str | os.PathLike) -> Path:
    """Refuses a checkpoint folder whose files could run code when DeepSpeed or this module loads them.

    Every ``*.pt`` file of the tag folder that ``latest`` names is read with :func:`read_checkpoint_file`.
    DeepSpeed itself unpickles with ``weights_only=False``: call this before every load of a folder.

    Returns:
        The tag folder.

    Raises:
        UntrustedCheckpointError: A file names a global no checkpoint holds, is not a torch.save archive,
            or links out of the folder; or ``latest`` names no plain folder of it.
        ValueError: ``directory`` has no ``latest`` tag file, or no folder of that tag.
    """
    root = Path(directory).resolve()
    tag_dir = tag_folder(root)
    for path in sorted(tag_dir.rglob("*.pt")):
        _check_file(_inside(path, root))
    return tag_dir


def tag_folder(directory: str | os.PathLike) -> Path:
    """The tag folder ``latest`` names in a checkpoint folder :func:`check_checkpoint` (or :func:`load`) has
    checked already; its files are not read again.

    Raises:
        UntrustedCheckpointError, ValueError: As :func:`check_checkpoint`, for the tag.
    """
    root = Path(directory).resolve()
    return _inside(root / _read_tag(root), root)


def _inside(path: Path, root: Path) -> Path:
    """``path``, unless it is a link that leads out of ``root``."""
    if not path.resolve().is_relative_to(root):
        raise UntrustedCheckpointError(f"{path}: links to {path.resolve()}, outside the checkpoint folder {root}; "
                                       "do not load it, resume from another checkpoint")
    return path


def _read_tag(root: Path) -> str:
    latest = root / LATEST
    if not latest.is_file():
        raise ValueError(f"{root} holds no DeepSpeed checkpoint (no '{LATEST}' tag file); pass the folder of a "
                         "checkpoint this platform wrote")
    tag = latest.read_text().strip()
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise UntrustedCheckpointError(f"{latest}: names the tag {tag[:80]!r}, not a folder name like "
                                       "step00000100; do not load it, resume from another checkpoint")
    if not (root / tag).is_dir():
        raise ValueError(f"{latest}: names the tag {tag!r} but {root} has no such folder; the checkpoint is "
                         "incomplete, resume from another one")
    return tag


def _check_file(path: Path) -> None:
    """Raises :class:`UntrustedCheckpointError` unless ``path`` loads as a checkpoint file without code."""
    refuse, advice = f"{path}: not a checkpoint this platform wrote", "do not load it, resume from another checkpoint"
    if not path.is_file() or _head(path) != _ZIP_MAGIC:
        raise UntrustedCheckpointError(f"{refuse}: a bare pickle or other bytes, not a torch.save archive; {advice}")
    try:
        read_checkpoint_file(path, mmap=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met something it may not build
        found = _GLOBAL.search(str(exc))
        what = f"it names {found.group(1)}, which" if found else "it holds an object that"
        raise UntrustedCheckpointError(f"{refuse}: {what} a checkpoint never holds; {advice}") from None
    except (RuntimeError, EOFError) as exc:  # torch's zip reader on a truncated or damaged archive
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UntrustedCheckpointError(f"{path}: not a readable checkpoint file ({reason}); {advice}") from None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC))


def state_snapshot(engine: "DeepSpeedEngine") -> dict[str, Any]:
    """Everything a resume must restore, as plain tensors: module weights, optimizer state (this
    rank's ZeRO partition), scheduler, step counters and RNG. For audits (``train.debug_state_dir``)."""
    return {"module": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "rng": rng_state()}
