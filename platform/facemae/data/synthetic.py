"""The built-in synthetic face dataset: N identities x M images, no real faces anywhere.

Every identity has stable traits (face shape, skin tone, eyes, brows, nose, mouth, hair, facial
hair, glasses) sampled from its own RNG; every image redraws pose, lighting, expression,
background, clothing and pixel noise from a per-image RNG. Both RNGs are seeded from SeedSequence
entropy lists (``[seed, identity]`` and ``[seed, identity, index, 1]``, a domain's own entropy appended),
so an image depends only on ``(identity, index, seed, style, domain)``: never on generation order, the
process that made it, or global state.

The per-image variation is tuned so identity is learnable but not a raw-pixel lookup: images of
one identity are closer in pixel space on average than images of different identities, yet
raw-pixel 1-nearest-neighbour identity accuracy stays well below 100% (about 0.3-0.5 for 20
identities x 5 gallery / 5 query images; ``tests/test_synthetic.py`` measures both).

Geometry is written in face units: the image spans ``[-1, 1]`` on both axes, y pointing down.
Shapes are polygons, so pose (rotation, scale, shift) is one affine map applied to their vertices
rather than a resampling of pixels; they are drawn at ``_SUPERSAMPLE`` x the output size and
box-downsampled for anti-aliasing. Only numpy and Pillow are imported.

Two styles draw the same shapes and poses (:data:`STYLES`). ``photo``, the default, gives them the
image statistics of real aligned 112x112 crops (``facemae.measures.image_stats``): the face shaded
as an ellipsoid under directional light, natural-image (1/f^3) texture on skin and backdrop, lens
blur, sensor noise at real levels and JPEG compression. ``cartoon`` is the generator before styles
existed (flat colours under strong pixel noise, about seven times a photo's high-frequency energy),
kept pixel for pixel as a second rendering. ``benchmarks/synthetic_stats.py`` measures both against
the real reference.

Two domains (:data:`DOMAINS`) draw different people under different conditions, for releases of
identities from another dataset: ``base``, the default (every dataset made before domains existed), and
``shifted``: a darker-skinned population with wider, rounder faces, wider-set eyes, longer noses, more
glasses and facial hair, photographed under harsher side light, underexposed, at lower JPEG quality
and with more head roll. A domain changes only the ranges values are drawn from, never the draw order.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Colour = tuple[int, int, int]

HAIR_STYLES: tuple[str, ...] = ("bald", "buzz", "short", "long", "fringe", "afro", "bun")
FACIAL_HAIR: tuple[str, ...] = ("none", "moustache", "beard")
MOUTH_SHAPES: tuple[str, ...] = ("neutral", "smile", "open")
STYLES: tuple[str, ...] = ("photo", "cartoon")
DEFAULT_STYLE = "photo"
DOMAINS: tuple[str, ...] = ("base", "shifted")
DEFAULT_DOMAIN = "base"
# The pixel definition each style draws, numbered over the generator's history; a manifest records it
# and ingest refuses a dataset made by another. Version 1 is every dataset made before styles existed,
# which ``cartoon`` still draws pixel for pixel. Bump a style's number whenever its pixels change.
GENERATOR_VERSIONS: dict[str, int] = {"cartoon": 1, "photo": 2}
TEXTURE_SLOPE = -3.0  # power spectrum of the photo style's texture, log-log
TEXTURE_BANK = 64  # precomputed texture fields per image size
# Per-image ranges of the photo style, uniform draws: (low, high).
PHOTO: dict[str, tuple[float, float]] = {
    "roundness": (0.15, 0.4),  # how much darker the face's outline is than its middle
    "light": (0.05, 0.4),  # directional light, relative change from the centre to an edge
    "contrast": (1.0, 1.45),
    "brightness": (-25.0, 25.0),
    "skin_texture": (3.0, 8.0),  # grey levels (std) of 1/f^3 texture on the head
    "backdrop_texture": (8.0, 30.0),  # ... and on the backdrop: clutter
    "blur_tap": (0.3, 0.9),  # lens blur [t, 1, t]: standard deviation sqrt(2t / (1 + 2t)), 0.61-0.80 px
    "noise": (1.0, 2.6),  # sensor noise, grey levels (std)
    "jpeg_quality": (70, 96),
}
# The shifted domain's capture: harsh side light on rounder heads, underexposed, noisier, more compressed.
_SHIFTED_PHOTO: dict[str, tuple[float, float]] = {
    **PHOTO, "roundness": (0.3, 0.5), "light": (0.35, 0.7), "brightness": (-35.0, 10.0), "noise": (2.0, 4.0),
    "jpeg_quality": (40, 75)}

_SUPERSAMPLE = 2
_MAX_IDENTITY = 999_999  # image_id pads to 6 digits, so ids sort in identity order
_MAX_INDEX = 9_999  # ... and 4 digits for the image index
_MIN_SIZE = 16
_ZOOM = 1.5  # face units -> image: fills the frame like an aligned 112x112 face crop

# Anchor palettes, interpolated and jittered per identity.
_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 167], [224, 172, 128], [198, 134, 96], [141, 85, 56], [92, 56, 38]],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [[20, 16, 14], [58, 38, 26], [104, 68, 40], [150, 84, 44], [205, 170, 110], [160, 158, 152]],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array(
    [[92, 56, 30], [60, 40, 24], [70, 120, 170], [80, 130, 80], [130, 110, 60], [110, 120, 130]],
    dtype=np.float64,
)

_THETA = np.linspace(0, 2 * np.pi, 40, endpoint=False)
# (40, 2) unit circle starting at 3 o'clock; y points down, so vertices run clockwise on screen and
# [20:] is the upper half from 9 o'clock over the top to 3 o'clock.
_CIRCLE = np.stack([np.cos(_THETA), np.sin(_THETA)], axis=1)


@dataclass(frozen=True)
class IdentityTraits:
    """The features that stay fixed across all images of one identity.

    Lengths are in face units (the image spans [-1, 1]); colours are RGB in 0..255.

    Attributes:
        face_width: Half-width of the face ellipse.
        face_height: Half-height of the face ellipse.
        chin_taper: How much the lower half narrows towards the chin (0 = plain ellipse).
        skin: Skin colour.
        eye_spacing: Horizontal distance from the face centre line to each eye centre.
        eye_size: Half-width of each eye.
        eye_height: Vertical position of the eyes relative to the face centre.
        iris: Iris colour.
        brow_thickness: Thickness of the eyebrows.
        brow_angle: Eyebrow tilt in degrees; positive raises the outer ends.
        nose_length: Distance from the eye line to the nose tip.
        nose_width: Half-width of the nostrils.
        mouth_width: Half-width of the mouth.
        lip_thickness: Thickness of each lip at its centre.
        lip: Lip colour.
        hair_style: One of ``HAIR_STYLES``.
        hair: Hair colour (also used, darkened, for brows and facial hair).
        facial_hair: One of ``FACIAL_HAIR``.
        glasses: Frame colour, or None for no glasses.
    """

    face_width: float
    face_height: float
    chin_taper: float
    skin: Colour
    eye_spacing: float
    eye_size: float
    eye_height: float
    iris: Colour
    brow_thickness: float
    brow_angle: float
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_thickness: float
    lip: Colour
    hair_style: str
    hair: Colour
    facial_hair: str
    glasses: Colour | None


@dataclass(frozen=True)
class Domain:
    """The ranges one synthetic domain draws its people and their photos from (uniform draws ``(low, high)``).

    Attributes:
        skin: Position along the skin-tone anchors, 0 (lightest) to 5 (darkest).
        face_width: Half-width of the face ellipse, face units.
        face_height: Half-height of the face ellipse.
        chin_taper: How much the lower half narrows towards the chin.
        eye_spacing: Distance from the centre line to each eye.
        nose_length: Distance from the eye line to the nose tip.
        glasses: Share of identities wearing glasses.
        facial_hair: Probabilities of :data:`FACIAL_HAIR`.
        rotation: Largest head roll, degrees either way.
        photo: The ``photo`` style's per-image ranges (:data:`PHOTO` for ``base``).
        entropy: Appended to every seed of the domain's generators, so that its people are not the other
            domain's at the same seed and index (``()`` for ``base``: datasets made before domains).
    """

    skin: tuple[float, float]
    face_width: tuple[float, float]
    face_height: tuple[float, float]
    chin_taper: tuple[float, float]
    eye_spacing: tuple[float, float]
    nose_length: tuple[float, float]
    glasses: float
    facial_hair: tuple[float, float, float]
    rotation: float
    photo: dict[str, tuple[float, float]]
    entropy: tuple[int, ...] = ()


DOMAIN_RANGES: dict[str, Domain] = {
    "base": Domain(skin=(0.0, 5.0), face_width=(0.34, 0.46), face_height=(0.46, 0.58), chin_taper=(0.0, 0.35),
                   eye_spacing=(0.13, 0.2), nose_length=(0.12, 0.22), glasses=0.25, facial_hair=(0.7, 0.15, 0.15),
                   rotation=12.0, photo=PHOTO),
    "shifted": Domain(skin=(2.5, 5.0), face_width=(0.42, 0.5), face_height=(0.44, 0.52), chin_taper=(0.0, 0.12),
                      eye_spacing=(0.17, 0.22), nose_length=(0.18, 0.26), glasses=0.6, facial_hair=(0.35, 0.3, 0.35),
                      rotation=20.0, photo=_SHIFTED_PHOTO, entropy=(0xD0B,)),
}


@dataclass(frozen=True)
class _Variation:
    """Per-image nuisance factors drawn by ``_sample_variation``."""

    rotation: float  # degrees
    scale: float
    shift: tuple[float, float]  # face units
    yaw: float  # horizontal offset of the inner features (ears move the other way): a cheap head turn
    smile: float
    mouth_open: float
    eye_open: float
    gaze: tuple[float, float]
    brow_raise: float
    shirt: Colour


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def _check_size(size: int) -> None:
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} pixels, got {size}")


def _palette(rng: np.random.Generator, anchors: np.ndarray, *, jitter: float,
             span: tuple[float, float] | None = None) -> Colour:
    """Interpolates between two neighbouring anchor colours (a position drawn from ``span``, default all of
    them) and adds per-channel jitter."""
    position = rng.uniform(*(span or (0, len(anchors) - 1)))
    low = int(position)
    high = min(low + 1, len(anchors) - 1)
    colour = anchors[low] + (anchors[high] - anchors[low]) * (position - low)
    colour = colour + rng.normal(0, jitter, 3)
    return _as_colour(colour)


def _as_colour(values: np.ndarray) -> Colour:
    r, g, b = np.clip(np.rint(values), 0, 255).astype(int).tolist()
    return (r, g, b)


def _shade(colour: Colour, factor: float) -> Colour:
    return _as_colour(np.asarray(colour, dtype=np.float64) * factor)


def identity_traits(identity: int, *, seed: int, domain: str = DEFAULT_DOMAIN) -> IdentityTraits:
    """Samples the stable features of one identity.

    Args:
        identity: Identity number, >= 0.
        seed: Dataset seed; the same (identity, seed, domain) always gives the same traits.
        domain: One of :data:`DOMAINS`: the population drawn from.

    Returns:
        The identity's traits.
    """
    _check_non_negative(identity=identity, seed=seed)
    _check_domain(domain)
    ranges = DOMAIN_RANGES[domain]
    rng = np.random.default_rng([seed, identity, *ranges.entropy])
    skin = _palette(rng, _SKIN_TONES, jitter=6.0, span=ranges.skin)
    hair_style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    hair = _palette(rng, _HAIR_COLOURS, jitter=8.0)
    facial_hair = FACIAL_HAIR[int(rng.choice(len(FACIAL_HAIR), p=list(ranges.facial_hair)))]
    has_glasses = rng.random() < ranges.glasses
    frame = _as_colour(rng.choice([[20, 20, 20], [90, 60, 30], [150, 150, 160], [120, 20, 30]]))
    return IdentityTraits(
        face_width=float(rng.uniform(*ranges.face_width)),
        face_height=float(rng.uniform(*ranges.face_height)),
        chin_taper=float(rng.uniform(*ranges.chin_taper)),
        skin=skin,
        eye_spacing=float(rng.uniform(*ranges.eye_spacing)),
        eye_size=float(rng.uniform(0.055, 0.085)),
        eye_height=float(rng.uniform(-0.1, 0.0)),
        iris=_palette(rng, _IRIS_COLOURS, jitter=10.0),
        brow_thickness=float(rng.uniform(0.014, 0.04)),
        brow_angle=float(rng.uniform(-14.0, 14.0)),
        nose_length=float(rng.uniform(*ranges.nose_length)),
        nose_width=float(rng.uniform(0.035, 0.07)),
        mouth_width=float(rng.uniform(0.09, 0.17)),
        lip_thickness=float(rng.uniform(0.012, 0.03)),
        lip=_as_colour(np.multiply(skin, rng.uniform(0.62, 0.8)) + np.array([40, 0, 5]) * rng.uniform(0.3, 1.0)),
        hair_style=hair_style,
        hair=hair,
        facial_hair=facial_hair,
        glasses=frame if has_glasses else None,
    )


def _sample_variation(rng: np.random.Generator, ranges: Domain) -> _Variation:
    """Draws one image's pose and expression; the draw order is part of the dataset definition."""
    mouth = MOUTH_SHAPES[int(rng.choice(len(MOUTH_SHAPES), p=[0.4, 0.4, 0.2]))]
    return _Variation(
        rotation=float(rng.uniform(-ranges.rotation, ranges.rotation)),
        scale=float(rng.uniform(0.9, 1.1)),
        shift=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06))),
        yaw=float(rng.uniform(-0.05, 0.05)),
        smile=float(rng.uniform(0.015, 0.045) if mouth != "neutral" else rng.uniform(-0.005, 0.01)),
        mouth_open=float(rng.uniform(0.02, 0.06)) if mouth == "open" else 0.0,
        eye_open=float(rng.uniform(0.55, 1.1)) if rng.random() > 0.05 else 0.12,
        gaze=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.15, 0.15))),
        brow_raise=float(rng.uniform(-0.01, 0.03)),
        shirt=_as_colour(rng.uniform(20, 235, 3)),
    )


class _Canvas:
    """A supersampled RGBA layer that takes polygons in face units and applies the image pose."""

    def __init__(self, size: int, *, pose: _Variation) -> None:
        pixels = size * _SUPERSAMPLE
        self.image = Image.new("RGBA", (pixels, pixels), (0, 0, 0, 0))
        self._draw = ImageDraw.Draw(self.image)
        angle = math.radians(pose.rotation)
        half = pixels / 2
        rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        # Row vectors: pixel = point @ matrix + offset.
        self._unit = pose.scale * _ZOOM * half
        self._matrix = self._unit * rotate.T
        self._offset = half * (1 + np.asarray(pose.shift))

    def face_units(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Face-unit coordinates ``(x, y)`` of each output pixel's centre, the pose undone: two ``[S, S]``."""
        centres = (np.arange(size, dtype=np.float32) + 0.5) * _SUPERSAMPLE  # on the supersampled grid
        back = np.linalg.inv(self._matrix).astype(np.float32)  # row vectors: point = (pixel - offset) @ back
        px, py = centres - np.float32(self._offset[0]), centres - np.float32(self._offset[1])
        # Two broadcast sums instead of an (S, S, 2) @ (2, 2) product, which numpy runs as S*S tiny products.
        return px[None, :] * back[0, 0] + py[:, None] * back[1, 0], px[None, :] * back[0, 1] + py[:, None] * back[1, 1]

    def polygon(self, points: np.ndarray, fill: Colour) -> None:
        """Fills a polygon; ``points`` is ``[K, 2]`` in face units."""
        self._draw.polygon((points @ self._matrix + self._offset).ravel().tolist(), fill=fill)

    def line(self, points: np.ndarray, fill: Colour, *, width: float) -> None:
        """Draws a polyline ``width`` face units thick through ``[K, 2]`` points."""
        pixels = (points @ self._matrix + self._offset).ravel().tolist()
        self._draw.line(pixels, fill=fill, width=max(1, round(width * self._unit)), joint="curve")


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """``[40, 2]`` vertices of an axis-aligned ellipse (the pose rotates it later)."""
    return _CIRCLE * (rx, ry) + (cx, cy)


def _face_outline(traits: IdentityTraits, *, grow: float = 1.0) -> np.ndarray:
    """``[40, 2]`` vertices of the face: an ellipse whose lower half narrows by ``chin_taper``."""
    points = _CIRCLE * (traits.face_width * grow, traits.face_height * grow)
    lower = np.clip(_CIRCLE[:, 1], 0, None)
    points[:, 0] *= 1 - traits.chin_taper * lower**2
    return points


def _channel_map(values: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Outer product of an ``[S, S]`` map and per-channel ``[3]`` gains, as ``[S, 3*S]``.

    The ``[S, 3*S]`` view of an HWC image keeps numpy's inner loop S*3 long; broadcasting against a
    trailing axis of 3 is several times slower.
    """
    return np.repeat(values, 3, axis=1) * np.tile(gains.astype(np.float32), values.shape[1])


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour linear gradient in a random direction, as a ``size`` x ``size`` RGB image."""
    colours = rng.uniform(20, 235, (2, 3))
    # Halfway to grey: muted, room-like backdrops rather than saturated primaries.
    start, end = 0.5 * colours + 0.5 * colours.mean(axis=1, keepdims=True)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = np.clip(0.5 + math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None], 0, 1)
    pixels = _channel_map(ramp, end - start) + np.tile(start.astype(np.float32), size)  # (S, 3S)
    return Image.fromarray(pixels.astype(np.uint8).reshape(size, size, 3))


def _draw_hair_back(canvas: _Canvas, traits: IdentityTraits) -> None:
    """Hair volume behind the head (drawn before the face)."""
    w, h, style = traits.face_width, traits.face_height, traits.hair_style
    if style in ("short", "fringe", "bun"):
        canvas.polygon(_ellipse(0, -0.08 * h, w * 1.12, h * 1.02), traits.hair)
    elif style == "afro":
        theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        curls = 1 + 0.04 * np.cos(16 * theta)
        outline = np.stack([np.cos(theta) * w * 1.45, np.sin(theta) * h * 1.18], axis=1) * curls[:, None]
        canvas.polygon(outline + (0, -0.22 * h), traits.hair)
    elif style == "long":
        top = _ellipse(0, -0.05 * h, w * 1.3, h * 1.1)[20:]  # upper half, right to left
        sides = np.array([[w * 1.4, h * 1.5], [-w * 1.4, h * 1.5]])
        canvas.polygon(np.concatenate([top, sides]), traits.hair)
    if style == "bun":
        canvas.polygon(_ellipse(0, -h * 1.12, w * 0.4, h * 0.26), traits.hair)


def _draw_hair_front(canvas: _Canvas, traits: IdentityTraits) -> None:
    """The part of the hair that covers the top of the forehead (drawn after the face)."""
    h, style = traits.face_height, traits.hair_style
    if style == "bald":
        return
    # Hairline height as a fraction of the face half-height above the centre.
    hairline = {"buzz": -0.62, "short": -0.55, "long": -0.5, "fringe": -0.18, "afro": -0.55, "bun": -0.6}[style]
    outline = _face_outline(traits, grow=1.02 if style == "buzz" else 1.06)[20:]  # upper half
    ends = outline[[0, -1]]
    xs = np.linspace(ends[1, 0], ends[0, 0], 17)
    # Hairline: flat across the forehead, bending down to meet the outline at the temples.
    reach = (xs / ends[1, 0]) ** 6
    ys = hairline * h + (ends[1, 1] - hairline * h) * reach
    if style == "fringe":
        ys = ys + 0.035 * (np.arange(17) % 2) * (1 - reach)  # jagged fringe tips
    canvas.polygon(np.concatenate([outline, np.stack([xs, ys], axis=1)]), traits.hair)


def _draw_head(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Shirt, neck, ears and the face itself."""
    w, h = traits.face_width, traits.face_height
    neck = np.array([[-w * 0.45, 0.3 * h], [w * 0.45, 0.3 * h], [w * 0.5, 1.5 * h], [-w * 0.5, 1.5 * h]])
    canvas.polygon(neck, _shade(traits.skin, 0.85))
    canvas.polygon(_ellipse(0, h * 1.95, w * 2.3, h * 0.75), variation.shirt)
    for side in (-1, 1):
        ear = _ellipse(side * w * 0.97 - variation.yaw, traits.eye_height + 0.06, 0.055, 0.1)
        canvas.polygon(ear, _shade(traits.skin, 0.93))
    canvas.polygon(_face_outline(traits), traits.skin)
    if traits.facial_hair == "beard":
        beard = _face_outline(traits, grow=1.01)[2:19]  # lower half, right to left
        inner = np.array([[-w * 0.75, 0.18 * h], [variation.yaw, 0.45 * h], [w * 0.75, 0.18 * h]])
        canvas.polygon(np.concatenate([beard, inner]), _shade(traits.hair, 0.9))


def _draw_eyes(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Almond-shaped eye whites, irises, pupils and upper lids."""
    rx = traits.eye_size
    ry = rx * 0.55 * variation.eye_open
    u = np.linspace(-1, 1, 13)
    for side in (-1, 1):
        cx, cy = side * traits.eye_spacing + variation.yaw, traits.eye_height
        upper = np.stack([cx + u * rx, cy - ry * (1 - u**2)], axis=1)
        lower = np.stack([cx - u * rx, cy + 0.8 * ry * (1 - u**2)], axis=1)
        canvas.polygon(np.concatenate([upper, lower]), (245, 242, 236))
        iris_r = min(rx * 0.5, ry * 1.1)
        ix, iy = cx + variation.gaze[0] * rx * 0.5, cy + variation.gaze[1] * ry
        if iris_r > 0.008:
            canvas.polygon(_ellipse(ix, iy, iris_r, iris_r), traits.iris)
            canvas.polygon(_ellipse(ix, iy, iris_r * 0.45, iris_r * 0.45), (15, 12, 12))
        canvas.line(upper, (35, 25, 25), width=0.014)


def _draw_brows(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Three-point brows above each eye, tilted by ``brow_angle`` and lifted by ``brow_raise``."""
    rx = traits.eye_size
    y = traits.eye_height - rx * 0.9 - 0.03 - variation.brow_raise
    tilt = math.tan(math.radians(traits.brow_angle)) * rx * 1.3
    for side in (-1, 1):
        cx = side * traits.eye_spacing + variation.yaw
        inner, outer = cx - side * rx * 1.2, cx + side * rx * 1.3
        brow = np.array([[inner, y + tilt * 0.2], [cx, y - 0.01], [outer, y - tilt]])
        canvas.line(brow, _shade(traits.hair, 0.7), width=traits.brow_thickness)


def _draw_nose(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Side shadow, tip and nostrils, ``nose_length`` below the eye line."""
    x = variation.yaw * 1.3
    tip_y = traits.eye_height + traits.nose_length
    bridge = np.array([[x - 0.01, traits.eye_height + 0.02], [x - 0.025, tip_y - 0.02]])
    canvas.line(bridge, _shade(traits.skin, 0.8), width=0.018)
    canvas.polygon(_ellipse(x, tip_y - 0.01, traits.nose_width * 0.75, 0.03), _shade(traits.skin, 0.9))
    for side in (-1, 1):
        nostril = _ellipse(x + side * traits.nose_width * 0.55, tip_y + 0.008, 0.018, 0.011)
        canvas.polygon(nostril, _shade(traits.skin, 0.55))


def _draw_mouth(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Lips (and moustache) around a centre line that curves up by ``smile`` at the corners."""
    w, tl = traits.mouth_width, traits.lip_thickness
    cx = variation.yaw * 1.1
    cy = traits.eye_height + traits.nose_length + 0.06 + tl + variation.mouth_open * 0.5
    u = np.linspace(-1, 1, 15)
    xs, centre, bulge = cx + u * w, cy - variation.smile * u**2, 1 - u**2
    gap = variation.mouth_open * bulge / 2
    upper = np.stack([xs, centre - gap - tl * bulge**0.6], axis=1)
    lower = np.stack([xs[::-1], (centre + gap + tl * 1.2 * bulge**0.6)[::-1]], axis=1)
    canvas.polygon(np.concatenate([upper, lower]), traits.lip)
    if variation.mouth_open > 0:
        inner_top = np.stack([xs, centre - gap], axis=1)
        inner_bottom = np.stack([xs[::-1], (centre + gap)[::-1]], axis=1)
        canvas.polygon(np.concatenate([inner_top, inner_bottom]), (70, 20, 25))
        teeth_bottom = np.stack([xs[::-1], (centre - gap * 0.2)[::-1]], axis=1)
        canvas.polygon(np.concatenate([inner_top, teeth_bottom])[2:-2], (235, 232, 222))
    else:
        canvas.line(np.stack([xs, centre], axis=1), _shade(traits.lip, 0.6), width=0.008)
    if traits.facial_hair == "moustache":
        top, tips = cy - tl - 0.04, cy - tl * 0.5
        tache = np.array([[cx - w * 1.1, tips], [cx, top], [cx + w * 1.1, tips], [cx, top + 0.035]])
        canvas.polygon(tache, _shade(traits.hair, 0.9))


def _draw_glasses(canvas: _Canvas, traits: IdentityTraits, variation: _Variation) -> None:
    """Round frames around both eyes joined by a bridge."""
    if traits.glasses is None:
        return
    r = traits.eye_size * 1.45
    for side in (-1, 1):
        cx = side * traits.eye_spacing + variation.yaw
        ring = _ellipse(cx, traits.eye_height, r, r * 0.8)
        canvas.line(np.concatenate([ring, ring[:1]]), traits.glasses, width=0.02)
    inner, y = traits.eye_spacing - r, traits.eye_height - 0.02
    canvas.line(np.array([[variation.yaw - inner, y], [variation.yaw + inner, y]]), traits.glasses, width=0.018)


def _lighting(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Directional light, white balance, brightness/contrast and sensor noise.

    Args:
        image: ``[S, S, 3]`` uint8.
        rng: The image's generator.

    Returns:
        ``[S, S, 3]`` uint8.
    """
    size = image.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 0.45)
    gains = rng.uniform(0.9, 1.1, 3)  # white balance
    brightness = rng.uniform(-30, 30)
    contrast = rng.uniform(0.7, 1.2)
    sigma = rng.uniform(2.0, 8.0)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + strength * (math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None])  # (S, S)
    # (x * light * gains - 128) * contrast + 128 + brightness, folded into one scale and one offset.
    out = image.reshape(size, 3 * size) * _channel_map(light, gains * contrast)
    out += 128 * (1 - contrast) + brightness
    # Uniform noise of standard deviation sigma: a quarter of the cost of standard_normal here.
    noise = rng.random(out.shape, dtype=np.float32)
    noise -= 0.5
    noise *= sigma * math.sqrt(12)
    out += noise
    return np.clip(out, 0, 255, out=out).astype(np.uint8).reshape(size, size, 3)


def _photo_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient in a random direction, as ``_background`` draws it but darker and brighter:
    the indoor and outdoor backdrops of face photos carry much of a crop's contrast outside the face.
    Drawn on an 8 x 8 grid and resized bilinearly (a fifth of the cost of drawing every pixel): the same
    ramp, flat within half a coarse cell of the border."""
    colours = rng.uniform(0, 255, (2, 3))
    start, end = 0.5 * colours + 0.5 * colours.mean(axis=1, keepdims=True)
    angle = rng.uniform(0, 2 * np.pi)
    axis = (np.arange(8, dtype=np.float32) + 0.5) * (size / 8) / size - 0.5  # pixel centres of the coarse grid
    ramp = np.clip(0.5 + math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None], 0, 1)[..., None]
    coarse = start + ramp * (end - start)  # (8, 8, 3)
    return Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=4)
def _texture_bank(size: int) -> np.ndarray:
    """``[TEXTURE_BANK, S, S]`` float32 fields of unit standard deviation whose power spectrum falls as
    ``r^TEXTURE_SLOPE`` (r in cycles per image): natural-image noise, drawn once from a fixed seed.

    FFT-filtered white noise is periodic, so any circular shift of a field is as seamless as the field.
    """
    radius = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]) * size
    filt = np.zeros_like(radius)
    filt[radius > 0] = radius[radius > 0] ** (TEXTURE_SLOPE / 2)
    white = np.random.default_rng(0x7E47).standard_normal((TEXTURE_BANK, size, size))
    fields = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(size, size))
    return (fields / fields.std(axis=(1, 2), keepdims=True)).astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[S, S]`` float32 texture of unit standard deviation with a natural-image (1/f^3) spectrum: skin
    mottling, hair and backdrop clutter at the scales a 112 px crop shows, not pixel noise.

    One of :data:`TEXTURE_BANK` precomputed fields, circularly shifted, flipped and transposed at random
    (8 x S^2 variants of each): a twentieth of the cost of filtering fresh noise per image. Textures are
    nuisance, drawn per image and independent of identity, so reuse across images teaches nothing.
    """
    index, dy, dx, flips = rng.integers(0, (TEXTURE_BANK, size, size, 8))
    field = np.roll(_texture_bank(size)[index], (int(dy), int(dx)), axis=(0, 1))
    if flips & 1:
        field = field[::-1]
    if flips & 2:
        field = field[:, ::-1]
    return field.T if flips & 4 else field


def _relief(canvas: _Canvas, traits: IdentityTraits, size: int) -> np.ndarray:
    """``[S, S]`` float32 in [0, 1]: how far each pixel's surface turns away from the camera if the face
    were an ellipsoid, ``1 - n_z`` (0 at the face's middle, 1 on and beyond its outline)."""
    x, y = canvas.face_units(size)
    inside = 1 - (x / traits.face_width) ** 2 - (y / traits.face_height) ** 2
    return 1 - np.sqrt(np.clip(inside, 0, 1, out=inside), out=inside)


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> np.ndarray:
    """``[S]`` float32 pixel positions from -1 to 1 (read-only, shared)."""
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    axis.flags.writeable = False
    return axis


def _lens_blur(image: np.ndarray, tap: float) -> np.ndarray:
    """Separable ``[tap, 1, tap]`` blur of an ``[S, 3*S]`` (HWC) image, edges mirrored, *not* normalised:
    the output is ``(1 + 2 tap)^2`` times a lens blur of standard deviation ``sqrt(2 tap / (1 + 2 tap))`` px
    (PIL's BoxBlur of radius ``tap`` < 1), so the caller folds the scale into a product it makes anyway."""
    rows = np.empty_like(image)
    np.add(image[:, :-6], image[:, 6:], out=rows[:, 3:-3])  # left + right neighbour: 3 columns over in HWC
    np.multiply(image[:, 3:6], 2, out=rows[:, :3])  # mirrored edges
    np.multiply(image[:, -6:-3], 2, out=rows[:, -3:])
    rows *= tap
    rows += image
    out = np.empty_like(rows)
    np.add(rows[:-2], rows[2:], out=out[1:-1])
    np.multiply(rows[1], 2, out=out[0])
    np.multiply(rows[-2], 2, out=out[-1])
    out *= tap
    out += rows
    return out


def _photograph(image: np.ndarray, cover: np.ndarray, relief: np.ndarray, rng: np.random.Generator,
                photo: dict[str, tuple[float, float]] = PHOTO) -> np.ndarray:
    """Turns a flat drawing into the statistics of an aligned face photo: the head shaded as a rounded
    solid, directional light, texture, white balance and exposure, lens blur, sensor noise and JPEG.

    The result's median Laplacian variance, spectrum slope and contrast fall inside the interquartile
    ranges of real aligned crops (``benchmarks/results/synthetic_stats.md``); :data:`PHOTO` holds the
    ranges that put them there (the ``base`` domain's; ``photo`` is the domain's own).

    Args:
        image: ``[S, S, 3]`` uint8, the drawing.
        cover: ``[S, S]`` uint8, where the head covers the backdrop (255 = head).
        relief: ``[S, S]`` from :func:`_relief`.
        rng: The image's generator.
        photo: The per-image ranges, keyed as :data:`PHOTO`.

    Returns:
        ``[S, S, 3]`` uint8.
    """
    size = image.shape[0]
    head = cover.astype(np.float32) / 255  # (S, S)
    roundness = rng.uniform(*photo["roundness"])
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(*photo["light"])
    axis = _axis(size)
    light = (1 - roundness * head * relief) * (1 + strength * (math.cos(angle) * axis[None, :]
                                                               + math.sin(angle) * axis[:, None]))  # (S, S)
    gains = rng.uniform(0.9, 1.1, 3)  # white balance
    contrast = rng.uniform(*photo["contrast"])
    brightness = rng.uniform(*photo["brightness"])
    amplitude = rng.uniform(*photo["skin_texture"]) * head + rng.uniform(*photo["backdrop_texture"]) * (1 - head)
    texture = _texture(rng, size) * amplitude  # (S, S) grey levels
    tap = rng.uniform(*photo["blur_tap"])
    # Exposure is linear, so the blur's normalisation (1 + 2 tap)^-2 rides along in the channel gains and
    # the offset is added after the blur, with the noise.
    exposure = gains * contrast / (1 + 2 * tap) ** 2
    out = _lens_blur((image.reshape(size, 3 * size) + np.repeat(texture, 3, axis=1)) * _channel_map(light, exposure),
                     tap)
    noise = rng.random((size, size), dtype=np.float32)  # luminance noise; JPEG's 4:2:0 drops most chroma noise
    noise -= 0.5
    noise *= rng.uniform(*photo["noise"]) * math.sqrt(12)  # uniform of that standard deviation
    noise += 128 * (1 - contrast) + brightness
    out += np.repeat(noise, 3, axis=1)
    exposed = np.clip(out, 0, 255, out=out).astype(np.uint8).reshape(size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(exposed).save(buffer, format="JPEG", quality=int(rng.integers(*photo["jpeg_quality"])))
    return np.asarray(Image.open(buffer))


def render_face(traits: IdentityTraits, *, rng: np.random.Generator, size: int = 112,
                style: str = DEFAULT_STYLE, domain: str = DEFAULT_DOMAIN) -> np.ndarray:
    """Draws one image of an identity, with pose, expression, background and lighting from ``rng``.

    Args:
        traits: The identity to draw.
        rng: Source of all per-image variation; consumed in a fixed order.
        size: Output side length in pixels.
        style: One of :data:`STYLES`: ``photo`` (the statistics of aligned photos) or ``cartoon``
            (flat shapes under sensor noise, generator version 1).
        domain: One of :data:`DOMAINS`: the head roll and, in the ``photo`` style, the capture conditions.

    Returns:
        ``[size, size, 3]`` uint8 RGB image.
    """
    _check_size(size)
    _check_style(style)
    _check_domain(domain)
    ranges = DOMAIN_RANGES[domain]
    variation = _sample_variation(rng, ranges)
    image = _background(rng, size) if style == "cartoon" else _photo_background(rng, size)
    canvas = _Canvas(size, pose=variation)
    _draw_hair_back(canvas, traits)
    _draw_head(canvas, traits, variation)
    _draw_eyes(canvas, traits, variation)
    _draw_brows(canvas, traits, variation)
    _draw_nose(canvas, traits, variation)
    _draw_mouth(canvas, traits, variation)
    _draw_hair_front(canvas, traits)
    _draw_glasses(canvas, traits, variation)
    face = canvas.image.reduce(_SUPERSAMPLE)  # box filter: anti-aliased edges in the alpha channel
    image.paste(face, (0, 0), face)
    if style == "cartoon":
        return _lighting(np.asarray(image), rng)
    return _photograph(np.asarray(image), np.asarray(face.getchannel("A")), _relief(canvas, traits, size), rng,
                       ranges.photo)


def generate_image(identity: int, index: int, *, seed: int, size: int = 112,
                   style: str = DEFAULT_STYLE, domain: str = DEFAULT_DOMAIN) -> np.ndarray:
    """Generates image ``index`` of ``identity``; a pure function of its arguments.

    Args:
        identity: Identity number, >= 0.
        index: Image number within the identity, >= 0.
        seed: Dataset seed.
        size: Output side length in pixels.
        style: One of :data:`STYLES`.
        domain: One of :data:`DOMAINS`.

    Returns:
        ``[size, size, 3]`` uint8 RGB image.
    """
    _check_non_negative(identity=identity, index=index, seed=seed)
    traits = identity_traits(identity, seed=seed, domain=domain)
    return render_face(traits, rng=_image_rng(identity, index, seed=seed, domain=domain), size=size, style=style,
                       domain=domain)


def _image_rng(identity: int, index: int, *, seed: int, domain: str) -> np.random.Generator:
    """The generator of one image's variation (pose, expression, backdrop, light, noise)."""
    return np.random.default_rng([seed, identity, index, 1, *DOMAIN_RANGES[domain].entropy])


def generate_identity(identity: int, *, images: int, seed: int, size: int = 112,
                      style: str = DEFAULT_STYLE, domain: str = DEFAULT_DOMAIN) -> np.ndarray:
    """Generates images ``0 .. images-1`` of one identity (equal to calling ``generate_image`` each).

    Args:
        identity: Identity number, >= 0.
        images: Number of images, >= 0.
        seed: Dataset seed.
        size: Output side length in pixels.
        style: One of :data:`STYLES`.
        domain: One of :data:`DOMAINS`.

    Returns:
        ``[images, size, size, 3]`` uint8 RGB images.
    """
    _check_non_negative(identity=identity, images=images, seed=seed)
    _check_size(size)
    _check_style(style)
    traits = identity_traits(identity, seed=seed, domain=domain)
    out = np.empty((images, size, size, 3), dtype=np.uint8)
    for index in range(images):
        out[index] = render_face(traits, rng=_image_rng(identity, index, seed=seed, domain=domain), size=size,
                                 style=style, domain=domain)
    return out


def image_id(identity: int, index: int) -> str:
    """A unique id that sorts by (identity, index), e.g. ``syn-000042-0007``.

    Args:
        identity: Identity number, 0 .. 999999.
        index: Image number within the identity, 0 .. 9999.

    Returns:
        The id string.
    """
    if not 0 <= identity <= _MAX_IDENTITY:
        raise ValueError(f"identity must be in 0..{_MAX_IDENTITY} for a fixed-width id, got {identity}")
    if not 0 <= index <= _MAX_INDEX:
        raise ValueError(f"index must be in 0..{_MAX_INDEX} for a fixed-width id, got {index}")
    return f"syn-{identity:06d}-{index:04d}"
