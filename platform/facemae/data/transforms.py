"""Batch transforms between shard rows and model inputs (numpy and pyarrow only: they run in Ray Data
tasks, whose processes should not import torch, or locally).

A training batch is a dict of numpy arrays:
    ``image``       uint8 ``[N, 112, 112, 3]`` decoded originals;
    ``identity``    int64 ``[N]``;
    ``uid``         int64 ``[N]``, a stable hash of ``image_id`` (strings do not become tensors);
    ``mask``        uint8 ``[N, L]``, 1 = removed (FaceMAE only): drawn afresh every time the batch is
                    made, so every epoch masks the originals differently;
    ``teacher_emb`` float32 ``[N, D]`` when the shards carry the teacher's embeddings;
    ``corrupt``     str ``[N]``: ``""``, or why the row's image would not decode (its ``image`` is then
                    zeros), with ``image_id`` and ``path`` (its shard file) as str ``[N]`` to name it.
                    The row stays in the batch: the worker consuming it raises or, with
                    ``data.skip_corrupt``, drops and counts it. Raised here, inside a Ray Data task, the
                    error would reach the driver as a remote traceback; dropped here, uncounted.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from facemae.data.images import decode_rows


def image_uid(image_id: str) -> int:
    """A stable signed 64-bit id of an ``image_id`` (the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little", signed=True)


def random_masks(n: int, *, num_patches: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """MAE masks for ``n`` images: argsort of uniform noise keeps ``keep`` patches each.

    Returns:
        ``[n, L]`` uint8, 1 = removed, exactly ``keep`` zeros per row.
    """
    ids_keep = np.argsort(rng.random((n, num_patches)), axis=1)[:, :keep]  # (n, keep)
    masks = np.ones((n, num_patches), dtype=np.uint8)
    np.put_along_axis(masks, ids_keep, 0, axis=1)
    return masks


def training_batch(batch: dict[str, Any], *, task: str, num_patches: int = 0, keep: int = 0,
                   flip: bool = False, seed: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Turns shard rows into a training batch (see the module docstring).

    Args:
        batch: Columns ``image_id``, ``identity``, ``image``, ``path`` (the row's shard file) and
            optionally ``teacher_emb``.
        task: ``mae`` (adds a random ``mask``) or ``fr``.
        num_patches: ``L`` for ``mae``.
        keep: Visible patches per image for ``mae``.
        flip: Random horizontal flips (the standard FR augmentation).
        seed: Seed of masks and flips; ``None`` draws fresh OS entropy (different every epoch).
    """
    rng = np.random.default_rng(seed)
    images, reasons = decode_rows(batch["image"], image_ids=batch["image_id"], paths=batch["path"],
                                  skip_corrupt=True)  # (N, H, W, 3)
    if flip:
        flipped = rng.random(len(images)) < 0.5
        images[flipped] = images[flipped, :, ::-1]
    out = {"image": images, "identity": np.asarray(batch["identity"], dtype=np.int64),
           "uid": np.array([image_uid(str(i)) for i in batch["image_id"]], dtype=np.int64),
           "corrupt": np.array(reasons, dtype=object), "image_id": np.array(batch["image_id"], dtype=object),
           "path": np.array(batch["path"], dtype=object)}
    if task == "mae":
        out["mask"] = random_masks(len(images), num_patches=num_patches, keep=keep, rng=rng)
    if "teacher_emb" in batch:
        out["teacher_emb"] = np.stack([np.asarray(e, dtype=np.float32) for e in batch["teacher_emb"]])
    return out


def training_file_batches(item: Any, *, filesystem: Any, columns: list[str], micro_batch: int, task: str,
                       num_patches: int, keep: int) -> Iterator[dict[str, Any]]:
    """One shard file of ``item["path"]`` as training batches of ``micro_batch`` rows (a Ray Data task:
    yielded one by one, so the first batch streams on before the file's last row is decoded)."""
    path, table = read_shard_item(item, filesystem=filesystem, columns=columns)
    for start in range(0, table.num_rows, micro_batch):
        rows = table.slice(start, micro_batch).to_pydict()
        rows["path"] = [path] * len(rows["image_id"])
        yield training_batch(rows, task=task, num_patches=num_patches, keep=keep, flip=task == "fr")


def columns_for(names: Sequence[str]) -> list[str]:
    """The shard columns a training batch reads (``teacher_emb`` only where the shards have it)."""
    wanted = ["image_id", "identity", "image", "teacher_emb"]
    return [c for c in wanted if c in names]


def read_shard_item(item: Any, *, filesystem: Any, columns: list[str] | None) -> tuple[str, Any]:
    """``(path, table)`` of the one shard file a task of :func:`facemae.data.stream.per_file` is given."""
    (path,) = item.column("path").to_pylist()
    return path, pq.read_table(path, columns=columns, filesystem=filesystem)


def shard_file_rows(item: Any, *, filesystem: Any, columns: list[str] | None) -> Iterator[Any]:
    """The rows of the shard file ``item["path"]`` with a ``path`` column naming it (a Ray Data task of
    :func:`facemae.data.stream.shard_rows`)."""
    import pyarrow as pa

    path, table = read_shard_item(item, filesystem=filesystem, columns=columns)
    yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
