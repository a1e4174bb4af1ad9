"""Teacher embeddings of the originals, computed once by a Ray Data actor pool and stored in the shards.

IRM compares the teacher's embeddings of the originals with those of the reconstructions; the first
never change, so FaceMAE training reads them from a ``teacher_emb`` column instead of running the
teacher on every original at every step. The output is a new original dataset of the trainer's splits
(``train`` and ``val``, same shard names and rows, plus ``teacher_emb``; never the owner's deployment
originals), written shard by shard, atomically and resumably. The
embeddings are of the IRM view the config names (``loss.irm_view``: the raw image or its Gaussian
low-pass), recorded in the manifest as ``source.teacher_view``; training refuses a dataset embedded
with another view.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from facemae import storage
from facemae.allocator import retain_freed_memory
from facemae.config import Config, LossConfig
from facemae.data.runner import REPORT_LIMIT, Journal, UnitResult, corrupt_report, prepare_output, reusable
from facemae.data.shards import (MANIFEST, ORIGINAL_SCHEMA, TRAINER_SPLITS, Manifest, sha256_file, verify_dataset,
                                 write_shard)
from facemae.data.stream import pool_batch_size, shard_rows
from facemae.generate.streaming import write_as_shards_complete
from facemae.losses.irm import view_name

EMBEDDED_SCHEMA = ORIGINAL_SCHEMA.append(pa.field("teacher_emb", pa.list_(pa.float32()), nullable=False))


class TeacherEmbedder:
    """Ray Data callable class: loads the frozen teacher once per actor, embeds batches of originals."""

    def __init__(self, weights: str, use_gpu: bool = False, view: str = "raw", sigma: float = 1.5,
                 batch_size: int = 64, storage_options: dict[str, str] | None = None) -> None:
        import torch

        from facemae.models.fr import fold_batchnorm
        from facemae.models.weights import load_fr_backbone

        storage.configure(**(storage_options or {}))  # the driver's endpoint: weights may be on a store
        retain_freed_memory()

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Folded as training's teacher is (FP32Teacher), so stored and live embeddings come from one function.
        self.model = fold_batchnorm(load_fr_backbone(weights)).to(self.device)
        self.view, self.sigma, self.batch_size = view, sigma, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Adds ``teacher_emb`` (the teacher sees ``batch_size`` images at a time of a call's whole shard),
        and ``corrupt``: per row ``""`` or why its image would not decode. Such a
        row comes back all the same, for the driver to raise for or skip and count
        (:func:`facemae.data.images.corrupt_records`) once its shard is complete."""
        import torch

        from facemae.data.images import decode_rows
        from facemae.losses.irm import irm_view
        from facemae.models.fr import to_model_range

        pixels, reasons = decode_rows(batch["image"], image_ids=batch["image_id"], paths=batch["path"],
                                      skip_corrupt=True)
        emb = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                x = to_model_range(torch.from_numpy(pixels[start:start + self.batch_size])).to(self.device)
                emb.extend(self.model(irm_view(x, view=self.view, sigma=self.sigma)).float().cpu().numpy())  # (n, D)
        return {**batch, "teacher_emb": emb, "corrupt": np.array(reasons, dtype=object)}


def embedded_output(source: str, weights: str, loss: LossConfig) -> str:
    """Default folder of ``source`` embedded by the teacher ``weights`` in ``loss``'s IRM view: one per
    (dataset, teacher, view); the raw view keeps the plain ``<source>-teacher-<hash>`` name."""
    view = view_name(loss.irm_view, loss.irm_blur_sigma)
    return f"{source.rstrip('/')}-teacher-{sha256_file(weights)[:8]}" + ("" if view == "raw" else f"-{view}")


def embed_dataset(config: Config, *, source: str, weights: str, output: str | None = None,
                  overwrite: bool = False) -> Manifest:
    """Writes ``source`` with the teacher's embedding of every image added.

    Args:
        config: Reads ``ray`` (cluster), ``train.use_gpu``, ``train.micro_batch`` (batch size) and
            ``loss.irm_view`` / ``loss.irm_blur_sigma`` (what the teacher sees).
        source: Original dataset folder.
        weights: The teacher's ``weights.safetensors``.
        output: Output folder; defaults to :func:`embedded_output`.
        overwrite: Rebuild even if ``output`` holds a finished dataset of the same settings.

    Returns:
        The embedded dataset's manifest. Its report is the source's, with a row whose image would not
        decode (skipped under ``data.skip_corrupt``) added to ``corrupt`` and ``corrupt_records``.

    Raises:
        WeightsError: ``weights`` is not an FR backbone (checked here, before any Ray actor loads it).
        CorruptImageError: An image does not decode and ``data.skip_corrupt`` is off; the message names
            the dataset, the shard and the image_id.
    """
    from facemae.models.weights import check_weights

    storage.configure(**asdict(config.storage))
    weights = check_weights(weights, task="fr").location
    original = verify_dataset(source, splits=TRAINER_SPLITS)
    if original.kind != "original":
        raise ValueError(f"{source} is a {original.kind} dataset; teacher embeddings are computed on originals")
    weights_sha = sha256_file(weights)
    output = output or embedded_output(source, weights, config.loss)
    view = view_name(config.loss.irm_view, config.loss.irm_blur_sigma)
    fingerprint = {"stage": "embed", "source_manifest": sha256_file(storage.join(source, MANIFEST)),
                   "teacher_sha256": weights_sha, **({} if view == "raw" else {"teacher_view": view})}
    if (done := reusable(output, fingerprint, overwrite=overwrite)) is not None:
        return done
    prepare_output(output, overwrite=overwrite)
    journal = Journal(output, fingerprint)
    # The trainer's splits only: the deployment originals are the owner's, and FaceMAE never trains on them.
    owned = {split: group for split, group in original.splits.items() if split in TRAINER_SPLITS}
    shards = {storage.join(source, s.file): (split, s) for split, group in owned.items() for s in group}
    todo = {path: v for path, v in shards.items() if v[1].file not in journal.done}
    if todo:
        _stream(config, todo, weights=weights, output=output, journal=journal)
    results = [journal.done[s.file] for group in owned.values() for s in group]
    manifest = Manifest(
        kind="original", settings=fingerprint, report=_report(original.report, results),
        identity_names=original.identity_names,
        source={**original.source, "embedded_from": str(source), "teacher": str(weights), "teacher_view": view},
        splits={split: [journal.done[s.file].shard for s in group] for split, group in owned.items()})
    manifest.write(output)
    journal.finish()
    return manifest


def _stream(config: Config, todo: dict[str, tuple[str, Any]], *, weights: str, output: str,
            journal: Journal) -> None:
    """Runs the actor pool over the shards to do; writes each shard once all its rows are back."""
    from facemae.cluster import ensure_ray

    ensure_ray(config.ray)
    ds = embedding_pool(config, todo, weights=weights)
    write_as_shards_complete(ds, todo, columns=("image_id", "identity", "image", "teacher_emb", "corrupt", "path"),
                             write=lambda rows, split, rel: _write(rows, split=split, rel=rel, output=output,
                                                                   journal=journal,
                                                                   skip_corrupt=config.data.skip_corrupt),
                             desc="embed")


def embedding_pool(config: Config, todo: dict[str, tuple[str, Any]], *, weights: str) -> Any:
    """The lazy Ray Dataset of the teacher's embeddings of ``todo``'s rows: one actor per training worker
    (a GPU each with ``train.use_gpu``)."""
    import ray.data

    use_gpu = config.train.use_gpu
    actors = max(1, config.train.num_workers)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 0.5}
    kwargs = {"weights": storage.absolute(weights), "use_gpu": use_gpu, "view": config.loss.irm_view,
              "sigma": config.loss.irm_blur_sigma, "batch_size": config.train.micro_batch, "storage_options": storage.options()}
    return shard_rows(list(todo), columns=["image_id", "identity", "image"], **resources).map_batches(
        TeacherEmbedder, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=pool_batch_size(todo, **resources), batch_format="numpy", **resources)


def _report(source: dict[str, Any], results: list[UnitResult]) -> dict[str, Any]:
    """The source's report with the rows this stage skipped added (the dataset is the source minus them)."""
    new = corrupt_report(results)
    if not new["corrupt"]:
        return source
    records = [*source.get("corrupt_records", []), *new["corrupt_records"]][:REPORT_LIMIT]
    return {**source, "images": sum(r.shard.rows for r in results),
            "corrupt": source.get("corrupt", 0) + new["corrupt"], "corrupt_records": records}


def _write(rows: list[dict[str, Any]], *, split: str, rel: str, output: str, journal: Journal,
           skip_corrupt: bool) -> None:
    from facemae.data.images import corrupt_records

    skipped = corrupt_records([r["corrupt"] for r in rows], image_ids=[r["image_id"] for r in rows],
                              paths=[r["path"] for r in rows], skip_corrupt=skip_corrupt)
    rows = sorted((r for r in rows if not r["corrupt"]), key=lambda r: str(r["image_id"]))  # a stable order
    table = pa.table({"image_id": [str(r["image_id"]) for r in rows],
                      "identity": [int(r["identity"]) for r in rows],
                      "image": [bytes(r["image"]) for r in rows],
                      "teacher_emb": [np.asarray(r["teacher_emb"], dtype=np.float32) for r in rows]},
                     schema=EMBEDDED_SCHEMA)
    journal.record(UnitResult(split=split, shard=write_shard(output, rel, table), skipped=skipped))
