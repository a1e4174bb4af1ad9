"""Fidelity of a released dataset against its originals, read from the datasets on disk.

The numbers (``psnr_masked``, ``hf_ratio``) are defined in :mod:`facemae.measures.fidelity`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facemae.data.images import decode_rgb
from facemae.data.shards import iter_rows, verify_dataset
from facemae.measures.fidelity import hf_ratio, masked_psnr


def release_fidelity(released: str, *, originals: str, masked: str, split: str = "deploy",
                     limit: int = 0) -> dict[str, Any]:
    """``psnr_masked`` and ``hf_ratio`` of a released dataset against the originals it came from.

    Args:
        released: Released dataset folder (rows carry ``source_id``, the original's ``image_id``).
        originals: The original dataset folder.
        masked: The owner's masked dataset the release was made from (its ``mask`` column).
        split: Split to score.
        limit: Score only the first ``limit`` released rows by ``image_id`` (0 = all).
    """
    rel = verify_dataset(released)
    rows = sorted(iter_rows(rel.files(released, split), columns=["image_id", "source_id", "image"]),
                  key=lambda r: r["image_id"])
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{released} has no {split} rows to score")
    wanted = {r["source_id"] for r in rows}
    source = verify_dataset(originals)
    pixels = {r["image_id"]: r["image"] for r in iter_rows(source.files(originals, split), columns=["image_id", "image"])
              if r["image_id"] in wanted}
    masked_set = verify_dataset(masked)
    ids = {r["image_id"] for r in rows}
    masks = {r["image_id"]: r["mask"] for r in iter_rows(masked_set.files(masked, split), columns=["image_id", "mask"])
             if r["image_id"] in ids}
    missing = sorted(wanted - set(pixels))[:3] + sorted(ids - set(masks))[:3]
    if missing:
        raise ValueError(f"{released} has rows whose original or mask is not in {originals} / {masked}: "
                         f"{', '.join(missing)}; score a release against the datasets it was made from")
    orig = np.stack([decode_rgb(pixels[r["source_id"]]) for r in rows])
    out = np.stack([decode_rgb(r["image"]) for r in rows])
    removed = np.stack([np.frombuffer(masks[r["image_id"]], dtype=np.uint8) for r in rows])
    return {"psnr_masked": masked_psnr(orig, out, removed, patch_size=masked_set.mask["patch_size"]),
            "hf_ratio": hf_ratio(out, orig), "images": len(rows)}
