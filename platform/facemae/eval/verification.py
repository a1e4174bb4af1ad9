"""Face verification accuracy with the 10-fold protocol of LFW / CFP-FP / AgeDB-30, as InsightFace computes it.

[SRC insightface ``recognition/arcface_torch/eval/verification.py``: ``test``, ``calculate_roc``,
``calculate_val``] Embeddings of an image and of its horizontal flip are summed and L2-normalised; a pair's
distance is the squared L2 distance; the pairs are cut into 10 contiguous folds (``sklearn.KFold`` without
shuffling); each fold is scored with the threshold that is best on the other nine.

Instead of InsightFace's loop over thresholds, each fold's counts of pairs below every threshold come from one
``searchsorted``; the counts are integers, so the chosen thresholds and accuracies are the same numbers.
Distances are compared with the float64 thresholds, as numpy >= 2 does in InsightFace's ``np.less``.

:func:`draw_pairs` builds an LFW-style pair list from held-out identities, and :func:`pairs_to_bin` turns it
into a standard ``.bin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from facemae.data.verification_bin import VerificationPairs

if TYPE_CHECKING:
    import torch

# Squared L2 distances between unit vectors lie in [0, 4]; the grids of calculate_roc and calculate_val.
ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
ROC_THRESHOLDS.setflags(write=False)
VAL_THRESHOLDS.setflags(write=False)


@dataclass(frozen=True)
class VerificationResult:
    """10-fold verification accuracy.

    Attributes:
        accuracy: Mean held-out accuracy over folds ("Accuracy-Flip").
        std: Population std of the fold accuracies (``np.std``, as InsightFace).
        fold_accuracies: ``[n_folds]`` held-out accuracy of each fold.
        thresholds: ``[n_folds]`` threshold chosen on each fold's nine training folds.
        tpr: ``[T]`` true-positive rate at each grid threshold, held-out folds averaged (for ROC plots).
        fpr: ``[T]`` false-positive rate at each grid threshold, held-out folds averaged.
        n_pairs: Number of pairs scored.
    """

    accuracy: float
    std: float
    fold_accuracies: np.ndarray
    thresholds: np.ndarray
    tpr: np.ndarray
    fpr: np.ndarray
    n_pairs: int

    def summary(self) -> dict[str, float]:
        """Scalars to log: accuracy, std, mean chosen threshold and the pair count."""
        return {"accuracy": float(self.accuracy), "accuracy_std": float(self.std),
                "threshold": float(np.mean(self.thresholds)), "n_pairs": float(self.n_pairs)}


class TarAtFar(NamedTuple):
    """Verification rate at a false-accept rate, as ``calculate_val`` returns it: ``(val, std, far)``.

    All NaN when it is undefined: :func:`tar_undefined` says why.
    """

    tar: float
    std: float
    far: float


class _FoldCounts(NamedTuple):
    pos_below: np.ndarray  # [F, T] positives of held-out fold f with dist < thresholds[t]
    neg_below: np.ndarray  # [F, T] negatives of held-out fold f with dist < thresholds[t]
    n_pos: np.ndarray  # [F]
    n_neg: np.ndarray  # [F]


def kfold_splits(n: int, *, n_splits: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous folds as ``sklearn.model_selection.KFold(n_splits, shuffle=False)``: the first ``n % n_splits``
    folds hold one extra item.

    Args:
        n: Number of items (pairs).
        n_splits: Number of folds.

    Returns:
        ``(train_indices, test_indices)`` per fold.

    Raises:
        ValueError: Fewer than 2 folds, or fewer items than folds.
    """
    if n_splits < 2:
        raise ValueError(f"n_folds={n_splits}: use at least 2 folds (the protocol uses 10)")
    if n < n_splits:
        raise ValueError(f"{n} pairs cannot fill {n_splits} folds; use at least {n_splits} pairs or fewer folds")
    sizes = np.full(n_splits, n // n_splits)
    sizes[: n % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    idx = np.arange(n)
    return [(np.concatenate([idx[:lo], idx[hi:]]), idx[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each pair: ``[N, D], [N, D] -> [N]``, in the embeddings' float dtype.

    Raises:
        ValueError: Shapes that differ or are not 2-D, or non-finite values.
    """
    e1, e2 = np.asarray(emb1), np.asarray(emb2)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"emb1 and emb2 must both be [N, D] with the same shape, got {e1.shape} and {e2.shape}")
    if not np.issubdtype(e1.dtype, np.floating):
        e1, e2 = e1.astype(np.float64), e2.astype(np.float64)
    dist = np.sum(np.square(np.subtract(e1, e2)), axis=1)
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"{int(np.sum(~np.isfinite(dist)))} pair distances are NaN or inf; the embeddings hold "
                         f"non-finite values, so check the model's weights and inputs")
    return dist


def _labels(issame: np.ndarray | Sequence[bool], n: int) -> np.ndarray:
    same = np.asarray(issame)
    if same.shape != (n,):
        raise ValueError(f"issame has shape {same.shape} but there are {n} pairs; pass one flag per pair")
    if same.dtype != np.bool_ and not np.isin(same, (0, 1)).all():
        raise ValueError("issame must hold bools (or 0/1), one per pair")
    return same.astype(bool)


def _grid(thresholds: np.ndarray) -> np.ndarray:
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError("thresholds must be a non-empty, strictly increasing 1-D grid, e.g. np.arange(0, 4, 0.01)")
    return grid


def _fold_counts(dist: np.ndarray, same: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                 grid: np.ndarray) -> _FoldCounts:
    """Per held-out fold, how many positives and negatives fall below each threshold."""
    pos_below, neg_below = [], []
    for _, test in folds:
        d, s = dist[test], same[test]
        # searchsorted(side="left") counts the sorted distances strictly below each threshold: dist < thr.
        pos_below.append(np.searchsorted(np.sort(d[s]), grid, side="left"))
        neg_below.append(np.searchsorted(np.sort(d[~s]), grid, side="left"))
    n_pos = np.array([same[test].sum() for _, test in folds])
    n_neg = np.array([len(test) for _, test in folds]) - n_pos
    return _FoldCounts(np.stack(pos_below), np.stack(neg_below), n_pos, n_neg)


def _rate(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``count / total`` per fold row, 0 where the fold has none (``calculate_accuracy``'s convention)."""
    return np.where(total[:, None] > 0, count / np.maximum(total, 1)[:, None], 0.0)


def verification_accuracy(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray | Sequence[bool], *,
                          n_folds: int = 10, thresholds: np.ndarray = ROC_THRESHOLDS) -> VerificationResult:
    """10-fold verification accuracy, InsightFace's ``calculate_roc``.

    Args:
        emb1: ``[N, D]`` embeddings of each pair's first image (flip-summed and normalised: :func:`embed_images`).
        emb2: ``[N, D]`` embeddings of each pair's second image.
        issame: ``[N]`` True where the pair shows one identity.
        n_folds: Contiguous folds; each is scored with the threshold best on all the others.
        thresholds: Increasing grid of squared-L2 thresholds; a pair is predicted "same" when ``dist < thr``.

    Returns:
        Mean and std of held-out fold accuracies, the chosen thresholds, and the mean ROC curve.

    Raises:
        ValueError: Mismatched shapes, non-finite embeddings, fewer pairs than folds, or a bad grid.
    """
    dist = pair_distances(emb1, emb2)
    same = _labels(issame, len(dist))
    grid = _grid(thresholds)
    folds = kfold_splits(len(dist), n_splits=n_folds)
    c = _fold_counts(dist, same, folds, grid)
    correct = c.pos_below + (c.n_neg[:, None] - c.neg_below)  # [F, T] tp + tn on each held-out fold
    correct_train = correct.sum(axis=0) - correct  # [F, T] on the other folds
    # Integer counts over a fixed train size order thresholds as calculate_accuracy's floats do, and
    # np.argmax keeps the first (lowest) of tied thresholds, as in calculate_roc.
    best = np.argmax(correct_train, axis=1)
    fold_acc = correct[np.arange(n_folds), best] / (c.n_pos + c.n_neg)
    return VerificationResult(accuracy=float(np.mean(fold_acc)), std=float(np.std(fold_acc)),
                              fold_accuracies=fold_acc, thresholds=grid[best],
                              tpr=_rate(c.pos_below, c.n_pos).mean(axis=0),
                              fpr=_rate(c.neg_below, c.n_neg).mean(axis=0), n_pairs=len(dist))


def tar_undefined(issame: np.ndarray | Sequence[bool], *, n_folds: int = 10) -> str:
    """Why :func:`tar_at_far` has no value for these pairs, or ``""``: a fold without negative pairs has no
    false-accept rate to set a threshold by, one without positives no true-accept rate (small published
    ``.bin`` files exist whose folds hold no negatives)."""
    same = np.asarray(issame, dtype=bool)
    lacking = []
    for f, (_, test) in enumerate(kfold_splits(len(same), n_splits=n_folds)):
        if not same[test].all() and same[test].any():
            continue
        lacking.append(f"fold {f} has no {'negative' if same[test].all() else 'positive'} pairs")
    if not lacking:
        return ""
    return (f"undefined: {'; '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} (of {n_folds} contiguous "
            f"folds of {len(same)} pairs), so no threshold can be set on the other folds' false accepts")


def _threshold_at_far(far_train: np.ndarray, grid: np.ndarray, far: float) -> float:
    """The threshold where the (non-decreasing) training FAR curve reaches ``far``, 0 when it never does.

    InsightFace interpolates with ``scipy.interpolate.interp1d(far_train, thresholds, kind="slinear")``. On
    the flat runs of the curve both it and ``np.interp`` take the last threshold of the run at or below
    ``far`` and the first one above it, so they agree up to rounding of the interpolated value.
    """
    if far_train.max() < far:
        return 0.0
    return float(np.interp(far, far_train, grid))


def tar_at_far(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray | Sequence[bool], *, far: float = 1e-3,
               n_folds: int = 10, thresholds: np.ndarray = VAL_THRESHOLDS) -> TarAtFar:
    """True-accept rate (VAL) at a false-accept rate, InsightFace's ``calculate_val``.

    Per fold, the threshold giving ``far`` on the other folds is interpolated on the grid, then VAL and FAR are
    measured on the held-out fold.

    Args:
        emb1: ``[N, D]`` embeddings of each pair's first image.
        emb2: ``[N, D]`` embeddings of each pair's second image.
        issame: ``[N]`` True where the pair shows one identity.
        far: Target false-accept rate, in ``(0, 1]``.
        n_folds: Contiguous folds.
        thresholds: Increasing grid of squared-L2 thresholds.

    Returns:
        Mean VAL over folds, its std, and the mean held-out FAR.

    Raises:
        ValueError: As :func:`verification_accuracy`, or a target outside ``(0, 1]``. A fold without positive or
            negative pairs is no error: the result is NaN (:func:`tar_undefined` says why), so that the accuracy
            of such a file (and of every other target) is still reported.
    """
    if not 0 < far <= 1:
        raise ValueError(f"far={far} must lie in (0, 1], e.g. 1e-3")
    dist = pair_distances(emb1, emb2)
    same = _labels(issame, len(dist))
    grid = _grid(thresholds)
    folds = kfold_splits(len(dist), n_splits=n_folds)
    c = _fold_counts(dist, same, folds, grid)
    if np.any(c.n_pos == 0) or np.any(c.n_neg == 0):
        return TarAtFar(tar=math.nan, std=math.nan, far=math.nan)
    neg_train = c.neg_below.sum(axis=0) - c.neg_below  # [F, T] false accepts on the other folds
    n_neg_train = c.n_neg.sum() - c.n_neg  # [F]
    vals, fars = np.zeros(n_folds), np.zeros(n_folds)
    for f, (_, test) in enumerate(folds):
        thr = _threshold_at_far(neg_train[f] / n_neg_train[f], grid, far)
        accept, s = dist[test] < thr, same[test]
        vals[f] = np.sum(accept & s) / np.sum(s)
        fars[f] = np.sum(accept & ~s) / np.sum(~s)
    return TarAtFar(tar=float(np.mean(vals)), std=float(np.std(vals)), far=float(np.mean(fars)))


def embed_images(model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """Flip-summed, L2-normalised embeddings, as InsightFace's verification ``test``.

    Args:
        model: Face-recognition backbone (``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, D]``), already on ``device``.
            It runs in eval mode; its training mode is restored afterwards.
        images: ``[N, H, W, 3]`` uint8 faces (112x112 for the standard backbones).
        batch_size: Images per forward pass (each pass also holds their flips).
        device: Where the batches are sent.

    Returns:
        ``[N, D]`` float32 rows ``emb(x) + emb(hflip(x))``, scaled to unit norm (zero rows stay zero).

    Raises:
        ValueError: Images that are not a non-empty ``[N, H, W, 3]`` uint8 array, or a batch size below 1.
    """
    import torch

    from facemae.models.fr import to_model_range

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"embed_images needs non-empty [N, H, W, 3] uint8 images, got {images.dtype} "
                         f"{images.shape}; decode them with facemae.data.images.decode_rgb")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
                x = x.to(device)
                emb = model(torch.cat([x, x.flip(3)]))  # (2B, D): originals, then their width-flips
                out.append((emb[:len(x)] + emb[len(x):]).float().cpu().numpy())
    finally:
        model.train(was_training)
    emb = np.concatenate(out)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms == 0, 1, norms)  # sklearn.preprocessing.normalize leaves zero rows at zero


def _identity_groups(identities: np.ndarray) -> list[np.ndarray]:
    """Image indices of each identity, identities in label order and indices ascending."""
    order = np.argsort(identities, kind="stable")
    _, starts = np.unique(identities[order], return_index=True)
    return np.split(order, starts[1:])


def _spread(capacity: np.ndarray, n: int, *, order: np.ndarray) -> np.ndarray:
    """Splits ``n`` as evenly as ``capacity`` allows, remainders to the first identities of ``order``."""
    quota = np.zeros_like(capacity)
    while n > 0:
        open_ = order[quota[order] < capacity[order]]
        share, extra = divmod(n, len(open_))
        add = np.full(len(open_), share)
        add[:extra] += 1
        add = np.minimum(add, capacity[open_] - quota[open_])
        quota[open_] += add
        n -= int(add.sum())
    return quota


def _unrank_pairs(ranks: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``r`` in the lexicographic list of ``(a, b)``, ``0 <= a < b < m``, to ``(a, b)``."""
    offsets = np.concatenate([[0], np.cumsum(np.arange(m - 1, 0, -1))])  # [m] rank of (a, a + 1)
    a = np.searchsorted(offsets, ranks, side="right") - 1
    return a, a + 1 + ranks - offsets[a]


def _too_few(kind: str, n: int, available: int, *, block: int, fix: str) -> ValueError:
    fit = 2 * available // block * block  # the largest n_pairs these identities can serve
    lower = f", or lower n_pairs to {fit}" if fit else ""
    return ValueError(f"draw_pairs(n_pairs={2 * n}) needs {n} distinct {kind} pairs but {available} exist; "
                      f"{fix}{lower}")


def _positive_pairs(rng: np.random.Generator, groups: list[np.ndarray], n: int, *, block: int) -> np.ndarray:
    """``[n, 2]`` distinct same-identity pairs, spread evenly over the identities with >= 2 images."""
    sizes = np.array([len(g) for g in groups])
    eligible = np.flatnonzero(sizes >= 2)
    capacity = sizes[eligible] * (sizes[eligible] - 1) // 2
    if capacity.sum() < n:
        raise _too_few("positive", n, int(capacity.sum()), block=block,
                       fix=f"only {len(eligible)} identities have >= 2 images: hold out more identities with at "
                           f"least 2 images each")
    order = rng.permutation(len(eligible))
    quota = _spread(capacity, n, order=order)
    pairs = []
    for j in order[quota[order] > 0]:
        a, b = _unrank_pairs(rng.choice(capacity[j], size=quota[j], replace=False), sizes[eligible[j]])
        pairs.append(np.stack([groups[eligible[j]][a], groups[eligible[j]][b]], axis=1))
    return np.concatenate(pairs)[rng.permutation(n)]


def _all_negative_pairs(groups: list[np.ndarray]) -> np.ndarray:
    """``[M, 2]`` every cross-identity image pair (used only when M < 2n, so it stays small)."""
    blocks = [np.stack(np.meshgrid(ga, gb, indexing="ij"), axis=-1).reshape(-1, 2)
              for i, ga in enumerate(groups) for gb in groups[i + 1:]]
    return np.concatenate(blocks)


def _negative_pairs(rng: np.random.Generator, groups: list[np.ndarray], n: int, *, block: int) -> np.ndarray:
    """``[n, 2]`` distinct pairs of two identities drawn uniformly, one uniform image of each."""
    sizes = np.array([len(g) for g in groups])
    available = (int(sizes.sum()) ** 2 - int(np.sum(sizes ** 2))) // 2
    if available < n:
        raise _too_few("negative", n, available, block=block,
                       fix=f"the images span only {len(groups)} identities: hold out more identities")
    if 2 * n > available:  # rejection would stall; few enough to list them all
        everything = _all_negative_pairs(groups)
        return everything[rng.choice(len(everything), size=n, replace=False)]
    flat, starts = np.concatenate(groups), np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < n:
        m = 2 * (n - len(out)) + 64
        ga = rng.integers(len(groups), size=m)
        gb = rng.integers(len(groups) - 1, size=m)
        gb += gb >= ga  # a second identity, uniform among the others
        ia = flat[starts[ga] + rng.integers(sizes[ga])]
        ib = flat[starts[gb] + rng.integers(sizes[gb])]
        for a, b in zip(ia.tolist(), ib.tolist()):
            key = (min(a, b), max(a, b))
            if key not in seen and len(out) < n:
                seen.add(key)
                out.append((a, b))
    return np.array(out, dtype=np.int64)


def draw_pairs(identities: np.ndarray, *, n_pairs: int, seed: int,
               n_folds: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An LFW-style verification pair list over held-out images, deterministic per seed.

    Half the pairs are positive (two different images of one identity, spread evenly over the identities), half
    negative (images of two different identities). Like LFW's ``pairs.txt``, each of the ``n_folds`` contiguous
    folds holds a block of ``n_pairs / (2 n_folds)`` positives, then as many negatives. No pair repeats.

    Args:
        identities: ``[N]`` integer identity of each image.
        n_pairs: Number of pairs, a multiple of ``2 * n_folds`` (6000 as LFW).
        seed: Seed of the draw.
        n_folds: Folds of the protocol the list is for.

    Returns:
        ``(idx1, idx2, issame)``: ``[n_pairs]`` image indices of each pair's two images, and the labels.

    Raises:
        ValueError: A bad ``n_pairs``, or too few identities (with >= 2 images) for that many distinct pairs.
    """
    ids = np.asarray(identities)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"identities must be a 1-D integer array (one label per image), got {ids.dtype} {ids.shape}")
    block = 2 * n_folds
    if n_pairs <= 0 or n_pairs % block:
        raise ValueError(f"n_pairs={n_pairs} must be a positive multiple of {block}, so each of {n_folds} folds "
                         f"holds equal positive and negative blocks; use {max(block, n_pairs // block * block)}")
    rng = np.random.default_rng(seed)
    groups = _identity_groups(ids)
    pos = _positive_pairs(rng, groups, n_pairs // 2, block=block)
    neg = _negative_pairs(rng, groups, n_pairs // 2, block=block)
    pairs = np.concatenate([pos, neg])
    pairs = np.where((rng.random(n_pairs) < 0.5)[:, None], pairs[:, ::-1], pairs)  # no image-order bias
    half = n_pairs // block
    pos_blocks = np.arange(n_pairs // 2).reshape(n_folds, half)  # [F, half]: row f are fold f's positives
    order = np.concatenate([pos_blocks, pos_blocks + n_pairs // 2], axis=1).ravel()  # fold f: positives, negatives
    issame = np.tile(np.repeat([True, False], half), n_folds)
    return pairs[order, 0], pairs[order, 1], issame


def pairs_to_bin(images_encoded: Sequence[bytes], idx1: np.ndarray, idx2: np.ndarray,
                 issame: np.ndarray | Sequence[bool]) -> VerificationPairs:
    """A pair list over encoded images as the pairs of a standard verification ``.bin``.

    Args:
        images_encoded: Encoded images (PNG / JPEG bytes), indexed by ``idx1`` / ``idx2``.
        idx1: ``[P]`` index of each pair's first image.
        idx2: ``[P]`` index of each pair's second image.
        issame: ``[P]`` labels.

    Returns:
        Pairs to write with :func:`facemae.data.verification_bin.save_verification_bin`.

    Raises:
        ValueError: Lengths that differ, or indices outside ``images_encoded``.
    """
    i1, i2 = np.asarray(idx1), np.asarray(idx2)
    same = _labels(issame, len(i1))
    if i2.shape != i1.shape or i1.ndim != 1:
        raise ValueError(f"idx1 and idx2 must be 1-D and of one length, got {i1.shape} and {i2.shape}")
    n = len(images_encoded)
    if len(i1) and (min(i1.min(), i2.min()) < 0 or max(i1.max(), i2.max()) >= n):
        raise ValueError(f"pair indices must lie in [0, {n}), the range of images_encoded; pass the images the "
                         f"pair list was drawn over")
    images = [bytes(images_encoded[k]) for a, b in zip(i1.tolist(), i2.tolist()) for k in (a, b)]
    return VerificationPairs(images=images, issame=same.tolist())
