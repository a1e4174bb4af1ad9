"""Face detection and ArcFace alignment of raw photos (DESIGN.md, "Data the platform reads"); no cluster imports.

A photo's face is found by MTCNN (facenet-pytorch, whose weights ship inside its wheel: nothing is
downloaded), its five landmarks (eyes, nose, mouth corners) are mapped onto InsightFace's ``arcface_dst``
template by the least-squares similarity (Umeyama, scale included, as
``insightface.utils.face_align.estimate_norm``), and the photo is warped to 112x112 through it, bilinear
with a black border (``norm_crop``'s ``cv2.warpAffine``). The math is numpy; torch is imported only with
the detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from facemae.config import IMAGE_SIZE, MULTIPLE_FACES
from facemae.data.images import CorruptImageError, encode_png, open_image, prepare_face, to_rgb

# insightface/python-package/insightface/utils/face_align.py: the five landmarks of a 112x112 ArcFace
# crop, in the order MTCNN gives them: left eye, right eye, nose tip, left and right mouth corner.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)  # (5, 2) x, y

REFUSALS = ("no_face", "low_score", "too_small")  # why a photo was not aligned (report keys)
_FIX = ("remove the image, lower data.align_min_score / data.align_min_face, or pass --skip-corrupt "
        "(data.skip_corrupt=true) to count it in the manifest and go on")


class FaceNotAlignedError(CorruptImageError):
    """A decodable photo holds no face the settings accept; ``kind`` is one of :data:`REFUSALS`."""

    def __init__(self, where: str, reason: str, kind: str, score: float | None = None) -> None:
        super().__init__(where, reason, _FIX)
        self.kind = kind
        self.score = score

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), (self.where, self.reason, self.kind, self.score)


def umeyama(src: np.ndarray, dst: np.ndarray, *, estimate_scale: bool = True) -> np.ndarray:
    """The least-squares similarity taking ``src`` points onto ``dst`` (Umeyama 1991, eq. 40-41).

    The same computation as scikit-image's ``_umeyama``, which ``SimilarityTransform.estimate`` and so
    InsightFace's ``estimate_norm`` run.

    Args:
        src: ``[N, 2]`` points.
        dst: ``[N, 2]`` points they should land on.
        estimate_scale: Fit a scale as well (a similarity); without it, a rigid transform.

    Returns:
        ``[3, 3]`` homogeneous matrix (float64).

    Raises:
        ValueError: The points are all the same (no transform is determined).
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num  # (2, 2) covariance, eq. 38
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1  # eq. 39: no reflection
    t = np.eye(dim + 1)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError(f"the {num} landmarks coincide; no similarity maps them onto the template")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(v) <= 0:
        t[:dim, :dim] = u @ np.diag(np.r_[d[:-1], -1.0]) @ v
    elif rank == dim - 1:
        t[:dim, :dim] = u @ v
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = (s @ d) / src_demean.var(axis=0).sum() if estimate_scale else 1.0  # eq. 42
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean)
    t[:dim, :dim] *= scale
    return t


def estimate_norm(landmarks: np.ndarray, *, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The ``[2, 3]`` affine matrix mapping a photo's five landmarks onto ``arcface_dst`` (``estimate_norm``).

    Args:
        landmarks: ``[5, 2]`` x, y in photo pixels, in :data:`ARCFACE_DST`'s order.
        image_size: Crop side; InsightFace scales the template for multiples of 112 (and shifts it by 8
            px for multiples of 128).
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be [5, 2] (x, y of eyes, nose, mouth corners), got {landmarks.shape}")
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio, diff_x = image_size / 128.0, 8.0 * image_size / 128.0
    else:
        raise ValueError(f"image_size={image_size} must be a multiple of 112 or 128 (InsightFace's templates)")
    dst = ARCFACE_DST.astype(np.float64) * ratio
    dst[:, 0] += diff_x
    return umeyama(landmarks, dst)[:2]


def warp_affine(image: np.ndarray, matrix: np.ndarray, *, size: int = IMAGE_SIZE) -> np.ndarray:
    """Warps ``image`` by ``matrix`` (source -> output pixels) as ``cv2.warpAffine(image, matrix, (size,
    size), borderValue=0.0)`` does: bilinear, each tap outside the image black.

    Pixel centres sit at integer coordinates (OpenCV's and scikit-image's convention). OpenCV rounds
    coordinates to 1/32 px and weights to 15 bits; this computes in float64, within 1 grey level of it.

    Args:
        image: ``[H, W, C]`` uint8.
        matrix: ``[2, 3]`` affine map from ``image`` pixels to output pixels.
        size: Output side.

    Returns:
        ``[size, size, C]`` uint8.
    """
    h, w = image.shape[:2]
    inverse = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]]))  # output -> source
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)  # (size, size) each
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(np.intp), np.floor(sy).astype(np.intp)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]  # (size, size, 1)

    def tap(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:  # (size, size, C): the pixel, black outside
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        return image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * inside

    top = (1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)
    bottom = (1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)
    return np.clip(np.rint((1 - fy) * top + fy * bottom), 0, 255).astype(np.uint8)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, *, size: int = IMAGE_SIZE) -> np.ndarray:
    """InsightFace's ``norm_crop``: ``[H, W, 3]`` photo + ``[5, 2]`` landmarks -> ``[size, size, 3]`` crop."""
    return warp_affine(image, estimate_norm(landmarks, image_size=size), size=size)


@dataclass(frozen=True)
class Face:
    """One detection: ``box`` ``[4]`` x1, y1, x2, y2; ``landmarks`` ``[5, 2]``; MTCNN's probability."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def side(self) -> float:
        """The shorter side of the box, in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@dataclass(frozen=True)
class Aligned:
    """What aligning one photo gave: the crop, the chosen face, and how many faces qualified."""

    pixels: np.ndarray  # [112, 112, 3] uint8
    face: Face
    faces: int


def choose_face(faces: list[Face], *, policy: str, width: int, height: int) -> Face:
    """The face to align among several: the largest box, or the box centre nearest the photo's centre."""
    if policy == "largest":
        return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    if policy == "center":
        cx, cy = width / 2.0, height / 2.0
        return min(faces, key=lambda f: float(((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2))
    raise ValueError(f"data.align_multiple={policy!r} is not one of {MULTIPLE_FACES}")


class FaceAligner:
    """MTCNN plus the ArcFace alignment; build one per work unit. The detector (a second to load) is loaded
    at the first photo to detect: a unit of 112x112 crops never loads it.

    Args:
        min_score: Lowest detection probability aligned (``data.align_min_score``).
        min_face: Shortest face-box side aligned, in photo pixels (``data.align_min_face``).
        multiple: Which of several faces to align (``data.align_multiple``).
    """

    def __init__(self, *, min_score: float, min_face: int, multiple: str) -> None:
        self.min_score, self.min_face, self.multiple = min_score, min_face, multiple
        self._mtcnn: Any = None

    def detect(self, photo: np.ndarray) -> list[Face]:
        """Every face MTCNN finds in ``[H, W, 3]`` uint8 ``photo``, in its order."""
        import torch

        if self._mtcnn is None:  # MTCNN's last stage drops faces under 0.7: lowered to ours, a refused
            # face's score is seen and reported
            self._mtcnn = load_mtcnn(min_face_size=self.min_face, thresholds=[0.6, 0.7, min(0.7, self.min_score)])
        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(Image.fromarray(photo), landmarks=True)
        if boxes is None:
            return []
        return [Face(np.asarray(b, np.float64), float(p), np.asarray(pt, np.float64))
                for b, p, pt in zip(boxes, probs, points)]

    def align(self, photo: np.ndarray, *, where: str) -> Aligned:
        """Detects, picks and aligns the face of ``[H, W, 3]`` uint8 ``photo``.

        Raises:
            FaceNotAlignedError: No face, or none that scores ``min_score`` and is ``min_face`` px wide.
        """
        found = self.detect(photo)
        if not found:
            raise FaceNotAlignedError(where, f"no face of at least {self.min_face} px found", "no_face")
        scored = [f for f in found if f.score >= self.min_score]
        if not scored:
            best = max(f.score for f in found)
            raise FaceNotAlignedError(where, f"no face scores {self.min_score} or more (best {best:.6g})",
                                      "low_score", best)
        faces = [f for f in scored if f.side >= self.min_face]
        if not faces:
            side = max(f.side for f in scored)
            raise FaceNotAlignedError(where, f"face too small ({side:.0f} px < data.align_min_face="
                                             f"{self.min_face})", "too_small", max(f.score for f in scored))
        face = choose_face(faces, policy=self.multiple, width=photo.shape[1], height=photo.shape[0])
        return Aligned(norm_crop(photo, face.landmarks), face, len(faces))

    def prepare(self, data: bytes, *, where: str, convert_rgb: bool) -> tuple[bytes, Aligned | None]:
        """The bytes to store for one folder image: a 112x112 image as it is (an aligned crop already,
        checked like any other), any other size detected and aligned (EXIF orientation honoured).

        Returns:
            ``(encoded bytes, the alignment or None for a crop kept as it was)``.

        Raises:
            CorruptImageError: Undecodable bytes or a refused mode; :class:`FaceNotAlignedError` when no
                face is accepted.
        """
        img = open_image(data, where=where)
        if img.size == (IMAGE_SIZE, IMAGE_SIZE):
            return prepare_face(data, where=where, convert_rgb=convert_rgb)[1], None
        photo = np.asarray(to_rgb(ImageOps.exif_transpose(img), where=where, convert_rgb=convert_rgb), np.uint8)
        aligned = self.align(photo, where=where)
        return encode_png(aligned.pixels), aligned


def load_mtcnn(**kwargs: Any) -> Any:
    """facenet-pytorch's MTCNN on the CPU with its packaged weights, returning every face (``keep_all``).

    Raises:
        ImportError: facenet-pytorch is not installed, saying how to install it without touching torch.
    """
    try:
        from facenet_pytorch import MTCNN
    except ImportError as exc:
        raise ImportError("data.align=mtcnn needs facenet-pytorch: `pip install --no-deps facenet-pytorch==2.5.3` "
                          "(--no-deps keeps your torch; its weights ship in the wheel)") from exc
    return MTCNN(keep_all=True, select_largest=False, device="cpu", **kwargs)


def contact_sheet(tiles: list[np.ndarray], *, captions: list[str] | None = None, columns: int = 8) -> np.ndarray:
    """Lays ``[h, w, 3]`` uint8 tiles (any sizes, each letterboxed into 112x112) out in a grid.

    Args:
        tiles: The images, in reading order.
        captions: One short line under each tile (a refusal's reason), or None.
        columns: Tiles per row.

    Returns:
        ``[rows * cell, columns * cell, 3]`` uint8, grey between the tiles.
    """
    caption_h = 14 if captions else 0
    pad, side = 2, IMAGE_SIZE
    rows = max(1, -(-len(tiles) // columns))
    columns = max(1, min(columns, len(tiles)))
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + caption_h + pad) + pad), (96, 96, 96))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x, y = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + caption_h + pad)
        thumb = ImageOps.pad(Image.fromarray(tile), (side, side), color=(0, 0, 0))
        sheet.paste(thumb, (x, y))
        if captions:
            draw.text((x + 1, y + side + 1), captions[i][:20], fill=(255, 255, 255))
    return np.asarray(sheet, np.uint8)
