"""Parquet shards and the dataset manifest (DESIGN.md "Shard format").

A dataset is a folder::

    manifest.json                 # written last: a folder without it is not a finished dataset
    train/part-00000.parquet      # one row per face
    deploy/part-00000.parquet     # identities disjoint from train

Every file is written to a temporary name and renamed into place, so an interrupted writer never
leaves a half shard that looks whole; the manifest holds each shard's row count and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "deploy")

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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the result to ``path`` once it is complete and synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_shard(root: str | os.PathLike, rel: str, table: pa.Table) -> ShardInfo:
    """Writes one Parquet shard atomically and returns what the manifest records of it."""
    dest = Path(root) / rel
    atomic_write(dest, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    identities = sorted(set(table.column("identity").to_pylist())) if table.num_rows else []
    return ShardInfo(file=rel, rows=table.num_rows, sha256=sha256_file(dest), identities=identities)


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
        """Absolute paths of one split's shards, in order."""
        if split not in self.splits:
            raise DatasetError(f"{root}: no split {split!r}; the dataset has {sorted(self.splits)}")
        return [str(Path(root) / s.file) for s in self.splits[split]]

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
        atomic_write_text(Path(root) / MANIFEST, json.dumps(self.to_json(), indent=1) + "\n")


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Reads ``<root>/manifest.json``.

    Raises:
        DatasetError: The folder has no manifest (not a dataset, or an unfinished one) or a newer
            schema version than this code reads.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{root} is not a finished facemae dataset (no {MANIFEST}); run `facemae ingest` "
                           "into it, or rerun the interrupted command to finish it")
    raw = json.loads(path.read_text())
    if raw.get("schema_version", 0) > SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema version {raw['schema_version']} is newer than this facemae reads "
                           f"({SCHEMA_VERSION}); upgrade facemae")
    raw.pop("counts", None)
    raw.pop("split_identities", None)
    raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
    return Manifest(**raw)


def verify_dataset(root: str | os.PathLike) -> Manifest:
    """Checks every shard named by the manifest exists with the recorded checksum and row count.

    Raises:
        DatasetError: Naming each missing or changed shard.
    """
    manifest = read_manifest(root)
    problems = []
    for shards in manifest.splits.values():
        for s in shards:
            path = Path(root) / s.file
            if not path.is_file():
                problems.append(f"{s.file} is missing")
            elif sha256_file(path) != s.sha256:
                problems.append(f"{s.file} does not match its checksum")
            elif pq.ParquetFile(path).metadata.num_rows != s.rows:
                problems.append(f"{s.file} has {pq.ParquetFile(path).metadata.num_rows} rows, manifest says {s.rows}")
    if problems:
        raise DatasetError(f"{root}: " + "; ".join(problems) + "; re-run the command that wrote it")
    return manifest


def iter_rows(paths: Iterable[str | os.PathLike], *, columns: list[str] | None = None) -> Iterable[dict[str, Any]]:
    """Yields the rows of shards one at a time (for small local jobs and tests; Ray Data reads at scale)."""
    for path in paths:
        table = pq.read_table(path, columns=columns)
        yield from table.to_pylist()
