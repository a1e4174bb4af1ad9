"""Deployment: a Ray Data actor pool turns the owner's masked shards into the released dataset.

Each actor loads the trained FaceMAE once and reconstructs batches of masked records (predicted
masked patches, the owner's visible patches pasted back, or the prediction everywhere). The released
dataset keeps the masked dataset's splits and shard names; each shard is written atomically once all
its rows are back and journalled with its checksum, so a killed run, rerun, redoes only the missing
shards and never duplicates a row. ``method: masked`` releases the masked view itself (the baseline
of the paper's comparison) through the same path, with no model.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from facemae.config import Config
from facemae.data.runner import Journal, UnitResult, prepare_output, reusable
from facemae.data.shards import MANIFEST, RELEASED_SCHEMA, Manifest, sha256_file, verify_dataset, write_shard
from facemae.generate.streaming import write_as_shards_complete
from facemae.train.tasks import WEIGHTS

METHODS = ("reconstruct", "masked")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Reconstructor:
    """Ray Data callable class: FaceMAE loaded once per actor; masked records in, released PNGs out."""

    def __init__(self, weights: str | None, *, method: str, patch_size: int, paste_visible: bool,
                 use_gpu: bool = False) -> None:
        import torch

        self.method, self.patch_size, self.paste_visible = method, patch_size, paste_visible
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = None
        if method == "reconstruct":
            from facemae.train.tasks import load_mae

            self.model = load_mae(weights).to(self.device)
            if self.model.patch_size != patch_size:
                raise ValueError(f"{weights} has patch size {self.model.patch_size} but the masked shards were cut "
                                 f"with {patch_size}; use a FaceMAE trained with mask.patch_size={patch_size}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from facemae.models.fr import to_uint8
        from facemae.models.mae import masked_record_input

        imgs, mask = masked_record_input(list(batch["visible"]), list(batch["mask"]), patch_size=self.patch_size)
        if self.model is None:  # the masked view: removed patches at mid-grey (0 in the model range)
            released = imgs
        else:
            with torch.inference_mode():
                _, pred, _ = self.model(imgs.to(self.device), mask=mask.to(self.device))
                released = self.model.compose(imgs.to(self.device), pred, mask.to(self.device),
                                              paste_visible=self.paste_visible)
        pixels = to_uint8(released.float().cpu()).numpy()  # (N, H, W, 3)
        return {"image_id": batch["image_id"], "source_id": batch["source_id"], "identity": batch["identity"],
                "image": np.array([_png(p) for p in pixels], dtype=object), "path": batch["path"]}


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
    """
    g = config.generate
    masked, output = released_paths(config, masked=masked, output=output)
    source = verify_dataset(masked)
    if source.kind != "masked":
        raise ValueError(f"{masked} is a {source.kind} dataset; generation reads the owner's masked shards "
                         "(the output of `facemae mask`)")
    weights = g.weights or str(Path(config.run_dir()) / "export" / WEIGHTS)
    if g.method == "reconstruct" and not Path(weights).is_file():
        raise ValueError(f"no FaceMAE weights at {weights}; train first (jobs/train.py) or set generate.weights")
    weights_sha = sha256_file(weights) if g.method == "reconstruct" else None
    fingerprint = {"stage": "generate", "method": g.method, "paste_visible": config.loss.paste_visible,
                   "source_manifest": sha256_file(Path(masked) / MANIFEST), "weights_sha256": weights_sha}
    if (done := reusable(output, fingerprint, overwrite=overwrite)) is not None:
        return done
    prepare_output(output, overwrite=overwrite)
    journal = Journal(output, fingerprint)
    shards = {str(Path(masked) / s.file): (split, s) for split, group in source.splits.items() for s in group}
    todo = {path: v for path, v in shards.items() if v[1].file not in journal.done}
    if todo:
        _stream(config, todo, weights=weights, patch_size=source.mask["patch_size"], output=output,
                journal=journal)
    manifest = Manifest(
        kind="released", settings=fingerprint, identity_names=source.identity_names,
        source={"type": "dataset", "path": str(masked), "kind": "masked", "method": g.method,
                "weights": weights if g.method == "reconstruct" else None,
                "paste_visible": config.loss.paste_visible, "mask": source.mask},
        splits={split: [journal.done[s.file].shard for s in group] for split, group in source.splits.items()},
        report={"images": source.num_images()})
    manifest.write(output)
    journal.finish()
    return manifest


def _stream(config: Config, todo: dict[str, tuple[str, Any]], *, weights: str, patch_size: int, output: str,
            journal: Journal) -> None:
    """Runs the actor pool over the shards to do; writes each shard once all its rows are back."""
    import ray.data

    from facemae.cluster import ensure_ray

    g = config.generate
    ensure_ray(config.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(list(todo), include_paths=True)
    ds = ds.map_batches(Reconstructor, batch_size=g.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"weights": weights, "method": g.method,
                                               "patch_size": patch_size, "paste_visible": config.loss.paste_visible,
                                               "use_gpu": g.use_gpu},
                        compute=ray.data.ActorPoolStrategy(size=g.actors),
                        **({"num_gpus": 1} if g.use_gpu else {"num_cpus": g.cpus_per_actor}))
    write_as_shards_complete(ds, todo, columns=("image_id", "source_id", "identity", "image"),
                             write=lambda rows, split, rel: _write(rows, split=split, rel=rel, output=output,
                                                                   journal=journal))


def _write(rows: list[dict[str, Any]], *, split: str, rel: str, output: str, journal: Journal) -> None:
    rows.sort(key=lambda r: str(r["image_id"]))  # the same bytes whatever order the actors returned
    ids = [str(r["image_id"]) for r in rows]
    assert len(set(ids)) == len(ids), f"duplicate image ids in {rel}"
    table = pa.table({"image_id": ids, "source_id": [str(r["source_id"]) for r in rows],
                      "identity": [int(r["identity"]) for r in rows], "image": [bytes(r["image"]) for r in rows]},
                     schema=RELEASED_SCHEMA)
    journal.record(UnitResult(split=split, shard=write_shard(output, rel, table)))
