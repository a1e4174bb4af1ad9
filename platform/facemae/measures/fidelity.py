"""Fidelity of a released dataset against its originals: does it look like faces, or like noise?

Two numbers per release, computed on the deployment identities (the faces the owner masked):

- ``psnr_masked``: PSNR (dB, peak 255) over the pixels of the *masked* patches only, pooled over the
  set: ``10 log10(255^2 / MSE)``. The visible patches are pasted back from the owner and would only
  flatter the figure.
- ``hf_ratio``: mean variance of the Laplacian of the released images over that of their originals
  (grayscale, the 4-neighbour discrete Laplacian). 1.0 is as sharp as real faces; a fine noise texture
  gives well above 1, a blurred release well below 1.

Pure numpy: ``image`` arrays are uint8 ``[N, H, W, 3]``, masks ``[N, L]`` with 1 = removed.
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights PIL's "L" conversion uses


def patch_pixel_mask(removed: np.ndarray, *, patch_size: int, img_size: int) -> np.ndarray:
    """Per-pixel mask of removed patches: ``[N, L] -> [N, H, W]`` bool, patches in row-major order."""
    grid = img_size // patch_size
    if removed.shape[1] != grid * grid:
        raise ValueError(f"masks hold {removed.shape[1]} patches but patch_size={patch_size} on {img_size} px "
                         f"makes {grid * grid}")
    cells = removed.reshape(-1, grid, grid).astype(bool)  # (N, h, w)
    return cells.repeat(patch_size, axis=1).repeat(patch_size, axis=2)  # (N, H, W)


def masked_psnr(originals: np.ndarray, released: np.ndarray, removed: np.ndarray, *, patch_size: int) -> float:
    """PSNR in dB over the masked patches' pixels of a whole set (see the module docstring).

    Args:
        originals: uint8 ``[N, H, W, 3]``.
        released: uint8 ``[N, H, W, 3]``, row i released from original i.
        removed: ``[N, L]``, 1 = the patch was masked by the owner.
        patch_size: Side of a patch in pixels.

    Returns:
        ``inf`` when every masked pixel is reproduced exactly.
    """
    if originals.shape != released.shape or originals.ndim != 4:
        raise ValueError(f"originals {originals.shape} and released {released.shape} must both be [N, H, W, 3]")
    where = patch_pixel_mask(np.asarray(removed), patch_size=patch_size, img_size=originals.shape[1])
    if not where.any():
        raise ValueError("no pixel is masked: PSNR of the masked patches is undefined")
    diff = originals.astype(np.float64) - released.astype(np.float64)  # (N, H, W, 3)
    mse = float(np.mean(diff[where] ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each image's luminance: ``[N, H, W, 3] -> [N]``."""
    gray = images.astype(np.float64) @ LUMA  # (N, H, W)
    lap = (gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:]
           - 4 * gray[:, 1:-1, 1:-1])  # (N, H-2, W-2): interior pixels, no padding artefacts
    return lap.reshape(len(images), -1).var(axis=1)


def hf_ratio(released: np.ndarray, originals: np.ndarray) -> float:
    """Mean Laplacian variance of ``released`` over that of ``originals`` (1.0 = as sharp as real faces)."""
    base = float(laplacian_variance(originals).mean())
    if base == 0:
        raise ValueError("the originals have no high-frequency energy (flat images): the ratio is undefined")
    return float(laplacian_variance(released).mean()) / base
