"""What the engine trains: one ``nn.Module`` per task whose ``forward(batch)`` is that task's step.

Routing the whole step through ``engine(batch)`` keeps DeepSpeed in charge of every parameter
access (ZeRO-3 gathers on forward hooks), while the math stays in :mod:`facemae.train.steps`.
The frozen IRM teacher is held outside the module's parameters: it is not trained, not sharded and
not written into training checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemae.config import Config
from facemae.losses.margin import build_head
from facemae.models.registry import build_fr, build_mae
from facemae.train.steps import fr_step, freeze_teacher, mae_irm_step

WEIGHTS = "weights.safetensors"
WEIGHTS_INFO = "weights.json"


class FP32Teacher(nn.Module):
    """Runs a frozen fp32 teacher on inputs of any float dtype (bf16/fp16 engines)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.net = teacher
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


def save_weights(module: nn.Module, directory: str | Path, info: dict[str, Any]) -> Path:
    """Writes inference weights (safetensors) and what they are (JSON) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"facemae": json.dumps(info)})
    (directory / WEIGHTS_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return directory / WEIGHTS


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a ``weights.safetensors`` (or the folder holding it) and its description."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the weights.safetensors a training run exported")
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("facemae", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, info


def load_fr_backbone(path: str | Path) -> nn.Module:
    """Builds the FR backbone a weights file describes and loads it."""
    state, info = read_weights(path)
    if info.get("task") != "fr":
        raise ValueError(f"{path} holds {info.get('task', 'unknown')} weights, not an FR backbone; pass the "
                         "weights of a train.task=fr run")
    backbone = build_fr(info["model"], embedding_size=info["embedding_size"])
    backbone.load_state_dict(state)
    return backbone.eval()


def load_mae(path: str | Path) -> nn.Module:
    """Builds the FaceMAE a weights file describes and loads it."""
    state, info = read_weights(path)
    if info.get("task") != "mae":
        raise ValueError(f"{path} holds {info.get('task', 'unknown')} weights, not a FaceMAE")
    model = build_mae(info["model"], norm_pix_loss=info.get("norm_pix_loss", False))
    model.load_state_dict(state)
    return model.eval()
