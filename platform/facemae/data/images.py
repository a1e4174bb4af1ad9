"""Decoding, checking and encoding of face images (112x112 RGB uint8); no cluster imports.

Every reader of user data goes through :func:`decode_face`, and every stage that decodes a stored
shard's ``image`` cells through :func:`decode_rows`, so a bad image gets the same error wherever it
came from, naming where it came from (for a shard row: the dataset folder, the shard file and the
``image_id``).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from facemae.config import IMAGE_SIZE


class CorruptImageError(ValueError):
    """An input image cannot be used; the message says which one, why, and what to do."""

    def __init__(self, where: str, reason: str, fix: str) -> None:
        super().__init__(f"{where}: {reason}; {fix}")
        self.where = where
        self.reason = reason
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Ray ships a task's exception back by pickling it; the default would call __init__(message).
        return type(self), (self.where, self.reason, self.fix)


_SKIP_HINT = "or pass --skip-corrupt (data.skip_corrupt=true) to count it in the manifest and go on"


def decode_face(data: bytes, *, where: str, resize: bool = False, convert_rgb: bool = False) -> np.ndarray:
    """Decodes one encoded face image and checks it is a 112x112 RGB face.

    Args:
        data: Encoded image bytes (JPEG, PNG, BMP, WebP, ...).
        where: Where the bytes came from (a path, ``train.rec key 17``), for the error message.
        resize: Center-crop to a square and resize to 112 instead of rejecting another size.
        convert_rgb: Convert grayscale / RGBA / palette images instead of rejecting them.

    Returns:
        ``[112, 112, 3]`` uint8 array.

    Raises:
        CorruptImageError: Truncated or undecodable bytes, a wrong mode or a wrong size.
    """
    return prepare_face(data, where=where, resize=resize, convert_rgb=convert_rgb)[0]


def prepare_face(data: bytes, *, where: str, resize: bool = False,
                 convert_rgb: bool = False) -> tuple[np.ndarray, bytes]:
    """Checks one encoded face like :func:`decode_face` and returns the bytes to store for it.

    JPEG or PNG bytes that needed no change are stored as they are (no second lossy encode);
    anything converted, resized or in another format is stored as lossless PNG.

    Returns:
        ``([112, 112, 3]`` uint8 pixels, encoded bytes to store``)``.

    Raises:
        CorruptImageError: Truncated or undecodable bytes, a wrong mode or a wrong size.
    """
    img = open_image(data, where=where)
    unchanged = img.format in ("JPEG", "PNG") and img.mode == "RGB"
    img = to_rgb(img, where=where, convert_rgb=convert_rgb)
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        if not resize:
            raise CorruptImageError(where, f"image is {img.size[0]}x{img.size[1]}, not {IMAGE_SIZE}x{IMAGE_SIZE}",
                                    f"align faces to {IMAGE_SIZE}x{IMAGE_SIZE} (--align detects and aligns them), "
                                    f"pass --resize (data.resize=true) to center-crop and resize, {_SKIP_HINT}")
        img = center_crop_resize(img, IMAGE_SIZE)
        unchanged = False
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels, (data if unchanged else encode_png(pixels))


def open_image(data: bytes, *, where: str) -> Image.Image:
    """Decodes encoded image bytes fully (a truncated file fails here, not later).

    Raises:
        CorruptImageError: Truncated or undecodable bytes, or a decompression bomb, naming ``where``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # PIL decodes lazily: a truncated file only fails here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise CorruptImageError(where, f"truncated or undecodable image ({type(exc).__name__}: {exc})",
                                f"re-export or remove the file, {_SKIP_HINT}") from exc
    return img


def to_rgb(img: Image.Image, *, where: str, convert_rgb: bool) -> Image.Image:
    """Returns ``img`` as RGB: as it is, converted (``convert_rgb``), or refused.

    Raises:
        CorruptImageError: A grayscale / RGBA / palette image while ``convert_rgb`` is off.
    """
    if img.mode == "RGB":
        return img
    if not convert_rgb:
        raise CorruptImageError(where, f"image mode is {img.mode}, not RGB",
                                f"convert it to RGB, pass --convert-rgb (data.convert_rgb=true), {_SKIP_HINT}")
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Crops the largest centered square and resizes it to ``size`` (bicubic)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encodes ``[H, W, 3]`` uint8 pixels as a lossless 8-bit RGB PNG.

    Every row carries PNG's ``Up`` filter (the difference to the row above, computed in numpy) and the
    whole goes through zlib at level 1: the size of Pillow's ``compress_level=1`` files (within 2% on
    faces) in half the time, since Pillow tries its five filters on every row. A release encodes every
    face it writes, and this took as long as the tiny FaceMAE's forward pass. ``benchmarks/png.py``
    compares it with Pillow and OpenCV inside a generation actor's call (``results/png.md``).
    """
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(pixels.shape[0], -1)  # (H, W*3)
    height, width = pixels.shape[0], pixels.shape[1]
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter is defined
    filtered = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), up], axis=1)  # 2 = Up, per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1))
            + _png_chunk(b"IEND", b""))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_rgb(data: bytes) -> np.ndarray:
    """Decodes bytes this platform wrote itself (already checked at ingest) to ``[H, W, 3]`` uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def shard_row(path: str, image_id: str) -> str:
    """Where a shard row is, for messages: ``dataset <folder>, shard <split>/<file>, image_id <id>``.

    Args:
        path: The shard file, ``<dataset folder>/<split>/<file>.parquet`` as every writer lays it out.
        image_id: The row's ``image_id``.
    """
    shard = Path(path)
    return f"dataset {shard.parent.parent}, shard {shard.parent.name}/{shard.name}, image_id {image_id}"


# A checksum-valid shard with a bad record was written bad (or rewritten with its manifest): no reread helps.
STORED_FIX = ("rebuild the dataset (rerun the command that wrote it with --overwrite), or set "
              "data.skip_corrupt=true (--set data.skip_corrupt=true) to skip such rows and count them")


def decode_stored(data: bytes, *, where: str) -> np.ndarray:
    """Decodes an image this platform stored in a shard, checking it is still a 112x112 face.

    Args:
        data: The ``image`` cell of a shard row.
        where: The row, from :func:`shard_row`.

    Returns:
        ``[112, 112, 3]`` uint8 array.

    Raises:
        CorruptImageError: Undecodable bytes or another size, naming ``where``.
    """
    try:
        pixels = decode_rgb(data)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise CorruptImageError(where, f"undecodable image ({type(exc).__name__}: {exc})", STORED_FIX) from exc
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise CorruptImageError(where, f"image is {pixels.shape[1]}x{pixels.shape[0]}, not "
                                       f"{IMAGE_SIZE}x{IMAGE_SIZE}", STORED_FIX)
    return pixels


def decode_rows(images: Sequence[bytes], *, image_ids: Sequence[str], paths: Sequence[str],
                skip_corrupt: bool) -> tuple[np.ndarray, list[str]]:
    """Decodes the ``image`` cells of shard rows; a bad one raises, or is skipped and said why.

    Args:
        images: Encoded images, one per row.
        image_ids: The rows' ``image_id``.
        paths: The shard file of each row (Ray Data's ``include_paths=True`` column).
        skip_corrupt: Return a reason for a bad row instead of raising (``data.skip_corrupt``).

    Returns:
        ``([N, 112, 112, 3]`` uint8 pixels, all zeros for a skipped row, ``reasons)``: per row ``""``
        when it decoded, else why not (:attr:`CorruptImageError.reason`).

    Raises:
        CorruptImageError: A bad row while ``skip_corrupt`` is off, naming dataset, shard and image_id.
    """
    pixels = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (N, H, W, 3)
    reasons = [""] * len(images)
    for i, (data, image_id, path) in enumerate(zip(images, image_ids, paths, strict=True)):
        try:
            pixels[i] = decode_stored(data, where=shard_row(str(path), str(image_id)))
        except CorruptImageError as exc:
            if not skip_corrupt:
                raise
            reasons[i] = exc.reason
    return pixels, reasons


def skipped_record(path: str, image_id: str, reason: str) -> dict[str, str]:
    """How a manifest's report lists one skipped row (``corrupt_records``)."""
    return {"where": shard_row(path, image_id), "image_id": str(image_id), "reason": reason}


def corrupt_records(reasons: Sequence[str], *, image_ids: Sequence[str], paths: Sequence[str],
                    skip_corrupt: bool) -> list[dict[str, str]]:
    """What to do with the rows a decoder marked corrupt (:func:`decode_rows` with ``skip_corrupt``).

    Ray Data workers mark bad rows instead of raising, and whoever consumes their output (the
    driver, a training worker) calls this: an error raised inside a Ray Data task reaches the driver
    as a remote traceback, and one skipped there could not be counted anywhere.

    Args:
        reasons: Per row ``""`` or why it is corrupt.
        image_ids: The rows' ``image_id``.
        paths: The rows' shard files.
        skip_corrupt: Skip the bad rows (``data.skip_corrupt``) instead of raising for the first.

    Returns:
        The skipped rows as a manifest's report lists them (:func:`skipped_record`).

    Raises:
        CorruptImageError: A bad row while ``skip_corrupt`` is off, naming dataset, shard and image_id.
    """
    records = []
    for reason, image_id, path in zip(reasons, image_ids, paths, strict=True):
        if not reason:
            continue
        if not skip_corrupt:
            raise CorruptImageError(shard_row(str(path), str(image_id)), str(reason), STORED_FIX)
        records.append(skipped_record(str(path), str(image_id), str(reason)))
    return records
