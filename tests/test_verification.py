"""Verification accuracy and TAR@FAR against plain loop implementations of InsightFace's protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import noise_face, png_bytes
from facemae.data.images import decode_rgb
from facemae.data.verification_bin import load_verification_bin, save_verification_bin
from facemae.eval.verification import (
    ROC_THRESHOLDS,
    VAL_THRESHOLDS,
    draw_pairs,
    embed_images,
    kfold_splits,
    pairs_to_bin,
    tar_at_far,
    tar_undefined,
    verification_accuracy,
)
from facemae.models.fr import to_model_range
from facemae.models.registry import build_fr


def _embed_distances(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D pair embeddings whose squared L2 distances are ``dist``."""
    emb1 = np.zeros((len(dist), 2))
    emb2 = np.stack([np.sqrt(dist), np.zeros(len(dist))], axis=1)
    return emb1, emb2


def _fold_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """sklearn KFold(shuffle=False), spelled out: the first n % k folds hold one extra item."""
    bounds, start = [], 0
    for f in range(k):
        size = n // k + (1 if f < n % k else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def _reference_roc(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray,
                   thresholds: np.ndarray) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """calculate_roc as written in InsightFace: loops over folds and thresholds."""
    dist = ((emb1 - emb2) ** 2).sum(axis=1)
    accs, best_thrs, tprs, fprs = [], [], [], []
    for lo, hi in _fold_bounds(len(dist), 10):
        test = np.arange(lo, hi)
        train = np.setdiff1d(np.arange(len(dist)), test)
        best_acc, best_thr = -1.0, None
        for thr in thresholds:
            acc = np.mean((dist[train] < thr) == issame[train])
            if acc > best_acc:  # strict: the first maximum wins
                best_acc, best_thr = acc, thr
        accs.append(np.mean((dist[test] < best_thr) == issame[test]))
        best_thrs.append(best_thr)
        tpr_row, fpr_row = [], []
        for thr in thresholds:
            pred, same = dist[test] < thr, issame[test]
            tpr_row.append(np.sum(pred & same) / np.sum(same) if same.any() else 0.0)
            fpr_row.append(np.sum(pred & ~same) / np.sum(~same) if (~same).any() else 0.0)
        tprs.append(tpr_row)
        fprs.append(fpr_row)
    return accs, best_thrs, np.mean(tprs, axis=0), np.mean(fprs, axis=0)


def _reference_val(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray, far: float) -> tuple[float, ...]:
    """calculate_val with scipy's interp1d(kind="slinear") replaced by its rule on a non-decreasing curve."""
    vals, fars = [], []
    for lo, hi in _fold_bounds(len(dist), 10):
        test = np.arange(lo, hi)
        train = np.setdiff1d(np.arange(len(dist)), test)
        far_train = [np.sum((dist[train] < t) & ~issame[train]) / np.sum(~issame[train]) for t in thresholds]
        if max(far_train) >= far:
            j = max(i for i, v in enumerate(far_train) if v <= far)  # last grid point at or below the target
            if far_train[j] == far or j == len(thresholds) - 1:
                thr = thresholds[j]
            else:
                step = (thresholds[j + 1] - thresholds[j]) / (far_train[j + 1] - far_train[j])
                thr = thresholds[j] + (far - far_train[j]) * step
        else:
            thr = 0.0
        pred, same = dist[test] < thr, issame[test]
        vals.append(np.sum(pred & same) / np.sum(same))
        fars.append(np.sum(pred & ~same) / np.sum(~same))
    return float(np.mean(vals)), float(np.std(vals)), float(np.mean(fars))


def test_kfold_matches_sklearns_contiguous_rule():
    folds = kfold_splits(23, n_splits=10)
    expected = [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 21), (21, 23)]
    assert [(int(test[0]), int(test[-1]) + 1) for _, test in folds] == expected
    for (train, test), (lo, hi) in zip(folds, expected):
        np.testing.assert_array_equal(test, np.arange(lo, hi))
        np.testing.assert_array_equal(train, np.r_[np.arange(0, lo), np.arange(hi, 23)])
    with pytest.raises(ValueError, match="at least 10 pairs"):
        kfold_splits(9, n_splits=10)


def test_known_threshold_and_one_mistake():
    # 100 pairs, 10 per fold, alternating labels; positives at 0.305, negatives at 1.5, except positive pair 0 at
    # 2.5. Every fold's training set is best split just above 0.305, at grid point 0.31; fold 0 loses pair 0.
    issame = np.arange(100) % 2 == 0
    dist = np.where(issame, 0.305, 1.5)
    dist[0] = 2.5
    result = verification_accuracy(*_embed_distances(dist), issame)
    np.testing.assert_array_equal(result.thresholds, np.full(10, ROC_THRESHOLDS[31]))
    np.testing.assert_allclose(result.fold_accuracies, [0.9] + [1.0] * 9)
    assert result.accuracy == pytest.approx(0.99)
    assert result.std == pytest.approx(0.03)
    assert result.n_pairs == 100
    assert result.summary() == pytest.approx({"accuracy": 0.99, "accuracy_std": 0.03,
                                              "threshold": ROC_THRESHOLDS[31], "n_pairs": 100.0})


@pytest.mark.parametrize("n, quantised", [(57, False), (60, True)])
def test_matches_loop_reference(n: int, quantised: bool):
    # Overlapping classes; quantised distances make many thresholds tie on the training folds.
    rng = np.random.default_rng(n)
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.uniform(0, 2.2, n), rng.uniform(0.8, 3.5, n))
    if quantised:
        dist = np.round(dist * 4) / 4
    emb1, emb2 = _embed_distances(dist)
    result = verification_accuracy(emb1, emb2, issame)
    accs, thrs, tpr, fpr = _reference_roc(emb1, emb2, issame, ROC_THRESHOLDS)
    np.testing.assert_array_equal(result.thresholds, thrs)
    np.testing.assert_allclose(result.fold_accuracies, accs, rtol=0, atol=1e-15)
    assert result.accuracy == pytest.approx(np.mean(accs), abs=1e-15)
    assert result.std == pytest.approx(np.std(accs), abs=1e-15)
    np.testing.assert_allclose(result.tpr, tpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.fpr, fpr, rtol=0, atol=1e-15)


def test_perfect_and_random_embeddings():
    # Same identity -> the same one-hot vector (distance 0), different -> orthogonal (distance 2).
    rng = np.random.default_rng(0)
    n = 600
    issame = np.tile(np.repeat([True, False], 30), 10)
    a = rng.integers(0, 16, n)
    b = np.where(issame, a, (a + rng.integers(1, 16, n)) % 16)
    eye = np.eye(16)
    perfect = verification_accuracy(eye[a], eye[b], issame)
    assert perfect.accuracy == 1.0 and perfect.std == 0.0
    np.testing.assert_array_equal(perfect.thresholds, np.full(10, ROC_THRESHOLDS[1]))

    emb = rng.normal(size=(2, 6000, 32))
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    chance = verification_accuracy(emb[0], emb[1], np.tile(np.repeat([True, False], 300), 10))
    assert 0.45 < chance.accuracy < 0.55


def test_input_errors():
    emb = np.zeros((20, 4))
    with pytest.raises(ValueError, match="same shape"):
        verification_accuracy(emb, np.zeros((20, 3)), np.ones(20, bool))
    with pytest.raises(ValueError, match="one flag per pair"):
        verification_accuracy(emb, emb, np.ones(19, bool))
    with pytest.raises(ValueError, match="strictly increasing"):
        verification_accuracy(emb, emb, np.ones(20, bool), thresholds=np.array([0.5, 0.1]))
    bad = emb.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        verification_accuracy(bad, emb, np.ones(20, bool))


def test_tar_at_far_separable():
    rng = np.random.default_rng(1)
    issame = np.tile(np.repeat([True, False], 300), 10)
    dist = np.where(issame, rng.uniform(0, 0.5, 6000), rng.uniform(1.5, 3.5, 6000))
    tar, std, far = tar_at_far(*_embed_distances(dist), issame, far=1e-3)
    assert tar == 1.0 and std == 0.0
    assert far < 5e-3


def test_tar_at_far_matches_loop_reference():
    rng = np.random.default_rng(2)
    issame = np.tile(np.repeat([True, False], 30), 10)
    dist = np.where(issame, rng.uniform(0, 2.0, 600), rng.uniform(0.6, 3.5, 600))
    grid = VAL_THRESHOLDS[::4]  # a coarser grid keeps the loop reference quick
    for far in (1e-2, 0.1):
        got = tar_at_far(*_embed_distances(dist), issame, far=far, thresholds=grid)
        want = _reference_val(dist, issame, grid, far)
        np.testing.assert_allclose(tuple(got), want, rtol=0, atol=1e-12)
        assert 0 < got.tar < 1


def test_tar_at_far_unreachable_target_uses_threshold_zero():
    # On a grid that stops below every negative distance the training FAR never reaches the target:
    # InsightFace then uses threshold 0, which accepts nothing.
    issame = np.tile(np.repeat([True, False], 5), 10)
    dist = np.where(issame, 0.2, 1.5)
    got = tar_at_far(*_embed_distances(dist), issame, thresholds=np.arange(0, 1, 0.001))
    assert tuple(got) == (0.0, 0.0, 0.0)


def test_tar_at_far_without_negative_pairs_is_undefined_and_says_why():
    dist = np.linspace(0.1, 1.9, 100)
    assert np.isnan(tuple(tar_at_far(*_embed_distances(dist), np.ones(100, bool)))).all()
    why = tar_undefined(np.ones(100, bool))
    assert why.startswith("undefined: fold 0 has no negative pairs; fold 1 has no negative pairs; fold 2")
    assert "(of 10 contiguous folds of 100 pairs)" in why
    mixed = np.tile(np.repeat([True, False], 5), 10)
    mixed[:10] = True  # only fold 0 lacks negatives
    assert np.isnan(tar_at_far(*_embed_distances(dist), mixed).tar)
    assert tar_undefined(mixed).startswith("undefined: fold 0 has no negative pairs (of 10 contiguous folds")
    mixed[:10] = False
    assert tar_undefined(mixed).startswith("undefined: fold 0 has no positive pairs (of")
    assert tar_undefined(np.tile(np.repeat([True, False], 5), 10)) == ""


def test_a_bin_without_negative_pairs_still_reports_its_accuracy(tmp_path: Path):
    """Its TAR@FAR is undefined, with why; the other .bin of the same evaluation is unaffected."""
    from facemae.config import load_config
    from facemae.eval.evaluate import verify
    from facemae.models.registry import build_fr
    from facemae.models.weights import save_weights

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    weights = save_weights(build_fr("fr_tiny", embedding_size=32), tmp_path / "fr",
                           {"task": "fr", "model": "fr_tiny", "embedding_size": 32})
    ids = np.repeat(np.arange(8), 4)
    encoded = [png_bytes(noise_face(i)) for i in range(len(ids))]
    idx1, idx2, issame = draw_pairs(ids, n_pairs=40, seed=1)
    save_verification_bin(tmp_path / "mixed.bin", pairs_to_bin(encoded, idx1, idx2, issame))
    positives = np.flatnonzero(issame)
    save_verification_bin(tmp_path / "positives.bin",
                          pairs_to_bin(encoded, idx1[positives], idx2[positives], issame[positives]))
    config = load_config(None, [f"eval.bins=[{tmp_path / 'mixed.bin'}, {tmp_path / 'positives.bin'}]"])
    results = verify(config, str(weights))
    assert 0 <= results["positives"]["accuracy"] <= 1 and results["positives"]["tar"] is None
    assert results["positives"]["tar_undefined"].startswith("undefined: fold 0 has no negative pairs")
    assert isinstance(results["mixed"]["tar"], float) and "tar_undefined" not in results["mixed"]


def test_embed_images_is_flip_summed_and_normalised():
    torch.manual_seed(0)
    model = build_fr("fr_tiny", embedding_size=16)
    images = np.stack([noise_face(i) for i in range(5)])
    emb = embed_images(model, images, batch_size=2)
    assert emb.shape == (5, 16) and model.training  # eval during, mode restored after
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(embed_images(model, images[:, :, ::-1]), emb, atol=1e-5)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images)
        ref = model(to_model_range(x)) + model(to_model_range(x.flip(2)))  # flip the width of [N, H, W, 3]
    ref = torch.nn.functional.normalize(ref, dim=1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(model, images.astype(np.float32))


def _identities() -> np.ndarray:
    """40 identities with 1..6 images each, in shuffled order."""
    sizes = np.random.default_rng(3).integers(1, 7, 40)
    return np.random.default_rng(4).permutation(np.repeat(np.arange(40) + 100, sizes))


def _check_pairs(ids: np.ndarray, idx1: np.ndarray, idx2: np.ndarray, issame: np.ndarray) -> None:
    assert np.all(idx1 != idx2)
    np.testing.assert_array_equal(ids[idx1] == ids[idx2], issame)
    keys = {(min(a, b), max(a, b)) for a, b in zip(idx1.tolist(), idx2.tolist())}
    assert len(keys) == len(idx1), "a pair repeats"


def test_draw_pairs_blocks_and_determinism():
    ids = _identities()
    idx1, idx2, issame = draw_pairs(ids, n_pairs=200, seed=7)
    _check_pairs(ids, idx1, idx2, issame)
    # LFW layout: each of the 10 contiguous folds holds 10 positives then 10 negatives.
    np.testing.assert_array_equal(issame.reshape(10, 20), np.tile(np.repeat([True, False], 10), (10, 1)))
    again = draw_pairs(ids, n_pairs=200, seed=7)
    for x, y in zip((idx1, idx2, issame), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(draw_pairs(ids, n_pairs=200, seed=8)[0], idx1)
    # Positives are spread evenly over identities that have room for it.
    counts = np.unique(ids, return_counts=True)
    roomy = set(counts[0][counts[1] >= 5].tolist())  # >= 10 positive pairs each
    pos_ids = ids[idx1[issame]]
    per_identity = [np.sum(pos_ids == i) for i in roomy]
    assert max(per_identity) - min(per_identity) <= 1 and min(per_identity) >= 1


def test_draw_pairs_small_pools_and_errors():
    ids = np.repeat([0, 1], 10)  # 90 positive and 100 negative pairs exist
    idx1, idx2, issame = draw_pairs(ids, n_pairs=180, seed=0)  # takes 90 + 90: nearly every pair
    _check_pairs(ids, idx1, idx2, issame)
    with pytest.raises(ValueError, match="lower n_pairs to 180"):
        draw_pairs(ids, n_pairs=200, seed=0)
    with pytest.raises(ValueError, match="hold out more identities with at least 2 images"):
        draw_pairs(np.arange(50), n_pairs=20, seed=0)
    with pytest.raises(ValueError, match="multiple of 20"):
        draw_pairs(ids, n_pairs=30, seed=0)


def test_pairs_to_bin_round_trips(tmp_path: Path):
    ids = np.repeat(np.arange(6), 4)
    encoded = [png_bytes(noise_face(i, size=16)) for i in range(len(ids))]
    idx1, idx2, issame = draw_pairs(ids, n_pairs=40, seed=1)
    save_verification_bin(tmp_path / "pairs.bin", pairs_to_bin(encoded, idx1, idx2, issame))
    loaded = load_verification_bin(tmp_path / "pairs.bin")
    assert loaded.issame == issame.tolist()
    for (a, b, _), i, j in zip(loaded.pairs(), idx1, idx2):
        np.testing.assert_array_equal(decode_rgb(a), noise_face(int(i), size=16))
        np.testing.assert_array_equal(decode_rgb(b), noise_face(int(j), size=16))
    with pytest.raises(ValueError, match="range of images_encoded"):
        pairs_to_bin(encoded[:3], idx1, idx2, issame)
