"""Inference weights on disk: ``weights.safetensors`` with a JSON description of the model.

Every job that loads a trained model (the IRM teacher, generation, evaluation, the privacy judge) reads it
through this module; training writes it. The description (``task``, ``model``, ``embedding_size``...) is
stored in the safetensors header, so a file can be checked on the driver from its header alone before
any Ray work starts.

:func:`export_onnx` turns such a file into one self-describing ONNX model for deployments outside
facemae (onnxruntime, insightface-style services): the description, the opset, the input
normalisation and the input / output shapes travel in the model's ``metadata_props``, so no sidecar
file is needed.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemae import storage
from facemae.models.registry import build_fr, build_mae

WEIGHTS = "weights.safetensors"
WEIGHTS_INFO = "weights.json"
HEAD = "head.safetensors"  # an FR run's class centres (the margin head), beside its backbone


def save_weights(module: nn.Module, directory: str | Path, info: dict[str, Any]) -> Path:
    """Writes inference weights (safetensors) and what they are (JSON) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"facemae": json.dumps(info)})
    (directory / WEIGHTS_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return directory / WEIGHTS


def save_head(weight: torch.Tensor, info: dict[str, Any], directory: str | Path) -> Path:
    """Writes an FR run's class centres, ``[C, D]`` fp32 as ``weight``, and what they are, as :data:`HEAD`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.detach().float().contiguous().cpu()}, str(directory / HEAD),
              metadata={"facemae": json.dumps(info)})
    return directory / HEAD


class WeightsError(ValueError):
    """A weights file is missing, is not safetensors, or holds other weights than the caller needs."""


# What each task's weights are, and where to find the right ones.
EXPECTED = {"fr": "an FR backbone (task=fr)", "mae": "a FaceMAE (task=mae)"}
FIND = {"fr": "pass the export/weights.safetensors of a train.task=fr run (e.g. the IRM teacher's)",
        "mae": "pass the export/weights.safetensors of a train.task=mae run"}


@dataclass(frozen=True)
class WeightsHeader:
    """What a weights file holds, read from its header alone: no tensor is loaded."""

    path: Path  # the .safetensors file on this machine (a downloaded copy when it lives on an object store)
    location: str  # where it lives: the local path, or its s3:// / gs:// URL; what messages name
    info: dict[str, Any]  # facemae's description of it: task, model, embedding_size, run...
    shapes: dict[str, tuple[int, ...]]

    def describe(self) -> str:
        """``FaceMAE weights (task=mae, model=facemae_vit_tiny_p8, run=smoke)``, or what else it is."""
        if not self.info:
            return f"{len(self.shapes)} tensors without a facemae description (not exported by a facemae run)"
        kind = {"fr": "FR backbone weights", "mae": "FaceMAE weights"}.get(self.info.get("task"), "weights")
        fields = ", ".join(f"{k}={self.info[k]}" for k in ("task", "model", "embedding_size", "run") if k in self.info)
        return f"{kind} ({fields})"


def weights_location(path: str | Path) -> str:
    """Where the ``.safetensors`` file a path names lives: a local path or an object-store URL.

    Raises:
        WeightsError: Neither the file nor an export folder holding it exists.
    """
    if storage.is_remote(path):
        for candidate in (str(path), storage.join(path, WEIGHTS)):
            if storage.is_file(candidate):
                return candidate
        raise WeightsError(f"{path} does not exist; pass the {WEIGHTS} a training run exported "
                           f"(<storage_path>/<name>/export/{WEIGHTS}) or its export folder")
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise WeightsError(f"{path} is a folder without {WEIGHTS}; pass a training run's export folder "
                               f"(<run>/export) or the {WEIGHTS} in it")
        return str(path / WEIGHTS)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; pass the {WEIGHTS} a training run exported "
                           f"(<storage_path>/<name>/export/{WEIGHTS})")
    return str(path)


def read_header(path: str | Path) -> WeightsHeader:
    """Reads a weights file's description and tensor shapes, not its tensors (cheap, for the driver).

    Raises:
        WeightsError: The file is missing, not safetensors, or its description is not JSON.
    """
    from safetensors import SafetensorError, safe_open

    location = weights_location(path)
    file = Path(storage.cached_file(location))
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise WeightsError(f"{location} is not a readable safetensors file ({_looks_like(file) or exc}); pass the "
                           f"{WEIGHTS} a facemae training run exported") from None
    try:
        info = json.loads(metadata.get("facemae", "{}"))
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise WeightsError(f"{location}: its facemae description is damaged (not a JSON object); export the weights "
                           "again from the run's checkpoint, or pass other weights")
    return WeightsHeader(path=file, location=location, info=info, shapes=shapes)


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
        raise WeightsError(f"{header.location} holds {header.describe()}, but {EXPECTED[task]} is needed here; "
                           f"{FIND[task]}")
    # The task's model module is imported outside the meta device, so its module-level tensors stay real;
    # only that one: an FR loader (a teacher or judge embedding actor) need not import timm and torchvision.
    importlib.import_module("facemae.models.fr" if task == "fr" else "facemae.models.mae")

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
        raise WeightsError(f"{header.location}: its tensors do not fit the {header.info['model']} its description "
                           f"names ({'; '.join(problems)}); export the weights again from the run's checkpoint, "
                           "or pass other weights")
    return header


def _build(header: WeightsHeader) -> nn.Module:
    """The untrained model a weights file describes (on the current default device)."""
    info = header.info
    needed = ["model", "embedding_size"] if info["task"] == "fr" else ["model"]
    if missing := [k for k in needed if k not in info]:
        raise WeightsError(f"{header.location}: its facemae description lacks {', '.join(missing)}; export the "
                           "weights again from the run's checkpoint")
    try:
        if info["task"] == "fr":
            return build_fr(info["model"], embedding_size=info["embedding_size"])
        return build_mae(info["model"], norm_pix_loss=info.get("norm_pix_loss", False))
    except (ValueError, TypeError) as exc:  # a model this version's registry does not know
        raise WeightsError(f"{header.location} holds {header.describe()}, which this facemae cannot build ({exc}); "
                           "upgrade facemae, or pass weights of a model it lists") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a ``weights.safetensors`` (or the folder holding it) and its description.

    Raises:
        WeightsError: The file is missing or not safetensors.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    return load_file(str(header.path)), header.info


def read_head(path: str | Path) -> torch.Tensor:
    """The class centres an FR run exported beside its backbone (:data:`HEAD`), ``[C, D]`` fp32.

    Args:
        path: The backbone's ``weights.safetensors`` or the export folder holding it.

    Raises:
        WeightsError: The weights are missing, or there is no readable head beside them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    location = weights_location(path)
    head = storage.join(location.rsplit("/", 1)[0], HEAD) if storage.is_remote(location) \
        else str(Path(location).with_name(HEAD))
    if not storage.is_file(head):
        raise WeightsError(f"{location} has no {HEAD} beside it (FR runs export their class centres there); "
                           "set train.init_head=false to start the class centres fresh")
    try:
        return load_file(storage.cached_file(head))["weight"]
    except (SafetensorError, KeyError) as exc:
        raise WeightsError(f"{head} is not a readable head ({exc}); export the run's weights again") from None


def check_init_weights(path: str | Path, *, task: str, model: str, embedding_size: int,
                       num_classes: int | None) -> WeightsHeader:
    """Checks that ``path`` can start a run that trains ``model`` (``train.init_weights``) on the driver:
    weights of the task and model, and with ``num_classes`` (an FR run that starts its head from them) a
    ``[num_classes, embedding_size]`` head beside them.

    Raises:
        WeightsError: What does not fit and what to change.
    """
    header = check_weights(path, task=task)
    held = header.info.get("model")
    if held != model:
        raise WeightsError(f"{header.location} holds {header.describe()}, but this run trains {model}: pass weights "
                           f"of {model}, or set the run's model to {held}")
    if task == "fr" and header.info.get("embedding_size") != embedding_size:
        raise WeightsError(f"{header.location} embeds in {header.info.get('embedding_size')} dimensions, this run "
                           f"in {embedding_size}: set model.embedding_size={header.info.get('embedding_size')}")
    if num_classes is not None:
        centres = read_head(path)
        if tuple(centres.shape) != (num_classes, embedding_size):
            raise WeightsError(f"{header.location}'s head holds {len(centres)} classes of {centres.shape[1]} "
                               f"dimensions, this run's data {num_classes} of {embedding_size}: its identities are "
                               "not the ones the head was trained on; set train.init_head=false to start the "
                               "class centres fresh")
    return header


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


# ONNX export: one file a deployment loads with onnxruntime alone.

# The dynamo exporter's own opset. Lower ones go through onnx's version converter, which fails on some
# operators, and the exporter then silently keeps 18 instead.
ONNX_OPSET = 18
IMG_SIZE = 112  # every registry model is built for 112x112 faces (facemae.models.fr)
ONNX_NAMES = {"fr": (("image",), ("embedding",)), "mae": (("image", "mask"), ("released", "prediction"))}
_PIXELS = ("float32 RGB (not BGR), NCHW; each 0..255 pixel x scaled to (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5, "
           "i.e. [-1, 1], insightface's arcface convention (facemae.models.fr.to_model_range)")
# What a deployment must feed and what it gets back; stored in every exported model.
NORMALISATION = {
    "fr": (f"image [batch, 3, 112, 112]: {_PIXELS}. embedding [batch, E]: float32, not L2-normalised; facemae's "
           "verification L2-normalises embedding(x) + embedding(x flipped left-right)."),
    "mae": (f"image [batch, 3, 112, 112]: the masked face, {_PIXELS}; pixels of removed patches are never read "
            "(0 will do). mask [batch, L]: float32, 1 = removed, 0 = visible, one per p x p patch in row-major order, "
            "L = (112 / p)^2; every row of a batch keeps the same number of patches (masks of one ratio, as in a "
            "masked shard; facemae.models.mae.masked_record_input builds both inputs from its records). "
            "released [batch, 3, 112, 112]: the predicted removed patches with the visible ones pasted back "
            "(loss.paste_visible: true); prediction: the prediction everywhere (paste_visible: false); both in "
            "the input's range, unclamped; to uint8 HWC as clamp(round((y * 0.5 + 0.5) * 255), 0, 255) "
            "(facemae.models.fr.to_uint8)."),
}


class _ReleaseGraph(nn.Module):
    """A FaceMAE's release of a batch as one exportable graph: what ``facemae generate`` computes per batch
    (``forward(imgs, mask=mask)``, then ``compose``), with the visible-patch count kept symbolic.

    ``given_masking`` checks the mask in Python and turns its keep count into an int, which an exporter
    would bake in from the example mask. Here the count is read as a tensor, and the visible-first order
    comes from unique sort keys, so the graph needs no stable sort (ONNX's TopK promises none).
    """

    def __init__(self, mae: nn.Module) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [N, 3, H, W]``, ``mask [N, L]`` (1 = removed) -> ``released``, ``prediction [N, 3, H, W]``."""
        from facemae.models.mae import _split

        mae = self.mae
        x = mae.patch_embed(image) + mae.pos_embed[:, 1:, :]  # (N, L, D)
        n, length, _ = x.shape
        keep = (mask[0] == 0).sum().item()  # visible patches of each row (the same in every row); symbolic in export
        torch._check(keep >= 1)
        torch._check(keep <= length)
        # given_masking's order, visible patches first and each group ascending, as unique keys.
        position = torch.arange(length, device=mask.device)
        ids_shuffle = torch.argsort((mask != 0).long() * length + position, dim=1)  # (N, L)
        x, _, ids_restore, _ = _split(x, ids_shuffle, keep)  # (N, keep, D)
        cls = (mae.cls_token + mae.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + keep, D)
        for block in mae.blocks:
            x = block(x)
        pred = mae.forward_decoder(mae.norm(x), ids_restore)  # (N, L, p*p*3)
        return mae.compose(image, pred, mask), mae.compose(image, pred, mask, paste_visible=False)


def export_onnx(weights_path: str | Path, output_path: str | Path, *, opset: int | None = None) -> Path:
    """Exports an FR backbone or a FaceMAE generator to ONNX, with a dynamic batch axis.

    An FR backbone maps ``image [batch, 3, 112, 112] -> embedding [batch, E]``. A FaceMAE maps a masked
    face and its mask to the released face exactly as ``facemae generate`` does: ``(image [batch, 3, 112,
    112], mask [batch, L]) -> (released, prediction)``, each ``[batch, 3, 112, 112]``. The model's
    ``metadata_props`` say what it is, so no sidecar file is needed: ``facemae`` (the weights' description:
    task, model, embedding_size, run...), ``opset``, ``input_normalisation`` (:data:`NORMALISATION`), and
    ``inputs`` / ``outputs`` (JSON names -> shapes, ``"batch"`` for the dynamic axis);
    :func:`read_onnx_description` reads them back.

    The exporter is torch's dynamo one (``torch.export``): the legacy TorchScript tracer cannot trace
    ``unpatchify``'s shape arithmetic, and would bake the example's keep count into the generator.

    Args:
        weights_path: A ``weights.safetensors`` or the export folder holding it.
        output_path: The ``.onnx`` file to write. It is written beside itself under a temporary name,
            checked with ``onnx.checker``, then moved into place: a reader never sees half a model.
        opset: ONNX opset, from 18 to the newest the installed onnx knows; None: :data:`ONNX_OPSET`.

    Returns:
        The written file.

    Raises:
        WeightsError: The weights are missing, not safetensors or damaged, hold neither an FR backbone nor
            a FaceMAE, or a FaceMAE trained with norm_pix_loss (its predictions are not pixels).
        ValueError: An opset outside that range, or an output path that is not a ``.onnx`` file.
    """
    import onnx

    opset = ONNX_OPSET if opset is None else opset
    _check_opset(opset)
    output = _onnx_output(output_path)
    header = read_header(weights_path)
    task = header.info.get("task")
    if task not in EXPECTED:
        raise WeightsError(f"{header.location} holds {header.describe()}; ONNX export needs {EXPECTED['fr']} or "
                           f"{EXPECTED['mae']}: pass the export/{WEIGHTS} of a facemae training run")
    if header.info.get("norm_pix_loss"):
        raise WeightsError(f"{header.location} holds {header.describe()} trained with norm_pix_loss, whose predictions "
                           "are per-patch-normalised values, not pixels; export a FaceMAE trained with "
                           "loss.norm_pix_loss=false")
    model = _load(header.path, task=task)
    graph = _ReleaseGraph(model).eval() if task == "mae" else model
    proto = _export_proto(graph, _example_inputs(model, task=task), task=task, opset=opset)
    _describe_onnx(proto, header.info, task=task, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    _write_atomically(proto, output)
    return output


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not ONNX_OPSET <= opset <= newest:
        raise ValueError(f"ONNX opset {opset} is not one the exporter writes reliably; pass an opset from "
                         f"{ONNX_OPSET} (the default, which onnxruntime >= 1.14 runs) to {newest}")


def _onnx_output(path: str | Path) -> Path:
    """The ``.onnx`` file to write, its folder created."""
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"{output} is a folder; name the .onnx file to write in it, e.g. {output / 'model.onnx'}")
    if output.suffix != ".onnx":
        raise ValueError(f"{output} does not end in .onnx; name the ONNX file to write, e.g. "
                         f"{output.with_suffix('.onnx')}")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _example_inputs(model: nn.Module, *, task: str) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: a batch of 2, since torch.export specialises axes of size 0 and 1."""
    image = torch.zeros(2, 3, IMG_SIZE, IMG_SIZE)
    if task == "fr":
        return (image,)
    mask = torch.ones(2, model.num_patches)
    mask[:, ::4] = 0  # any keep count: the graph reads it from the mask
    return image, mask


def _export_proto(graph: nn.Module, args: tuple[torch.Tensor, ...], *, task: str, opset: int) -> Any:
    """The ``onnx.ModelProto`` of ``graph``, axis 0 of every input dynamic (``batch``)."""
    inputs, outputs = ONNX_NAMES[task]
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # Said of the generator's mask, whose batch axis is the image's: the sharing is what is meant.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(graph, args, dynamo=True, input_names=list(inputs),
                                    output_names=list(outputs), opset_version=opset,
                                    dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)
    proto = program.model_proto
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:  # the exporter falls back to its own opset when converting fails
        raise ValueError(f"the ONNX exporter could not write opset {opset} (it wrote {sorted(written)}); "
                         f"export with opset {ONNX_OPSET}")
    return proto


def _describe_onnx(proto: Any, info: dict[str, Any], *, task: str, opset: int) -> None:
    """Writes what the model is and how to feed it into its ``metadata_props`` and ``doc_string``."""

    def shapes(values: Any) -> dict[str, list[int | str]]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    props = {"facemae": json.dumps(info), "opset": str(opset), "input_normalisation": NORMALISATION[task],
             "inputs": json.dumps(shapes(proto.graph.input)), "outputs": json.dumps(shapes(proto.graph.output))}
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    kind = {"fr": "facemae FR backbone", "mae": "facemae FaceMAE generator"}[task]
    proto.doc_string = f"{kind} {info.get('model')} (run {info.get('run')}). {NORMALISATION[task]}"


def _write_atomically(proto: Any, output: Path) -> None:
    import onnx

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_onnx_description(path: str | Path) -> dict[str, Any]:
    """What an exported ONNX model is, from its ``metadata_props``: path, task, model, run, opset,
    inputs and outputs (names -> shapes), input_normalisation.

    Raises:
        ValueError: The file was not exported by :func:`export_onnx`.
    """
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if not {"facemae", "opset", "inputs", "outputs"} <= set(props):
        raise ValueError(f"{path} has no facemae description in its metadata; export it with `facemae export`")
    info = json.loads(props["facemae"])
    return {"path": str(path), "task": info.get("task"), "model": info.get("model"), "run": info.get("run"),
            "opset": int(props["opset"]), "inputs": json.loads(props["inputs"]),
            "outputs": json.loads(props["outputs"]), "input_normalisation": props.get("input_normalisation")}
