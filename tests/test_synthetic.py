"""The built-in synthetic face dataset: deterministic, identity-structured, not a pixel lookup."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from facemae.config import SYNTHETIC_DOMAINS, SYNTHETIC_STYLES, load_config
from facemae.data.synthetic import (
    DOMAINS,
    GENERATOR_VERSIONS,
    HAIR_STYLES,
    STYLES,
    generate_identity,
    generate_image,
    identity_traits,
    image_id,
)
from facemae.measures.image_stats import REAL_ALIGNED_QUARTILES, image_statistics, inside_real_iqr, quartiles


def _pixels(identities: int, images: int, *, seed: int) -> np.ndarray:
    """``[identities, images, size*size*3]`` float64 raw pixels."""
    batch = np.stack([generate_identity(i, images=images, seed=seed) for i in range(identities)])
    return batch.reshape(identities, images, -1).astype(np.float64)


def _pairwise_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, D], [M, D] -> [N, M]`` Euclidean distances."""
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0))


def test_generation_is_deterministic_and_order_independent() -> None:
    image = generate_image(3, 5, seed=0)
    assert image.shape == (112, 112, 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, generate_image(3, 5, seed=0))
    np.testing.assert_array_equal(image, generate_identity(3, images=8, seed=0)[5])
    assert not np.array_equal(image, generate_image(3, 5, seed=1))
    assert not np.array_equal(image, generate_image(3, 6, seed=0))
    assert generate_image(0, 0, seed=0, size=64).shape == (64, 64, 3)


def test_images_of_one_identity_are_closer_than_images_of_different_identities() -> None:
    identities, images = 16, 8
    pixels = _pixels(identities, images, seed=0).reshape(identities * images, -1)
    labels = np.repeat(np.arange(identities), images)
    distances = _pairwise_l2(pixels, pixels)
    same = labels[:, None] == labels[None, :]
    within = distances[same & ~np.eye(len(labels), dtype=bool)].mean()
    between = distances[~same].mean()
    print(f"mean raw-pixel L2 within identity: {within:.1f}, between identities: {between:.1f}")
    assert within < between


def test_identity_is_not_solvable_by_raw_pixel_nearest_neighbour() -> None:
    identities, images, gallery = 20, 10, 5
    pixels = _pixels(identities, images, seed=0)
    gallery_pixels = pixels[:, :gallery].reshape(identities * gallery, -1)
    query_pixels = pixels[:, gallery:].reshape(identities * (images - gallery), -1)
    gallery_labels = np.repeat(np.arange(identities), gallery)
    query_labels = np.repeat(np.arange(identities), images - gallery)
    nearest = _pairwise_l2(query_pixels, gallery_pixels).argmin(axis=1)
    acc = float((gallery_labels[nearest] == query_labels).mean())
    print(f"raw-pixel 1-NN identity accuracy: {acc:.3f}")
    assert acc > 3 / identities, "identities are not distinguishable enough to learn"
    assert acc < 0.9, "per-image variation is too small: raw pixels already solve identity"


def test_traits_are_stable_and_diverse() -> None:
    assert identity_traits(7, seed=0) == identity_traits(7, seed=0)
    assert identity_traits(7, seed=0) != identity_traits(8, seed=0)
    traits = [identity_traits(i, seed=0) for i in range(50)]
    styles = {t.hair_style for t in traits}
    assert styles <= set(HAIR_STYLES)
    assert len(styles) >= 3, styles
    with_glasses = sum(t.glasses is not None for t in traits)
    assert 0 < with_glasses < len(traits), with_glasses


def test_image_ids_are_unique_and_sort_by_identity_then_index() -> None:
    assert image_id(42, 7) == "syn-000042-0007"
    pairs = [(identity, index) for identity in (0, 1, 9, 10, 123) for index in (0, 2, 10, 999)]
    ids = [image_id(identity, index) for identity, index in pairs]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids
    with pytest.raises(ValueError, match="index"):
        image_id(0, 10_000)


def test_invalid_arguments_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="identity"):
        generate_image(-1, 0, seed=0)
    with pytest.raises(ValueError, match="size"):
        generate_identity(0, images=1, seed=0, size=4)
    with pytest.raises(ValueError, match="style must be one of"):
        generate_image(0, 0, seed=0, style="oil")


# sha256 (first 16 hex digits) of images drawn by generator version 1, the rendering before styles existed
# (commit 97c151a), with the pinned Pillow: the cartoon style must keep drawing them pixel for pixel.
VERSION_1_IMAGES = {(0, 0, 0): "899b3cc942edbc59", (3, 5, 0): "a02b401989724706",
                    (42, 7, 1): "93aed297abf854df", (199, 19, 0): "8381e9017a957f9e"}


def test_the_cartoon_style_is_generator_version_1_pixel_for_pixel() -> None:
    assert GENERATOR_VERSIONS["cartoon"] == 1
    for (identity, index, seed), digest in VERSION_1_IMAGES.items():
        pixels = generate_image(identity, index, seed=seed, style="cartoon")
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == digest, (identity, index, seed)


@pytest.mark.parametrize("style", STYLES)
def test_each_style_is_deterministic_per_seed_and_order_independent(style: str) -> None:
    image = generate_image(5, 3, seed=2, style=style)
    np.testing.assert_array_equal(image, generate_image(5, 3, seed=2, style=style))
    np.testing.assert_array_equal(image, generate_identity(5, images=6, seed=2, style=style)[3])
    assert not np.array_equal(image, generate_image(5, 3, seed=3, style=style))


def test_styles_differ_and_the_config_knows_every_style() -> None:
    assert SYNTHETIC_STYLES == STYLES
    assert set(GENERATOR_VERSIONS) == set(STYLES) and len(set(GENERATOR_VERSIONS.values())) == len(STYLES)
    assert not np.array_equal(generate_image(1, 1, seed=0, style="photo"), generate_image(1, 1, seed=0, style="cartoon"))
    np.testing.assert_array_equal(generate_image(1, 1, seed=0), generate_image(1, 1, seed=0, style="photo"))


# ... and of photo faces before domains existed (commit f2552a2): the base domain draws them pixel for pixel.
BASE_PHOTO_IMAGES = {(0, 0, 0): "59b00ab7fb845262", (3, 5, 0): "1fb525e9f765df7d",
                     (42, 7, 1): "5d8406741abf124f", (199, 19, 0): "387080f4dc67285f"}


def test_the_base_domain_draws_the_photo_faces_made_before_domains() -> None:
    for (identity, index, seed), digest in BASE_PHOTO_IMAGES.items():
        pixels = generate_image(identity, index, seed=seed, domain="base")
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == digest, (identity, index, seed)
        np.testing.assert_array_equal(pixels, generate_image(identity, index, seed=seed))


def test_the_shifted_domain_is_deterministic_and_draws_other_people() -> None:
    image = generate_image(5, 3, seed=2, domain="shifted")
    np.testing.assert_array_equal(image, generate_image(5, 3, seed=2, domain="shifted"))
    np.testing.assert_array_equal(image, generate_identity(5, images=6, seed=2, domain="shifted")[3])
    assert not np.array_equal(image, generate_image(5, 3, seed=3, domain="shifted"))
    assert not np.array_equal(image, generate_image(5, 3, seed=2))
    # Other people at the same seed, not the base domain's people restyled: the traits that both domains draw
    # from the same ranges (hair style: 1 in 7 by chance) agree about as often as two strangers'.
    same = np.mean([identity_traits(i, seed=0).hair_style == identity_traits(i, seed=0, domain="shifted").hair_style
                    for i in range(200)])
    assert same < 0.3, same
    assert SYNTHETIC_DOMAINS == DOMAINS
    with pytest.raises(ValueError, match="domain must be one of"):
        generate_image(0, 0, seed=0, domain="mars")
    with pytest.raises(ValueError, match=r"data.domain='mars' is not one of \('base', 'shifted'\)"):
        load_config(None, ["data.domain=mars"])


def test_the_shifted_domain_differs_measurably_from_the_base() -> None:
    # A simple image statistic: the mean grey level of the face's middle (40 x 40 centre), per image.
    def centre(domain: str) -> np.ndarray:
        faces = np.stack([generate_image(i, k, seed=0, domain=domain) for i in range(40) for k in range(2)])
        return faces[:, 36:76, 36:76].astype(np.float64).mean(axis=(1, 2, 3))

    base, shifted = centre("base"), centre("shifted")
    welch = (base.mean() - shifted.mean()) / np.sqrt(base.var(ddof=1) / len(base) + shifted.var(ddof=1) / len(shifted))
    print(f"centre grey level: base {base.mean():.1f} +- {base.std():.1f}, shifted {shifted.mean():.1f} +- "
          f"{shifted.std():.1f}, Welch t {welch:.1f}")
    assert base.mean() - shifted.mean() > 20 and welch > 4
    # ... and the population: glasses, face width (their ranges are the domains' definitions).
    for domain, glasses, width in (("base", 0.25, 0.40), ("shifted", 0.6, 0.46)):
        traits = [identity_traits(i, seed=1, domain=domain) for i in range(400)]
        assert np.mean([t.glasses is not None for t in traits]) == pytest.approx(glasses, abs=0.07), domain
        assert np.mean([t.face_width for t in traits]) == pytest.approx(width, abs=0.01), domain


def test_photo_faces_have_the_statistics_of_real_aligned_crops_and_cartoons_do_not() -> None:
    faces = {style: np.concatenate([generate_identity(i, images=2, seed=0, style=style) for i in range(100)])
             for style in STYLES}
    for name in REAL_ALIGNED_QUARTILES:
        medians = {style: quartiles(image_statistics(f)[name])[1] for style, f in faces.items()}
        assert inside_real_iqr(name, medians["photo"]), (name, medians, REAL_ALIGNED_QUARTILES[name])
    cartoon = image_statistics(faces["cartoon"])
    assert not inside_real_iqr("laplacian_variance", quartiles(cartoon["laplacian_variance"])[1])
    assert not inside_real_iqr("spectrum_slope", quartiles(cartoon["spectrum_slope"])[1])
