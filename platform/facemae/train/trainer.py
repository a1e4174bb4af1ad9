"""The driver side of training: Ray Data + ``TorchTrainer`` (or one local process), then weight export.

Ray Data reads the training shards (``read_parquet``, file order shuffled every epoch), decodes and
masks them in ``map_batches`` and streams each worker its split; the driver never materialises the
dataset. Runs live in ``<train.storage_path>/<name>``; rerunning with the same name resumes from the
run's latest checkpoint (Ray Train V2 keeps the run's state there).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from facemae import console, storage
from facemae.config import Config, TrainConfig, from_dict
from facemae.data.shards import verify_dataset
from facemae.losses.irm import view_name
from facemae.losses.partial_fc import merge_shards
from facemae.models.weights import HEAD, WEIGHTS, WEIGHTS_INFO, save_head, save_weights
from facemae.tracking import TrackedRun, log_weights, tracked_run
from facemae.train.context import METRICS_LOG, LocalContext, RayContext, batches_per_epoch, latest_checkpoint
from facemae.train.engine import (check_checkpoint, import_deepspeed, read_checkpoint_file, tag_folder,
                                  weights_only_loads)
from facemae.train.loop import PROGRESS, run

EXPORT_DIR = "export"
# Read tasks of a training stream at most: planning costs Ray Data ~2.5 ms per input block here, so 512
# keep the stream's start near a second however many passes a run needs (the main job's: 49 reads).
STREAM_TASKS = 512


@dataclass
class TrainResult:
    """What a training run left behind."""

    run_dir: str
    checkpoint: str | None  # newest checkpoint folder (DeepSpeed state of every rank)
    weights: str | None  # exported inference weights (safetensors)
    metrics: dict[str, Any]  # last reported metrics


def train(config: Config, *, dataset: str | None = None, split: str = "train",
          callbacks: Sequence[Any] = (), show_progress: bool = True) -> TrainResult:
    """Trains ``config.train.task`` on one split of a dataset.

    Args:
        config: Validated config.
        dataset: Original or released dataset folder; defaults to ``config.data.output``.
        split: ``train`` (FaceMAE, the teacher, the judge) or ``deploy`` (FR models trained on a
            released dataset of the deployment identities).
        callbacks: Ray Train ``UserCallback``s (a Tune trial passes ``TuneReportCallback``).
        show_progress: The driver's progress bar (Tune trials turn it off: their logs are files).
    """
    storage.configure(**asdict(config.storage))  # where s3:// locations of the config point
    root = dataset or config.data.output
    manifest = verify_dataset(root, splits=[split])  # what this run reads: a trainer never opens deploy originals
    files = manifest.files(root, split)
    if not files:
        raise ValueError(f"{root} has no {split} shards; ingest with 0 < data.deploy_fraction < 1")
    num_classes = max(manifest.identities(split)) + 1  # identity labels index the class centres
    _check_teacher_view(config, manifest.source, root)
    if (done := finished_run(config)) is not None:
        return done
    _check_frozen_nets(config)
    _check_init_weights(config, num_classes)
    # One MLflow run per run folder (tracking.mlflow_uri): opened here, logged to by rank 0, ended here.
    with tracked_run(config, folder=config.run_dir(), name=config.name, kind="train") as tracked:
        if config.train.num_workers == 0:
            result = _train_local(config, files, num_classes, tracked=tracked)
        else:
            result = _train_ray(config, files, num_classes, rows=manifest.num_images(split),
                                callbacks=list(callbacks), show_progress=show_progress, tracked=tracked)
        if result.checkpoint:
            result.weights = export_weights(result.checkpoint, config, storage.join(result.run_dir, EXPORT_DIR))
        log_weights(tracked, result.weights)
    return result


def _check_teacher_view(config: Config, source: dict[str, Any], root: str) -> None:
    """Stored teacher embeddings must be of the IRM view this run trains with (``loss.irm_view``)."""
    if config.train.task != "mae" or config.loss.lambda_irm == 0 or "embedded_from" not in source:
        return
    stored, wanted = source.get("teacher_view", "raw"), view_name(config.loss.irm_view, config.loss.irm_blur_sigma)
    if stored != wanted:
        raise ValueError(f"{root} holds teacher embeddings of the {stored!r} IRM view but this run trains with "
                         f"{wanted!r} (loss.irm_view / loss.irm_blur_sigma); train on {source['embedded_from']} "
                         "re-embedded with this config (facemae.generate.embed.embed_dataset), or match the loss")


def _check_frozen_nets(config: Config) -> None:
    """The teacher and judge a FaceMAE run will load, checked on the driver before any Ray work: a missing
    or wrong file fails once, in one line naming the config key, instead of in every worker after start-up.

    Raises:
        WeightsError: ``train.teacher=<path>: ...`` or ``train.judge=<path>: ...`` and what to pass instead.
    """
    from facemae.models.weights import WeightsError, check_weights

    train = config.train
    if train.task != "mae":
        return
    needed = []
    if train.teacher and (config.loss.lambda_irm > 0 or train.val_every):  # IRM, or validation's val_irm
        needed.append(("train.teacher", train.teacher))
    if train.judge and train.val_every:  # validation's leaks
        needed.append(("train.judge", train.judge))
    for key, path in needed:
        try:
            check_weights(path, task="fr")
        except WeightsError as exc:
            raise WeightsError(f"{key}={path}: {exc}") from None


def _check_init_weights(config: Config, num_classes: int) -> None:
    """``train.init_weights`` (and the head beside it) checked on the driver before any Ray work.

    Raises:
        WeightsError: ``train.init_weights=<path>: ...`` and what to change.
    """
    from facemae.models.weights import WeightsError, check_init_weights

    train = config.train
    if not train.init_weights:
        return
    model = config.model.mae if train.task == "mae" else (train.fr_backbone or config.model.fr)
    try:
        check_init_weights(train.init_weights, task=train.task, model=model,
                           embedding_size=config.model.embedding_size,
                           num_classes=num_classes if train.task == "fr" and train.init_head else None)
    except WeightsError as exc:
        raise WeightsError(f"train.init_weights={train.init_weights}: {exc}") from None


def finished_run(config: Config) -> TrainResult | None:
    """The result of a run of this name that already reached ``train.max_steps`` and exported its
    weights from that last checkpoint, or None. Resuming it would restore, train nothing and export
    the same weights again; this skips that, whether the run trained on Ray workers or in-process."""
    import json

    run_dir = config.run_dir()
    checkpoint = latest_checkpoint(run_dir)
    info = storage.join(run_dir, EXPORT_DIR, "weights.json")
    if checkpoint is None or not storage.is_file(info):
        return None
    step = json.loads(storage.read_text(storage.join(checkpoint, PROGRESS))).get("step", 0)
    if step < config.train.max_steps or json.loads(storage.read_text(info)).get("checkpoint") != checkpoint:
        return None
    if config.train.task == "fr" and not storage.is_file(storage.join(run_dir, EXPORT_DIR, HEAD)):
        return None  # exported before FR runs kept their head: restoring exports it (and the same weights) again
    return TrainResult(run_dir=run_dir, checkpoint=checkpoint,
                       weights=storage.join(run_dir, EXPORT_DIR, "weights.safetensors"), metrics=_last_metrics(run_dir))


def _train_local(config: Config, files: list[str], num_classes: int, *, tracked: TrackedRun | None) -> TrainResult:
    from facemae.train.engine import ensure_process_group

    ensure_process_group()
    run_dir = config.run_dir()
    storage.make_dirs(run_dir)
    with tqdm(total=config.train.max_steps, desc=f"train {config.train.task}", unit="step",
              file=console.bar_stream()) as bar:
        ctx = LocalContext(config, files=files, num_classes=num_classes, bar=bar, tracked=tracked)
        run(config, ctx)
    return TrainResult(run_dir=run_dir, checkpoint=latest_checkpoint(run_dir), weights=None,
                       metrics=_last_metrics(run_dir))


def _train_ray(config: Config, files: list[str], num_classes: int, *, rows: int, callbacks: list[Any],
               show_progress: bool, tracked: TrackedRun | None) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from facemae.cluster import ensure_ray, input_errors_unwrapped

    train = config.train
    # Ray Train keeps the run (its state, the checkpoints) through the same pyarrow filesystem as ours,
    # so an S3-compatible store's endpoint reaches it: a bare s3:// URL would go to AWS itself.
    (root,), filesystem = storage.for_arrow([train.storage_root()])
    ensure_ray(config.ray)
    progress = _start_progress_actor()
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        _worker_entry,
        # The config's folders absolute: each worker starts in a working directory of its own.
        train_loop_config={"config": config.absolute().to_dict(), "num_classes": num_classes, "rows": rows,
                           "progress": progress, "tracked": tracked, "storage": storage.options()},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=config.name, storage_path=root, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             callbacks=callbacks or None),
        datasets={"train": training_dataset(config, files, passes=passes_needed(config.train, rows))})
    with input_errors_unwrapped():  # a corrupt row: its one-line message, not Train's worker tracebacks
        result = _fit_with_progress(trainer, progress, total=train.max_steps, desc=f"train {train.task}",
                                    disable=not show_progress)
    ray.kill(progress)
    checkpoint = storage.join(config.run_dir(), result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]) \
        if result.checkpoint else None
    return TrainResult(run_dir=config.run_dir(), checkpoint=checkpoint, weights=None,
                       metrics=dict(result.metrics or {}))


def passes_needed(train: TrainConfig, rows: int) -> int:
    """Passes over ``rows`` training images that ``train.max_steps`` optimizer steps consume from scratch,
    plus one to spare (a resume needs fewer; batches the step guard skips use up a few more)."""
    per_epoch = max(1, batches_per_epoch(rows, workers=train.num_workers, micro_batch=train.micro_batch))
    return -(-train.max_steps * train.grad_accum // per_epoch) + 1


def training_dataset(config: Config, files: list[str], *, passes: int = 1) -> Any:
    """The streaming Ray Dataset of training batches: ``passes`` passes over ``files`` back to back, each
    in its own file order (``train.seed`` and the pass), decoded, flipped or masked afresh as they stream.

    Workers iterate it once for the whole run (:class:`facemae.train.context.RayContext`), so an epoch
    boundary does not restart Ray Data's pipeline. The stream reads each file once per pass, in that order
    (``read_parquet`` would read a path listed twice once), one task per file and pass up to
    ``STREAM_TASKS`` tasks, beyond which consecutive reads share a task: a long run over a few shards
    (100,000 steps over 3 shards: 100,000 reads) would otherwise wait minutes for Ray Data to plan its
    blocks before the first batch. Each row carries its shard file
    (``path``) so that a corrupt image can be named by dataset, shard and image_id; it stays in its
    batch, marked, for the worker to raise for or, with ``data.skip_corrupt``, to drop and count.
    """
    import numpy as np
    import pyarrow.parquet as pq
    import ray.data

    from facemae.data.stream import per_file
    from facemae.data.transforms import columns_for, training_file_batches

    paths, fs = storage.for_arrow(files)
    columns = columns_for(pq.read_schema(paths[0], filesystem=fs).names)
    order = [paths[i] for p in range(passes)
             for i in np.random.default_rng([config.train.seed, p]).permutation(len(paths))]
    # The driver shows one training progress bar; per-operator bars of every epoch would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return per_file(order, training_file_batches,
                    fn_kwargs={"filesystem": fs, "columns": columns, "micro_batch": config.train.micro_batch,
                               "task": config.train.task, "num_patches": config.mask.num_patches,
                               "keep": config.mask.keep}, tasks=STREAM_TASKS)


def _worker_entry(loop_config: dict[str, Any]) -> None:
    storage.configure(**loop_config.get("storage", {}))  # the driver's endpoint: a worker is another process
    config = from_dict(Config, loop_config["config"]).validate()
    ctx = RayContext(config, num_classes=loop_config["num_classes"], rows=loop_config["rows"],
                     progress_actor=loop_config["progress"], tracked=loop_config.get("tracked"))
    run(config, ctx)


def _fit_with_progress(trainer: Any, progress: Any, *, total: int, desc: str, disable: bool = False) -> Any:
    """Runs ``trainer.fit()`` in a thread while the driver shows a progress bar fed by rank 0."""
    import ray

    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=_capture(trainer.fit)), daemon=True)
    thread.start()
    with tqdm(total=total, desc=desc, unit="step", mininterval=1.0, disable=disable,
              file=console.bar_stream()) as bar:
        while thread.is_alive():
            thread.join(timeout=0.5)
            step, losses = ray.get(progress.get.remote())
            if step > bar.n:
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if "loss" in k}, refresh=False)
                bar.update(step - bar.n)
    outcome = box["result"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _capture(fn: Any) -> Any:
    try:
        return fn()
    except BaseException as exc:  # re-raised on the driver's main thread
        return exc


def _last_metrics(run_dir: str) -> dict[str, Any]:
    import json

    log = storage.join(run_dir, METRICS_LOG)
    lines = storage.read_text(log).splitlines() if storage.is_file(log) else []
    return json.loads(lines[-1]) if lines else {}


def export_weights(checkpoint: str, config: Config, out_dir: str) -> str:
    """Writes inference weights (fp32 safetensors) from a DeepSpeed checkpoint of any ZeRO stage; both
    may be local folders or object-store locations. An FR run's class centres go beside them as one ordinary
    ``[C, D]`` head (``head.safetensors``), a Partial FC run's shards merged.

    Returns:
        The ``weights.safetensors`` location.
    """
    with storage.local_folder(checkpoint) as local:  # DeepSpeed's merger reads files by name
        state = consolidated_state(local)
        if config.train.task == "fr":
            head = state.get("head.weight")  # the full head, or the Partial FC shards merged into one
            state["head.weight"] = merge_shards(tag_folder(local)) if head is None else head
    prefix = "mae." if config.train.task == "mae" else "backbone."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    name = config.model.mae if config.train.task == "mae" else (config.train.fr_backbone or config.model.fr)
    from facemae.models.registry import build_fr, build_mae

    module = build_mae(name, norm_pix_loss=config.loss.norm_pix_loss) if config.train.task == "mae" \
        else build_fr(name, embedding_size=config.model.embedding_size)
    module.load_state_dict(weights)
    info = {"task": config.train.task, "model": name, "embedding_size": config.model.embedding_size,
            "norm_pix_loss": config.loss.norm_pix_loss, "run": config.name, "checkpoint": str(checkpoint)}
    loss = config.loss
    head_info = {**info, "margin": loss.margin, "s": loss.s, "m": loss.margin_m, "trained_with": config.model.head}

    def write(folder: str) -> Path:
        if config.train.task == "fr":
            save_head(state["head.weight"], {**head_info, "num_classes": len(state["head.weight"])}, folder)
        return save_weights(module, folder, info)

    if not storage.is_remote(out_dir):
        return str(write(out_dir))
    with storage.scratch_folder("export") as tmp:
        write(tmp)
        storage.upload_folder(tmp, out_dir, last=[WEIGHTS_INFO])  # weights.json last: finished_run() reads it
    return storage.join(out_dir, WEIGHTS)


def consolidated_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 module state of a DeepSpeed checkpoint folder (ZeRO shards merged).

    Raises:
        UntrustedCheckpointError: A file of the folder could run code when loaded (the message names it).
    """
    tag_dir = check_checkpoint(checkpoint)  # DeepSpeed's merger below unpickles with weights_only=False
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not list(tag_dir.glob("*optim_states.pt")) and states.exists():  # ZeRO stage 0
        module = read_checkpoint_file(states)["module"]
        return {k: v.float() for k, v in module.items()}
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))


def _start_progress_actor() -> Any:
    """A tiny actor holding rank 0's latest step and losses, polled by the driver's progress bar."""
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.step, self.losses = 0, {}

        def update(self, step: int, losses: dict[str, float]) -> None:
            self.step, self.losses = step, losses

        def get(self) -> tuple[int, dict[str, float]]:
            return self.step, self.losses

    return Progress.remote()
