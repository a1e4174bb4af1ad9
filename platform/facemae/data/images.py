"""Decoding, checking and encoding of face images (112x112 RGB uint8); no cluster imports.

Every reader of user data goes through :func:`decode_face`, so a bad image gets the same error
wherever it came from, naming where it came from.
"""

from __future__ import annotations

import io
import warnings

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # PIL decodes lazily: a truncated file only fails here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise CorruptImageError(where, f"truncated or undecodable image ({type(exc).__name__}: {exc})",
                                f"re-export or remove the file, {_SKIP_HINT}") from exc
    unchanged = img.format in ("JPEG", "PNG")
    if img.mode != "RGB":
        unchanged = False
        if not convert_rgb:
            raise CorruptImageError(where, f"image mode is {img.mode}, not RGB",
                                    f"convert it to RGB, pass --convert-rgb (data.convert_rgb=true), {_SKIP_HINT}")
        img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        if not resize:
            raise CorruptImageError(where, f"image is {img.size[0]}x{img.size[1]}, not {IMAGE_SIZE}x{IMAGE_SIZE}",
                                    f"align faces to {IMAGE_SIZE}x{IMAGE_SIZE}, pass --resize (data.resize=true) "
                                    f"to center-crop and resize, {_SKIP_HINT}")
        img = center_crop_resize(img, IMAGE_SIZE)
        unchanged = False
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels, (data if unchanged else encode_png(pixels))


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Crops the largest centered square and resizes it to ``size`` (bicubic)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encodes ``[H, W, 3]`` uint8 pixels losslessly."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Decodes bytes this platform wrote itself (already checked at ingest) to ``[H, W, 3]`` uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
