"""Privacy metric: can a judge FR model find the original face behind a released (reconstructed) face?

DESIGN.md "Privacy metric": every released image (query) and every original (gallery) is embedded by an
independent FR model; cosine similarity ranks the gallery for each query.

- ``image_leak@k``: fraction of queries whose own source image is among the k nearest gallery images;
- ``identity_leak@k``: fraction whose k nearest gallery images include one of the query's identity.

Lower is more private. Ties are resolved in the leak's favour: a gallery image counts as within the top k when
fewer than k gallery images are strictly more similar to the query. A privacy metric should not look better
because a sort broke a tie one way (exact duplicate originals are common), and this definition does not depend on
the chunking or on the sort algorithm. Without ties it is plain top-k membership.

Queries are scored in chunks, so a 100k x 100k comparison never holds the full similarity matrix.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Similarities held per chunk: 2**24 float32 = 64 MiB, a few copies of which a chunk makes.
_CHUNK_ELEMENTS = 2 ** 24


def _unit_rows(emb: np.ndarray, *, name: str) -> np.ndarray:
    """``[N, D]`` rows scaled to unit L2 norm (zero rows stay zero), in the embeddings' float dtype."""
    x = np.asarray(emb)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or inf; check the judge model's weights and inputs")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def _check_labels(query_source: np.ndarray, query_identity: np.ndarray, gallery_identity: np.ndarray, *,
                  n_query: int, n_gallery: int) -> None:
    if query_source.shape != (n_query,) or query_identity.shape != (n_query,):
        raise ValueError(f"query_source and query_identity need one entry per query ({n_query}), got shapes "
                         f"{query_source.shape} and {query_identity.shape}")
    if gallery_identity.shape != (n_gallery,):
        raise ValueError(f"gallery_identity needs one entry per gallery image ({n_gallery}), got shape "
                         f"{gallery_identity.shape}")
    if not np.issubdtype(query_source.dtype, np.integer) or query_source.min() < 0 or query_source.max() >= n_gallery:
        raise ValueError(f"query_source must hold integer gallery row indices in [0, {n_gallery}); map each "
                         f"released image to the row of its original in the gallery")
    wrong = np.flatnonzero(gallery_identity[query_source] != query_identity)
    if len(wrong):
        raise ValueError(f"{len(wrong)} queries (first: {wrong[0]}) have another identity than their source image; "
                         f"query_source, query_identity and gallery_identity are misaligned")


def chance_levels(query_identity: np.ndarray, gallery_identity: np.ndarray, *,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """What a judge that ranks the gallery at random would score.

    ``image_chance@k = k / G``: the source is one of ``G`` gallery images. ``identity_chance@k`` is the mean over
    queries of ``1 - C(G - m, k) / C(G, k) = 1 - prod_{j<k} (G - m - j) / (G - j)``, the chance that ``k`` gallery
    images drawn without replacement include one of the ``m`` images of the query's identity.

    Args:
        query_identity: ``[Q]`` identity of each query.
        gallery_identity: ``[G]`` identity of each gallery image.
        ks: Neighbourhood sizes.

    Returns:
        ``image_chance@k`` and ``identity_chance@k`` for each k.
    """
    gallery_identity, query_identity = np.asarray(gallery_identity), np.asarray(query_identity)
    n_gallery = len(gallery_identity)
    labels, counts = np.unique(gallery_identity, return_counts=True)
    pos = np.clip(np.searchsorted(labels, query_identity), 0, len(labels) - 1)
    m = np.where(labels[pos] == query_identity, counts[pos], 0).astype(np.float64)  # [Q] same-identity images
    out = {}
    for k in ks:
        j = np.arange(k)
        miss = np.prod(np.maximum(n_gallery - m[:, None] - j, 0) / (n_gallery - j), axis=1)  # [Q] C(G-m,k)/C(G,k)
        out[f"image_chance@{k}"] = k / n_gallery
        out[f"identity_chance@{k}"] = float(np.mean(1 - miss))
    return out


def _chunk_hits(q: np.ndarray, g: np.ndarray, *, source: np.ndarray, query_identity: np.ndarray,
                gallery_identity: np.ndarray, ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per k, how many queries of one chunk leak their image and their identity: ``[c, D], [G, D] -> [K], [K]``.

    ``ks`` is sorted; one partition at the largest k, then a sort of those few, gives every k-th largest value.
    """
    n_gallery = len(g)
    sims = q @ g.T  # (c, G) cosine similarities
    top = np.sort(np.partition(sims, n_gallery - ks[-1], axis=1)[:, n_gallery - ks[-1]:], axis=1)  # (c, kmax)
    kth = top[:, [ks[-1] - k for k in ks]]  # (c, K) k-th largest similarity of each query
    own = sims[np.arange(len(q)), source]  # (c,) similarity to the query's own source
    same = gallery_identity[None, :] == query_identity[:, None]  # (c, G)
    best_same = np.where(same, sims, -np.inf).max(axis=1)  # (c,) nearest image of the query's identity
    # An image is within the top k iff fewer than k others are strictly closer, i.e. sim >= k-th largest.
    return (own[:, None] >= kth).sum(axis=0), (best_same[:, None] >= kth).sum(axis=0)


def retrieval_leak(query_emb: np.ndarray, gallery_emb: np.ndarray, *, query_source: np.ndarray,
                   query_identity: np.ndarray, gallery_identity: np.ndarray, ks: Sequence[int] = (1, 5),
                   chunk_size: int | None = None) -> dict[str, float]:
    """Image and identity leaks of released faces against the originals (see the module docstring).

    Args:
        query_emb: ``[Q, D]`` judge embeddings of the released images.
        gallery_emb: ``[G, D]`` judge embeddings of the originals.
        query_source: ``[Q]`` gallery row of each query's own original.
        query_identity: ``[Q]`` identity of each query.
        gallery_identity: ``[G]`` identity of each original.
        ks: Neighbourhood sizes, each in ``[1, G]``.
        chunk_size: Queries compared at a time; default keeps a chunk's similarities near 64 MiB (at most 1024).

    Returns:
        ``image_leak@k``, ``identity_leak@k``, the chance levels of :func:`chance_levels`, ``n_queries`` and
        ``n_gallery``, all floats.

    Raises:
        ValueError: Shapes that differ, non-finite embeddings, misaligned labels, or a bad k or chunk size.
    """
    q, g = _unit_rows(query_emb, name="query_emb"), _unit_rows(gallery_emb, name="gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb {g.shape[1]}; embed both with "
                         f"the same judge model")
    n_query, n_gallery = len(q), len(g)
    source, qid, gid = np.asarray(query_source), np.asarray(query_identity), np.asarray(gallery_identity)
    _check_labels(source, qid, gid, n_query=n_query, n_gallery=n_gallery)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > n_gallery:
        raise ValueError(f"ks={ks} must be non-empty with each k in [1, {n_gallery}] (the gallery size)")
    chunk = min(1024, max(1, _CHUNK_ELEMENTS // n_gallery)) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    image_hits, identity_hits = np.zeros(len(ks), np.int64), np.zeros(len(ks), np.int64)
    for lo in range(0, n_query, chunk):
        hi = min(lo + chunk, n_query)
        img, ident = _chunk_hits(q[lo:hi], g, source=source[lo:hi], query_identity=qid[lo:hi],
                                 gallery_identity=gid, ks=ks)
        image_hits += img
        identity_hits += ident
    out = {}
    for i, k in enumerate(ks):
        out[f"image_leak@{k}"] = float(image_hits[i] / n_query)
        out[f"identity_leak@{k}"] = float(identity_hits[i] / n_query)
    out.update(chance_levels(qid, gid, ks=ks))
    return {**out, "n_queries": float(n_query), "n_gallery": float(n_gallery)}


def nearest_release_similarity(candidate_emb: np.ndarray, released_emb: np.ndarray, *,
                               chunk_size: int | None = None) -> np.ndarray:
    """Each candidate face's highest cosine similarity to any released face: the membership attacker's score.

    Args:
        candidate_emb: ``[M, D]`` embeddings of the original faces whose membership is asked.
        released_emb: ``[R, D]`` embeddings of the release, by the same model.

    Returns:
        ``[M]`` float64 scores in ``[-1, 1]``.
    """
    c, r = _unit_rows(candidate_emb, name="candidate_emb"), _unit_rows(released_emb, name="released_emb")
    if c.shape[1] != r.shape[1]:
        raise ValueError(f"candidate_emb has dimension {c.shape[1]} but released_emb {r.shape[1]}; embed both "
                         "with the same model")
    chunk = min(1024, max(1, _CHUNK_ELEMENTS // len(r))) if chunk_size is None else chunk_size
    return np.concatenate([(c[lo:lo + chunk] @ r.T).max(axis=1) for lo in range(0, len(c), chunk)]).astype(np.float64)


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC of "member when score >= t" over every threshold t of ``scores`` (and +inf).

    Returns:
        ``(fpr, tpr, thresholds)``, from ``(0, 0)`` at +inf to ``(1, 1)`` at the lowest score; tied scores are
        one point.
    """
    scores, member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    if scores.shape != member.shape or scores.ndim != 1:
        raise ValueError(f"scores and is_member need one entry per candidate, got shapes {scores.shape} and "
                         f"{member.shape}")
    positives, negatives = int(member.sum()), int((~member).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"membership inference needs members and non-members, got {positives} and {negatives}")
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], member[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last candidate of each run of equal scores
    tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
    return (np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives], np.r_[np.inf, s[last]])


def membership_inference(scores: np.ndarray, is_member: np.ndarray, *, fpr: float = 0.01) -> dict[str, float]:
    """How well ``scores`` tell members (identities in the release) from non-members (never released).

    - ``mia_auc``: the ROC's area, the chance that a random member scores above a random non-member (ties
      count half; Mann-Whitney). 0.5 is guessing, 1.0 is certain membership.
    - ``mia_tpr@1%fpr``: the share of members found at the threshold that wrongly flags at most ``fpr`` of the
      non-members (no interpolation between thresholds): what an attacker who must rarely be wrong achieves.

    Args:
        scores: ``[M]`` the attacker's score per candidate, higher = more likely a member
            (:func:`nearest_release_similarity`).
        is_member: ``[M]`` bool.
        fpr: The false-positive rate the TPR is read at.
    """
    fprs, tprs, _ = roc_curve(scores, is_member)
    auc = float(np.sum(np.diff(fprs) * (tprs[1:] + tprs[:-1]) / 2))  # trapezoids: a tied run is a diagonal
    name = f"mia_tpr@{fpr * 100:g}%fpr"
    return {"mia_auc": auc, name: float(tprs[fprs <= fpr + 1e-12].max()),
            "n_members": float(np.sum(is_member)), "n_nonmembers": float(np.sum(~np.asarray(is_member, bool)))}
