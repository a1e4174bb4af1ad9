"""MAE reconstruction loss: mean squared error over the masked patches only."""

from __future__ import annotations

import torch


def normalize_patches(target: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch-normalised targets (MAE's ``norm_pix_loss``), for pre-training studies only.

    At deployment a masked patch's mean and variance are unknown, so a prediction of normalised
    pixels cannot be turned back into an image (DESIGN.md 1); the platform's default is raw pixels.

    Args:
        target: ``[N, L, p*p*3]`` patches.
        eps: Added to the variance, as in MAE.

    Returns:
        ``[N, L, p*p*3]``, each patch with zero mean and unit variance.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's models_mae.py
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error averaged over the masked patches; visible patches count for nothing.

    Args:
        pred: ``[N, L, p*p*3]`` predicted patches.
        target: ``[N, L, p*p*3]`` target patches.
        mask: ``[N, L]``, 1 where the patch was removed (and is scored), 0 where it is visible.

    Returns:
        Scalar loss; 0 when no patch is masked.
    """
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_patch.dtype)
    # where(), not a product: a non-finite prediction on a visible patch must not leak in as NaN.
    per_patch = torch.where(mask.bool(), per_patch, torch.zeros_like(per_patch))
    return per_patch.sum() / mask.sum().clamp_min(1.0)
