"""Evaluation jobs: verification accuracy of an FR model and the privacy of a released dataset.

Embedding is the only heavy part; sets above ``eval.ray_threshold`` images are embedded by a Ray
Data actor pool (one model per actor), smaller ones in this process. The metrics themselves are the
plain functions of :mod:`facemae.eval.verification` and :mod:`facemae.measures.privacy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemae import storage
from facemae.allocator import retain_freed_memory
from facemae.config import Config
from facemae.data.images import corrupt_records, decode_face, decode_rows
from facemae.data.shards import MANIFEST, SPLITS, iter_rows, sha256_file, verify_dataset
from facemae.data.stream import shard_rows
from facemae.data.verification_bin import load_verification_bin, save_verification_bin
from facemae.measures.privacy import membership_inference, nearest_release_similarity, retrieval_leak, roc_curve
from facemae.eval.verification import (draw_pairs, embed_images, pairs_to_bin, tar_at_far, tar_undefined,
                                       verification_accuracy)


LISTED_IDS = 100  # corrupt image_ids an evaluation names; all are counted


@dataclass
class Embeddings:
    """Flip-sum embeddings of one split of a dataset, rows sorted by ``image_id``."""

    image_id: np.ndarray  # [N] str
    source_id: np.ndarray  # [N] str: the original face a released row came from (itself for originals)
    identity: np.ndarray  # [N] int64
    emb: np.ndarray  # [N, D] float32, unit rows
    skipped: list[dict[str, str]] = field(default_factory=list)  # rows left out (data.skip_corrupt)


class FlipSumEmbedder:
    """Ray Data callable class: an FR backbone loaded once per actor; encoded faces in, embeddings out."""

    def __init__(self, weights: str, batch_size: int = 64, storage_options: dict[str, str] | None = None) -> None:
        from facemae.models.weights import load_fr_backbone

        storage.configure(**(storage_options or {}))  # the driver's endpoint: weights may be on a store
        retain_freed_memory()

        self.model, self.batch_size = load_fr_backbone(weights), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Embeddings of a batch of shard rows; ``corrupt`` says per row ``""`` or why its image would not
        decode, for the caller to raise for or leave out and count (:func:`embed_split`)."""
        pixels, reasons = decode_rows(batch["image"], image_ids=batch["image_id"], paths=batch["path"],
                                      skip_corrupt=True)
        emb = embed_images(self.model, pixels, batch_size=self.batch_size)
        source = batch["source_id"] if "source_id" in batch else batch["image_id"]
        return {"image_id": batch["image_id"], "source_id": source, "identity": batch["identity"], "emb": list(emb),
                "corrupt": np.array(reasons, dtype=object), "path": batch["path"]}


def embed_split(config: Config, weights: str, root: str, split: str) -> Embeddings:
    """Embeds every image of ``root``'s ``split`` with the FR backbone ``weights``: :func:`embed_splits`
    of one set."""
    return embed_splits(config, weights, [(root, split)])[0]


def embed_splits(config: Config, weights: str, sets: list[tuple[str, str]]) -> list[Embeddings]:
    """Embeds every image of each ``(root, split)`` with the FR backbone ``weights``, in one go.

    Together above ``eval.ray_threshold`` images, the sets go through one Ray Data actor pool, which loads
    the model once (a pool's start, its actors importing torch and loading the weights, took 6-7 s
    here, as long as embedding a few thousand faces); otherwise one process embeds them.

    Returns:
        One :class:`Embeddings` per set, in order.

    Raises:
        CorruptImageError: An image does not decode and ``data.skip_corrupt`` is off; the message names
            the dataset, the shard and the image_id. With it on, the row is left out and listed in
            :attr:`Embeddings.skipped`.
    """
    manifests = [verify_dataset(root) for root, _ in sets]
    files = [m.files(root, split) for m, (root, split) in zip(manifests, sets)]
    if sum(m.num_images(split) for m, (_, split) in zip(manifests, sets)) > config.eval.ray_threshold:
        stores = {storage.store_of(f) for fs in files for f in fs}  # a pool reads from one store
        groups = [files] if len(stores) == 1 else [[fs] for fs in files]
        outs = [out for group in groups for out in _embed_sets_on_ray(config, weights, group)]
    else:
        embedder = FlipSumEmbedder(weights, config.eval.batch_size)
        outs = []
        for fs in files:
            rows = [{**r, "path": f} for f in fs for r in iter_rows([f])]
            outs.append(embedder({k: np.array([r.get(k, r["image_id"]) for r in rows], dtype=object)
                                  for k in ("image_id", "source_id", "identity", "image", "path")}))
    return [_embeddings(out, skip_corrupt=config.data.skip_corrupt) for out in outs]


def _embed_sets_on_ray(config: Config, weights: str, files: list[list[str]]) -> list[dict[str, list]]:
    """The embedder's output of each set of shard files (one store), by one actor pool over them all."""
    everything = list(dict.fromkeys(f for fs in files for f in fs))
    out = _embed_on_ray(config, weights, everything)
    rows_of: dict[str, list[int]] = {}  # shard, as the pool's rows name it (a path in its filesystem)
    for i, path in enumerate(out["path"]):
        rows_of.setdefault(path, []).append(i)
    named = dict(zip(everything, storage.for_arrow(everything)[0]))
    outs = []
    for fs in files:
        rows = [i for f in fs for i in rows_of.get(named[f], [])]
        outs.append({k: [v[i] for i in rows] for k, v in out.items()})
    assert sum(len(o["image_id"]) for o in outs) >= len(out["image_id"]), "rows of a shard no set holds"
    return outs


def _embeddings(out: dict[str, Any], *, skip_corrupt: bool) -> Embeddings:
    """The good rows of an embedder's output, by image_id, and the corrupt ones left out (or raised for)."""
    skipped = corrupt_records(list(out["corrupt"]), image_ids=list(out["image_id"]), paths=list(out["path"]),
                              skip_corrupt=skip_corrupt)
    bad = np.array([bool(c) for c in out["corrupt"]], dtype=bool)
    image_id = np.asarray(out["image_id"], dtype=str)[~bad]
    order = np.argsort(image_id)
    return Embeddings(image_id=image_id[order], source_id=np.asarray(out["source_id"], dtype=str)[~bad][order],
                      identity=np.asarray(out["identity"], dtype=np.int64)[~bad][order],
                      emb=np.stack(out["emb"]).astype(np.float32)[~bad][order], skipped=skipped)


def _embed_on_ray(config: Config, weights: str, files: list[str]) -> dict[str, list]:
    import ray.data

    from facemae.cluster import ensure_ray

    ensure_ray(config.ray)
    resources = {"num_cpus": config.generate.cpus_per_actor}
    ds = shard_rows(files, **resources).map_batches(
        FlipSumEmbedder, batch_size=None, batch_format="numpy",
        fn_constructor_kwargs={"weights": storage.absolute(weights), "batch_size": config.eval.batch_size,
                               "storage_options": storage.options()},
        compute=ray.data.ActorPoolStrategy(size=config.generate.actors), **resources)
    out: dict[str, list] = {"image_id": [], "source_id": [], "identity": [], "emb": [], "corrupt": [], "path": []}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for key in out:
            out[key].extend(batch[key])
    return out


def verify(config: Config, weights: str, *, pairs_from: str | None = None) -> dict[str, dict[str, Any]]:
    """Verification accuracy (10-fold, flip-sum) and TAR@FAR of an FR backbone.

    Args:
        config: ``eval.bins`` and ``eval.pairs`` say on what.
        weights: The backbone's ``weights.safetensors``.
        pairs_from: Dataset whose ``train`` split originals the platform draws ``eval.pairs`` pairs from.

    Returns:
        ``{target name: {accuracy, accuracy_std, tar, tar_std, far, n_pairs, tpr, fpr}}``; the drawn
        pairs' entry also counts (``corrupt_skipped``) and names (``corrupt_image_ids``) the rows left
        out because their image would not decode (``data.skip_corrupt``).

    Raises:
        WeightsError: ``weights`` is not an FR backbone (found here, on the driver, before any Ray work).
    """
    from facemae.models.weights import load_fr_backbone

    storage.configure(**asdict(config.storage))
    model, results = load_fr_backbone(weights), {}
    for path in config.eval.bins:
        pairs = load_verification_bin(path)
        pixels = np.stack([decode_face(b, where=f"{path} image {i}", resize=True, convert_rgb=True)
                           for i, b in enumerate(pairs.images)])
        emb = embed_images(model, pixels, batch_size=config.eval.batch_size)
        results[Path(path).stem] = _scores(emb[0::2], emb[1::2], np.asarray(pairs.issame), far=config.eval.far)
    if pairs_from and config.eval.pairs:
        embedded = embed_split(config, weights, pairs_from, "train")
        idx1, idx2, issame = draw_pairs(embedded.identity, n_pairs=config.eval.pairs, seed=config.eval.pair_seed)
        results["heldout_pairs"] = {**_scores(embedded.emb[idx1], embedded.emb[idx2], issame, far=config.eval.far),
                                    **_corrupt_summary(embedded.skipped)}
    return results


def export_verification_bin(dataset: str, path: str | os.PathLike, *, n_pairs: int, seed: int,
                            splits: tuple[str, ...] = SPLITS) -> int:
    """Writes ``n_pairs`` LFW-style pairs over a dataset's images (:func:`draw_pairs`: half positive, in
    10 folds) as an InsightFace verification ``.bin``, so that other tools verify on its faces (an aligned
    ingest of one's own photos, say). The images are the dataset's stored bytes, unchanged.

    Args:
        dataset: Dataset folder (or object-store prefix), checked against its manifest first.
        path: The ``.bin`` to write (atomically).
        n_pairs: Pairs, a multiple of 20.
        seed: Seed of the draw.
        splits: Splits whose images the pairs are drawn over, all by default.

    Returns:
        The number of pairs written.

    Raises:
        ValueError: Too few identities or images for ``n_pairs`` distinct pairs, saying how many there are.
    """
    manifest = verify_dataset(dataset)
    files = [f for split in splits if split in manifest.splits for f in manifest.files(dataset, split)]
    identities = np.fromiter((r["identity"] for r in iter_rows(files, columns=["identity"])), dtype=np.int64)
    idx1, idx2, issame = draw_pairs(identities, n_pairs=n_pairs, seed=seed)
    wanted = set(idx1.tolist()) | set(idx2.tolist())
    images = {i: r["image"] for i, r in enumerate(iter_rows(files, columns=["image"])) if i in wanted}
    order = sorted(images)  # the .bin holds only the images its pairs use
    at = {i: k for k, i in enumerate(order)}
    pairs = pairs_to_bin([images[i] for i in order], np.array([at[i] for i in idx1.tolist()]),
                         np.array([at[i] for i in idx2.tolist()]), issame)
    save_verification_bin(path, pairs)
    return len(issame)


def _corrupt_summary(skipped: list[dict[str, str]]) -> dict[str, Any]:
    """``corrupt_skipped`` (always) and the first :data:`LISTED_IDS` ``corrupt_image_ids`` (when any)."""
    out: dict[str, Any] = {"corrupt_skipped": len(skipped)}
    if skipped:
        out["corrupt_image_ids"] = [s["image_id"] for s in skipped[:LISTED_IDS]]
    return out


def _scores(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, *, far: float) -> dict[str, Any]:
    acc = verification_accuracy(emb1, emb2, issame)
    tar = tar_at_far(emb1, emb2, issame, far=far)
    undefined = tar_undefined(issame)
    rates = {"tar": None, "tar_std": None, "far": None, "tar_undefined": undefined} if undefined else \
        {"tar": float(tar.tar), "tar_std": float(tar.std), "far": float(tar.far)}
    return {**acc.summary(), **rates, "tpr": acc.tpr.tolist(), "fpr": acc.fpr.tolist()}


def privacy(config: Config, judge: str, *, released: str, originals: str, split: str = "deploy",
            gallery_cache: str | None = None) -> dict[str, Any]:
    """``image_leak@k`` and ``identity_leak@k`` of a released set against its originals, by the judge.

    ``gallery_cache``, a local folder, keeps the judge's embeddings of the originals (the gallery) under a
    key of the judge's weights, the originals' manifest, the split and ``data.skip_corrupt``: every
    release of the same originals scored by the same judge (an experiment's rows, a frontier's points)
    embeds only its own faces.

    With ``data.skip_corrupt``, rows of either set whose image would not decode are left out, counted
    (``corrupt_skipped``) and named (``corrupt_image_ids``); a released face whose original was left
    out cannot be scored and is left out too (``queries_left_out``).

    Raises:
        WeightsError: ``judge`` is not an FR backbone (checked here, before any Ray actor loads it).
        CorruptImageError: An image does not decode and ``data.skip_corrupt`` is off (naming its row).
    """
    from facemae.models.weights import check_weights

    storage.configure(**asdict(config.storage))
    check_weights(judge, task="fr")
    cached = _gallery_path(gallery_cache, judge=judge, originals=originals, split=split,
                           skip_corrupt=config.data.skip_corrupt) if gallery_cache else None
    gallery = _load_gallery(cached) if cached else None
    if gallery is None:
        gallery, queries = embed_splits(config, judge, [(originals, split), (released, split)])
        if cached:
            _save_gallery(cached, gallery)
    else:
        (queries,) = embed_splits(config, judge, [(released, split)])
    position = {image_id: i for i, image_id in enumerate(gallery.image_id)}
    left_out = {s["image_id"] for s in gallery.skipped}
    scored = np.array([s not in left_out for s in queries.source_id], dtype=bool)
    missing = [s for s in queries.source_id[scored] if s not in position]
    if missing:
        raise ValueError(f"{released} holds faces whose originals are not in {originals}/{split} "
                         f"(e.g. {missing[:3]}); compare a release with the dataset it came from")
    source = np.array([position[s] for s in queries.source_id[scored]])
    leak: dict[str, Any] = retrieval_leak(queries.emb[scored], gallery.emb, query_source=source,
                                          query_identity=queries.identity[scored],
                                          gallery_identity=gallery.identity, ks=(1, 5))
    leak.update(_corrupt_summary([*gallery.skipped, *queries.skipped]))
    if not scored.all():
        leak["queries_left_out"] = int((~scored).sum())
    return leak


def membership(config: Config, weights: str, *, released: str, members: tuple[str, str],
               nonmembers: list[tuple[str, str]], released_split: str = "deploy") -> dict[str, Any]:
    """Membership inference against a release: each original face of the members (``(root, split)``: the
    released identities) and of the non-members (identities never released) scores its highest cosine
    similarity to any released face, embedded by ``weights`` (DESIGN.md "Who sees what").

    Returns:
        ``mia_auc``, ``mia_tpr@1%fpr``, ``n_members``, ``n_nonmembers`` and ``mia_roc`` (``fpr`` and ``tpr``
        lists, thinned to at most 200 points, for a plot).

    Raises:
        ValueError: A non-member shares an identity name with a member (they would not be non-members).
    """
    from facemae.models.weights import check_weights

    storage.configure(**asdict(config.storage))
    check_weights(weights, task="fr")
    _check_disjoint(members, nonmembers)
    release, inside, *outside = embed_splits(config, weights, [(released, released_split), members, *nonmembers])
    candidates = np.concatenate([inside.emb, *(o.emb for o in outside)])
    is_member = np.r_[np.ones(len(inside.emb), bool), np.zeros(sum(len(o.emb) for o in outside), bool)]
    scores = nearest_release_similarity(candidates, release.emb)
    out: dict[str, Any] = membership_inference(scores, is_member)
    fpr, tpr, _ = roc_curve(scores, is_member)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
    out["mia_roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
    return out


def _check_disjoint(members: tuple[str, str], nonmembers: list[tuple[str, str]]) -> None:
    """Non-members must be other people: not the members' dataset, nor one of its identity names."""
    root, split = members
    manifest = verify_dataset(root)
    names = {manifest.identity_names.get(str(i)) for i in manifest.identities(split)} - {None} \
        if manifest.identity_names else set()
    for other, other_split in nonmembers:
        theirs = verify_dataset(other)
        if theirs.source == manifest.source:
            raise ValueError(f"{other} holds the same faces as {root}: membership inference needs non-members who "
                             "were never released; pass a dataset of other people")
        shared = names & {theirs.identity_names.get(str(i)) for i in theirs.identities(other_split)} \
            if theirs.identity_names else set()
        if shared:
            raise ValueError(f"{other} holds identities of the members ({sorted(shared)[:3]}): membership inference "
                             "needs non-members who were never released; pass a dataset of other people")


def _gallery_path(folder: str, *, judge: str, originals: str, split: str, skip_corrupt: bool) -> Path:
    key = json.dumps({"judge": sha256_file(judge), "originals": sha256_file(storage.join(originals, MANIFEST)),
                      "split": split, "skip_corrupt": skip_corrupt}, sort_keys=True)
    return Path(folder) / f"gallery-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _load_gallery(path: Path) -> Embeddings | None:
    """A cached gallery, or None when there is none (or it does not read: it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Embeddings(image_id=z["image_id"], source_id=z["source_id"], identity=z["identity"],
                              emb=z["emb"], skipped=json.loads(str(z["skipped"])))
    except (OSError, KeyError, ValueError):
        return None


def _save_gallery(path: Path, gallery: Embeddings) -> None:
    """Writes the gallery atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gallery-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, image_id=gallery.image_id, source_id=gallery.source_id, identity=gallery.identity,
                     emb=gallery.emb, skipped=np.array(json.dumps(gallery.skipped)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
