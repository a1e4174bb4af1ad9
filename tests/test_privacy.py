"""Retrieval leaks against hand-computed cases, a full-argsort reference and their chance levels."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from facemae.measures.privacy import chance_levels, retrieval_leak


def _gallery(n_ids: int = 200, per_id: int = 10, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_ids * per_id, dim)), np.repeat(np.arange(n_ids), per_id)


def _reference(query: np.ndarray, gallery: np.ndarray, source: np.ndarray, qid: np.ndarray, gid: np.ndarray,
               k: int) -> tuple[float, float]:
    """Top-k by a full argsort of the cosine-similarity matrix."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    top = np.argsort(-(q @ g.T), axis=1)[:, :k]  # (Q, k)
    image = np.mean([source[i] in top[i] for i in range(len(q))])
    identity = np.mean([qid[i] in gid[top[i]] for i in range(len(q))])
    return float(image), float(identity)


def test_originals_against_themselves_leak_everything():
    gallery, gid = _gallery(n_ids=50)
    out = retrieval_leak(gallery, gallery, query_source=np.arange(len(gallery)), query_identity=gid,
                         gallery_identity=gid)
    assert out["image_leak@1"] == out["identity_leak@1"] == 1.0
    assert out["image_leak@5"] == out["identity_leak@5"] == 1.0
    assert out["n_queries"] == out["n_gallery"] == 500.0


def test_shuffled_queries_score_chance():
    # Query i carries the embedding of original perm[i] but keeps source i: any hit is luck.
    gallery, gid = _gallery()
    perm = np.random.default_rng(1).permutation(len(gallery))
    out = retrieval_leak(gallery[perm], gallery, query_source=np.arange(len(gallery)), query_identity=gid,
                         gallery_identity=gid)
    assert out["image_chance@1"] == 1 / 2000 and out["image_chance@5"] == 5 / 2000
    assert out["identity_chance@1"] == pytest.approx(10 / 2000)
    for k in (1, 5):
        assert abs(out[f"image_leak@{k}"] - out[f"image_chance@{k}"]) < 4e-3
        assert abs(out[f"identity_leak@{k}"] - out[f"identity_chance@{k}"]) < 0.015
    assert out["identity_leak@5"] > 0.01  # the identity check itself is live


def test_five_point_case():
    # Gallery on the unit circle at 0, 10, 20, 90, 180 degrees; identities A A B B C.
    angles = np.deg2rad([0, 10, 20, 90, 180])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    gid = np.array([0, 0, 1, 1, 2])
    # Query 0 (source 0, A) sits at 16 deg: order 20(B), 10(A), 0(A), 90, 180 -> image rank 3, identity rank 2.
    # Query 1 (source 3, B) sits at 170 deg: order 180(C), 90(B), ... -> image rank 2, identity rank 2.
    # Query 2 (source 4, C) sits at 175 deg: 180(C) first -> image and identity rank 1.
    q_angles = np.deg2rad([16, 170, 175])
    queries = 3.0 * np.stack([np.cos(q_angles), np.sin(q_angles)], axis=1)  # norms must not matter
    out = retrieval_leak(queries, gallery, query_source=np.array([0, 3, 4]), query_identity=np.array([0, 1, 2]),
                         gallery_identity=gid, ks=(1, 2, 3))
    assert out["image_leak@1"] == pytest.approx(1 / 3) and out["identity_leak@1"] == pytest.approx(1 / 3)
    assert out["image_leak@2"] == pytest.approx(2 / 3) and out["identity_leak@2"] == 1.0
    assert out["image_leak@3"] == 1.0 and out["identity_leak@3"] == 1.0


def test_ties_count_as_leaks():
    # Two identical originals: the query's own image ties with its duplicate, so either order counts.
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gid = np.array([0, 1, 2])
    for source in (0, 1):
        out = retrieval_leak(gallery[[source]], gallery, query_source=np.array([source]),
                             query_identity=gid[[source]], gallery_identity=gid, ks=(1,))
        assert out["image_leak@1"] == out["identity_leak@1"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_chunked_equals_full_argsort(chunk_size: int | None):
    # Noisy "reconstructions": some still match their source, most do not.
    gallery, gid = _gallery(n_ids=60, per_id=5, dim=8, seed=2)
    rng = np.random.default_rng(3)
    source = rng.choice(len(gallery), size=123, replace=False)
    queries = gallery[source] + rng.normal(scale=1.2, size=(123, 8))
    out = retrieval_leak(queries, gallery, query_source=source, query_identity=gid[source], gallery_identity=gid,
                         ks=(1, 5, 20), chunk_size=chunk_size)
    for k in (1, 5, 20):
        image, identity = _reference(queries, gallery, source, gid[source], gid, k)
        assert out[f"image_leak@{k}"] == pytest.approx(image, abs=1e-12)
        assert out[f"identity_leak@{k}"] == pytest.approx(identity, abs=1e-12)
    assert 0 < out["image_leak@1"] < out["image_leak@20"] < 1


def test_identity_chance_matches_enumeration():
    # Every 3-subset of an 8-image gallery, counted.
    gid = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    qid = np.array([0, 1, 2, 7])  # identity 7 is not in the gallery: chance 0
    got = chance_levels(qid, gid, ks=(3,))
    subsets = list(combinations(range(8), 3))
    want = np.mean([np.mean([q in gid[list(s)] for s in subsets]) for q in qid])
    assert got["identity_chance@3"] == pytest.approx(want, abs=1e-12)
    assert got["image_chance@3"] == 3 / 8


def test_input_errors():
    gallery, gid = _gallery(n_ids=5, per_id=2)
    kwargs = dict(query_source=np.arange(10), query_identity=gid, gallery_identity=gid)
    with pytest.raises(ValueError, match="misaligned"):
        retrieval_leak(gallery, gallery, **{**kwargs, "query_identity": gid[::-1]})
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        retrieval_leak(gallery, gallery, **{**kwargs, "query_source": np.arange(10) + 1})
    with pytest.raises(ValueError, match="same judge"):
        retrieval_leak(gallery[:, :3], gallery, **kwargs)
    with pytest.raises(ValueError, match="gallery size"):
        retrieval_leak(gallery, gallery, ks=(11,), **kwargs)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_leak(gallery, gallery, chunk_size=0, **kwargs)


def test_membership_inference_against_a_hand_computation():
    from facemae.measures.privacy import membership_inference, roc_curve

    # Members 0.9 0.8 0.7 0.3; non-members 0.85 0.3 and 98 others at 0.1 (100 non-members: 1% FPR is one of them).
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.85, 0.3] + [0.1] * 98)
    member = np.array([True] * 4 + [False] * 100)
    got = membership_inference(scores, member)
    # Pairs (member, non-member) a member wins: 0.9 beats all 100, 0.8 and 0.7 all but 0.85 (99 each), 0.3 beats
    # the 98 at 0.1 and ties one (half): (100 + 99 + 99 + 98.5) / 400.
    assert got["mia_auc"] == pytest.approx((100 + 99 + 99 + 98.5) / 400)
    # At t = 0.9 one member, no false positive; t = 0.85 flags one non-member (1%): still one member; t = 0.8 and
    # 0.7 keep FPR at 1% with 2 then 3 members; t = 0.3 flags 2 non-members (2%): over. TPR at 1% FPR = 3/4.
    assert got["mia_tpr@1%fpr"] == pytest.approx(0.75)
    fpr, tpr, thresholds = roc_curve(scores, member)
    assert thresholds.tolist() == [np.inf, 0.9, 0.85, 0.8, 0.7, 0.3, 0.1]
    assert tpr.tolist() == [0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert fpr.tolist() == pytest.approx([0, 0, 0.01, 0.01, 0.01, 0.02, 1.0])
    with pytest.raises(ValueError, match="members and non-members"):
        membership_inference(scores[:4], member[:4])


def test_membership_inference_is_chance_for_an_unrelated_release_and_certain_for_the_members_originals():
    from facemae.measures.privacy import membership_inference, nearest_release_similarity

    rng = np.random.default_rng(0)
    members, others = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    candidates = np.concatenate([members, others])
    is_member = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
    unrelated = rng.normal(size=(500, 32))  # faces of nobody here
    chance = membership_inference(nearest_release_similarity(candidates, unrelated, chunk_size=700), is_member)
    # AUC's standard error here is sqrt((n+m+1) / (12 n m)) = 0.0065: 0.5 within about 4.5 of them.
    assert abs(chance["mia_auc"] - 0.5) < 0.03 and chance["mia_tpr@1%fpr"] < 0.05
    leaked = membership_inference(nearest_release_similarity(candidates, members), is_member)
    assert leaked["mia_auc"] == 1.0 and leaked["mia_tpr@1%fpr"] == 1.0
    # The score is each candidate's best cosine over the release, checked against the plain matrix.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(nearest_release_similarity(candidates[:50], unrelated),
                               (unit(candidates[:50]) @ unit(unrelated).T).max(axis=1), rtol=1e-12)
