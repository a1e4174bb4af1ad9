"""The instrument of the seeded comparison: intervals, paired differences, fidelity, the seeds loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facemae.config import load_config
from facemae.data.synthetic import generate_image
from facemae.measures.fidelity import hf_ratio, laplacian_variance, masked_psnr, patch_pixel_mask
from facemae.eval.stats import mean_ci, paired_difference, t_quantile_975
from facemae.experiment import ROWS, summarise, target_checks
from facemae.losses.irm import gaussian_blur
from facemae.train.steps import freeze_teacher, mae_irm_step

# Student's t has closed-form quantiles for 1 and 2 degrees of freedom: tan(pi (p - 1/2)) and
# (2p - 1) sqrt(2 / (4p (1 - p))), at p = 0.975 (12.7062 and 4.3027 in a statistics table).
T975_DF1 = math.tan(0.475 * math.pi)
T975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))


def test_mean_ci_matches_a_hand_computation():
    # values 0.90, 0.93, 0.96: mean 0.93, s = 0.03, half = t_{0.975,2} * 0.03 / sqrt(3)
    ci = mean_ci([0.90, 0.93, 0.96])
    assert ci.mean == pytest.approx(0.93)
    assert ci.half_width == pytest.approx(T975_DF2 * 0.03 / math.sqrt(3), rel=1e-9)
    assert (ci.low, ci.high) == pytest.approx((0.93 - 0.074525, 0.93 + 0.074525), abs=1e-5)
    assert ci.n == 3


def test_paired_difference_removes_what_the_seeds_share():
    # A beats B by 0.01 +- 0.001 on every seed while the seeds themselves differ by 0.1: unpaired
    # intervals overlap, the paired one is tight and above 0.
    b = [0.80, 0.90, 0.70]
    a = [0.811, 0.910, 0.709]
    diff = paired_difference(a, b)
    d = np.array(a) - np.array(b)  # 0.011, 0.010, 0.009
    assert diff.mean == pytest.approx(d.mean())
    assert diff.half_width == pytest.approx(T975_DF2 * d.std(ddof=1) / math.sqrt(3), rel=1e-9)
    assert diff.low > 0 and diff.excludes_zero()
    assert mean_ci(a).low < mean_ci(b).high  # the unpaired view cannot tell them apart
    assert not paired_difference([0.9, 0.8, 0.7], [0.8, 0.9, 0.7]).excludes_zero()
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_single_seed_has_no_interval_and_t_quantiles():
    ci = mean_ci([0.5])
    assert ci.mean == 0.5 and math.isnan(ci.half_width) and not ci.excludes_zero()
    assert t_quantile_975(1) == pytest.approx(T975_DF1, rel=1e-12)
    assert t_quantile_975(2) == pytest.approx(T975_DF2, rel=1e-12)
    assert t_quantile_975(20) == pytest.approx(2.0860, abs=1e-4)  # a statistics table's row
    assert t_quantile_975(20) > t_quantile_975(22) > t_quantile_975(25)  # exact between table rows
    assert t_quantile_975(100_000) == pytest.approx(1.95996, abs=1e-4)  # the normal's 1.96 in the limit
    with pytest.raises(ValueError):
        t_quantile_975(0)


def _faces(n: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth images (a few low-frequency blobs), uint8 [n, 112, 112, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:112, 0:112] / 112.0
    out = []
    for _ in range(n):
        img = np.zeros((112, 112, 3))
        for _ in range(5):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            img += rng.uniform(40, 120, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        out.append(np.clip(img + 30, 0, 255))
    return np.stack(out).astype(np.uint8)


def test_masked_psnr_against_a_direct_numpy_computation():
    orig = _faces()
    rng = np.random.default_rng(1)
    released = np.clip(orig.astype(int) + rng.integers(-20, 21, orig.shape), 0, 255).astype(np.uint8)
    removed = (rng.random((4, 196)) < 0.75).astype(np.uint8)
    # Direct: loop over every masked patch's pixels.
    sq, count = 0.0, 0
    for i in range(4):
        for j in np.flatnonzero(removed[i]):
            r, c = divmod(int(j), 14)
            a = orig[i, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].astype(float)
            b = released[i, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].astype(float)
            sq += ((a - b) ** 2).sum()
            count += a.size
    expected = 10 * math.log10(255 ** 2 / (sq / count))
    assert masked_psnr(orig, released, removed, patch_size=8) == pytest.approx(expected, rel=1e-9)
    # Errors in the visible patches do not count; an exact reconstruction is infinite.
    visible_only = orig.copy()
    visible_only[~patch_pixel_mask(removed, patch_size=8, img_size=112)] = 0
    assert masked_psnr(orig, visible_only, removed, patch_size=8) == math.inf


def test_hf_ratio_against_numpy_and_on_noise_and_blur():
    faces = np.stack([generate_image(i, 0, seed=0) for i in range(6)])  # the platform's synthetic faces
    gray = faces.astype(float) @ np.array([0.299, 0.587, 0.114])
    lap = (np.roll(gray, 1, 1) + np.roll(gray, -1, 1) + np.roll(gray, 1, 2) + np.roll(gray, -1, 2) - 4 * gray)
    direct = lap[:, 1:-1, 1:-1].reshape(6, -1).var(axis=1)  # interior pixels: roll's wrap-around dropped
    np.testing.assert_allclose(laplacian_variance(faces), direct, rtol=1e-10)
    assert hf_ratio(faces, faces) == pytest.approx(1.0)
    noisy = np.clip(faces + np.random.default_rng(0).normal(0, 12, faces.shape), 0, 255).astype(np.uint8)
    tensor = torch.from_numpy(faces).permute(0, 3, 1, 2).float()
    blurred = gaussian_blur(tensor, sigma=1.5).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    assert hf_ratio(noisy, faces) > 2.0
    assert hf_ratio(blurred, faces) < 0.5


def test_gaussian_blur_preserves_constants_and_low_passes():
    flat = torch.full((1, 3, 20, 20), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, sigma=1.5), flat)
    checker = (torch.arange(20)[:, None] + torch.arange(20)[None]).remainder(2).float().expand(1, 3, 20, 20)
    assert gaussian_blur(checker, sigma=1.5).std() < 0.05 * checker.std()
    with pytest.raises(ValueError, match="reaches 5 pixels, which a 5x20 image cannot reflect"):
        gaussian_blur(torch.zeros(1, 3, 5, 20), sigma=1.5)


def test_gaussian_blur_and_its_gradient_match_a_reflect_padded_band_matrix():
    def band(n: int, sigma: float) -> torch.Tensor:  # row i: the Gaussian around i, reflected at the edges
        radius = max(1, int(3 * sigma + 0.5))
        taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
        m = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j, w in zip(range(i - radius, i + radius + 1), taps / taps.sum()):
                m[i, -j if j < 0 else 2 * (n - 1) - j if j >= n else j] += w
        return m

    x = torch.randn(3, 3, 24, 17, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 3, 24, 17, dtype=torch.float64)
    ours = gaussian_blur(x, sigma=1.5)
    reference = band(24, 1.5) @ x @ band(17, 1.5).T
    torch.testing.assert_close(ours, reference)
    (grad,) = torch.autograd.grad((ours * weights).sum(), x)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_irm_schedule_and_blur_view_in_the_step():
    config = load_config(None, ["model.mae=facemae_vit_tiny_p8", "loss.irm_start=0.05", "loss.irm_ramp=0.1",
                                "loss.irm_view=blur", "model.embedding_size=16", "loss.lambda_irm=1",
                                "train.max_steps=100"])
    # start at step round(0.05 * 100) = 5, full weight after round(0.1 * 100) = 10 more steps.
    weights = [config.loss.irm_weight(s, max_steps=100) for s in (0, 4, 5, 9, 14, 99)]
    assert weights == pytest.approx([0, 0, 0.1, 0.5, 1.0, 1.0])
    assert config.loss.irm_weight(None, max_steps=100) == 1.0
    with pytest.raises(ValueError, match="fractions of train.max_steps"):
        load_config(None, ["loss.irm_start=100"])
    from facemae.models.registry import build_fr, build_mae

    torch.manual_seed(0)
    model, teacher = build_mae("facemae_vit_tiny_p8"), freeze_teacher(build_fr("fr_tiny", embedding_size=16))
    batch = {"image": torch.rand(4, 3, 112, 112) * 2 - 1, "identity": torch.arange(4)}
    early = mae_irm_step(model, teacher, batch, config, generator=torch.Generator().manual_seed(0), step=4)
    late = mae_irm_step(model, teacher, batch, config, generator=torch.Generator().manual_seed(0), step=50)
    assert float(early["irm_weight"]) == 0 and float(early["irm_loss"]) > 0  # logged, not trained
    torch.testing.assert_close(early["loss"], early["recon_loss"])
    torch.testing.assert_close(late["loss"], late["recon_loss"] + late["irm_loss"])
    late["loss"].backward()
    assert model.decoder_pred.weight.grad is not None


def test_target_checks_and_summary_on_per_seed_values():
    rows = {"originals": {"accuracy": [0.98, 0.97, 0.98], "identity_leak@1": [1.0, 1.0, 1.0]},
            "masked": {"accuracy": [0.86, 0.85, 0.87], "identity_leak@1": [0.2, 0.2, 0.2],
                       "psnr_masked": [10.0, 10.0, 10.0], "hf_ratio": [3.0, 3.0, 3.0]},
            "mae": {"accuracy": [0.93, 0.92, 0.94], "identity_leak@1": [0.5, 0.6, 0.5],
                    "psnr_masked": [20.0, 20.5, 21.0], "hf_ratio": [0.6, 0.6, 0.6]},
            "facemae": {"accuracy": [0.94, 0.93, 0.95], "identity_leak@1": [0.3, 0.3, 0.3],
                        "psnr_masked": [19.5, 20.0, 20.5], "hf_ratio": [0.9, 1.0, 1.1]}}
    stats = summarise(rows)
    assert set(stats["summary"]) == set(ROWS)
    gain = stats["paired"]["facemae - mae"]["accuracy"]
    assert gain["mean"] == pytest.approx(0.01) and gain["ci95_low"] == pytest.approx(0.01)  # zero spread
    met = {c["target"]: c["met"] for c in target_checks(rows)}
    # error 0.06 vs masked 0.14: 0.43 <= 0.5; leak 0.3 <= 0.533 and <= 1/3; psnr -0.5 dB; hf 1.0.
    assert all(met.values()), met
    rows["facemae"]["hf_ratio"] = [2.5, 2.6, 2.7]
    assert not {c["target"]: c["met"] for c in target_checks(rows)}["hf_ratio: FaceMAE"]
