"""Privacy invariants (issue 11): no pixel of a deployment face's masked patch leaves the data owner.

The owner's masking removes 75% of each deployment face's patches; those pixels must not appear in
anything the platform writes: the masked shards, the released shards and their exports (beyond the
owner's visible patches, which are pasted back), checkpoints, exported weights, preview PNGs,
metrics and logs. The faces are noise (``conftest.noise_face``), so every 8-pixel row of a patch is
24 random bytes: found anywhere only if it was copied there. The search reads every file as raw
bytes and also as what it decodes to (Parquet values, embedded PNG/JPEG images, the tensors of
torch archives, numbers printed in text), and looks for each removed row in every form the
platform holds pixels in: uint8 (interleaved and per-channel) and the model's float inputs
(``pixel / 255`` and :func:`facemae.models.fr.to_model_range`, in float32, bfloat16 and float16).
A positive control plants leaks in each form and checks that the search reports them.

The release runs on the test session's Ray cluster, whose object store (the raylet's shared memory under
/dev/shm) a watch reads while it runs; what it held is searched the same way, raw and as decoded images, with
a positive control of its own.

The second invariant: the Prometheus endpoint of a training run binds 127.0.0.1 unless
``train.metrics_host`` says otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import BIN, ROOT, free_ports, make_folder, png_bytes
from facemae.data.images import decode_rgb
from facemae.data.masking import patchify
from facemae.data.shards import iter_rows, read_manifest
from facemae.models.fr import to_model_range

P = 8  # patch side of the run below (mask.patch_size)
KEY = 8  # bytes of the window each needle is indexed by
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
CHUNK = 1 << 23  # bytes of a blob looked up at once (bounds the lookup arrays' memory)
FILTER_BITS = 22


# -- what must not appear -------------------------------------------------------------------------
Needles = list[tuple[np.ndarray, list[str]]]  # groups of equal-length byte strings [M, n] uint8, and their names


def row_needles(patches: np.ndarray, labels: list[str], *, floats: bool = True) -> Needles:
    """Every encoding of every pixel row of ``patches`` the platform could hold them in.

    Args:
        patches: ``[K, p, p, 3]`` uint8 patches.
        labels: ``K`` names (``image_id patch i``) for the report.
        floats: Also the model-input encodings (float32 ``/255`` and model range; bfloat16 and
            float16 of the model range, the inputs of bf16 / fp16 engines).

    Returns:
        Per encoding, each row as 24 interleaved values (HWC, as images and patches store them) and
        as 3 per-channel rows of 8 values (CHW, as model inputs do).
    """
    forms = {"uint8": torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)}  # (K, 3, p, p)
    if floats:
        pixels = torch.from_numpy(np.ascontiguousarray(patches))
        unit = pixels.permute(0, 3, 1, 2).float() / 255.0
        model = to_model_range(pixels)  # (K, 3, p, p), exactly as the model's inputs are made
        forms |= {"float32 /255": unit, "float32 model": model, "bfloat16 model": model.to(torch.bfloat16),
                  "float16 model": model.to(torch.float16)}
    out: Needles = []
    k, p = len(labels), patches.shape[1]
    for name, x in forms.items():
        hwc = _raw(x.permute(0, 2, 3, 1)).reshape(k * p, -1)  # (K*p, p*3*itemsize): row r of patch i
        out.append((hwc, [f"{label} row {r} ({name} HWC)" for label in labels for r in range(p)]))
        chw = _raw(x).reshape(k * 3 * p, -1)  # (K*3*p, p*itemsize): channel c, row r of patch i
        out.append((chw, [f"{label} row {r} ({name} channel {c})" for label in labels for c in range(3)
                          for r in range(p)]))
    return out


def _raw(x: torch.Tensor) -> np.ndarray:
    """``x``'s in-memory bytes with the last axis folded into bytes: ``[..., n] -> [..., n * itemsize]``."""
    x = x.contiguous()
    return x.flatten().view(torch.uint8).numpy().reshape(*x.shape[:-1], -1)


class Finder:
    """Finds any of many byte strings (each at least :data:`KEY` bytes long) anywhere in a blob.

    Each needle is indexed by one 8-byte window of it, the first with at least 5 distinct bytes, so
    that runs of zeros or of 1.0 floats in a checkpoint do not make every offset a candidate. A blob
    is read as little-endian uint64 at each of the 8 byte alignments, candidates are found by a
    sorted lookup, and each is confirmed byte for byte.
    """

    def __init__(self, needles: Needles) -> None:
        self.index: dict[int, list[tuple[int, bytes, str]]] = {}
        for group, labels in needles:
            assert group.ndim == 2 and group.shape[1] >= KEY and len(group) == len(labels)
            windows = np.lib.stride_tricks.sliding_window_view(group, KEY, axis=1)  # (M, S, 8)
            ordered = np.sort(windows, axis=2)
            distinct = 1 + (np.diff(ordered, axis=2) != 0).sum(axis=2)  # (M, S)
            start = np.where((distinct >= 5).any(axis=1), (distinct >= 5).argmax(axis=1), distinct.argmax(axis=1))
            keys = np.ascontiguousarray(windows[np.arange(len(group)), start]).view("<u8")[:, 0]
            for key, s, data, label in zip(keys.tolist(), start.tolist(), group, labels):
                self.index.setdefault(key, []).append((s, data.tobytes(), label))
        self.keys = np.array(sorted(self.index), dtype=np.uint64)
        self.filter = np.zeros(1 << FILTER_BITS, dtype=bool)  # a one-hash Bloom filter in front of the lookup
        self.filter[_hash(self.keys)] = True
        self.longest = max(group.shape[1] for group, _ in needles)
        self.count = sum(len(labels) for _, labels in needles)

    def find(self, blob: bytes) -> set[tuple[int, str]]:
        """``(offset, label)`` of every needle in ``blob``."""
        hits: set[tuple[int, str]] = set()
        for base in range(0, max(len(blob) - KEY + 1, 0), CHUNK):
            part = blob[base:base + CHUNK + self.longest]
            for shift in range(KEY):
                words = np.frombuffer(part, dtype="<u8", count=(len(part) - shift) // KEY, offset=shift)
                maybe = np.flatnonzero(self.filter[_hash(words)])  # a few % of the words
                at = np.minimum(np.searchsorted(self.keys, words[maybe]), len(self.keys) - 1)
                for i in maybe[self.keys[at] == words[maybe]]:
                    offset = base + shift + KEY * int(i)
                    for start, data, label in self.index[int(words[i])]:
                        if offset >= start and blob[offset - start:offset - start + len(data)] == data:
                            hits.add((offset - start, label))
        return hits


def _hash(words: np.ndarray) -> np.ndarray:
    """Fibonacci hashing of uint64 words to :data:`FILTER_BITS` bits."""
    return (words * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - FILTER_BITS)


# -- how every file is read -----------------------------------------------------------------------
def views(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(what, bytes)`` of everything ``path`` holds: its raw bytes, each Parquet value, each image
    embedded anywhere in those (decoded to HWC uint8), each tensor of a torch archive, and the
    numbers a text file prints, read as pixel values (``numbers`` views)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:  # a log Ray rotated away while the search ran
        return
    blobs = [("raw", raw)]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        for name in table.column_names:
            blobs += [(f"column {name}[{i}]", _value_bytes(v)) for i, v in enumerate(table.column(name).to_pylist())]
    if zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
        blobs += [(f"tensor {name}", data) for name, data in _tensors(_load_torch(path))]
    for what, blob in blobs:
        yield what, blob
        yield from ((f"{what} {image}", pixels) for image, pixels in _embedded_images(blob))
    if b"\x00" not in raw[:8192]:  # text: logs, metrics.jsonl, manifests
        yield from (("numbers", run) for run in _number_runs(raw))


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, list) and value and isinstance(value[0], float):
        return np.asarray(value, dtype=np.float32).tobytes()  # e.g. teacher_emb
    return str(value).encode()


def _load_torch(path: Path) -> Any:
    """A torch archive read the way the platform reads checkpoints (``weights_only``, no code run)."""
    from facemae.train.engine import read_checkpoint_file

    return read_checkpoint_file(path)


def _tensors(obj: Any, name: str = "") -> Iterator[tuple[str, bytes]]:
    if isinstance(obj, torch.Tensor):
        yield name, _raw(obj.detach().cpu().reshape(-1)).tobytes()
    elif isinstance(obj, np.ndarray):
        yield name, obj.tobytes()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def _embedded_images(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Every PNG or JPEG that starts anywhere in ``blob``, decoded (a RecordIO pack, a Parquet value,
    a file that is one image)."""
    for magic in IMAGE_MAGIC:
        start = blob.find(magic)
        while start >= 0:
            try:
                with Image.open(io.BytesIO(blob[start:])) as image:
                    pixels = np.asarray(image.convert("RGB"))
                yield f"image@{start}", pixels.tobytes()
            except Exception:  # noqa: BLE001 - the magic bytes by chance, or a damaged image: no pixels in it
                pass
            start = blob.find(magic, start + 1)


def _number_runs(text: bytes) -> Iterator[bytes]:
    """Runs of consecutive printed numbers that read as pixel values, as uint8 bytes: integers
    0-255, floats in [0, 1] times 255, and model-range floats in [-1, 1] mapped back (within 0.05
    of a whole pixel value, as 4 printed decimals are)."""
    tokens = NUMBER.findall(text)
    if len(tokens) < P:
        return
    values = np.array([float(t) for t in tokens])
    values[~np.isfinite(values)] = -2.0  # "inf" / "nan": no pixel
    whole = np.array([b"." not in t and b"e" not in t.lower() for t in tokens])
    for ok, pixels in ((whole & (values >= 0) & (values <= 255), values),
                       ((values >= 0) & (values <= 1), values * 255),
                       ((values >= -1) & (values <= 1), (values + 1) * 127.5)):
        ok = ok & (np.abs(pixels - np.round(pixels)) < 0.05)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        for begin, end in zip(edges[::2], edges[1::2]):
            if end - begin >= P:
                yield np.round(pixels[begin:end]).astype(np.uint8).tobytes()


@dataclass
class Search:
    """What a search read and found."""

    files: int = 0
    bytes: Counter = field(default_factory=Counter)  # by view: raw, column, tensor, image, numbers
    views: Counter = field(default_factory=Counter)
    hits: dict[str, set[str]] = field(default_factory=dict)  # "file: view" -> labels found there


def search(roots: list[Path], finder: Finder) -> Search:
    """Every regular file under ``roots``, in every view (:func:`views`)."""
    out = Search()
    for root in roots:
        for path in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            out.files += 1
            for what, blob in views(path):
                _look(out, f"{path}: {what}", what, blob, finder)
    return out


def _look(out: Search, where: str, what: str, blob: bytes, finder: Finder) -> None:
    kind = "image" if "image@" in what else what.split()[0]  # raw, column, tensor, numbers
    out.views[kind] += 1
    out.bytes[kind] += len(blob)
    found = {label for _, label in finder.find(blob)} if len(blob) >= KEY else set()
    if found:
        out.hits.setdefault(where, set()).update(found)


def describe(hits: dict[str, set[str]]) -> str:
    return "\n".join(f"{where}: {len(labels)} rows, e.g. {sorted(labels)[:3]}" for where, labels in hits.items())


# -- Ray's object store ---------------------------------------------------------------------------
# Ray's plasma store, a part of the raylet, keeps every object in one shared mmap of object_store_memory bytes:
# a file it creates in --plasma_directory (/dev/shm on Linux) and unlinks at once; objects that do not fit go to
# more such files in --fallback_directory (the session folder), unlinked as well
# (src/ray/object_manager/plasma/dlmalloc.cc, create_and_mmap_buffer). Only open descriptors reach them: the
# raylet's /proc/<pid>/fd. The file is sparse; SEEK_DATA / SEEK_HOLE give the pages ever written. Freed objects
# are not cleared, but dlmalloc gives their memory to the next objects once the raylet frees them (in batches,
# about every second), so one read after a run sees only what was not overwritten: the watch reads during it.
# Objects spilled to disk go to the session folder, which the file search reads.
STORE_PAGE = 1 << 16  # bytes compared between reads of the store
READ_CHUNK = 1 << 30  # bytes of one read of a store file


@dataclass(frozen=True)
class ObjectStore:
    """The object store of the Ray node that this process started (not any other Ray on the machine)."""

    raylet: int  # pid
    directories: tuple[str, str]  # the raylet's --plasma_directory and --fallback_directory

    @classmethod
    def of(cls, ray: Any) -> ObjectStore:
        from ray._private import ray_constants

        node = ray._private.worker._global_node  # no public API names a node's processes
        (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
        args = dict(a[2:].split("=", 1) for a in Path(f"/proc/{raylet.process.pid}/cmdline").read_text().split("\0")
                    if a.startswith("--") and "=" in a)
        assert args["session_dir"] == node.get_session_dir_path(), f"raylet {raylet.process.pid} is another cluster's"
        return cls(raylet.process.pid, (args["plasma_directory"], args["fallback_directory"]))

    def files(self) -> list[Path]:
        """The raylet's descriptors of its plasma files (``<directory>/plasmaXXXXXX (deleted)``)."""
        out = []
        for fd in Path(f"/proc/{self.raylet}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            folder, _, name = target.removesuffix(" (deleted)").rpartition("/")
            if folder in self.directories and re.fullmatch(r"plasma\w{6}", name):
                out.append(fd)
        return out

    def extents(self) -> Iterator[tuple[int, int, bytes]]:
        """``(file inode, offset, bytes)`` of each written stretch of each plasma file, from a
        :data:`STORE_PAGE` boundary."""
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:  # a fallback file unmapped meanwhile
                continue
            try:
                inode, size, offset = os.fstat(fd).st_ino, os.fstat(fd).st_size, 0
                while offset < size:
                    try:
                        start = os.lseek(fd, offset, os.SEEK_DATA)
                    except OSError:  # ENXIO: no written page after offset
                        break
                    offset = os.lseek(fd, start, os.SEEK_HOLE)
                    start -= start % STORE_PAGE  # the same pages at every read
                    yield inode, start, _read_at(fd, start, offset - start)
            finally:
                os.close(fd)


def _read_at(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes of ``fd`` from ``offset`` (fewer if the file ends first). One read returns at most
    2 GiB - 4 KiB (read(2), NOTES), and a store's written stretch can be longer: a single pread silently
    left its tail, where new objects may go, unread."""
    parts = []
    while n > 0 and (part := os.pread(fd, min(n, READ_CHUNK), offset)):
        parts.append(part)
        offset, n = offset + len(part), n - len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class StoreWatch:
    """Keeps every stretch of an object store that changed between its reads: one when the ``with``
    block starts, one every ``interval`` seconds during it, one at its end. So an object that the block's
    work put there, freed, and let later objects overwrite is still searched."""

    def __init__(self, store: ObjectStore, *, interval: float = 0.25) -> None:
        self.store, self.interval = store, interval
        self.last: dict[tuple[int, int], int] = {}  # (inode, offset) -> hash of that page at the last read
        self.kept: dict[int, bytes] = {}  # hash -> consecutive changed pages and one page either side
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> StoreWatch:
        self.read(keep=False)  # what the store held before the block is only compared against
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.read()

    def _loop(self) -> None:
        # A read takes about 1.5 ms per MB ever written, and a whole test session's cluster holds more than
        # this module's: pausing twice as long as the last read took keeps the watch within a third of a core.
        pause = self.interval
        while not self._stop.wait(pause):
            began = time.monotonic()
            self.read()
            pause = max(self.interval, 2 * (time.monotonic() - began))

    def read(self, *, keep: bool = True) -> None:
        for inode, start, data in self.store.extents():
            view, changed = memoryview(data), []
            for i in range(0, len(data), STORE_PAGE):
                page = (inode, start + i)
                digest = hash(view[i:i + STORE_PAGE])
                if self.last.get(page) != digest:
                    self.last[page] = digest
                    changed.append(i)
            # A run of changed pages is kept whole, with a page of context either side: an object (a block
            # of PNGs) spans many pages, and an image is only decoded from its first byte to its last.
            for first, last in _runs(changed if keep else [], STORE_PAGE):
                stretch = data[max(first - STORE_PAGE, 0):last + 2 * STORE_PAGE]
                self.kept.setdefault(hash(stretch), stretch)
        self.reads += 1

    def search(self, finder: Finder) -> Search:
        """The kept stretches as raw bytes and as the images that start anywhere in them (decoded)."""
        out = Search()
        for n, stretch in enumerate(self.kept.values()):
            out.files += 1
            for what, blob in [("raw", stretch), *_embedded_images(stretch)]:
                _look(out, f"object store stretch {n}: {what}", what, blob, finder)
        return out


def _runs(offsets: list[int], step: int) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of ``offsets`` (ascending) that are ``step`` apart."""
    for k, offset in enumerate(offsets):
        if k == 0 or offset - offsets[k - 1] != step:
            first = offset
        if k + 1 == len(offsets) or offsets[k + 1] - offset != step:
            yield first, offset


# -- the platform run -----------------------------------------------------------------------------
@dataclass
class Run:
    """One pass through the platform on noise faces, and what it wrote."""

    root: Path
    faces: dict[str, np.ndarray]  # image_id -> pixels, every face (the owner's originals)
    masked: dict[str, dict]  # image_id -> masked-shard row, deployment faces
    released: dict[str, dict]  # image_id -> released-shard row
    outputs: list[Path]  # everything the platform wrote that must hold no removed pixel
    originals: Path  # the owner's ingested dataset, which does hold them
    store: StoreWatch  # what the cluster's object store held while the release ran on it


def _teacher(folder: Path, seed: int) -> str:
    """A frozen fr_tiny at its initial weights: enough to run validation's IRM and retrieval leak."""
    from facemae.models.registry import build_fr
    from facemae.models.weights import save_weights

    torch.manual_seed(seed)
    return str(save_weights(build_fr("fr_tiny", embedding_size=64), folder,
                            {"task": "fr", "model": "fr_tiny", "embedding_size": 64}))


def _facemae(*args: str, log: Path) -> None:
    """One ``facemae`` command in a process of its own, stdout and stderr kept as files to search."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        done = subprocess.run([str(BIN / "facemae"), *args], stdout=out, stderr=err, env=env, cwd=ROOT,
                              timeout=600)
    assert done.returncode == 0, log.with_suffix(".err").read_text()[-3000:]


def _ray_session_dir(ray: Any) -> Path:
    # No public API names the session folder; its logs hold what every actor and worker printed.
    return Path(ray._private.worker._global_node.get_session_dir_path())


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_cluster) -> Run:
    """Ingest, owner masking, a FaceMAE training in the local mode with checkpoints, previews and
    validation (on the validation identities), then the release (Ray Data actor pool on the session's cluster)
    with its folder and RecordIO exports, the cluster's object store watched meanwhile; every command's output
    captured in ``logs/``. (Ingest, masking and the local-mode training use no Ray.)"""
    root = tmp_path_factory.mktemp("privacy")
    faces = make_folder(root / "faces", identities=8, images=4, seed=11)
    (root / "logs").mkdir()
    common = ["--config", str(ROOT / "jobs/configs/train_smoke.yaml"),
              *[x for s in (f"data.path={root / 'faces'}", f"data.output={root / 'orig'}",
                            f"mask.output={root / 'masked'}", f"train.storage_path={root / 'runs'}",
                            f"generate.output={root / 'released'}") for x in ("--set", s)],
              "--set", "data.source=folder", "--set", "data.workers=1", "--set", "name=privacy"]
    train = ["--set", f"train.teacher={_teacher(root / 'teacher', 0)}", "--set", "loss.lambda_irm=0",
             "--set", f"train.judge={_teacher(root / 'judge', 1)}", "--set", "train.num_workers=0",
             "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.val_every=2",
             "--set", "train.val_images=8", "--set", "train.metrics_port=0", "--set", "train.log_sample_ids=true"]
    _facemae("train", *common, *train, log=root / "logs" / "train")
    address = ray_cluster.get_runtime_context().gcs_address
    with StoreWatch(ObjectStore.of(ray_cluster)) as store:
        _facemae("generate", *common, "--address", address, "--set", "generate.actors=1", "--set",
                 "generate.batch_size=4", "--export-folder", str(root / "export-folder"), "--export-recordio",
                 str(root / "export-rec" / "train.rec"), log=root / "logs" / "generate")
    masked = {r["image_id"]: r for r in _rows(root / "masked")}
    assert masked and set(masked) <= set(faces) and read_manifest(root / "masked").splits.keys() == {"deploy"}
    outputs = [root / d for d in ("masked", "released", "export-folder", "export-rec", "runs", "logs")]
    return Run(root=root, faces=faces, masked=masked, released={r["image_id"]: r for r in _rows(root / "released")},
               outputs=[*outputs, _ray_session_dir(ray_cluster)], originals=root / "orig", store=store)


def _rows(root: Path) -> list[dict]:
    manifest = read_manifest(root)
    return [r for split in manifest.splits for r in iter_rows(manifest.files(root, split))]


def _patches(run: Run, *, removed: bool) -> tuple[np.ndarray, list[str]]:
    """``([K, p, p, 3], labels)``: the removed (or the visible) patches of every deployment face."""
    patches, labels = [], []
    for image_id, row in sorted(run.masked.items()):
        mask = np.frombuffer(row["mask"], np.uint8)
        picked = np.flatnonzero(mask == (1 if removed else 0))
        patches.append(patchify(run.faces[row["source_id"]], P).reshape(-1, P, P, 3)[picked])
        labels += [f"{image_id} patch {i}" for i in picked]
    return np.concatenate(patches), labels


@pytest.fixture(scope="module")
def forbidden(run) -> Finder:
    patches, labels = _patches(run, removed=True)
    return Finder(row_needles(patches, labels))


# -- the invariants -------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_no_removed_pixel_of_a_deployment_face_is_written_anywhere(run, forbidden):
    found = search(run.outputs, forbidden)
    removed, _ = _patches(run, removed=True)
    written = {p.name for p in run.root.joinpath("runs").rglob("*") if p.is_file()}
    print(f"\nsearched {found.files} files, {sum(found.bytes.values()) / 1e6:.1f} MB in {sum(found.views.values())} "
          f"views (MB: { {k: round(v / 1e6, 2) for k, v in found.bytes.items()} }, views: {dict(found.views)}) for "
          f"{len(removed) * P} removed pixel rows of {len(run.masked)} deployment faces as {forbidden.count} byte "
          f"strings; {len(found.hits)} views with a hit")
    # What the search must have covered, so that an empty result means something.
    assert {"raw", "column", "tensor", "image", "numbers"} <= set(found.views)
    assert {"preview.png", "metrics.jsonl", "weights.safetensors", "mp_rank_00_model_states.pt"} <= written
    assert len(list(run.root.joinpath("runs").rglob("preview.png"))) == 2  # checkpoints 2 and 4 (keep 2)
    metrics = [json.loads(line) for line in (run.root / "runs/privacy/metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in metrics if "val_psnr_masked" in m} == {2, 4}  # validation ran
    assert any(p.suffix in (".log", ".out", ".err") for p in run.outputs[-1].rglob("*"))  # Ray's logs
    assert not found.hits, f"removed pixels of deployment faces were written:\n{describe(found.hits)}"


@pytest.mark.ray
def test_release_predicts_every_removed_patch_and_pastes_only_visible_ones(run):
    assert sorted(run.released) == sorted(run.masked)
    pasted = predicted = 0
    for image_id, row in run.released.items():
        mask = np.frombuffer(run.masked[image_id]["mask"], np.uint8)
        shown = patchify(decode_rgb(row["image"]), P).reshape(-1, P, P * 3)  # (L, p, p*3): pixel rows
        owner = patchify(run.faces[row["source_id"]], P).reshape(-1, P, P * 3)
        same_row = (shown == owner).all(axis=2)  # (L, p)
        assert not same_row[mask == 1].any(), f"{image_id}: a removed patch row of the original is released"
        assert same_row[mask == 0].all(), f"{image_id}: a visible patch is not the owner's (loss.paste_visible)"
        pasted, predicted = pasted + int((mask == 0).sum()), predicted + int((mask == 1).sum())
    assert predicted == 3 * pasted  # mask.ratio 0.75


@pytest.mark.ray
def test_search_finds_every_form_of_a_planted_leak(run, forbidden, tmp_path):
    """Positive controls: the owner's originals hold every removed row, and a leak planted in each
    form (a cached model input, an image, a printed tensor, a Parquet column, raw bytes) is reported."""
    removed, labels = _patches(run, removed=True)
    owner = search([run.originals], forbidden)
    uint8_rows = {f"{label} row {r} (uint8 HWC)" for label in labels for r in range(P)}
    assert uint8_rows <= set().union(*owner.hits.values()), "a removed row in the owner's PNGs went unfound"

    visible, vis_labels = _patches(run, removed=False)
    shown = search([run.root / "masked", run.root / "released", run.root / "export-rec"],
                   Finder(row_needles(visible, vis_labels, floats=False)))
    for where in ("masked", "released", "export-rec"):  # the pasted patches are findable in each decoding
        assert any(f"/{where}/" in w for w in shown.hits), f"the search read no pixel of {where}"

    face = next(iter(run.masked.values()))
    pixels = run.faces[face["source_id"]]
    first = labels.index(next(label for label in labels if label.startswith(f"{face['image_id']} ")))
    planted = _plant(tmp_path, pixels, removed[first], Path(next(run.root.rglob("weights.safetensors"))))
    found = search([tmp_path], forbidden)
    for name, (form, view) in planted.items():
        where = {w for w in found.hits if f"/{name}: " in w and view in w.split(": ", 1)[1]}
        assert where, f"a leak planted in {name} ({form}) was not found in its {view} view"
        assert any(f"{labels[first]} row" in label for w in where for label in found.hits[w])


def _plant(folder: Path, face: np.ndarray, patch: np.ndarray, weights: Path) -> dict[str, tuple[str, str]]:
    """Writes one leak of each form into ``folder``; returns ``{file name: (form, view that finds it)}``."""
    model = to_model_range(torch.from_numpy(face[None]))  # (1, 3, 112, 112) float32
    torch.save({"batch": {"image": model.to(torch.bfloat16)}}, folder / "cached_batch.pt")
    grid = np.concatenate([np.zeros_like(face), face], axis=1)
    (folder / "preview.png").write_bytes(png_bytes(grid))
    printed = [[round(v, 4) for v in row] for row in to_model_range(torch.from_numpy(patch[None]))[0, 0].tolist()]
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "debug": printed}) + "\n")
    table = pa.table({"image_id": ["x"], "visible": [patch.tobytes()]})
    pq.write_table(table, folder / "shard.parquet", compression="zstd")
    (folder / "weights.bin").write_bytes(weights.read_bytes() + patch[3].tobytes())
    return {"cached_batch.pt": ("a bfloat16 model input in a torch archive", "tensor"),
            "preview.png": ("an image", "image@"),
            "metrics.jsonl": ("model-range floats printed to 4 decimals", "numbers"),
            "shard.parquet": ("a zstd-compressed Parquet column", "column"),
            "weights.bin": ("uint8 bytes after the weights", "raw")}


@pytest.mark.ray
@pytest.mark.slow
def test_no_removed_pixel_of_a_deployment_face_reaches_rays_object_store(run, forbidden):
    """What the session's Ray cluster held in its object store while the release ran on it (every stretch
    of its shared memory that changed between reads at least a quarter of a second apart, raw and as decoded
    images) holds no removed row. That it read the release's objects: the pasted visible patches of every
    face are found there, in the released PNGs."""
    found = run.store.search(forbidden)
    visible, labels = _patches(run, removed=False)
    shown = run.store.search(Finder(row_needles(visible, labels, floats=False)))
    seen = {label.split(" patch ")[0] for where, found_there in shown.hits.items() if "image@" in where
            for label in found_there}
    print(f"\nobject store of raylet {run.store.store.raylet}: {run.store.reads} reads, {len(run.store.kept)} "
          f"changed stretches, {sum(map(len, run.store.kept.values())) / 1e6:.1f} MB (MB: "
          f"{ {k: round(v / 1e6, 2) for k, v in found.bytes.items()} }, views: {dict(found.views)}); visible "
          f"patches of {len(seen)} of {len(run.masked)} faces in its images; {len(found.hits)} views with a removed "
          f"row")
    assert run.store.reads >= 3
    assert seen == set(run.masked), "the watch did not read the released faces in the object store"
    assert not found.hits, f"removed pixels of deployment faces reached Ray's object store:\n{describe(found.hits)}"


@pytest.mark.ray
def test_object_store_search_finds_removed_pixels_held_there(run, forbidden, ray_cluster):
    """Positive control of the object store search, on the session's cluster: the removed rows of the
    deployment faces, put there as a driver's uint8 batch, as a worker's float32 model input (an actor's
    return, as the release's actors make them) and as a list of PNGs, are all found by a watch during which
    they were also freed, and new objects of their sizes were put."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = ray_cluster
    originals = np.stack([run.faces[row["source_id"]] for _, row in sorted(run.masked.items())])  # (N, H, W, 3)
    pngs = [png_bytes(face) for face in originals]
    model = to_model_range(torch.from_numpy(originals))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # the watched node
    # An actor that has imported torch before it takes a tensor: a plain task's worker may still be importing
    # torch in another thread when it unpickles its argument, and then fails on a half-imported module
    # (seen here: "module 'torch' has no attribute '_utils'", the task never ran).
    class ModelInput:  # defined here, so that Ray ships it by value (workers cannot import the test module)
        def ready(self) -> bool:
            return True

        def of(self, pixels: torch.Tensor) -> torch.Tensor:
            return to_model_range(pixels)

    worker = ray.remote(ModelInput).options(scheduling_strategy=here, num_cpus=0).remote()
    ray.get(worker.ready.remote())
    store = ObjectStore.of(ray)
    with StoreWatch(store) as watch:
        task = worker.of.remote(torch.from_numpy(originals))
        refs = [ray.put(originals), task, ray.put(pngs)]
        ray.wait(refs, num_returns=len(refs))
        assert torch.equal(ray.get(task), model), "the actor's model input differs from the one computed here"
        _wait_for_reads(watch, 2)  # one whole read after all three are in the store
        # Where each object's bytes were while it was held: in the raylet's files, and in what the watch kept.
        probes = {name: _middle(blob) for name, blob in
                  [("uint8 batch", originals.tobytes()), ("float32 model input", _raw(model).tobytes()),
                   ("PNGs", pngs[len(pngs) // 2])]}
        stretches = [data for _, _, data in store.extents()]
        held = {name: any(probe in data for data in stretches) for name, probe in probes.items()}
        longest = max(map(len, stretches)) / 2**30
        del stretches
        kept = {name: any(probe in data for data in watch.kept.values()) for name, probe in probes.items()}
        del refs, task
        ray.kill(worker)
        time.sleep(1.5)  # the raylet frees objects in batches, about every second
        noise = np.random.default_rng(0)
        for n in (originals.nbytes, 4 * originals.nbytes, sum(map(len, pngs))):  # to take the freed memory
            ray.put(noise.integers(0, 256, n, dtype=np.uint8))
        _wait_for_reads(watch, 2)
    found = watch.search(forbidden)
    raw = set().union(*(labels for where, labels in found.hits.items() if where.endswith(": raw")))
    images = set().union(*(labels for where, labels in found.hits.items() if "image@" in where))
    _, removed = _patches(run, removed=True)
    rows = [f"{label} row {r}" for label in removed for r in range(P)]
    print(f"\n{watch.reads} reads, {len(watch.kept)} kept stretches, the store's longest written stretch {longest:.2f} "
          f"GiB; each object's bytes in the store while held: "
          f"{held}, in what the watch kept: {kept}")
    assert all(held.values()), f"an object was not in the watched node's plasma files while it was held: {held}"
    assert all(kept.values()), f"the watch did not keep an object the store held: {kept}"
    assert {f"{row} (uint8 HWC)" for row in rows} <= raw, "a removed row of the put uint8 batch went unfound"
    assert {f"{row} (float32 model channel {c})" for row in rows for c in range(3)} <= raw, \
        "a removed row of the float32 model input the actor returned went unfound"
    assert {f"{row} (uint8 HWC)" for row in rows} <= images, "a removed row of the put PNGs went unfound"
    late = StoreWatch(store)
    late.read()
    print(f"one read after the fillers alone finds {len(late.search(forbidden).hits)} views with a removed row, "
          f"the watch {len(found.hits)}")


def _middle(blob: bytes, n: int = 512) -> bytes:
    """``n`` bytes from the middle of ``blob``: a probe for where an object's bytes lie."""
    start = max(len(blob) // 2 - n // 2, 0)
    return blob[start:start + n]


@pytest.mark.slow
def test_store_watch_reads_written_stretches_longer_than_one_read_returns(tmp_path):
    """A plasma file whose written stretch is longer than the 2 GiB one pread returns: an object written
    beyond that point is still read, and kept once it changes; what the file held when the watch began is
    only compared against."""
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path  # tmpfs, as Ray's plasma directory
    name = folder / f"plasma{os.getpid() % 1000000:06d}"  # plasmaXXXXXX, as the raylet's mkstemp names them
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(name)  # and unlinked, as the raylet's are: reached through /proc/<pid>/fd only
    try:
        block = np.random.default_rng(0).integers(0, 256, 1 << 26, dtype=np.uint8).tobytes()  # 64 MiB
        for k in range(35):  # 2.19 GiB written, one stretch
            os.pwrite(fd, block, k << 26)
        watch = StoreWatch(ObjectStore(os.getpid(), (str(folder), str(folder))))
        watch.read(keep=False)
        assert not watch.kept
        marker, at = b"late object " * 100, (1 << 31) + (5 << 20)  # past the first 2 GiB
        os.pwrite(fd, marker, at)
        watch.read()
        assert sum(len(data) for _, _, data in watch.store.extents()) == 35 << 26
        assert [marker in stretch for stretch in watch.kept.values()] == [True]
        assert sum(map(len, watch.kept.values())) <= 4 * STORE_PAGE  # the changed page and its context
    finally:
        os.close(fd)


def _wait_for_reads(watch: StoreWatch, n: int, *, timeout: float = 30) -> None:
    until, deadline = watch.reads + n, time.monotonic() + timeout
    while watch.reads < until:
        assert time.monotonic() < deadline, f"the object store watch made no {n} reads in {timeout} s"
        time.sleep(0.05)


# -- the metrics endpoint -------------------------------------------------------------------------
SERVE = """
import sys, time
from pathlib import Path
import torch
from facemae.config import load_config
from facemae.train.context import WorkerContext
ports = []
for port, host in zip(sys.argv[1::2], sys.argv[2::2]):
    config = load_config(None, [f"train.metrics_port={port}", *host.split()]).validate()
    ctx = WorkerContext(config, rank=0, world_size=1, device=torch.device("cpu"), num_classes=2,
                        run_dir=Path("."), in_ray=False)
    ports.append(ctx.metrics.port)
print(*ports, flush=True)
time.sleep(300)
"""


def test_metrics_endpoint_binds_localhost_unless_configured(tmp_path):
    """A rank-0 worker context with the default config serves Prometheus on 127.0.0.1 only;
    ``train.metrics_host=0.0.0.0`` is honoured. Checked on the process's listening sockets."""
    import psutil

    from facemae.config import load_config

    assert load_config(None, []).train.metrics_host == "127.0.0.1"
    ports = free_ports(2)
    args = [str(ports[0]), "", str(ports[1]), "train.metrics_host=0.0.0.0"]  # (port, overrides) pairs
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        default, configured = (int(p) for p in line.split())
        deadline = time.monotonic() + 30
        listening: dict[int, str] = {}
        while time.monotonic() < deadline and not {default, configured} <= set(listening):
            listening = {c.laddr.port: c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert [default, configured] == ports and listening.get(default) == "127.0.0.1", listening
    assert listening.get(configured) == "0.0.0.0", listening
