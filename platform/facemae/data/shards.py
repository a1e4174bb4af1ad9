"""Parquet shards and the dataset manifest (DESIGN.md "Shard format").

A dataset is a folder, or a prefix of an object store (``s3://bucket/prefix``; :mod:`facemae.storage`)::

    manifest.json                 # written last: a folder without it is not a finished dataset
    train/part-00000.parquet      # one row per face
    deploy/part-00000.parquet     # identities disjoint from train

Every file is written to a temporary name and renamed into place (an object is uploaded to its final
key only once complete), so an interrupted writer never leaves a half shard that looks whole; the
manifest holds each shard's row count and SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from facemae import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "deploy")  # training, validation (training side) and deployment identities
TRAINER_SPLITS = ("train", "val")  # what the trainer may read of the originals (DESIGN.md, "Who sees what")

ORIGINAL_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("identity", pa.int64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # encoded PNG / JPEG, 112x112 RGB
])

# A masked shard holds no pixel of a masked patch: `visible` is the kept patches' raw pixels,
# [keep, p, p, 3] uint8 in ascending patch order, and `mask` is L bytes (1 = removed, 0 = visible),
# the MAE convention. `source_id` is the original face's id (several masked copies may share it).
MASKED_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("identity", pa.int64(), nullable=False),
    pa.field("visible", pa.binary(), nullable=False),
    pa.field("mask", pa.binary(), nullable=False),
])


class DatasetError(ValueError):
    """A dataset folder is missing, unfinished or does not match its manifest."""


@dataclass
class ShardInfo:
    """One written shard, as the manifest records it."""

    file: str  # relative to the dataset folder
    rows: int
    sha256: str
    identities: list[int] = field(default_factory=list)


# A released shard: the face the platform publishes (reconstructed or masked view), PNG-encoded.
RELEASED_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("identity", pa.int64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
])


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a local file or an object (``s3://...``)."""
    return storage.sha256(path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and puts the result at ``path`` once it is complete: renamed after an
    fsync locally, uploaded to its final key on an object store (:func:`facemae.storage.atomic_write`)."""
    storage.atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    storage.write_text(path, text)


def write_shard(root: str | os.PathLike, rel: str, table: pa.Table) -> ShardInfo:
    """Writes one Parquet shard atomically and returns what the manifest records of it."""
    digest: dict[str, str] = {}

    def write(tmp: str) -> None:
        pq.write_table(table, tmp, compression="zstd")
        digest["sha256"] = storage.sha256(tmp)  # of the bytes about to be published; saves reading them back

    atomic_write(storage.join(root, rel), write)
    identities = sorted(set(table.column("identity").to_pylist())) if table.num_rows else []
    return ShardInfo(file=rel, rows=table.num_rows, sha256=digest["sha256"], identities=identities)


def read_table(path: str | os.PathLike, *, columns: list[str] | None = None) -> pa.Table:
    """One shard (a local file or an object) as an Arrow table."""
    if not storage.is_remote(path):
        return pq.read_table(path, columns=columns)
    fs, key = storage.resolve(path)
    return pq.read_table(key, columns=columns, filesystem=fs)


def parquet_rows(path: str | os.PathLike) -> int:
    """A shard's row count, from its footer."""
    with storage.open_input(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


@dataclass
class Manifest:
    """The description of a finished dataset folder; see the module docstring."""

    kind: str  # "original" | "masked" | "released"
    source: dict[str, Any]
    splits: dict[str, list[ShardInfo]]
    report: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # what built it; a rerun with equal settings reuses it
    mask: dict[str, Any] | None = None
    identity_names: dict[str, str] | None = None
    image_size: int = 112
    schema_version: int = SCHEMA_VERSION

    def identities(self, split: str) -> list[int]:
        return sorted({i for s in self.splits.get(split, []) for i in s.identities})

    def num_images(self, split: str | None = None) -> int:
        names = [split] if split else list(self.splits)
        return sum(s.rows for n in names for s in self.splits.get(n, []))

    def files(self, root: str | os.PathLike, split: str) -> list[str]:
        """Paths (or URLs) of one split's shards, in order."""
        if split not in self.splits:
            raise DatasetError(f"{root}: no split {split!r}; the dataset has {sorted(self.splits)}")
        return [storage.join(root, s.file) for s in self.splits[split]]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = {
            name: {"images": self.num_images(name), "identities": len(self.identities(name)),
                   "shards": len(shards)}
            for name, shards in self.splits.items()
        }
        out["split_identities"] = {name: self.identities(name) for name in self.splits}
        return out

    def write(self, root: str | os.PathLike) -> None:
        atomic_write_text(storage.join(root, MANIFEST), json.dumps(self.to_json(), indent=1) + "\n")


# The command that writes each kind of dataset (manifest ``settings.stage``) and how to rebuild it.
REBUILD = {
    "ingest": "rerun `facemae ingest` (or `facemae train`) with --overwrite to rewrite it from its source",
    "mask": "rerun `facemae mask` (or `facemae train`) with --overwrite to rewrite it",
    "generate": "rerun `facemae generate` with --overwrite to rewrite it",
    # embed_dataset's callers (train, experiment, tune) pass no overwrite: a fresh folder is rebuilt.
    "embed": "delete the folder; the next `facemae train`, `experiment` or `tune` run rebuilds the embeddings",
}
REBUILD_ANY = ("rerun the command that wrote it (`facemae ingest`, `mask` or `generate`) with --overwrite to "
               "rewrite it")
# The JSON types a manifest's keys may hold (a key not listed may hold any); which keys there are, and
# which are required, comes from the dataclasses.
MANIFEST_TYPES = {"kind": (str,), "source": (dict,), "splits": (dict,), "report": (dict,), "settings": (dict,),
                  "mask": (dict, type(None)), "identity_names": (dict, type(None)), "image_size": (int,),
                  "schema_version": (int,)}
SHARD_TYPES = {"file": (str,), "rows": (int,), "sha256": (str,), "identities": (list,)}
DERIVED_KEYS = ("counts", "split_identities")  # written by Manifest.to_json, dropped on read
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", type(None): "null"}


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Reads ``<root>/manifest.json``.

    Raises:
        DatasetError: The folder has no manifest (not a dataset, or an unfinished one), the manifest
            is damaged (not JSON, missing or mistyped keys), or it has a newer schema version than
            this code reads.
    """
    path = storage.join(root, MANIFEST)
    if not storage.is_file(path):
        raise DatasetError(f"{root} is not a finished facemae dataset (no {MANIFEST}); run `facemae ingest` "
                           "into it, or rerun the interrupted command to finish it")
    damaged = f"{path} is damaged"
    fix = f"restore it from a backup, or {REBUILD_ANY}"
    try:
        raw = json.loads(storage.read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{damaged}: not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{damaged}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); "
                           f"{fix}") from None
    version = raw.get("schema_version", 0) if isinstance(raw, dict) else 0
    if isinstance(version, int) and version > SCHEMA_VERSION:  # before the keys, which a newer schema may change
        raise DatasetError(f"{path}: schema version {version} is newer than this facemae reads "
                           f"({SCHEMA_VERSION}); upgrade facemae")
    _check_keys(raw, Manifest, MANIFEST_TYPES, where=damaged, fix=fix, derived=DERIVED_KEYS)
    for split, shards in raw["splits"].items():
        if not isinstance(shards, list):
            raise DatasetError(f"{damaged}: splits.{split} must be a list of shards, found "
                               f"{type(shards).__name__}; {fix}")
        for i, shard in enumerate(shards):
            _check_keys(shard, ShardInfo, SHARD_TYPES, where=f"{damaged}: splits.{split}[{i}]", fix=fix)
    for key in DERIVED_KEYS:
        raw.pop(key, None)
    raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
    return Manifest(**raw)


def _check_keys(raw: Any, cls: type, types: dict[str, tuple[type, ...]], *, where: str, fix: str,
                derived: tuple[str, ...] = ()) -> None:
    """Raises :class:`DatasetError` unless ``raw`` is a JSON object that builds dataclass ``cls``: every
    field without a default present, no unknown key, and values of the JSON ``types`` listed."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(raw).__name__}; {fix}")
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING]
    if missing := [k for k in required if k not in raw]:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}; {fix}")
    known = [f.name for f in fields] + list(derived)
    if unknown := sorted(set(raw) - set(known)):
        raise DatasetError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(known)}); {fix}")
    for key, value in raw.items():
        allowed = types.get(key)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            expected = " or ".join(JSON_TYPE_NAMES[t] for t in allowed)
            raise DatasetError(f"{where}: {key} must be {expected}, found {json.dumps(value)[:40]}; {fix}")


def verify_dataset(root: str | os.PathLike, *, splits: Sequence[str] | None = None) -> Manifest:
    """Checks every shard named by the manifest exists with the recorded checksum and row count.

    Args:
        root: Dataset folder.
        splits: Only these splits' shards (a trainer checks what it reads, never the owner's ``deploy``
            originals); all by default.

    Raises:
        DatasetError: Naming each missing or changed shard, and how to rewrite the dataset (the
            ``--overwrite`` of the command that wrote it).
    """
    manifest = read_manifest(root)
    problems = []
    for split, shards in manifest.splits.items():
        if splits is not None and split not in splits:
            continue
        for s in shards:
            path = storage.join(root, s.file)
            if not storage.is_file(path):
                problems.append(f"{s.file} is missing")
            elif sha256_file(path) != s.sha256:
                problems.append(f"{s.file} does not match its checksum")
            elif (rows := parquet_rows(path)) != s.rows:
                problems.append(f"{s.file} has {rows} rows, manifest says {s.rows}")
    if problems:
        # Without --overwrite the writing command reuses the folder, verifies it and stops here again.
        rebuild = REBUILD.get(manifest.settings.get("stage"), REBUILD_ANY)
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(f"{root}: " + "; ".join(problems[:5]) + f"{more}; restore the changed files, or {rebuild}")
    return manifest


def iter_rows(paths: Iterable[str | os.PathLike], *, columns: list[str] | None = None) -> Iterable[dict[str, Any]]:
    """Yields the rows of shards one at a time (for small local jobs and tests; Ray Data reads at scale)."""
    for path in paths:
        yield from read_table(path, columns=columns).to_pylist()
