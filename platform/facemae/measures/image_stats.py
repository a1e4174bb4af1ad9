"""Image statistics that say whether faces look like aligned photos to a model.

Three per-image numbers on the grayscale image (0.299 R + 0.587 G + 0.114 B, 0-255), the ones the
synthetic-statistics issue measured on 1,000 real aligned crops (LFW deep-funneled, MTCNN landmarks,
InsightFace ``norm_crop``), :data:`REAL_ALIGNED_QUARTILES`:

- ``laplacian_variance``: variance of the 4-neighbour Laplacian over interior pixels (the high-frequency
  energy: sensor noise, texture, sharp edges); the same function ``hf_ratio`` uses.
- ``spectrum_slope``: slope of the radially averaged power spectrum in log-log over radii 4-49 cycles
  per image, the image mean removed and no window. Natural photos sit near -2 to -3; blur steepens it,
  white noise flattens it towards 0.
- ``gray_std``: standard deviation of the grayscale image (global contrast).

Pure numpy: ``images`` are uint8 or float ``[N, H, W, 3]``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from facemae.measures.fidelity import LUMA, laplacian_variance

SLOPE_RADII = (4, 49)  # inclusive, cycles per image: above the face's own scale, below the 112 px Nyquist (56)

# Quartiles 25 / 50 / 75 over 1,000 real aligned 112x112 crops (the synthetic-statistics issue).
REAL_ALIGNED_QUARTILES: dict[str, tuple[float, float, float]] = {
    "laplacian_variance": (96.0, 138.0, 201.0),
    "spectrum_slope": (-3.66, -3.49, -3.33),
    "gray_std": (43.7, 50.6, 57.9),
}


def grayscale(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3] -> [N, H, W]`` float64 luminance, BT.601 weights."""
    return images.astype(np.float64) @ LUMA


def radial_power(images: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of each image's mean-removed luminance.

    Args:
        images: ``[N, H, W, 3]`` with ``H == W``.

    Returns:
        ``[N, R]`` mean ``|FFT|^2`` over the frequencies at distance ``[r, r+1)`` from DC, for each integer
        radius ``r = 0 .. R-1`` (cycles per image), ``R = H // 2 + 1`` (rings up to Nyquist).
    """
    n, h, w = images.shape[:3]
    if h != w:
        raise ValueError(f"radial_power needs square images, got {h}x{w}")
    gray = grayscale(images)
    gray -= gray.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(gray)) ** 2  # (N, H, W), DC at [0, 0]
    freq = np.rint(np.fft.fftfreq(h) * h).astype(np.int64)  # cycles per image, signed, exact integers
    squared = freq[:, None] ** 2 + freq[None, :] ** 2  # exact, so a bin at radius 9 is never 8.999...
    radius = np.floor(np.sqrt(squared)).astype(np.int64).ravel()  # (H*W,) ring index; sqrt of a square is exact
    rings_of = (radius[:, None] == np.arange(h // 2 + 1)[None, :]).astype(np.float64)  # (H*W, R) one-hot
    sums = power.reshape(n, -1) @ rings_of  # (N, R)
    counts = rings_of.sum(axis=0)  # (R,), every ring up to Nyquist is non-empty
    return sums / counts


def spectrum_slope(images: np.ndarray, *, radii: tuple[int, int] = SLOPE_RADII) -> np.ndarray:
    """Least-squares slope of ``log power`` against ``log radius`` over ``radii`` (inclusive): ``[N]``.

    Raises:
        ValueError: An image has no power in some ring of the range (a flat image), where the log-log
            slope is undefined; or the range does not fit the image.
    """
    low, high = radii
    profile = radial_power(images)  # (N, R)
    if not 1 <= low < high < profile.shape[1]:
        raise ValueError(f"radii {radii} must satisfy 1 <= low < high <= {profile.shape[1] - 1} for "
                         f"{images.shape[1]} px images")
    ring = profile[:, low:high + 1]  # (N, K)
    if (ring <= 0).any():
        flat = sorted(set(np.nonzero((ring <= 0).any(axis=1))[0].tolist()))
        raise ValueError(f"image(s) {flat[:5]} have no spectral power in some ring of radii {low}-{high} "
                         "(a flat or band-limited image): the log-log slope is undefined")
    x = np.log(np.arange(low, high + 1, dtype=np.float64))  # (K,)
    y = np.log(ring)  # (N, K)
    xc = x - x.mean()
    return (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)


def gray_std(images: np.ndarray) -> np.ndarray:
    """Standard deviation of each image's luminance: ``[N, H, W, 3] -> [N]``."""
    return grayscale(images).reshape(len(images), -1).std(axis=1)


STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "laplacian_variance": laplacian_variance,
    "spectrum_slope": spectrum_slope,
    "gray_std": gray_std,
}


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STATISTICS` per image: ``name -> [N]``."""
    return {name: fn(images) for name, fn in STATISTICS.items()}


def quartiles(values: np.ndarray) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (numpy's linear interpolation)."""
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def inside_real_iqr(name: str, median: float) -> bool:
    """Whether a median lies within the real crops' interquartile range of statistic ``name``."""
    low, _, high = REAL_ALIGNED_QUARTILES[name]
    return low <= median <= high
