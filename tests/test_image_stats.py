"""The image statistics that compare synthetic faces with real aligned photos, against theory."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from facemae.measures.image_stats import (
    REAL_ALIGNED_QUARTILES,
    gray_std,
    image_statistics,
    inside_real_iqr,
    laplacian_variance,
    quartiles,
    radial_power,
    spectrum_slope,
)

N = 112


def _rgb(gray: np.ndarray) -> np.ndarray:
    """``[N, H, W] -> [N, H, W, 3]`` with equal channels: the BT.601 weights sum to 1, so luminance is ``gray``."""
    return np.repeat(gray[..., None], 3, axis=-1)


def _power_law_field(beta: float, *, seed: int, count: int = 4) -> np.ndarray:
    """``[count, N, N]`` real fields whose every FFT bin has power ``r^-beta`` (random phases)."""
    rng = np.random.default_rng(seed)
    radius = np.hypot(np.fft.fftfreq(N)[:, None], np.fft.rfftfreq(N)[None, :]) * N
    amplitude = np.where(radius > 0, np.maximum(radius, 1e-9) ** (-beta / 2), 0.0)
    phases = np.exp(2j * np.pi * rng.random((count, N, N // 2 + 1)))
    return np.fft.irfft2(amplitude * phases, s=(N, N)) * 1e4


def test_a_flat_image_has_no_contrast_no_high_frequencies_and_no_slope():
    flat = np.full((2, N, N, 3), 137, dtype=np.uint8)
    assert_allclose(laplacian_variance(flat), 0.0)
    assert_allclose(gray_std(flat), 0.0)
    with pytest.raises(ValueError, match="no spectral power"):
        spectrum_slope(flat)


def test_grayscale_contrast_uses_bt601_luminance():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, N, N, 3), dtype=np.uint8)
    by_hand = [np.std(0.299 * im[..., 0].astype(float) + 0.587 * im[..., 1] + 0.114 * im[..., 2]) for im in images]
    assert_allclose(gray_std(images), by_hand, rtol=1e-12)


def test_a_sinusoid_is_an_eigenfunction_of_the_laplacian_and_a_single_ring_of_the_spectrum():
    cycles, amplitude = 9, 40.0
    omega = 2 * np.pi * cycles / N
    wave = 128 + amplitude * np.sin(omega * np.arange(N))[None, :].repeat(N, axis=0)  # (N, N), varies along x
    image = _rgb(wave[None])
    # The 4-neighbour Laplacian of sin(omega x) is -(2 - 2 cos omega) sin(omega x): variance scales by its square.
    interior = wave[1:-1, 1:-1]
    assert_allclose(laplacian_variance(image), [(2 - 2 * np.cos(omega)) ** 2 * interior.var()], rtol=1e-9)
    profile = radial_power(image)[0]
    assert profile.argmax() == cycles
    # Two FFT bins of magnitude A N^2 / 2 hold all the power; the ring's mean is their sum over the number
    # of integer frequency pairs (u, v) with cycles <= |(u, v)| < cycles + 1.
    k = np.arange(-N // 2, N // 2)
    squared = k[:, None] ** 2 + k[None, :] ** 2
    in_ring = int(((squared >= cycles**2) & (squared < (cycles + 1) ** 2)).sum())
    assert_allclose(profile[cycles], 2 * (amplitude * N * N / 2) ** 2 / in_ring, rtol=1e-9)
    assert profile[np.arange(len(profile)) != cycles].max() < 1e-9 * profile[cycles]
    assert_allclose(gray_std(image), [amplitude / np.sqrt(2)], rtol=1e-9)  # whole periods: A / sqrt(2)


def test_white_noise_has_a_flat_spectrum_and_twenty_times_its_variance_in_the_laplacian():
    sigma = 10.0
    noise = np.random.default_rng(1).normal(100, sigma, (8, N, N))
    images = _rgb(noise)
    # Independent pixels: the Laplacian's weights (1, 1, 1, 1, -4) square-sum to 20.
    assert_allclose(laplacian_variance(images).mean(), 20 * sigma**2, rtol=0.03)
    assert abs(spectrum_slope(images).mean()) < 0.05


@pytest.mark.parametrize("beta", [2.0, 3.5])
def test_the_slope_of_a_power_law_field_is_its_exponent(beta):
    slopes = spectrum_slope(_rgb(_power_law_field(beta, seed=int(beta * 10))))
    # Ring r holds radii [r, r + 1), whose mean is about r + 0.5: a pure power law reads ~0.06 shallower.
    assert_allclose(slopes, -beta + 0.06, atol=0.04)


def test_the_slope_fit_is_a_least_squares_line_through_the_rings():
    field = _rgb(_power_law_field(3.0, seed=5, count=1))
    rings = np.arange(4, 50)
    expected = np.polyfit(np.log(rings), np.log(radial_power(field)[0, 4:50]), 1)[0]
    assert_allclose(spectrum_slope(field), [expected], rtol=1e-10)
    with pytest.raises(ValueError, match="radii"):
        spectrum_slope(field, radii=(4, 80))


def test_quartiles_and_the_real_reference():
    assert quartiles(np.arange(101)) == (25.0, 50.0, 75.0)
    assert set(image_statistics(np.zeros((1, N, N, 3)) + np.arange(N)[None, None, :, None])) == set(REAL_ALIGNED_QUARTILES)
    low, median, high = REAL_ALIGNED_QUARTILES["spectrum_slope"]
    assert inside_real_iqr("spectrum_slope", median) and inside_real_iqr("spectrum_slope", low)
    assert not inside_real_iqr("spectrum_slope", high + 0.01)
