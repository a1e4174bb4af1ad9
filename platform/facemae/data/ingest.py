"""Ingest: synthetic faces, an image folder or an InsightFace RecordIO pack -> Parquet shards + manifest.

Identities are split once, by a seeded permutation, into a training set and a disjoint deployment
set, and a second permutation carves a validation set out of the training side (the trainer's own
held-out identities: it validates without opening a deployment original); each split is cut into shards of ``rows_per_shard`` rows built by independent work units, so
large inputs run as Ray tasks and an interrupted ingest resumes where it stopped. With
``data.align=mtcnn`` (``auto``, the default, for a folder read without ``resize``) a folder's photos are
detected and aligned inside those units (:mod:`facemae.data.align`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from facemae import storage
from facemae.config import Config, DataConfig
from facemae.data import synthetic
from facemae.data.align import REFUSALS, FaceAligner, FaceNotAlignedError, contact_sheet
from facemae.data.images import CorruptImageError, decode_rgb, encode_png, open_image, prepare_face
from facemae.data.recordio import RecordIOError, RecordIOReader
from facemae.data.runner import REPORT_LIMIT, Unit, UnitResult, finish, prepare_output, reusable, run_units
from facemae.data.shards import (MANIFEST, ORIGINAL_SCHEMA, SPLITS, DatasetError, Manifest, atomic_write, iter_rows,
                                 read_manifest, shard_name, write_shard)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
ALIGN_KEYS = ("align", "align_min_score", "align_min_face", "align_multiple")
# Detecting and aligning a photo costs about a hundred times generating a synthetic face, so with
# data.workers=0 an aligned ingest goes to Ray at a hundredth of data.ray_threshold.
ALIGN_COST = 100
SHEET_TILES = 64  # crops on a contact sheet
UNIT_SAMPLE = 8  # aligned crops each work unit offers the sheet, so that it shows several shards
SCORE_EDGES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)  # the report's detection-score histogram


@dataclass(frozen=True)
class Source:
    """A resolved input: what to read per identity, and how to describe it in the manifest."""

    kind: str
    items: dict[int, list[Any]]  # identity -> the items of its images, in order
    description: dict[str, Any]
    identity_names: dict[str, str] | None = None
    empty_identities: tuple[str, ...] = ()
    skipped: tuple[dict[str, str], ...] = ()  # records refused while listing (unreadable RecordIO headers)
    hidden: tuple[str, ...] = ()  # dotfiles left out of a folder (.DS_Store, ._x.jpg), relative to it


def ingest(config: Config, *, overwrite: bool = False) -> Manifest:
    """Builds an original-faces dataset at ``config.data.output`` (a folder, or an ``s3://`` / ``gs://``
    prefix; the input of a folder or RecordIO source is read locally).

    Args:
        config: Validated job config; ``config.data`` says what to read.
        overwrite: Rebuild even when the output folder holds a finished dataset; without it, a
            dataset built with the same settings is reused and one built otherwise is refused.

    Returns:
        The written manifest.

    Raises:
        ValueError: Bad input (an empty folder, a corrupt image without ``skip_corrupt``...),
            naming what and where.
    """
    data = replace(config.data, align=config.data.aligner)  # ``auto`` resolved: the manifest says which
    storage.configure(**asdict(config.storage))
    fingerprint = _fingerprint(data)
    legacy = _check_generator(data, overwrite=overwrite)
    # A rerun that turns skip_corrupt on (to get past a bad row a later stage found) reuses the dataset.
    ignore = ("data.skip_corrupt",) + (("data.style", "generator_version") if legacy else ())
    if (done := reusable(data.output, fingerprint, overwrite=overwrite, ignore=ignore)) is not None:
        return done
    source = resolve_source(data)
    train_ids, deploy_ids = split_identities(sorted(source.items), fraction=data.deploy_fraction, seed=data.seed)
    train_ids, val_ids = carve_validation(train_ids, count=int(round(data.val_fraction * len(source.items))),
                                          seed=data.seed)
    units = []
    for split, ids in zip(SPLITS, (train_ids, val_ids, deploy_ids)):
        items = [item for i in ids for item in source.items[i]]
        for index, start in enumerate(range(0, len(items), data.rows_per_shard)):
            payload = {"source": source.kind, "items": items[start:start + data.rows_per_shard],
                       "description": source.description, "resize": data.resize,
                       "convert_rgb": data.convert_rgb, "skip_corrupt": data.skip_corrupt,
                       **{f"{k}": getattr(data, k) for k in ALIGN_KEYS}}
            units.append(Unit(root=data.output, split=split, rel=shard_name(split, index), payload=payload))
    total = sum(len(u.payload["items"]) for u in units)
    threshold = data.ray_threshold // (ALIGN_COST if data.align != "none" else 1)
    use_ray = data.workers > 1 or (data.workers == 0 and total > threshold)
    prepare_output(data.output, overwrite=overwrite)
    results = run_units(data.output, units, build_unit, fingerprint=fingerprint, use_ray=use_ray,
                        ray_config=config.ray, desc=f"ingest {source.kind}")
    manifest = Manifest(
        kind="original", source=source.description, settings=fingerprint,
        splits={s: [r.shard for r in results if r.split == s] for s in SPLITS},
        report=_report(results, source=source, inputs=total + len(source.skipped), data=data),
        identity_names=source.identity_names)
    sheets = _contact_sheets(data.output, manifest, results) if data.align != "none" else {}
    if sheets:
        manifest.report["align"]["sheets"] = sorted(sheets)
    manifest.write(data.output)
    for name, pixels in sheets.items():  # after the manifest: a folder without one holds only shards
        atomic_write(storage.join(data.output, name), lambda tmp, px=pixels: Path(tmp).write_bytes(encode_png(px)))
    finish(data.output)
    return manifest


def _fingerprint(data: DataConfig) -> dict[str, Any]:
    """The settings a finished dataset must have been built with (its manifest's ``settings``)."""
    settings = {k: v for k, v in asdict(data).items() if k not in ("output", "workers", "ray_threshold")}
    if data.val_fraction == 0:
        settings.pop("val_fraction")  # as datasets made before the validation split, which stay reusable
    if data.align == "none":  # as datasets made before alignment, which stay reusable; on, they all count
        for key in ALIGN_KEYS:
            settings.pop(key)
    if data.source != "synthetic" or data.domain == "base":
        settings.pop("domain")  # as datasets made before domains (all base), which stay reusable
    if data.source != "synthetic":
        settings.pop("style")  # only the generator draws in a style: a folder's dataset stays reusable
        return {"stage": "ingest", "data": settings}
    return {"stage": "ingest", "data": settings, "generator_version": synthetic.GENERATOR_VERSIONS[data.style]}


def _check_generator(data: DataConfig, *, overwrite: bool) -> bool:
    """Refuses to reuse a synthetic dataset that another generator version drew.

    Returns:
        Whether ``data.output`` holds a dataset made before styles existed (its manifest names neither
        style nor version) that this run may reuse: version 1, which ``data.style=cartoon`` draws.

    Raises:
        DatasetError: ``data.output`` holds synthetic faces of another version or style; the message
            says which, and how to go on (the style that still draws them, or ``--overwrite``).
    """
    if data.source != "synthetic" or overwrite or not storage.exists(storage.join(data.output, MANIFEST)):
        return False
    made = read_manifest(data.output).source
    if made.get("type") != "synthetic":
        return False  # another source entirely: reusable() names the settings that differ
    # Manifests written before styles existed hold neither key: version 1, which is the cartoon style.
    style, version = made.get("style", "cartoon"), made.get("generator_version", 1)
    want = synthetic.GENERATOR_VERSIONS[data.style]
    if (style, version) == (data.style, want):
        return "generator_version" not in made
    still = [s for s, v in synthetic.GENERATOR_VERSIONS.items() if v == version]
    fix = (f"set data.style={still[0]} to use them as they are, or pass --overwrite to re-ingest them"
           if still else "pass --overwrite to re-ingest them (no style draws that version any more)")
    raise DatasetError(f"{data.output} holds synthetic faces drawn by generator version {version} (style {style}), "
                       f"not version {want} (style {data.style}) that this run draws; {fix}")


def carve_validation(train: Sequence[int], *, count: int, seed: int) -> tuple[list[int], list[int]]:
    """Carves ``count`` validation identities out of the training identities by a seeded permutation.

    The deployment identities are drawn first and do not depend on this, so a dataset with a validation
    split deploys the same identities as one without. At least one training identity is kept.

    Returns:
        ``(train, val)``, disjoint, sorted, together the input.
    """
    train = sorted(train)
    count = min(count, len(train) - 1) if train else 0
    order = np.random.default_rng([seed, 0x7A1]).permutation(len(train))
    val = sorted(train[i] for i in order[:max(count, 0)])
    taken = set(val)
    return [i for i in train if i not in taken], val


def split_identities(ids: Sequence[int], *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits identities into disjoint ``(train, deploy)`` lists by a seeded permutation.

    ``deploy`` gets ``round(fraction * n)`` identities, at least one when ``fraction > 0`` and
    there are two or more identities.
    """
    ids = sorted(ids)
    n_deploy = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) > 1:
        n_deploy = min(max(n_deploy, 1), len(ids) - 1)
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ids))
    deploy = sorted(ids[i] for i in order[:n_deploy])
    taken = set(deploy)
    return [i for i in ids if i not in taken], deploy


def resolve_source(data: DataConfig) -> Source:
    """Lists what to ingest, per identity, without reading any image yet."""
    if data.source == "synthetic":
        items = {i: [(i, k) for k in range(data.images_per_identity)] for i in range(data.num_identities)}
        return Source("synthetic", items, {"type": "synthetic", "num_identities": data.num_identities,
                                           "images_per_identity": data.images_per_identity,
                                           "seed": data.seed, "style": data.style, "domain": data.domain,
                                           "generator_version": synthetic.GENERATOR_VERSIONS[data.style]})
    if data.source == "folder":
        return _folder_source(Path(data.path))
    return _recordio_source(Path(data.path), skip_corrupt=data.skip_corrupt)


def _folder_source(root: Path) -> Source:
    if not root.is_dir():
        raise ValueError(f"data.path={root} is not a folder; give the folder that holds <identity>/<image> files")
    listing = sorted(root.iterdir())
    hidden = [p.name for p in listing if p.name.startswith(".")]
    entries = [p for p in listing if not p.name.startswith(".")]
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        raise ValueError(f"{root}: expected only identity folders (<identity>/<image>), found files "
                         f"{', '.join(stray[:5])}; move them into an identity folder or out of {root}")
    if not entries:
        raise ValueError(f"{root} is empty: an image folder holds one sub-folder of images per identity")
    items: dict[int, list[Any]] = {}
    names, empty, not_utf8 = {}, [], []
    for label, folder in enumerate(entries):
        inside = sorted(folder.iterdir())
        hidden += [f"{folder.name}/{p.name}" for p in inside if p.name.startswith(".")]
        files = [p for p in inside if not p.name.startswith(".")]
        not_utf8 += [folder.name] if not _is_utf8(folder.name) else \
            [f"{folder.name}/{p.name}" for p in files if not _is_utf8(p.name)]
        nested = [p.name for p in files if p.is_dir()]
        if nested:
            raise ValueError(f"{folder}: holds sub-folders ({', '.join(nested[:5])}); an identity folder holds "
                             "image files only")
        names[str(label)] = folder.name
        if not files:
            empty.append(folder.name)
            continue
        items[label] = [(str(p), label, f"{folder.name}/{p.name}") for p in files]
    _refuse_non_utf8(root, not_utf8)
    if not items:
        raise ValueError(f"{root}: all {len(entries)} identity folders are empty; there is nothing to ingest")
    # A skipped name only goes into the report, so a non-UTF-8 one is shown escaped rather than refused.
    shown = tuple(os.fsencode(h).decode("utf-8", "backslashreplace") for h in hidden)
    return Source("folder", items, {"type": "folder", "path": str(root)}, names, tuple(empty), hidden=shown)


def _refuse_non_utf8(root: Path, names: Sequence[str]) -> None:
    """Refuses identity folders (``name``) and images (``folder/image``) whose names are not UTF-8, all
    of them in one message.

    Python hands such names over with the bad bytes as lone surrogates (``"caf\\udce9"``), which
    Parquet and JSON readers refuse. They are refused here rather than escaped: the identity name is
    the key that joins ``identity_names``, the released dataset and its exports back to the user's
    own label lists, and an escaped name (``caf%E9``, ``caf\\xe9``) would silently differ from the
    folder name every other tool shows. Renaming is one command, and the check runs before any image
    is read.
    """
    if not names:
        return
    shown = ", ".join(repr(os.fsencode(n)) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    raise ValueError(f"{root}: {len(names)} identity folder or image name(s) are not valid UTF-8: {shown} (the "
                     f"first reads {os.fsencode(names[0]).decode('latin-1')!r} as Latin-1); names are stored as "
                     f"text, so rename them to UTF-8, e.g. `convmv -f latin1 -t utf-8 -r --notest {root}`, and rerun")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _recordio_source(rec: Path, *, skip_corrupt: bool) -> Source:
    with RecordIOReader(rec) as reader:
        items: dict[int, list[Any]] = {}
        skipped = []
        for key in reader.image_keys:
            try:
                label = reader.read_label(key)
            except RecordIOError as exc:
                if not skip_corrupt:
                    raise
                skipped.append({"where": f"{rec} key {key}", "reason": str(exc)})
                continue
            items.setdefault(label, []).append((key, label))
        description = {"type": "recordio", "path": str(rec), "idx": str(reader.idx_path),
                       "has_header": reader.has_header, "records": len(reader.keys)}
    if not items:
        raise ValueError(f"{rec}: the pack holds no image records; check that the .idx belongs to this .rec")
    return Source("recordio", items, description, skipped=tuple(skipped))


def build_unit(unit: Unit) -> UnitResult:
    """Reads, checks and encodes one shard's images, and writes the shard (runs locally or as a Ray task)."""
    p = unit.payload
    columns: dict[str, list[Any]] = {"image_id": [], "identity": [], "image": []}
    skipped, converted = [], 0
    # The detector is loaded once per work unit (one shard, one Ray task), never per image.
    aligner = (FaceAligner(min_score=p["align_min_score"], min_face=p["align_min_face"],
                           multiple=p["align_multiple"]) if p.get("align", "none") != "none" else None)
    stats: dict[str, Any] = {"aligned": 0, "already_aligned": 0, "multiple_faces": 0, "scores": [], "sample": []}
    for image_id, identity, where, load in _records(p):
        try:
            data = load()
            if aligner is not None:
                data = _align_one(aligner, data, where=where, image_id=image_id, p=p, stats=stats)
            elif p["source"] != "synthetic":
                stored = prepare_face(data, where=where, resize=p["resize"], convert_rgb=p["convert_rgb"])[1]
                converted += stored is not data
                data = stored
        except (CorruptImageError, RecordIOError, OSError) as exc:
            if not p["skip_corrupt"]:
                if isinstance(exc, CorruptImageError):
                    raise
                raise CorruptImageError(where, f"unreadable record ({exc})",
                                        "repair the input or pass --skip-corrupt to count it and go on") from exc
            skipped.append(_skipped(exc, where=where))
            continue
        columns["image_id"].append(image_id)
        columns["identity"].append(identity)
        columns["image"].append(data)
    shard = write_shard(unit.root, unit.rel, pa.table(columns, schema=ORIGINAL_SCHEMA))
    return UnitResult(split=unit.split, shard=shard, skipped=skipped, converted=converted,
                      stats=stats if aligner is not None else {})


def _align_one(aligner: FaceAligner, data: bytes, *, where: str, image_id: str, p: dict[str, Any],
               stats: dict[str, Any]) -> bytes:
    """One folder image through the aligner, counted in the unit's ``stats``; returns the bytes to store."""
    stored, aligned = aligner.prepare(data, where=where, convert_rgb=p["convert_rgb"])
    if aligned is None:
        stats["already_aligned"] += 1
        return stored
    stats["aligned"] += 1
    stats["multiple_faces"] += aligned.faces > 1
    stats["scores"].append(round(aligned.face.score, 6))
    if len(stats["sample"]) < UNIT_SAMPLE:
        stats["sample"].append(image_id)
    return stored


def _skipped(exc: Exception, *, where: str) -> dict[str, Any]:
    """How the report lists a refused image; an alignment refusal says which (``refused``) and its score."""
    record: dict[str, Any] = {"where": where, "reason": getattr(exc, "reason", str(exc))}
    if isinstance(exc, FaceNotAlignedError):
        record["refused"] = exc.kind
        if exc.score is not None:
            record["score"] = round(exc.score, 6)
    return record


def _records(p: dict[str, Any]) -> Iterator[tuple[str, int, str, Callable[[], bytes]]]:
    """Yields ``(image_id, identity, where, load)`` for a unit's items; ``load`` does the I/O."""
    if p["source"] == "synthetic":
        seed, style, domain = (p["description"][k] for k in ("seed", "style", "domain"))
        for identity, index in p["items"]:
            yield (synthetic.image_id(identity, index), identity, f"synthetic {identity}/{index}",
                   lambda i=identity, k=index: encode_png(synthetic.generate_image(i, k, seed=seed, style=style,
                                                                                   domain=domain)))
    elif p["source"] == "folder":
        for path, identity, image_id in p["items"]:
            yield image_id, identity, path, lambda path=path: Path(path).read_bytes()
    else:
        desc = p["description"]
        with RecordIOReader(desc["path"], desc["idx"]) as reader:
            for key, label in p["items"]:
                yield (f"rec-{key:09d}", label, f"{desc['path']} key {key}",
                       lambda key=key: reader.read_image(key).image)


def _report(results: list[UnitResult], *, source: Source, inputs: int, data: DataConfig) -> dict[str, Any]:
    skipped = [*source.skipped, *(s for r in results for s in r.skipped)]
    report = {"inputs": inputs, "images": sum(r.shard.rows for r in results), "corrupt": len(skipped),
              "corrupt_records": skipped[:REPORT_LIMIT], "converted": sum(r.converted for r in results),
              "empty_identities": list(source.empty_identities), "hidden_skipped": len(source.hidden),
              "hidden_files": list(source.hidden[:REPORT_LIMIT])}
    if data.align != "none":
        report["align"] = _align_report(results, skipped, data=data)
    return report


def _align_report(results: list[UnitResult], skipped: list[dict[str, Any]], *, data: DataConfig) -> dict[str, Any]:
    """Counts of an aligned ingest: aligned, kept as crops, refused by reason, several faces; the
    detection-score distribution of the aligned faces. Refused images are among ``corrupt_records``."""
    scores = np.array([s for r in results for s in r.stats["scores"]], dtype=np.float64)
    refused = {kind: sum(s.get("refused") == kind for s in skipped) for kind in REFUSALS}
    distribution: dict[str, Any] = {"count": int(scores.size)}
    if scores.size:
        q = np.quantile(scores, [0.0, 0.05, 0.25, 0.5, 0.75, 1.0])
        distribution.update({k: round(float(v), 6) for k, v in zip(("min", "p5", "p25", "median", "p75", "max"), q)})
        counts, _ = np.histogram(scores, bins=SCORE_EDGES)
        distribution["histogram"] = {f"{lo}-{hi}": int(c) for lo, hi, c in zip(SCORE_EDGES, SCORE_EDGES[1:], counts)}
    return {"detector": f"{data.align} (facenet-pytorch)", "min_score": data.align_min_score,
            "min_face": data.align_min_face, "multiple_policy": data.align_multiple,
            "aligned": sum(r.stats["aligned"] for r in results),
            "already_aligned": sum(r.stats["already_aligned"] for r in results),
            "multiple_faces": sum(r.stats["multiple_faces"] for r in results),
            "refused": refused, "refused_total": sum(refused.values()), "scores": distribution}


def _contact_sheets(root: str, manifest: Manifest, results: list[UnitResult]) -> dict[str, np.ndarray]:
    """The contact sheets of an aligned ingest, to write beside the manifest: ``aligned.png``, a sample
    of aligned crops read back from the shards, and ``refused.png``, the photos refused for want of a
    face, each captioned with the reason (absent when there is none).

    Returns:
        Sheet pixels ``[H, W, 3]`` uint8 by file name, relative to ``root``.
    """
    crops: list[np.ndarray] = []
    for r in results:
        if len(crops) >= SHEET_TILES:
            break
        if r.stats.get("sample"):
            want = set(r.stats["sample"])
            crops += [decode_rgb(row["image"]) for row in iter_rows([storage.join(root, r.shard.file)],
                                                                    columns=["image_id", "image"])
                      if row["image_id"] in want]
    refused = [s for s in manifest.report["corrupt_records"] if "refused" in s][:SHEET_TILES]
    photos = [np.asarray(open_image(Path(s["where"]).read_bytes(), where=s["where"]).convert("RGB"))
              for s in refused]
    sheets = {}
    if crops:
        sheets["aligned.png"] = contact_sheet(crops[:SHEET_TILES])
    if photos:
        sheets["refused.png"] = contact_sheet(photos, captions=[s["refused"] for s in refused])
    return sheets
