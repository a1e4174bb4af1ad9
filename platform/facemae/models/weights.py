"""Inference weights on disk: ``weights.safetensors`` with a JSON description of the model.

Every job that loads a trained model (the IRM teacher, generation, evaluation, the privacy judge) reads it
through this module; training writes it. The description (``task``, ``model``, ``embedding_size``...) is
stored in the safetensors header, so a file can be checked on the driver from its header alone before
any Ray work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemae.models.registry import build_fr, build_mae

WEIGHTS = "weights.safetensors"
WEIGHTS_INFO = "weights.json"


def save_weights(module: nn.Module, directory: str | Path, info: dict[str, Any]) -> Path:
    """Writes inference weights (safetensors) and what they are (JSON) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"facemae": json.dumps(info)})
    (directory / WEIGHTS_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return directory / WEIGHTS


class WeightsError(ValueError):
    """A weights file is missing, is not safetensors, or holds other weights than the caller needs."""


# What each task's weights are, and where to find the right ones.
EXPECTED = {"fr": "an FR backbone (task=fr)", "mae": "a FaceMAE (task=mae)"}
FIND = {"fr": "pass the export/weights.safetensors of a train.task=fr run (e.g. the IRM teacher's)",
        "mae": "pass the export/weights.safetensors of a train.task=mae run"}


@dataclass(frozen=True)
class WeightsHeader:
    """What a weights file holds, read from its header alone: no tensor is loaded."""

    path: Path  # the .safetensors file
    info: dict[str, Any]  # facemae's description of it: task, model, embedding_size, run...
    shapes: dict[str, tuple[int, ...]]

    def describe(self) -> str:
        """``FaceMAE weights (task=mae, model=facemae_vit_tiny_p8, run=smoke)``, or what else it is."""
        if not self.info:
            return f"{len(self.shapes)} tensors without a facemae description (not exported by a facemae run)"
        kind = {"fr": "FR backbone weights", "mae": "FaceMAE weights"}.get(self.info.get("task"), "weights")
        fields = ", ".join(f"{k}={self.info[k]}" for k in ("task", "model", "embedding_size", "run") if k in self.info)
        return f"{kind} ({fields})"


def weights_file(path: str | Path) -> Path:
    """The ``.safetensors`` file a path names: the file itself, or the export folder holding it.

    Raises:
        WeightsError: Neither exists.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise WeightsError(f"{path} is a folder without {WEIGHTS}; pass a training run's export folder "
                               f"(<run>/export) or the {WEIGHTS} in it")
        return path / WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; pass the {WEIGHTS} a training run exported "
                           f"(<storage_path>/<name>/export/{WEIGHTS})")
    return path


def read_header(path: str | Path) -> WeightsHeader:
    """Reads a weights file's description and tensor shapes, not its tensors (cheap, for the driver).

    Raises:
        WeightsError: The file is missing, not safetensors, or its description is not JSON.
    """
    from safetensors import SafetensorError, safe_open

    file = weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise WeightsError(f"{file} is not a readable safetensors file ({_looks_like(file) or exc}); pass the "
                           f"{WEIGHTS} a facemae training run exported") from None
    try:
        info = json.loads(metadata.get("facemae", "{}"))
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise WeightsError(f"{file}: its facemae description is damaged (not a JSON object); export the weights "
                           "again from the run's checkpoint, or pass other weights")
    return WeightsHeader(path=file, info=info, shapes=shapes)


def _looks_like(file: Path) -> str:
    """What a file that is not safetensors seems to be, from its first bytes; ``""`` when unknown."""
    with open(file, "rb") as f:
        head = f.read(8)
    if not head:
        return "it is empty"
    if len(head) == 8 and int.from_bytes(head, "little") < file.stat().st_size:  # safetensors' header length
        return "its header is whole but its tensors are cut short: an interrupted copy?"
    if head[:4] == b"PK\x03\x04":
        return "it looks like a torch.save checkpoint"
    if head[:1] == b"\x80":
        return "it looks like a pickle, e.g. an old torch.save checkpoint"
    return ""


def check_weights(path: str | Path, *, task: str) -> WeightsHeader:
    """Checks, from the header alone, that a weights file holds a model of ``task`` whose tensors fit
    the model its description names. Jobs call it on the driver before any Ray work starts.

    Args:
        path: A ``weights.safetensors`` or the export folder holding it.
        task: ``fr`` or ``mae``: what the caller will load.

    Raises:
        WeightsError: Naming the file, what it holds, what was expected and what to pass instead.
    """
    header = read_header(path)
    if header.info.get("task") != task:
        raise WeightsError(f"{header.path} holds {header.describe()}, but {EXPECTED[task]} is needed here; "
                           f"{FIND[task]}")
    import facemae.models.fr
    import facemae.models.mae  # noqa: F401  imported outside the meta device, so module-level tensors stay real

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in _build(header).state_dict().items()}
    missing = sorted(set(expected) - set(header.shapes))
    unexpected = sorted(set(header.shapes) - set(expected))
    resized = [f"{k} is {list(header.shapes[k])}, not {list(v)}" for k, v in expected.items()
               if k in header.shapes and header.shapes[k] != v]
    problems = [f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
    problems += resized[:3] + ["..."] * (len(resized) > 3)
    if problems:
        raise WeightsError(f"{header.path}: its tensors do not fit the {header.info['model']} its description "
                           f"names ({'; '.join(problems)}); export the weights again from the run's checkpoint, "
                           "or pass other weights")
    return header


def _build(header: WeightsHeader) -> nn.Module:
    """The untrained model a weights file describes (on the current default device)."""
    info = header.info
    needed = ["model", "embedding_size"] if info["task"] == "fr" else ["model"]
    if missing := [k for k in needed if k not in info]:
        raise WeightsError(f"{header.path}: its facemae description lacks {', '.join(missing)}; export the "
                           "weights again from the run's checkpoint")
    try:
        if info["task"] == "fr":
            return build_fr(info["model"], embedding_size=info["embedding_size"])
        return build_mae(info["model"], norm_pix_loss=info.get("norm_pix_loss", False))
    except (ValueError, TypeError) as exc:  # a model this version's registry does not know
        raise WeightsError(f"{header.path} holds {header.describe()}, which this facemae cannot build ({exc}); "
                           "upgrade facemae, or pass weights of a model it lists") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a ``weights.safetensors`` (or the folder holding it) and its description.

    Raises:
        WeightsError: The file is missing or not safetensors.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    return load_file(str(header.path)), header.info


def load_fr_backbone(path: str | Path) -> nn.Module:
    """Builds the FR backbone a weights file describes and loads it.

    Raises:
        WeightsError: The file is missing, not safetensors, not an FR backbone, or damaged.
    """
    return _load(path, task="fr")


def load_mae(path: str | Path) -> nn.Module:
    """Builds the FaceMAE a weights file describes and loads it.

    Raises:
        WeightsError: The file is missing, not safetensors, not a FaceMAE, or damaged.
    """
    return _load(path, task="mae")


def _load(path: str | Path, *, task: str) -> nn.Module:
    from safetensors.torch import load_file

    header = check_weights(path, task=task)
    model = _build(header)
    model.load_state_dict(load_file(str(header.path)))
    return model.eval()
