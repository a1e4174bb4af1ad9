"""Shard files as a Ray Data stream: one read task per file (the pools' rows, the training batches).

``ray.data.read_parquet`` lists and samples its files in a task of its own before the first row moves
(1-9 s on a 2-core machine, for ten local files) and packs small files into one block, which a pool of
actors then works on one actor at a time. The platform's datasets are already cut into shards of a
few hundred rows; reading each in its own task needs neither.
"""

from __future__ import annotations

from typing import Any, Sequence

from facemae import storage


def shard_rows(files: Sequence[str], *, columns: Sequence[str] | None = None, **resources: Any) -> Any:
    """The Ray Dataset of the rows of ``files`` (local paths or object locations, one store), one block
    per file, each row with ``columns`` (all when None) and ``path``, its shard file as the filesystem
    names it (:func:`facemae.generate.streaming.write_as_shards_complete` maps it back).

    ``resources`` (``num_cpus=0.5``, ``num_gpus=1``) are those of the actor pool that maps the rows next
    with ``batch_size=None``: given the same, Ray Data fuses the read into the pool, so each actor reads
    the shards it works on (a whole shard per call) and no read-task processes start beside the actors
    while they load their models (a generation pool over ten shards of 100 faces on 2 cores: first
    shard back after 6.4-8.5 s, against 8.3-9.7 s unfused).
    """
    from facemae.data.transforms import shard_file_rows

    paths, fs = storage.for_arrow(list(files))
    kwargs = {"filesystem": fs, "columns": list(columns) if columns else None}
    return per_file(paths, shard_file_rows, fn_kwargs=kwargs, **resources)


def pool_batch_size(todo: dict[str, tuple[str, Any]], **resources: Any) -> int | None:
    """The ``batch_size`` of the actor pool that maps :func:`shard_rows`' rows: None (a whole shard per
    call, the read fused into the pool) on CPU; on GPUs, where Ray Data refuses None ("You must provide
    `batch_size` ... when requesting GPUs"), the largest shard's rows, which keeps one shard per call where
    shards are even. ``todo`` maps shard paths to ``(split, ShardInfo)``."""
    if not resources.get("num_gpus"):
        return None
    return max((shard.rows for _, shard in todo.values()), default=1)


def per_file(paths: Sequence[str], fn: Any, *, fn_kwargs: dict[str, Any], tasks: int | None = None,
             **resources: Any) -> Any:
    """A Ray Dataset of one task per entry of ``paths`` (filesystem paths, :func:`facemae.storage.for_arrow`;
    a path may repeat), in that order: ``fn(item, **fn_kwargs)`` gets a one-row pyarrow table whose
    ``path`` column names the file and yields the blocks made of it.

    ``tasks`` caps the tasks: consecutive entries then share one, each still a call of ``fn`` of its own.
    Ray Data spends a few milliseconds per input block before the first row moves, so a list of tens of
    thousands of entries (many passes over a few shards) would stall a stream for minutes.
    """
    import ray.data

    blocks = len(paths) if tasks is None else max(1, min(len(paths), tasks))
    reads = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    return reads.map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs, **resources)
