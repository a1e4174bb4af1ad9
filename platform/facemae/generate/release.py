"""Deployment: a Ray Data actor pool turns the owner's masked shards into the released dataset.

Each actor loads the trained FaceMAE once and reconstructs batches of masked records (predicted
masked patches, the owner's visible patches pasted back, or the prediction everywhere). The released
dataset keeps the masked dataset's splits and shard names; each shard is written atomically once all
its rows are back and journalled with its checksum, so a killed run, rerun, redoes only the missing
shards and never duplicates a row. ``method: masked`` releases the masked view itself (the baseline
of the paper's comparison) through the same path, with no model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from facemae import storage
from facemae.allocator import retain_freed_memory
from facemae.config import Config
from facemae.data.images import encode_png
from facemae.data.runner import Journal, UnitResult, corrupt_report, prepare_output, reusable
from facemae.data.shards import MANIFEST, RELEASED_SCHEMA, Manifest, sha256_file, verify_dataset, write_shard
from facemae.data.stream import pool_batch_size, shard_rows
from facemae.generate.streaming import write_as_shards_complete
from facemae.models.weights import WEIGHTS

METHODS = ("reconstruct", "masked")


class Reconstructor:
    """Ray Data callable class: FaceMAE loaded once per actor; masked records in, released PNGs out."""

    def __init__(self, weights: str | None, *, method: str, patch_size: int, paste_visible: bool,
                 batch_size: int = 64, use_gpu: bool = False, storage_options: dict[str, str] | None = None) -> None:
        import torch

        storage.configure(**(storage_options or {}))  # the driver's endpoint: weights may be on a store
        retain_freed_memory()

        self.method, self.patch_size, self.paste_visible = method, patch_size, paste_visible
        self.batch_size = batch_size
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = None
        if method == "reconstruct":
            from facemae.models.weights import load_mae

            self.model = load_mae(weights).to(self.device)
            if self.model.patch_size != patch_size:
                raise ValueError(f"{weights} has patch size {self.model.patch_size} but the masked shards were cut "
                                 f"with {patch_size}; use a FaceMAE trained with mask.patch_size={patch_size}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Released PNGs of a batch of masked records (a whole shard: the model sees ``batch_size`` at a
        time); ``corrupt`` says per row ``""`` or why it cannot be reconstructed. Such a row comes back
        with an empty image, for the driver to raise for or skip and count
        (:func:`facemae.data.images.corrupt_records`), never raised here: inside a Ray Data actor that
        would reach the driver as a remote traceback."""
        reasons = [masked_record_problem(v, m, patch_size=self.patch_size)
                   for v, m in zip(batch["visible"], batch["mask"])]
        good = [i for i, reason in enumerate(reasons) if not reason]
        images = np.full(len(reasons), b"", dtype=object)
        for start in range(0, len(good), self.batch_size):
            rows = good[start:start + self.batch_size]
            pixels = self._release([batch["visible"][i] for i in rows], [batch["mask"][i] for i in rows])
            images[rows] = [encode_png(p) for p in pixels]
        return {"image_id": batch["image_id"], "source_id": batch["source_id"], "identity": batch["identity"],
                "image": images, "path": batch["path"], "corrupt": np.array(reasons, dtype=object)}

    def _release(self, visible: list[bytes], mask: list[bytes]) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 released faces of well-formed masked records."""
        import torch

        from facemae.models.fr import to_uint8
        from facemae.models.mae import masked_record_input

        imgs, mask = masked_record_input(visible, mask, patch_size=self.patch_size)
        if self.model is None:  # the masked view: removed patches at mid-grey (0 in the model range)
            released = imgs
        else:
            with torch.inference_mode():
                released = self.model.reconstruct(imgs.to(self.device), mask.to(self.device),
                                                  paste_visible=self.paste_visible)
        return to_uint8(released.float().cpu()).numpy()  # (N, H, W, 3)


def masked_record_problem(visible: bytes, mask: bytes, *, patch_size: int, img_size: int = 112) -> str:
    """Why a masked record cannot be reconstructed (a mask of another length or with values other than
    0 / 1, visible pixels that do not fill its kept patches), or ``""`` when it can."""
    length, width = (img_size // patch_size) ** 2, patch_size * patch_size * 3
    removed = np.frombuffer(mask, dtype=np.uint8)  # (L,)
    if len(removed) != length:
        return f"mask holds {len(removed)} patches, not the {length} of {patch_size}-pixel patches"
    if removed.max(initial=0) > 1:
        return "mask holds values other than 0 (visible) and 1 (removed)"
    kept = int((removed == 0).sum())
    if len(visible) != kept * width:
        return f"visible holds {len(visible)} bytes, not the {kept} kept patches x {width} bytes its mask shows"
    return ""


def released_paths(config: Config, *, masked: str | None = None, output: str | None = None) -> tuple[str, str]:
    """``(masked dataset, released dataset)`` folders a generation run reads and writes."""
    g = config.generate
    masked = masked or g.masked or config.masked_output()
    return masked, output or g.output or f"{masked.rstrip('/')}-{g.method}"


def generate_released(config: Config, *, masked: str | None = None, output: str | None = None,
                      overwrite: bool = False) -> Manifest:
    """Writes the released dataset of a masked dataset (see the module docstring).

    Args:
        config: ``config.generate`` says how; ``config.ray`` where.
        masked: Masked dataset folder; defaults to ``generate.masked`` or ``config.masked_output()``.
        output: Released dataset folder; defaults to ``generate.output`` or ``<masked>-<method>``.
        overwrite: Rebuild even if ``output`` holds a finished release of the same settings.

    Returns:
        The released dataset's manifest; with ``data.skip_corrupt`` its report counts (``corrupt``) and
        lists (``corrupt_records``) the masked records that could not be reconstructed, left out.

    Raises:
        CorruptImageError: A masked record cannot be reconstructed and ``data.skip_corrupt`` is off; the
            message names the dataset, the shard and the image_id.
    """
    g = config.generate
    storage.configure(**asdict(config.storage))
    masked, output = released_paths(config, masked=masked, output=output)
    source = verify_dataset(masked)
    if source.kind != "masked":
        raise ValueError(f"{masked} is a {source.kind} dataset; generation reads the owner's masked shards "
                         "(the output of `facemae mask`)")
    weights = g.weights or storage.join(config.run_dir(), "export", WEIGHTS)
    if g.method == "reconstruct":
        if not storage.exists(weights):
            raise ValueError(f"no FaceMAE weights at {weights}; train first (jobs/train.py) or set generate.weights")
        weights = str(check_mae(weights, patch_size=source.mask["patch_size"], masked=masked))
    weights_sha = sha256_file(weights) if g.method == "reconstruct" else None
    fingerprint = {"stage": "generate", "method": g.method, "paste_visible": config.loss.paste_visible,
                   "source_manifest": sha256_file(storage.join(masked, MANIFEST)), "weights_sha256": weights_sha}
    if (done := reusable(output, fingerprint, overwrite=overwrite)) is not None:
        return done
    prepare_output(output, overwrite=overwrite)
    journal = Journal(output, fingerprint)
    shards = {storage.join(masked, s.file): (split, s) for split, group in source.splits.items() for s in group}
    todo = {path: v for path, v in shards.items() if v[1].file not in journal.done}
    if todo:
        _stream(config, todo, weights=weights, patch_size=source.mask["patch_size"], output=output,
                journal=journal)
    results = [journal.done[s.file] for group in source.splits.values() for s in group]
    manifest = Manifest(
        kind="released", settings=fingerprint, identity_names=source.identity_names,
        source={"type": "dataset", "path": str(masked), "kind": "masked", "method": g.method,
                "weights": weights if g.method == "reconstruct" else None,
                "paste_visible": config.loss.paste_visible, "mask": source.mask},
        splits={split: [journal.done[s.file].shard for s in group] for split, group in source.splits.items()},
        report={"images": sum(r.shard.rows for r in results), **corrupt_report(results)})
    manifest.write(output)
    journal.finish()
    return manifest


def check_mae(weights: str, *, patch_size: int, masked: str) -> str:
    """Checks on the driver, from the file's header, that ``weights`` is a FaceMAE for shards cut into
    ``patch_size`` patches, before any Ray actor loads it.

    Returns:
        The weights file's location (``weights`` may name the export folder holding it).

    Raises:
        WeightsError: Not a FaceMAE, not safetensors, damaged, or of another patch size.
    """
    from facemae.models.registry import mae_patch_size
    from facemae.models.weights import WeightsError, check_weights

    header = check_weights(weights, task="mae")
    if (p := mae_patch_size(header.info["model"])) != patch_size:
        raise WeightsError(f"{header.path} holds {header.describe()} with {p}-pixel patches, but {masked} was "
                           f"masked with {patch_size}-pixel patches; pass a FaceMAE trained with "
                           f"mask.patch_size={patch_size}, or mask again with --patch-size {p}")
    return header.location


def release_pool(config: Config, todo: dict[str, tuple[str, Any]], *, weights: str, patch_size: int) -> Any:
    """The lazy Ray Dataset of the released rows of ``todo``: ``generate.actors`` actors, a GPU each with
    ``generate.use_gpu``."""
    import ray.data

    g = config.generate
    resources = {"num_gpus": 1} if g.use_gpu else {"num_cpus": g.cpus_per_actor}
    return shard_rows(list(todo), **resources).map_batches(
        Reconstructor, batch_size=pool_batch_size(todo, **resources), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=g.actors),
        fn_constructor_kwargs={"weights": storage.absolute(weights), "method": g.method, "patch_size": patch_size,
                               "paste_visible": config.loss.paste_visible, "batch_size": g.batch_size,
                               "use_gpu": g.use_gpu, "storage_options": storage.options()}, **resources)


def _stream(config: Config, todo: dict[str, tuple[str, Any]], *, weights: str, patch_size: int, output: str,
            journal: Journal) -> None:
    """Runs the actor pool over the shards to do; writes each shard once all its rows are back."""
    import ray.data

    from facemae.cluster import ensure_ray

    ensure_ray(config.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = release_pool(config, todo, weights=weights, patch_size=patch_size)
    write_as_shards_complete(ds, todo, columns=("image_id", "source_id", "identity", "image", "corrupt", "path"),
                             write=lambda rows, split, rel: _write(rows, split=split, rel=rel, output=output,
                                                                   journal=journal,
                                                                   skip_corrupt=config.data.skip_corrupt),
                             desc="generate")


def _write(rows: list[dict[str, Any]], *, split: str, rel: str, output: str, journal: Journal,
           skip_corrupt: bool) -> None:
    from facemae.data.images import corrupt_records

    skipped = corrupt_records([r["corrupt"] for r in rows], image_ids=[r["image_id"] for r in rows],
                              paths=[r["path"] for r in rows], skip_corrupt=skip_corrupt)
    rows = sorted((r for r in rows if not r["corrupt"]), key=lambda r: str(r["image_id"]))  # any order in, same bytes
    ids = [str(r["image_id"]) for r in rows]
    assert len(set(ids)) == len(ids), f"duplicate image ids in {rel}"
    table = pa.table({"image_id": ids, "source_id": [str(r["source_id"]) for r in rows],
                      "identity": [int(r["identity"]) for r in rows], "image": [bytes(r["image"]) for r in rows]},
                     schema=RELEASED_SCHEMA)
    journal.record(UnitResult(split=split, shard=write_shard(output, rel, table), skipped=skipped))
