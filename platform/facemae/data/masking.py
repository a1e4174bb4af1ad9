"""Owner-side masking: the pixels of masked patches never leave this function's caller.

Pure numpy (no torch, no cluster): the data owner runs it where the raw faces live. Patch order and
layout follow MAE's ``patchify`` (row-major patches, each ``[p, p, 3]``), so a masked shard's
``visible`` bytes are exactly the rows of ``patchify(img)[ids_keep]``.
"""

from __future__ import annotations

import hashlib

import numpy as np


def patchify(img: np.ndarray, patch_size: int) -> np.ndarray:
    """Cuts an image into patches.

    Args:
        img: ``[H, W, 3]`` image.
        patch_size: ``p``, dividing ``H`` and ``W``.

    Returns:
        ``[L, p*p*3]`` with ``L = (H/p) * (W/p)``, patches in row-major order.
    """
    h, w, c = img.shape
    p = patch_size
    x = img.reshape(h // p, p, w // p, p, c)  # (h, p, w, p, c)
    return x.transpose(0, 2, 1, 3, 4).reshape((h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, patch_size: int) -> np.ndarray:
    """Inverse of :func:`patchify` for square images: ``[L, p*p*3] -> [H, W, 3]``."""
    p = patch_size
    side = int(round(patches.shape[0] ** 0.5))
    assert side * side == patches.shape[0], "unpatchify needs a square number of patches"
    x = patches.reshape(side, side, p, p, 3).transpose(0, 2, 1, 3, 4)  # (h, p, w, p, 3)
    return x.reshape(side * p, side * p, 3)


def image_mask_seed(image_id: str, seed: int) -> list[int]:
    """Seed entropy of one image's mask: depends on the image and the seed only, not on sharding."""
    digest = hashlib.sha256(image_id.encode()).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def random_keep(num_patches: int, keep: int, *, rng: np.random.Generator) -> np.ndarray:
    """Indices of the visible patches, as MAE's ``random_masking`` draws them, sorted ascending.

    Argsort of uniform noise: the first ``keep`` of the shuffled order are kept.
    """
    noise = rng.random(num_patches)
    return np.sort(np.argsort(noise, kind="stable")[:keep])


def mask_face(img: np.ndarray, *, image_id: str, patch_size: int, keep: int, seed: int) -> tuple[bytes, bytes]:
    """Masks one face for release.

    Args:
        img: ``[H, W, 3]`` uint8 face.
        image_id: The face's id; with ``seed`` it fixes the mask.
        patch_size: ``p``.
        keep: Visible patches.
        seed: Mask seed.

    Returns:
        ``(visible, mask)``: ``visible`` is the kept patches' pixels, ``[keep, p, p, 3]`` uint8 as bytes;
        ``mask`` is ``L`` bytes, 1 where the patch was removed, 0 where it is visible.
    """
    patches = patchify(img, patch_size)  # (L, p*p*3)
    ids_keep = random_keep(len(patches), keep, rng=np.random.default_rng(image_mask_seed(image_id, seed)))
    mask = np.ones(len(patches), dtype=np.uint8)
    mask[ids_keep] = 0
    return np.ascontiguousarray(patches[ids_keep]).tobytes(), mask.tobytes()


def unmask(visible: bytes, mask: bytes, *, patch_size: int, fill: int = 0) -> np.ndarray:
    """Rebuilds the released view of a masked face: visible patches in place, ``fill`` elsewhere.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    m = np.frombuffer(mask, dtype=np.uint8)
    width = patch_size * patch_size * 3
    vis = np.frombuffer(visible, dtype=np.uint8).reshape(-1, width)
    if len(vis) != int((m == 0).sum()):
        raise ValueError(f"masked record holds {len(vis)} visible patches but its mask shows {(m == 0).sum()}; "
                         "the shard is corrupt or was written with another patch size")
    patches = np.full((len(m), width), fill, dtype=np.uint8)
    patches[m == 0] = vis
    return unpatchify(patches, patch_size)
