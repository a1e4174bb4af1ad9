"""Export of a released dataset to what face-recognition trainers read: an image folder or a RecordIO pack.

Both are written so InsightFace's ``arcface_torch`` reads them directly (``ImageFolder`` fallback,
or ``MXFaceDataset`` on ``train.rec`` / ``train.idx`` with the header record).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

from facemae import storage
from facemae.data.recordio import write_recordio
from facemae.data.shards import iter_rows, verify_dataset

EXPORT_SPLITS = ("deploy", "train")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def export_name(image_id: str, data: bytes) -> str:
    """The file name of a row in its identity folder: the image's own name (the last part of a folder
    source's ``<identity>/<image>`` id), with its image suffix replaced by that of the bytes' format and a
    masked copy's ``#m<j>`` kept: ``person_01/img.jpg#m1`` with PNG bytes -> ``img#m1.png``."""
    name, _, copy = image_id.rpartition("/")[2].partition("#")
    stem, suffix = os.path.splitext(name)
    if suffix.lower() not in IMAGE_SUFFIXES:
        stem = name
    return stem + (f"#{copy}" if copy else "") + (".jpg" if data[:3] == JPEG_MAGIC else ".png")


def _rows(root: str, splits: tuple[str, ...]) -> Iterator[dict]:
    manifest = verify_dataset(root)
    for split in splits:
        if split in manifest.splits:
            yield from iter_rows(manifest.files(root, split), columns=["image_id", "identity", "image"])


def export_image_folder(released: str, output: str, *, splits: tuple[str, ...] = EXPORT_SPLITS) -> int:
    """Writes ``<output>/<identity>/<image>.png`` (:func:`export_name`); the folder appears whole (temp
    folder, then rename). Two images whose names differ only in their suffix (``a.jpg`` and ``a.png``) keep
    apart: the second is written under its whole id.

    Returns:
        The number of images written.
    """
    manifest = verify_dataset(released)
    names = manifest.identity_names or {}
    out = Path(output)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder for the export")
    tmp = storage.sibling_temp(out, folder=True, suffix="")
    count = 0
    try:
        for row in _rows(released, splits):
            folder = tmp / names.get(str(row["identity"]), f"{row['identity']:06d}")
            folder.mkdir(exist_ok=True)
            path = folder / export_name(row["image_id"], row["image"])
            if path.exists():  # a.jpg after a.png: the whole id is unique in the dataset
                path = folder / (row["image_id"].replace("/", "_") + path.suffix)
            path.write_bytes(row["image"])
            count += 1
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def export_recordio(released: str, rec_path: str, *, splits: tuple[str, ...] = EXPORT_SPLITS) -> int:
    """Writes an InsightFace pack (``train.rec`` + ``train.idx`` with header and identity records).

    Labels are the dataset's identity labels, images grouped by identity as the pack format needs.

    Returns:
        The number of image records.
    """
    rows = sorted(((r["identity"], r["image_id"], r["image"]) for r in _rows(released, splits)))
    rec = Path(rec_path)
    return write_recordio(rec, rec.with_suffix(".idx"), [(identity, image) for identity, _, image in rows])
