"""What the engine trains: one ``nn.Module`` per task whose ``forward(batch)`` is that task's step.

Routing the whole step through ``engine(batch)`` keeps DeepSpeed in charge of every parameter
access (ZeRO-3 gathers on forward hooks), while the math stays in :mod:`facemae.train.steps`.
The frozen IRM teacher is held outside the module's parameters: it is not trained, not sharded and
not written into training checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facemae.config import Config
from facemae.losses.margin import build_head
from facemae.losses.partial_fc import PartialFC, RowAdamW, load_shard, save_shard
from facemae.models.fr import IResNet, fold_batchnorm
from facemae.models.registry import build_fr, build_mae
from facemae.models.weights import load_fr_backbone, read_head, read_weights
from facemae.train.steps import fr_step, freeze_teacher, mae_irm_step, partial_fc_step


class FP32Teacher(nn.Module):
    """Runs a frozen fp32 teacher on inputs of any float dtype (bf16/fp16 engines), its BatchNorms folded
    into the layers before them (:func:`~facemae.models.fr.fold_batchnorm`: the same function, fewer passes)."""

    def __init__(self, teacher: IResNet) -> None:
        super().__init__()
        self.net = fold_batchnorm(teacher)
        freeze_teacher(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


class MAETask(nn.Module):
    """FaceMAE + IRM: ``forward(batch) -> {loss, recon_loss, irm_loss}``."""

    def __init__(self, config: Config, teacher: nn.Module | None) -> None:
        super().__init__()
        self.mae = build_mae(config.model.mae, norm_pix_loss=config.loss.norm_pix_loss)
        self.__dict__["teacher"] = teacher  # not a submodule: see the module docstring
        self.config = config
        self.step: int | None = None  # the loop sets the optimizer step before each forward (IRM schedule)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return mae_irm_step(self.mae, self.teacher, batch, self.config, step=self.step)

    def weights(self) -> nn.Module:
        return self.mae

    def step_head(self, *, lr: float, loss_scale: float, applied: bool) -> dict[str, float]:
        return {}  # every trained parameter is the engine's

    def save_head(self, tag_dir: str | Path) -> None:
        pass

    def load_head(self, tag_dir: str | Path) -> None:
        pass


class FRTask(nn.Module):
    """Face recognition with a margin head: ``forward(batch) -> {loss, accuracy}``.

    With ``model.head: full`` the class centres are a submodule, trained, averaged and checkpointed by the
    engine like the backbone. With ``partial_fc`` each worker holds its shard of them outside the engine's
    parameters (DeepSpeed would average and broadcast them, mixing the shards): :meth:`step_head` steps it
    with its own optimizer at the engine's boundaries, :meth:`save_head` / :meth:`load_head` keep it in the
    checkpoint beside DeepSpeed's files.
    """

    def __init__(self, config: Config, *, backbone: str, num_classes: int) -> None:
        super().__init__()
        self.backbone = build_fr(backbone, embedding_size=config.model.embedding_size)
        self.config = config
        self.step: int | None = None  # the loop sets the optimizer step before each forward (Partial FC's draws)
        loss, model = config.loss, config.model
        if model.head == "partial_fc":
            shard = PartialFC(model.embedding_size, num_classes, margin=loss.margin, s=loss.s, m=loss.margin_m,
                              sample_rate=model.partial_fc.sample_rate, seed=config.train.seed)
            self.__dict__["head"] = shard  # not a submodule: see the class docstring
            self.head_optimizer: RowAdamW | None = RowAdamW(shard, weight_decay=config.train.weight_decay)
        else:
            self.head = build_head(loss.margin, model.embedding_size, num_classes, s=loss.s, m=loss.margin_m)
            self.head_optimizer = None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.head_optimizer is None:
            return fr_step(self.backbone, self.head, batch, self.config)
        return partial_fc_step(self.backbone, self.head, batch, step=self.step or 0)

    def weights(self) -> nn.Module:
        return self.backbone

    def step_head(self, *, lr: float, loss_scale: float, applied: bool) -> dict[str, float]:
        """At each of the engine's accumulation boundaries: steps the Partial FC shard at the engine's lr (the
        same schedule), its gradient unscaled by the fp16 ``loss_scale``, clipped to ``train.grad_clip`` over
        the whole head; nothing moves where the engine skipped the step. Collective. ``{}`` for a full head."""
        if self.head_optimizer is None:
            return {}
        done = self.head_optimizer.step(lr=lr, grad_scale=loss_scale, clip=self.config.train.grad_clip,
                                        skip=not applied)
        return {"head_grad_norm": done.grad_norm, "head_rows": float(done.rows)}

    def save_head(self, tag_dir: str | Path) -> None:
        if self.head_optimizer is not None:
            save_shard(self.head, self.head_optimizer, tag_dir)

    def load_head(self, tag_dir: str | Path) -> None:
        if self.head_optimizer is not None:
            load_shard(self.head, self.head_optimizer, tag_dir)

    def init_head(self, centres: torch.Tensor) -> None:
        """Starts the class centres from an exported ``[C, D]`` head: all of them, or this worker's range."""
        rows = centres if self.head_optimizer is None else centres[self.head.start:self.head.stop]
        with torch.no_grad():
            self.head.weight.copy_(rows)


def build_task(config: Config, *, num_classes: int, device: torch.device) -> nn.Module:
    """The module the engine wraps, for ``config.train.task``.

    Raises:
        ValueError: FaceMAE with IRM but no teacher weights configured.
    """
    if config.train.task == "fr":
        task = FRTask(config, backbone=config.train.fr_backbone or config.model.fr, num_classes=num_classes)
        _initialise(task, config)
        if task.head_optimizer is not None:  # outside the module's parameters: the engine does not move it
            task.head.to(device)
            task.head_optimizer.to(device)
        return task
    config.check_mae_patch_size()
    teacher = None
    if config.loss.lambda_irm > 0:
        if not config.train.teacher:
            raise ValueError("FaceMAE with loss.lambda_irm > 0 needs a frozen teacher: set train.teacher to the "
                             "weights.safetensors of an FR run (train.task=fr), or loss.lambda_irm=0 for plain MAE")
        teacher = FP32Teacher(load_fr_backbone(config.train.teacher)).to(device)
    task = MAETask(config, teacher)
    _initialise(task, config)
    return task


def _initialise(task: nn.Module, config: Config) -> None:
    """Loads ``train.init_weights`` (and, for FR with ``train.init_head``, the head beside them) into a new
    task, before the engine copies its parameters; a checkpoint the run restores overwrites them."""
    train = config.train
    if not train.init_weights:
        return
    state, _ = read_weights(train.init_weights)
    task.weights().load_state_dict(state)
    if train.task == "fr" and train.init_head:
        task.init_head(read_head(train.init_weights))
