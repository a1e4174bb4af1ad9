"""Named model sizes: a config says ``model.mae: facemae_vit_tiny_p8`` and tests iterate the tables.

The tables are plain data, and torch / timm are imported only when a model is built, so that
``facemae.config`` can validate names (and patch sizes) without importing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facemae.models.fr import IResNet
    from facemae.models.mae import FaceMAE


@dataclass(frozen=True)
class MAESpec:
    """Keyword arguments of :class:`facemae.models.mae.FaceMAE` for one named size."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int


@dataclass(frozen=True)
class FRSpec:
    """Keyword arguments of :class:`facemae.models.fr.IResNet` for one named size."""

    layers: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)


_TINY = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)
# ViT-Base encoder with MAE's 512-wide, 8-block decoder (mae_vit_base_patch16_dec512d8b).
_BASE = dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

MAE_SPECS: dict[str, MAESpec] = {
    "facemae_vit_tiny_p8": MAESpec(patch_size=8, **_TINY),  # CPU tests and smoke runs
    "facemae_vit_tiny_p16": MAESpec(patch_size=16, **_TINY),
    "facemae_vit_small_p8": MAESpec(patch_size=8, **_SMALL),
    "facemae_vit_small_p16": MAESpec(patch_size=16, **_SMALL),
    "facemae_vit_base_p8": MAESpec(patch_size=8, **_BASE),  # the GPU default
    "facemae_vit_base_p16": MAESpec(patch_size=16, **_BASE),
}

# Stage depths as insightface's iresnet18/34/50/100.
FR_SPECS: dict[str, FRSpec] = {
    "fr_tiny": FRSpec(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)),  # CPU tests and smoke runs
    "fr_r18": FRSpec(layers=(2, 2, 2, 2)),
    "fr_r34": FRSpec(layers=(3, 4, 6, 3)),
    "fr_r50": FRSpec(layers=(3, 4, 14, 3)),
    "fr_r100": FRSpec(layers=(3, 13, 30, 3)),
}

MAE_MODELS: list[str] = list(MAE_SPECS)
FR_MODELS: list[str] = list(FR_SPECS)


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} model {name!r}; choose one of {', '.join(table)}")
    return table[name]


def mae_patch_size(name: str) -> int:
    """Patch size of the named FaceMAE, without building it."""
    return _lookup(MAE_SPECS, name, "FaceMAE").patch_size


def build_mae(name: str, **overrides: Any) -> FaceMAE:
    """Builds a named FaceMAE.

    Args:
        name: A key of :data:`MAE_SPECS`.
        **overrides: FaceMAE keyword arguments replacing the spec's (``norm_pix_loss``, ``depth``...).

    Raises:
        ValueError: An unknown name; the message lists the registry.
    """
    from facemae.models.mae import FaceMAE  # deferred: see the module docstring

    return FaceMAE(**{**asdict(_lookup(MAE_SPECS, name, "FaceMAE")), **overrides})


def build_fr(name: str, *, embedding_size: int = 512, **overrides: Any) -> IResNet:
    """Builds a named face-recognition backbone.

    Args:
        name: A key of :data:`FR_SPECS`.
        embedding_size: Output dimension.
        **overrides: IResNet keyword arguments replacing the spec's (``dropout``, ``widths``...).

    Raises:
        ValueError: An unknown name; the message lists the registry.
    """
    from facemae.models.fr import IResNet  # deferred: see the module docstring

    kwargs = {**asdict(_lookup(FR_SPECS, name, "face-recognition")), "embedding_size": embedding_size, **overrides}
    return IResNet(kwargs.pop("layers"), **kwargs)
