"""One typed config tree for every job, loaded from YAML with dotted ``--set a.b=c`` overrides.

Unknown keys and impossible combinations raise ``ValueError`` naming the fix. Derived values are
computed by methods (``MaskConfig.keep``), never written back into the tree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

IMAGE_SIZE = 112
SOURCES = ("synthetic", "folder", "recordio")


@dataclass
class DataConfig:
    """Where faces come from and how they become Parquet shards.

    Attributes:
        source: ``synthetic`` (built-in generator), ``folder`` (``<identity>/<image>``) or
            ``recordio`` (InsightFace ``train.rec`` + ``train.idx``).
        path: Input folder or ``.rec`` file; unused for ``synthetic``.
        output: Dataset folder the shards and ``manifest.json`` are written to.
        num_identities: Synthetic identities.
        images_per_identity: Synthetic images per identity.
        seed: Seed of the synthetic generator and of the identity split.
        deploy_fraction: Fraction of identities held out as the disjoint deployment set.
        rows_per_shard: Target rows per Parquet shard.
        resize: Center-crop and resize images that are not 112x112 instead of rejecting them.
        convert_rgb: Convert grayscale / RGBA / palette images to RGB instead of rejecting them.
        skip_corrupt: Count undecodable or rejected images in the manifest's report and go on,
            instead of stopping at the first one.
        workers: Parallel Ray tasks for synthetic generation; 0 picks by size (Ray above
            ``ray_threshold`` images), 1 forces a single process.
        ray_threshold: Synthetic datasets with more images than this are generated through Ray.
    """

    source: str = "synthetic"
    path: str | None = None
    output: str = "data/synthetic"
    num_identities: int = 200
    images_per_identity: int = 20
    seed: int = 0
    deploy_fraction: float = 0.2
    rows_per_shard: int = 1000
    resize: bool = False
    convert_rgb: bool = False
    skip_corrupt: bool = False
    workers: int = 0
    ray_threshold: int = 20_000

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {SOURCES}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (the input folder or .rec file)")
        if self.source == "synthetic" and (self.num_identities < 2 or self.images_per_identity < 1):
            raise ValueError("synthetic data needs data.num_identities >= 2 and data.images_per_identity >= 1")
        if not 0.0 <= self.deploy_fraction < 1.0:
            raise ValueError(f"data.deploy_fraction={self.deploy_fraction} must be in [0, 1): it is the share "
                             "of identities held out for deployment")
        if self.rows_per_shard < 1:
            raise ValueError(f"data.rows_per_shard={self.rows_per_shard} must be >= 1")
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers} must be >= 0 (0 = choose by dataset size)")


@dataclass
class MaskConfig:
    """Owner-side masking: which patches of each face are kept (visible) and released.

    Attributes:
        patch_size: Side of a square patch in pixels; must divide 112.
        ratio: Fraction of patches removed per image.
        seed: Mask seed; each image's mask depends only on this seed and its ``image_id``.
        splits: Dataset splits to mask.
        output: Folder of the masked dataset; empty means ``<data.output>-masked``.
    """

    patch_size: int = 8
    ratio: float = 0.75
    seed: int = 0
    splits: list[str] = field(default_factory=lambda: ["train", "deploy"])
    output: str = ""

    @property
    def num_patches(self) -> int:
        """Patches per image, ``L = (112 / p)^2``."""
        return (IMAGE_SIZE // self.patch_size) ** 2

    @property
    def keep(self) -> int:
        """Visible patches per image, ``int(L * (1 - ratio))`` as in MAE's ``random_masking``."""
        return int(self.num_patches * (1 - self.ratio))

    def validate(self) -> None:
        if self.patch_size < 1 or IMAGE_SIZE % self.patch_size:
            raise ValueError(f"mask.patch_size={self.patch_size} must divide the image size {IMAGE_SIZE} "
                             "(use 4, 7, 8, 14, 16, 28 or 56)")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask.ratio={self.ratio} must be in [0, 1)")
        if self.keep < 1:
            raise ValueError(f"mask.ratio={self.ratio} with mask.patch_size={self.patch_size} keeps no patch "
                             f"of the {self.num_patches}; lower the ratio or the patch size")
        unknown = sorted(set(self.splits) - {"train", "deploy"})
        if unknown or not self.splits:
            raise ValueError(f"mask.splits={self.splits} must be a non-empty subset of ['train', 'deploy']")


@dataclass
class RayConfig:
    """How a job reaches Ray.

    Attributes:
        address: Cluster address (``auto``, ``ray://...``); ``None`` starts an embedded local cluster.
        num_cpus: Logical CPUs of an embedded cluster; ``None`` lets Ray count them.
    """

    address: str | None = None
    num_cpus: int | None = None

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus={self.num_cpus} must be >= 1")
        if self.address is not None and self.num_cpus is not None:
            raise ValueError("ray.num_cpus applies only to an embedded cluster; drop it when ray.address is set")


@dataclass
class Config:
    """The root of every job's config.

    Attributes:
        name: Run name; a rerun with the same name resumes.
        data: Ingest settings.
        mask: Owner-side masking settings.
        ray: Cluster connection.
    """

    name: str = "facemae"
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "Config":
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty run name without '/'")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    def masked_output(self) -> str:
        """Folder of the masked dataset."""
        return self.mask.output or f"{self.data.output.rstrip('/')}-masked"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds a validated config from a YAML file and ``a.b=c`` overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: Dotted assignments applied in order, values parsed as YAML scalars.

    Raises:
        ValueError: An unknown key, a value of the wrong type or an impossible combination.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(Config, raw).validate()


def from_dict(cls: type, raw: dict[str, Any], *, where: str = "") -> Any:
    """Builds dataclass ``cls`` from a nested mapping, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, where=f"{where}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, where=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where=where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(inner, v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is a value, not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
