"""Collects a Ray Data stream back into whole output shards, one per input shard."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

from tqdm import tqdm

from facemae import console


def write_as_shards_complete(ds: Any, todo: dict[str, tuple[str, Any]], *, columns: Sequence[str],
                             write: Callable[[list[dict[str, Any]], str, str], None], desc: str) -> None:
    """Iterates ``ds`` (read with ``include_paths=True``) and calls ``write(rows, split, rel)`` as soon
    as every row of an input shard has come back, so memory holds only the shards in flight.

    Args:
        ds: The dataset; its batches carry a ``path`` column and ``columns``.
        todo: Input shard path -> ``(split, ShardInfo)`` of the shards to produce.
        columns: Columns to keep per row.
        write: Writes one output shard.
        desc: Progress-bar label (the bar counts faces).

    Raises:
        RuntimeError: The stream ended with a shard incomplete (rows lost on the way).
    """
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    total = sum(shard.rows for _, shard in todo.values())
    with tqdm(total=total, desc=desc, unit="face", leave=False, file=console.bar_stream()) as bar:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for i, path in enumerate(batch["path"]):
                key = _input_path(str(path), todo)
                pending[key].append({c: batch[c][i] for c in columns})
                split, shard = todo[key]
                if len(pending[key]) == shard.rows:
                    write(pending.pop(key), split, shard.file)
            bar.update(len(batch["path"]))
    if pending:
        raise RuntimeError(f"rows of {sorted(pending)} were lost on the way; rerun to finish those shards")


def _input_path(path: str, todo: dict[str, Any]) -> str:
    """Ray Data reports paths without the filesystem scheme; map back to the key we passed."""
    if path in todo:
        return path
    return next(p for p in todo if p.endswith(path) or path.endswith(p.lstrip("/")))
