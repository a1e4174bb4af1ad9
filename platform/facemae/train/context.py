"""Worker contexts: how the loop gets batches, resumes, checkpoints and reports (STYLE.md 6).

:class:`RayContext` runs inside a Ray Train worker (dataset shard, ``ray.train.report``, Ray's
checkpoint storage); :class:`LocalContext` runs in one process with no Ray at all, for debugging.

Corrupt rows: a training batch keeps a row whose image would not decode, marked
(:func:`facemae.data.transforms.training_batch`); ``batches()`` raises a ``CorruptImageError`` naming
it, or with ``data.skip_corrupt`` drops it and remembers its id, so no row vanishes uncounted. Every
report carries two cumulative run totals, summed over ranks (and kept in each checkpoint, so a resumed
run goes on counting):

- ``images_trained``: rows trained on by all ranks (the Prometheus counter ``facemae_train_images_total``);
- ``corrupt_skipped``: *distinct* corrupt rows skipped (``facemae_train_corrupt_skipped_total``). A bad
  row is read again every epoch, and Ray Data may hand it to another rank each time; it counts once.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from facemae import storage
from facemae.allocator import retain_freed_memory
from facemae.config import Config
from facemae.data.images import corrupt_records
from facemae.data.transforms import training_batch
from facemae.metrics import TrainMetrics, peak_rss_gib
from facemae.tracking import ReportLogger, TrackedRun
from facemae.train import engine as ds

CHECKPOINT_PREFIX = "checkpoint_"
METRICS_LOG = "metrics.jsonl"
PREVIEW = "preview.png"
RUN_TOTALS = "run_totals.json"  # images trained and corrupt row ids, next to progress.json


class WorkerContext:
    """What the loop needs from its surroundings; subclasses provide batches and checkpoint storage."""

    def __init__(self, config: Config, *, rank: int, world_size: int, device: torch.device, num_classes: int,
                 run_dir: str, in_ray: bool, tracked: TrackedRun | None = None) -> None:
        self.config = config
        self.rank, self.world_size, self.device = rank, world_size, device
        if device.type == "cpu":
            retain_freed_memory()  # the step's activations reuse the last step's pages
        self.num_classes = num_classes
        self.run_dir = run_dir
        train = config.train
        self.metrics = TrainMetrics(run=config.name, rank=rank, world_size=world_size, in_ray=in_ray,
                                    port=train.metrics_port if rank == 0 and train.metrics_port else None,
                                    host=train.metrics_host)
        self._images_trained = 0  # by this rank since it started, plus the restored run total on rank 0
        self._corrupt_seen: set[int] = set()  # uids of corrupt rows any rank had skipped at the last sync
        self._corrupt_new: set[int] = set()  # uids this rank skipped since then
        self._restoring: str | None = None  # the checkpoint folder restore_dir() hands out
        self._gather_group: Any = None
        self._preview: Any = None  # the preview's faces (validation.ValidationSet), loaded at the first checkpoint
        self._attempt: int | None = None  # of this run: read from metrics.jsonl at the first line
        self._logged_before = 0  # highest step an earlier attempt logged
        self._metrics_log: storage.AppendLog | None = None  # rank 0's metrics.jsonl, opened at its first line
        self._ids_file = storage.AppendLog(storage.join(run_dir, "sample_ids", f"rank{rank:03d}.txt"),
                                           upload_every_s=config.train.log_upload_every_s) \
            if train.log_sample_ids else None
        self._tracker = ReportLogger.create(config, tracked, rank=rank, run_dir=run_dir)  # MLflow, TensorBoard

    # -- provided by subclasses ---------------------------------------------------------------------
    def batches(self, epoch: int, *, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]:
        raise NotImplementedError

    def checkpoint_dir(self, step: int) -> contextlib.AbstractContextManager[str]:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        """Logs ``metrics`` with the run totals. Every rank calls it at the same steps: it is collective."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    def observe(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *, step: int,
                step_s: float, wait_s: float) -> None:
        """Records one micro-batch: metrics, and which samples it held when asked to."""
        losses = {k: float(v.detach().float()) for k, v in out.items()}
        self._images_trained += len(batch["identity"])
        self.metrics.observe(images=len(batch["identity"]), step=step, step_s=step_s, wait_s=wait_s,
                             losses=losses)
        if self._ids_file is not None:
            self._ids_file.write("".join(f"{u}\n" for u in batch["uid"].tolist()))

    def write_metrics_line(self, metrics: dict[str, Any]) -> None:
        """Appends rank 0's line to ``<run>/metrics.jsonl``, marked with this start's ``attempt`` (1 for a
        fresh run, +1 per restart or resume) and ``repeat: true`` where an earlier attempt logged the step
        already (a restart from a checkpoint trains those steps again): keep the last attempt's line."""
        if self.rank != 0:
            return
        if self._metrics_log is None:
            self._metrics_log = storage.AppendLog(storage.join(self.run_dir, METRICS_LOG),
                                                  upload_every_s=self.config.train.log_upload_every_s)
            self._attempt, self._logged_before = _attempt_after(self._metrics_log.text())
        line = {**metrics, "attempt": self._attempt}
        if line.get("step", 0) <= self._logged_before:
            line["repeat"] = True
        self._metrics_log.write(json.dumps(line) + "\n")
        self._metrics_log.flush()  # on an object store: the whole log, replaced, at most every log_upload_every_s

    def upload_logs(self) -> None:
        """Uploads the logs that grew (an object store's copies) now: with a checkpoint, so the logs on the store
        reach at least the step a resume starts after."""
        for log in (self._metrics_log, self._ids_file):
            if log is not None:
                log.flush(force=True)

    def close(self) -> None:
        """Puts the last lines of the run's logs in place (an object store's copies are uploaded) and stops the
        metrics endpoint."""
        for log in (self._metrics_log, self._ids_file):
            if log is not None:
                log.close()
        self._metrics_log = self._ids_file = None
        if self._tracker is not None:
            self._tracker.close()
        self.metrics.close()

    def track(self, metrics: dict[str, Any], directory: str | None) -> None:
        """Rank 0, with tracking on: the report's metrics at its step, and the preview of the checkpoint
        in ``directory``, to MLflow and TensorBoard (:mod:`facemae.tracking`)."""
        if self._tracker is None:
            return
        preview = Path(directory) / PREVIEW if directory else None
        self._tracker.log(metrics, preview=preview if preview is not None and preview.is_file() else None)

    def drop_corrupt(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Raises for a row a training batch marks corrupt or, with ``data.skip_corrupt``, drops it and
        remembers its id for the counts; yields the batches' tensors only.

        A micro-batch with no valid row left is replaced by this rank's previous one: the gradient
        all-reduce pairs every rank's steps, so one rank cannot leave a step out.

        Raises:
            CorruptImageError: A corrupt row while ``data.skip_corrupt`` is off, naming dataset, shard and
                image_id.
            ValueError: The first micro-batch of a rank holds nothing but corrupt rows.
        """
        previous = None
        for batch in batches:
            reasons, ids, paths = (list(batch.pop(k)) for k in ("corrupt", "image_id", "path"))
            if any(reasons):
                corrupt_records(reasons, image_ids=ids, paths=paths, skip_corrupt=self.config.data.skip_corrupt)
                valid = torch.tensor([not r for r in reasons])  # (N,)
                self._corrupt_new.update(int(u) for u in batch["uid"][~valid].tolist())
                self._corrupt_new -= self._corrupt_seen
                self.metrics.record_run_totals(images=0, corrupt=len(self._corrupt_seen | self._corrupt_new))
                batch = {k: v[valid] for k, v in batch.items()} if bool(valid.any()) else previous
                if batch is None:
                    raise ValueError(f"every row of rank {self.rank}'s first micro-batch is corrupt; rebuild the "
                                     "training dataset (data.skip_corrupt skips single bad rows, not whole "
                                     "stretches of a shard)")
            previous = batch
            yield batch

    def sync_run_totals(self) -> tuple[int, int]:
        """Sums the images trained and unites the corrupt rows skipped over all ranks (collective).

        Returns:
            ``(images_trained, corrupt_skipped)`` of the whole run, as its Prometheus counters now read.
        """
        mine = (self._images_trained, sorted(self._corrupt_new))
        parts = [mine]
        if self.world_size > 1:
            import torch.distributed as dist

            if self._gather_group is None:  # objects travel on gloo; a NCCL group would need CUDA tensors
                self._gather_group = dist.group.WORLD if dist.get_backend() == "gloo" else \
                    dist.new_group(backend="gloo")
            parts = [None] * self.world_size
            dist.all_gather_object(parts, mine, group=self._gather_group)
        self._corrupt_seen.update(u for _, uids in parts for u in uids)
        self._corrupt_new.clear()
        self.metrics.record_run_totals(images=sum(n for n, _ in parts), corrupt=len(self._corrupt_seen))
        return self.metrics.run_totals()

    def run_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if self._ids_file is not None:
            self._ids_file.flush()  # on an object store: the sample ids so far, at most every log_upload_every_s
        images, corrupt = self.sync_run_totals()
        compute_s, wait_s = self.metrics.seconds_totals()
        return {**metrics, "images_trained": images, "corrupt_skipped": corrupt,
                "images_per_s": round(self.metrics.images_per_second(), 2),
                "step_time_s": round(self.metrics.median_step_seconds(), 4),
                "data_wait_fraction": round(self.metrics.data_wait_fraction(), 4),
                "compute_total_s": round(compute_s, 3), "data_wait_total_s": round(wait_s, 3),  # this attempt, rank 0
                "rss_peak_gib": round(peak_rss_gib(), 3),
                "time": round(time.time(), 3),
                **({"gpu_mem_peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
                   if self.device.type == "cuda" else {})}

    def saved(self, engine: Any, directory: str, step: int) -> None:
        """After a checkpoint (every rank): the run totals go into it; with ``train.debug_state_dir``,
        a snapshot of what was saved (resume audits)."""
        images, _ = self.sync_run_totals()
        if self.rank == 0:
            totals = {"images_trained": images, "corrupt_uids": sorted(self._corrupt_seen)}
            (Path(directory) / RUN_TOTALS).write_text(json.dumps(totals) + "\n")
        if self.config.train.debug_state_dir:
            _dump(engine, Path(self.config.train.debug_state_dir) / f"saved_step{step:08d}_rank{self.rank}.pt")

    def restored(self, engine: Any, step: int) -> None:
        """After a restore: the run totals go on from the checkpoint's; with ``train.debug_state_dir``,
        a snapshot of what was loaded."""
        totals = Path(self._restoring or "") / RUN_TOTALS
        if self._restoring and totals.is_file():  # checkpoints written before the totals existed have none
            saved = json.loads(totals.read_text())
            self._images_trained += saved["images_trained"] if self.rank == 0 else 0  # summed over ranks
            self._corrupt_seen.update(saved["corrupt_uids"])
            self.metrics.record_run_totals(images=self._images_trained, corrupt=len(self._corrupt_seen))
        if self.config.train.debug_state_dir:
            _dump(engine, Path(self.config.train.debug_state_dir) / f"restored_step{step:08d}_rank{self.rank}.pt")

    def write_preview(self, engine: Any, directory: Path) -> None:
        """A PNG grid of masked / reconstructed / original faces (FaceMAE runs), next to the checkpoint: the
        same faces at every checkpoint and in every run over the same data (``load_preview_set``).

        Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 writes.
        """
        if self.config.train.task != "mae":
            return
        if self._preview is None:
            from facemae.train.validation import load_preview_set

            self._preview = load_preview_set(self.config, device=next(engine.module.parameters()).device)
        mae, faces = engine.module.mae, self._preview
        if not faces.image_id:
            return  # every preview face is corrupt (data.skip_corrupt): nothing to show
        imgs, mask = faces.images.to(next(mae.parameters()).dtype), faces.mask
        with torch.no_grad():
            _, pred, _ = mae(imgs, mask=mask)
            released = mae.compose(imgs, pred, mask, paste_visible=self.config.loss.paste_visible)
            masked = mae.compose(imgs, torch.zeros_like(pred), mask)  # removed patches shown at mid-grey
        if self.rank == 0:
            rows = [_to_uint8(t) for t in (masked, released, imgs)]
            grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
            buf = io.BytesIO()
            Image.fromarray(grid).save(buf, format="PNG")
            (directory / PREVIEW).write_bytes(buf.getvalue())


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    x = ((images.detach().float() * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)


def _dump(engine: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ds.state_snapshot(engine), path)


def _to_tensors(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numeric columns to tensors in the model range; text columns (``image_id``...) stay lists of str.

    Also ``iter_torch_batches``' collate function: its default would refuse the text columns.
    """
    # Ray Data hands read-only arrays, which torch.from_numpy warns about: np.require copies those.
    return _model_inputs({k: list(v) if v.dtype.kind in "OUS" else torch.from_numpy(np.require(v, requirements="CW"))
                          for k, v in batch.items()})


def _tensor_collate() -> Any:
    """:func:`_to_tensors` as the collate class ``iter_torch_batches`` expects (Ray 2.47 deprecated plain
    functions, with a warning per worker and epoch)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ToTensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return _to_tensors(batch)

    return ToTensors()


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 pixels to the model range ``[N, 3, H, W]`` in [-1, 1]; masks to float."""
    from facemae.models.fr import to_model_range

    out = dict(batch)
    out["image"] = to_model_range(batch["image"])
    if "mask" in out:
        out["mask"] = out["mask"].float()
    return out


def batches_per_epoch(rows: int, *, workers: int, micro_batch: int) -> int:
    """An epoch of a Ray Train worker: its share of one pass over ``rows`` images, in micro-batches, the
    same count on every rank so that their steps pair up."""
    return rows // (max(1, workers) * micro_batch)


class RayContext(WorkerContext):
    """Inside a Ray Train worker: the dataset shard, ``ray.train.report`` and Ray's checkpoints."""

    def __init__(self, config: Config, *, num_classes: int, rows: int, progress_actor: Any = None,
                 tracked: TrackedRun | None = None) -> None:
        import ray.train
        import ray.train.torch

        tc = ray.train.get_context()
        # DeepSpeed's ZeRO gathers call torch's deprecated all_gather_into_tensor: one FutureWarning per
        # call site and rank, hundreds per run, about code that is not ours to change.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor", category=FutureWarning)
        if not config.train.use_gpu:
            # Workers share the node's cores: one intra-op thread per reserved CPU, not one per core each
            # (with 2 threads each, 2 workers on 2 cores ran up to 25x slower here).
            torch.set_num_threads(max(1, round(config.train.cpus_per_worker)))
        super().__init__(config, rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                         device=ray.train.torch.get_device(), num_classes=num_classes,
                         run_dir=config.run_dir(), in_ray=True, tracked=tracked)
        self._shard = ray.train.get_dataset_shard("train")
        self._progress = progress_actor
        self._per_epoch = batches_per_epoch(rows, workers=self.world_size, micro_batch=config.train.micro_batch)
        self._stream: Iterator[dict[str, torch.Tensor]] | None = None

    def batches(self, epoch: int, *, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's next ``per_epoch - skip`` batches of the run's one stream.

        The dataset holds every epoch's pass back to back (:func:`facemae.train.trainer.training_dataset`)
        and is iterated once: an epoch's first batches come as fast as any other's, where a fresh
        iteration per epoch waited seconds for Ray Data to start its pipeline again. A resume takes the
        rest of the interrupted epoch from the stream: exact in count, not in which rows (Ray Data's
        streaming split does not replay a pass in the same order; see README). Should the stream end
        early (skipped non-finite batches used it up), the next iteration of the dataset continues it.
        """
        wanted = self._per_epoch - skip
        while wanted > 0:
            fresh = self._stream is None
            if fresh:
                self._stream = self.drop_corrupt(self._iterate())
            taken = 0
            for batch in itertools.islice(self._stream, wanted):
                taken += 1
                yield batch
            wanted -= taken
            if wanted > 0:
                self._stream = None  # ended: every rank ends it at the same batch (an equal split)
                if fresh and taken == 0:
                    return

    def _iterate(self) -> Iterator[dict[str, torch.Tensor]]:
        train = self.config.train
        return iter(self._shard.iter_torch_batches(batch_size=train.micro_batch, drop_last=True,
                                                   prefetch_batches=train.prefetch_batches,
                                                   collate_fn=_tensor_collate(),
                                                   local_shuffle_buffer_size=train.shuffle_buffer or None))

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        import ray.train
        import torch.distributed as dist

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if not self.config.train.resume_from:
                yield None
                return
            with storage.local_folder(self.config.train.resume_from) as directory:  # downloaded when remote
                self._restoring = directory
                yield directory
            return
        if storage.is_remote(self.config.run_dir()):
            # Each rank downloads into its own folder. as_directory() shares one per node, and a rank
            # that takes its lock after another's download ended downloads again over the files the
            # other is reading (seen here: an empty run_totals.json on S3).
            with storage.scratch_folder(f"restore-rank{self.rank}") as directory:
                self._restoring = checkpoint.to_directory(directory)
                yield directory
            return
        with checkpoint.as_directory() as directory:
            self._restoring = directory
            yield directory
            dist.barrier()  # keep the folder until every rank has read it (ray-project/ray#57118)

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[str]:
        with storage.scratch_folder("ckpt") as directory:
            yield directory

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        import ray.train

        metrics = self.run_metrics(metrics)
        self.write_metrics_line(metrics)
        self.track(metrics, directory)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        name = f"{CHECKPOINT_PREFIX}{metrics['step']:08d}" if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def observe(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *, step: int,
                step_s: float, wait_s: float) -> None:
        super().observe(batch, out, step=step, step_s=step_s, wait_s=wait_s)
        if self._progress is not None and self.rank == 0:
            self._progress.update.remote(step, {k: float(v.detach().float()) for k, v in out.items()})


class LocalContext(WorkerContext):
    """One process, no Ray: shards read with pyarrow, checkpoints in ``<run_dir>/checkpoint_<step>``."""

    def __init__(self, config: Config, *, files: list[str], num_classes: int, bar: Any = None,
                 tracked: TrackedRun | None = None) -> None:
        super().__init__(config, rank=0, world_size=1, device=torch.device("cpu"), num_classes=num_classes,
                         run_dir=config.run_dir(), in_ray=False, tracked=tracked)
        paths, fs = storage.for_arrow(files)
        names = pq.read_schema(paths[0], filesystem=fs).names
        columns = [c for c in ("image_id", "identity", "image", "teacher_emb") if c in names]
        tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in paths]
        self._rows = pa.concat_tables(tables).to_pydict()
        self._rows["path"] = [f for f, t in zip(files, tables) for _ in range(t.num_rows)]  # names a bad row's shard
        self._bar = bar

    def batches(self, epoch: int, *, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        return self.drop_corrupt(self._epoch(epoch, skip=skip))

    def _epoch(self, epoch: int, *, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        train, mask = self.config.train, self.config.mask
        n = len(self._rows["image_id"])
        order = np.random.default_rng([train.seed, epoch]).permutation(n)
        for i in range(skip, n // train.micro_batch):
            rows = order[i * train.micro_batch:(i + 1) * train.micro_batch]
            picked = {k: [v[j] for j in rows] for k, v in self._rows.items()}
            yield _to_tensors(training_batch(picked, task=train.task, num_patches=mask.num_patches,
                                             keep=mask.keep, flip=train.task == "fr",
                                             seed=[train.seed, epoch, i]))

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        location = latest_checkpoint(self.run_dir) or self.config.train.resume_from or None
        if location is None:
            yield None
            return
        with storage.local_folder(location) as directory:  # downloaded when on an object store
            self._restoring = directory
            yield directory

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[str]:
        """A folder to save into that appears at ``<run>/checkpoint_<step>`` whole or not at all: renamed
        into place locally; on an object store uploaded file by file with ``progress.json`` last, the
        file :func:`latest_checkpoint` waits for."""
        final = storage.join(self.run_dir, f"{CHECKPOINT_PREFIX}{step:08d}")
        remote = storage.is_remote(final)
        if not remote:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        tmp = storage.scratch(f"ckpt-{step:08d}", folder=True) if remote else \
            str(storage.sibling_temp(final, folder=True, suffix=""))
        try:
            yield tmp
            storage.delete_tree(final)
            if remote:
                storage.upload_folder(tmp, final, last=["progress.json"])
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        done = [name for name in storage.child_folders(self.run_dir) if name.startswith(CHECKPOINT_PREFIX)]
        for old in done[:-self.config.train.keep_checkpoints]:
            storage.delete_tree(storage.join(self.run_dir, old))

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        metrics = self.run_metrics(metrics)
        self.write_metrics_line(metrics)
        self.track(metrics, directory)
        if self._bar is not None:
            self._bar.update(metrics["step"] - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k})

    def observe(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *, step: int,
                step_s: float, wait_s: float) -> None:
        super().observe(batch, out, step=step, step_s=step_s, wait_s=wait_s)
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)


def _attempt_after(log: str) -> tuple[int, int]:
    """``(this start's attempt number, highest step logged so far)`` from a run's metrics.jsonl text."""
    lines = []
    for text in log.splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line cut short when a killed run was writing it
            continue
    if not lines:
        return 1, 0
    return lines[-1].get("attempt", 1) + 1, max(line.get("step", 0) for line in lines)


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder of a run (one with ``progress.json``), or None; a local
    path or an object-store URL, as ``run_dir`` is."""
    for name in reversed(storage.child_folders(run_dir)):
        if name.startswith(CHECKPOINT_PREFIX) and storage.is_file(storage.join(run_dir, name, "progress.json")):
            return storage.join(run_dir, name)
    return None
