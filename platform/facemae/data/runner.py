"""Runs shard-writing work units locally or as Ray tasks, resumably.

A job that writes a dataset (ingest, mask) is cut into units, one output shard each. Each finished
unit is appended to a journal in the output folder; a rerun with the same settings keeps every
shard whose file still matches its journalled checksum and runs only the rest. The manifest is
written after the last unit, and the journal removed.

The output may be an object-store prefix (``s3://bucket/prefix``, :mod:`facemae.storage`). Objects
cannot be appended to, so there the journal object is rewritten whole, in one atomic upload, after
each finished unit: the same JSON lines as the local file, at O(units) bytes per record, which is
small for the hundreds of shards of a dataset. Ray tasks get the driver's storage settings
(:func:`facemae.storage.options`, plain strings, no credential) and build their own filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from facemae import console, storage
from facemae.config import RayConfig
from facemae.data.shards import (MANIFEST, SPLITS, DatasetError, Manifest, ShardInfo, read_manifest, sha256_file,
                                 verify_dataset)

JOURNAL = ".facemae-progress.jsonl"
REPORT_LIMIT = 10_000  # skipped records listed one by one in a manifest's report; all are counted


@dataclass
class Unit:
    """One output shard to build: ``build(unit)`` reads ``payload`` and writes ``root/rel``."""

    root: str
    split: str
    rel: str
    payload: Any


@dataclass
class UnitResult:
    """What building one unit produced and what it could not use."""

    split: str
    shard: ShardInfo
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"where", "reason", ...} per corrupt record
    converted: int = 0  # images stored after an opted-in convert / resize
    stats: dict[str, Any] = field(default_factory=dict)  # a stage's own counts (ingest's alignment)


def corrupt_report(results: Sequence[UnitResult]) -> dict[str, Any]:
    """The ``corrupt`` count and the first :data:`REPORT_LIMIT` ``corrupt_records`` of a stage that read
    shards with ``data.skip_corrupt``, for its manifest's report."""
    skipped = [s for r in results for s in r.skipped]
    return {"corrupt": len(skipped), "corrupt_records": skipped[:REPORT_LIMIT]}


def reusable(root: str | os.PathLike, fingerprint: dict[str, Any], *, overwrite: bool,
             ignore: Sequence[str] = ()) -> Manifest | None:
    """Returns the finished dataset at ``root`` when it was built with exactly these settings.

    Args:
        root: Dataset folder.
        fingerprint: The settings the dataset must have been built with (its manifest's ``settings``).
        overwrite: Never reuse.
        ignore: Dotted keys (``data.skip_corrupt``) left out of the comparison: settings that change how
            a build treats bad input, not what a finished dataset holds.

    Raises:
        DatasetError: ``root`` holds a dataset built with other settings and ``overwrite`` is off, or
            its shards no longer match the manifest.
    """
    if overwrite or not storage.exists(storage.join(root, MANIFEST)):
        return None
    settings, fingerprint = (_without(json.loads(json.dumps(d)), ignore)
                             for d in (read_manifest(root).settings, fingerprint))
    if settings != fingerprint:
        changed = ", ".join(f"{k}: built with {was!r}, now {now!r}"
                            for k, was, now in _differences(settings, fingerprint))
        raise DatasetError(f"{root} holds a dataset built with other settings (differs in {changed}); "
                           "pass --overwrite to rebuild it or choose another output folder")
    return verify_dataset(root)


def _differences(built: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, built value, wanted value)`` of every leaf setting that differs (``None``: absent)."""
    if not (isinstance(built, dict) and isinstance(wanted, dict)):
        return [] if built == wanted else [(prefix.rstrip("."), built, wanted)]
    return [d for k in sorted(set(built) | set(wanted))
            for d in _differences(built.get(k), wanted.get(k), f"{prefix}{k}.")]


def _without(settings: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    for key in keys:
        *parents, last = key.split(".")
        node = settings
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return settings


def prepare_output(root: str | os.PathLike, *, overwrite: bool) -> None:
    """Makes ``root`` ready for a dataset: refuses to clobber a finished one unless told to.

    Raises:
        DatasetError: ``root`` holds a finished dataset and ``overwrite`` is off, or holds files
            this platform did not write.
    """
    if storage.is_remote(root):
        _prepare_remote_output(str(root), overwrite=overwrite)
        return
    root = Path(root)
    if (root / MANIFEST).exists():
        if not overwrite:
            raise DatasetError(f"{root} already holds a finished dataset; pass --overwrite to replace it "
                               "or choose another output folder")
        shutil.rmtree(root)
    if root.exists():
        foreign = [p.name for p in root.iterdir() if p.name not in (JOURNAL, *SPLITS)]
        if foreign:
            raise DatasetError(f"{root} holds files facemae did not write ({', '.join(sorted(foreign)[:5])}); "
                               "choose an empty or new output folder")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob("*/.*.tmp"):  # temp files of a writer that was killed mid-shard
        leftover.unlink()


def _prepare_remote_output(root: str, *, overwrite: bool) -> None:
    """:func:`prepare_output` for an object-store prefix (no temp objects to clean: uploads land whole)."""
    if storage.exists(storage.join(root, MANIFEST)):
        if not overwrite:
            raise DatasetError(f"{root} already holds a finished dataset; pass --overwrite to replace it "
                               "or choose another output location")
        storage.delete_tree(root)
    foreign = sorted({f.split("/")[0] for f in storage.list_files(root)} - {JOURNAL, *SPLITS})
    if foreign:
        raise DatasetError(f"{root} holds objects facemae did not write ({', '.join(foreign[:5])}); "
                           "choose an empty or new output prefix")


class Journal:
    """The record of finished shards in an output folder, one JSON line each, fsynced (on an object
    store: the whole journal re-uploaded per record; module docstring).

    Opening it with another fingerprint than the one it was started with discards it and the shards
    it lists (they were built with other settings). A shard whose file no longer matches its
    journalled checksum counts as not done.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.remote = storage.is_remote(root)
        self.path = storage.join(root, JOURNAL) if self.remote else Path(root) / JOURNAL
        self._lines: list[str] = []  # what the journal object holds (object stores)
        self.done = self._load(json.loads(json.dumps({"fingerprint": fingerprint})))
        self._log = None if self.remote else open(self.path, "a")

    def _load(self, header: dict[str, Any]) -> dict[str, UnitResult]:
        lines = storage.read_text(self.path).splitlines() if storage.exists(self.path) else []
        results = {}
        for line in lines[1:]:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write: that unit simply runs again
            raw["shard"] = ShardInfo(**raw["shard"])
            results[raw["shard"].file] = UnitResult(**raw)
        if not lines or json.loads(lines[0]) != header:
            for result in results.values():
                storage.delete(storage.join(self.root, result.shard.file))
            self._lines = [json.dumps(header)]
            storage.write_text(self.path, self._lines[0] + "\n")
            return {}
        self._lines = lines  # a re-recorded shard's later line wins on load
        done = {}
        for rel, r in results.items():
            shard = storage.join(self.root, rel)
            if storage.is_file(shard) and sha256_file(shard) == r.shard.sha256:
                done[rel] = r
        return done

    def record(self, result: UnitResult) -> None:
        line = json.dumps(asdict(result))
        if self.remote:
            self._lines.append(line)
            storage.write_text(self.path, "\n".join(self._lines) + "\n")
        else:
            self._log.write(line + "\n")
            self._log.flush()
            os.fsync(self._log.fileno())
        self.done[result.shard.file] = result

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def finish(self) -> None:
        """Removes the journal once the manifest is written."""
        self.close()
        storage.delete(self.path)


def run_units(root: str | os.PathLike, units: Sequence[Unit], build: Callable[[Unit], UnitResult], *,
              fingerprint: dict[str, Any], use_ray: bool = False, ray_config: RayConfig | None = None,
              desc: str = "shards") -> list[UnitResult]:
    """Builds every unit not already done, and returns all results in unit order.

    Args:
        root: Output dataset folder (already passed through :func:`prepare_output`).
        units: Work, one shard each; their ``rel`` paths must be unique.
        build: Top-level (picklable) function that writes one unit's shard.
        fingerprint: Everything that decides the output; a journal with another fingerprint is
            discarded with the shards it lists.
        use_ray: Run units as Ray tasks on the connected (or an embedded) cluster.
        ray_config: Cluster connection for ``use_ray``.
        desc: Progress-bar label.
    """
    journal = Journal(root, fingerprint)
    todo = [u for u in units if u.rel not in journal.done]
    with tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="shard",
              disable=not todo, leave=False, file=console.bar_stream()) as bar:
        def record(result: UnitResult) -> None:
            journal.record(result)
            bar.update(1)

        if use_ray and len(todo) > 1:
            _run_on_ray(todo, build, record, ray_config or RayConfig())
        else:
            for unit in todo:
                record(build(unit))
    journal.close()
    return [journal.done[u.rel] for u in units]


def finish(root: str | os.PathLike) -> None:
    """Removes the journal once the manifest is written."""
    storage.delete(storage.join(root, JOURNAL))


def run_unit_with_storage(build: Callable[[Unit], UnitResult], unit: Unit,
                          storage_options: dict[str, str]) -> UnitResult:
    """A Ray task's body: the driver's storage settings (a worker is another process), then ``build``."""
    storage.configure(**storage_options)
    return build(unit)


def _run_on_ray(units: Sequence[Unit], build: Callable[[Unit], UnitResult],
                record: Callable[[UnitResult], None], ray_config: RayConfig) -> None:
    import ray

    from facemae.cluster import ensure_ray

    ensure_ray(ray_config)
    task = ray.remote(num_cpus=1)(run_unit_with_storage)
    storage_options = storage.options()
    pending = {task.remote(build, u, storage_options): u for u in units}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ready[0])
        try:
            record(ray.get(ready[0]))
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            cause = exc.cause if isinstance(exc.cause, Exception) else None
            if cause is not None:
                raise cause from None  # the user's error (a corrupt image...), not Ray's wrapper
            raise RuntimeError(f"building {unit.rel} failed: {exc}") from exc
