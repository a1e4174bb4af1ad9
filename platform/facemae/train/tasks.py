"""What the engine trains: one ``nn.Module`` per task whose ``forward(batch)`` is that task's step.

Routing the whole step through ``engine(batch)`` keeps DeepSpeed in charge of every parameter
access (ZeRO-3 gathers on forward hooks), while the math stays in :mod:`facemae.train.steps`.
The frozen IRM teacher is held outside the module's parameters: it is not trained, not sharded and
not written into training checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from facemae.config import Config
from facemae.losses.margin import build_head
from facemae.models.fr import IResNet, fold_batchnorm
from facemae.models.registry import build_fr, build_mae
from facemae.models.weights import load_fr_backbone
from facemae.train.steps import fr_step, freeze_teacher, mae_irm_step


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


class FRTask(nn.Module):
    """Face recognition with a margin head: ``forward(batch) -> {loss, accuracy}``."""

    def __init__(self, config: Config, *, backbone: str, num_classes: int) -> None:
        super().__init__()
        self.backbone = build_fr(backbone, embedding_size=config.model.embedding_size)
        self.head = build_head(config.loss.margin, config.model.embedding_size, num_classes,
                               s=config.loss.s, m=config.loss.margin_m)
        self.config = config

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fr_step(self.backbone, self.head, batch, self.config)

    def weights(self) -> nn.Module:
        return self.backbone


def build_task(config: Config, *, num_classes: int, device: torch.device) -> nn.Module:
    """The module the engine wraps, for ``config.train.task``.

    Raises:
        ValueError: FaceMAE with IRM but no teacher weights configured.
    """
    if config.train.task == "fr":
        return FRTask(config, backbone=config.train.fr_backbone or config.model.fr, num_classes=num_classes)
    config.check_mae_patch_size()
    teacher = None
    if config.loss.lambda_irm > 0:
        if not config.train.teacher:
            raise ValueError("FaceMAE with loss.lambda_irm > 0 needs a frozen teacher: set train.teacher to the "
                             "weights.safetensors of an FR run (train.task=fr), or loss.lambda_irm=0 for plain MAE")
        teacher = FP32Teacher(load_fr_backbone(config.train.teacher)).to(device)
    return MAETask(config, teacher)
