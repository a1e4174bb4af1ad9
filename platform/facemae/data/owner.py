"""`facemae mask`: the data owner's step that turns an original dataset into masked shards.

The masked dataset holds, per face, only the visible patches' pixels and the mask; no column of the
original shard that could carry masked pixels (the encoded image, teacher embeddings) is copied.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from facemae import storage
from facemae.config import Config
from facemae.data.images import decode_rows, skipped_record
from facemae.data.masking import mask_face
from facemae.data.runner import Unit, UnitResult, corrupt_report, finish, prepare_output, reusable, run_units
from facemae.data.shards import MANIFEST, MASKED_SCHEMA, Manifest, read_table, sha256_file, verify_dataset, write_shard


def mask_dataset(config: Config, *, source: str | None = None, output: str | None = None,
                 overwrite: bool = False) -> Manifest:
    """Writes the masked twin of an original dataset.

    Args:
        config: Validated config; ``config.mask`` sets patch size, ratio, seed and splits.
        source: Original dataset folder or ``s3://`` / ``gs://`` prefix; defaults to ``config.data.output``.
        output: Masked dataset folder or prefix; defaults to ``config.masked_output()``.
        overwrite: Rebuild even when ``output`` holds a finished masked dataset of the same settings.

    Returns:
        The masked dataset's manifest; with ``data.skip_corrupt`` its report counts (``corrupt``) and
        lists (``corrupt_records``) the originals whose image would not decode, left out.

    Raises:
        CorruptImageError: An original's image does not decode and ``data.skip_corrupt`` is off; the
            message names the dataset, the shard and the image_id.
    """
    storage.configure(**asdict(config.storage))
    source = source or config.data.output
    output = output or config.masked_output()
    original = verify_dataset(source)
    if original.kind != "original":
        raise ValueError(f"{source} is a {original.kind} dataset; `facemae mask` reads an original one "
                         "(the output of `facemae ingest`)")
    if _same_location(output, source):
        raise ValueError("mask output must differ from its source: set mask.output to a new folder")
    m = config.mask
    units = [Unit(root=output, split=split, rel=shard.file,
                  payload={"src": storage.join(source, shard.file), "patch_size": m.patch_size,
                           "keep": m.keep, "seed": m.seed, "copies": m.copies,
                           "skip_corrupt": config.data.skip_corrupt})
             for split in m.splits for shard in original.splits.get(split, [])]
    fingerprint = {"stage": "mask", "mask": asdict(m) | {"output": ""},
                   "source_manifest": sha256_file(storage.join(source, MANIFEST))}
    if (done := reusable(output, fingerprint, overwrite=overwrite)) is not None:
        return done
    prepare_output(output, overwrite=overwrite)
    results = run_units(output, units, mask_unit, fingerprint=fingerprint, desc="mask")
    manifest = Manifest(
        kind="masked", settings=fingerprint, source={"type": "dataset", "path": str(source), "kind": original.kind,
                               "manifest_sha256": fingerprint["source_manifest"]},
        splits={s: [r.shard for r in results if r.split == s] for s in m.splits},
        report={"images": sum(r.shard.rows for r in results), **corrupt_report(results)},
        mask={"patch_size": m.patch_size, "ratio": m.ratio, "keep": m.keep,
              "num_patches": m.num_patches, "seed": m.seed, "copies": m.copies,
              "layout": "visible=[keep,p,p,3] uint8; mask=L bytes, 1=removed"},
        identity_names=original.identity_names, image_size=original.image_size)
    manifest.write(output)
    finish(output)
    return manifest


def _same_location(a: str, b: str) -> bool:
    """Whether two dataset locations are one: local paths resolved, URLs normalised (``s3://b/x/``)."""
    if storage.is_remote(a) or storage.is_remote(b):
        return storage.join(a) == storage.join(b)
    return Path(a).resolve() == Path(b).resolve()


def masked_id(image_id: str, copy: int, copies: int) -> str:
    """Id of one masked version of a face: the face's own id when there is one version."""
    return image_id if copies == 1 else f"{image_id}#m{copy}"


def mask_unit(unit: Unit) -> UnitResult:
    """Masks one original shard into one masked shard (``copies`` rows per face, each its own mask)."""
    p = unit.payload
    table = read_table(p["src"], columns=["image_id", "identity", "image"])
    ids, identities, images = (table.column(c).to_pylist() for c in ("image_id", "identity", "image"))
    faces, reasons = decode_rows(images, image_ids=ids, paths=[p["src"]] * len(ids),
                                 skip_corrupt=p.get("skip_corrupt", False))  # (N, H, W, 3)
    columns: dict[str, list] = {"image_id": [], "source_id": [], "identity": [], "visible": [], "mask": []}
    skipped = [skipped_record(p["src"], i, reason) for i, reason in zip(ids, reasons) if reason]
    for image_id, identity, pixels, reason in zip(ids, identities, faces, reasons):
        if reason:
            continue
        for copy in range(p["copies"]):
            name = masked_id(image_id, copy, p["copies"])
            vis, mask = mask_face(pixels, image_id=name, patch_size=p["patch_size"], keep=p["keep"], seed=p["seed"])
            for key, value in zip(columns, (name, image_id, identity, vis, mask)):
                columns[key].append(value)
    out = pa.table(columns, schema=MASKED_SCHEMA)
    return UnitResult(split=unit.split, shard=write_shard(unit.root, unit.rel, out), skipped=skipped)
