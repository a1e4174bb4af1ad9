"""The figures of ``run_all.py`` that need the Ray path: the main job's data wait, Ray Data against the
training step and against a torch DataLoader, DeepSpeed-on-Ray against DDP, and a training process's
memory against its state.

- ``data_wait``: the main job (``jobs/train.py``, ``train.yaml``) run whole in a subprocess; rank 0's
  seconds waiting for data over its seconds of compute and waiting (``data_wait_total_s`` and
  ``compute_total_s`` of the FaceMAE run's last ``metrics.jsonl`` line), epoch starts included.
- ``data_headroom``: images/s that the training dataset (read, decode, mask, batch, local shuffle) delivers
  to one worker through Ray Train's streaming split, over several passes in one stream as a run reads
  them, start-up included, over the images/s the main job's FaceMAE step consumes (workers x
  micro-batch / its median compute time per step).
- ``data_vs_dataloader``: the same images/s over a torch DataLoader reading the same shards with the
  same transform and shuffle buffer, as many loader processes as the Ray cluster has CPUs.
- ``ray_ds_overhead``: one training step of the DeepSpeed engine (``train.yaml``: ZeRO-2, AdamW) inside
  Ray Train workers over a plain DDP step with torch's AdamW, same model, batch and processes.
- ``worker_memory``: peak RSS of a process training ``experiment.yaml``'s FaceMAE (in-process, as that
  config trains) less the framework's fixed cost (a process that imports the same libraries and
  starts the process group), over the state lower bound (fp32 weights, gradients and both AdamW
  moments of the trained parameters, plus the frozen teacher's weights).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from facemae import console
from facemae.allocator import retain_freed_memory
from facemae.config import Config, load_config

from figures import figure

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
GIB = 2 ** 30


@dataclasses.dataclass
class MainRun:
    """Where the benchmark's main-job run left its FaceMAE run and the dataset it trained on."""

    config: Config
    run_dir: Path
    dataset: Path  # the originals with the teacher's embeddings: what FaceMAE trains on
    teacher: Path  # the teacher's exported weights


QUICK = ["data.num_identities=40", "train.max_steps=20", "train.teacher_steps=10", "train.checkpoint_every=10"]


def run_main_job(work: Path, *, quick: bool = False) -> MainRun:
    """``python jobs/train.py`` on ``train.yaml`` with its data and runs under ``work`` (its own embedded
    Ray); ``quick``: a fifth of the faces and a few steps (a smoke run of the script)."""
    work = work / "main-job"
    work.mkdir()
    overrides = [f"data.output={work / 'data'}", f"train.storage_path={work / 'runs'}", *(QUICK if quick else [])]
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), *[a for o in overrides for a in ("--set", o)]]
    console.say("[perf] main job: " + " ".join(command[1:]))
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the main job failed (rc {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    config = load_config(CONFIGS / "train.yaml", overrides)
    (dataset,) = work.glob("data-teacher-*")
    return MainRun(config=config, run_dir=Path(config.run_dir()), dataset=dataset,
                   teacher=work / "runs" / f"{config.name}-teacher" / "export" / "weights.safetensors")


def last_attempt(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` that the run's last start wrote."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["attempt"] == lines[-1]["attempt"]]


def data_wait_figure(run: MainRun) -> dict[str, Any]:
    lines = last_attempt(run.run_dir)
    compute, wait = lines[-1]["compute_total_s"], lines[-1]["data_wait_total_s"]
    fraction = wait / (compute + wait)
    return figure(fraction, None, ratio=fraction, goal="< 0.05", unit="of the time",
                  how=f"main job (train.yaml, {run.config.train.num_workers} workers, {lines[-1]['step']} steps): "
                      f"rank 0 waited {wait:.1f} s for data in {compute + wait:.1f} s of batches")


def consumption(run: MainRun) -> float:
    """Images/s the main job's FaceMAE training consumes when it never waits: all workers' micro-batches
    over the median compute time of a step (rank 0's reports)."""
    train = run.config.train
    step = statistics.median(m["step_time_s"] for m in last_attempt(run.run_dir))
    return train.num_workers * train.micro_batch / step


@dataclasses.dataclass
class Delivery:
    """How a loader delivered a stream of passes: images/s over the whole stream, start-up included
    (a run starts its loader once), and the wait for the first batch."""

    rate: float
    first_s: float
    images: int

    @property
    def running_rate(self) -> float:
        """Images/s once the first batch is in: the rate with the start-up left out."""
        return self.images / (self.images / self.rate - self.first_s)


def _delivery(batches: Any) -> Delivery:
    start = time.perf_counter()
    first, images = None, 0
    for batch in batches:
        first = first or time.perf_counter()
        images += len(batch["identity"])
    return Delivery(rate=images / (time.perf_counter() - start), first_s=first - start, images=images)


def ray_data_delivery(config: Config, files: list[str], *, passes: int) -> Delivery:
    """The training dataset (``passes`` passes in one stream, as a run reads it) to one consumer of a
    streaming split, through the worker's ``iter_torch_batches``."""
    from facemae.train.context import _tensor_collate
    from facemae.train.trainer import training_dataset

    train = config.train
    (split,) = training_dataset(config, files, passes=passes).streaming_split(1, equal=True)
    return _delivery(split.iter_torch_batches(batch_size=train.micro_batch, drop_last=True,
                                              prefetch_batches=train.prefetch_batches, collate_fn=_tensor_collate(),
                                              local_shuffle_buffer_size=train.shuffle_buffer or None))


class ShardBatches(torch.utils.data.IterableDataset):
    """The training batches of Parquet shards for a torch DataLoader, as numpy: each loader process reads
    its share of the (file, pass) list and applies the same transform as the Ray Data pipeline."""

    def __init__(self, files: list[str], *, passes: int, micro_batch: int, num_patches: int, keep: int) -> None:
        self.files = [f for p in range(passes) for f in np.random.default_rng(p).permutation(files)]
        self.micro_batch, self.num_patches, self.keep = micro_batch, num_patches, keep

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from facemae.data.transforms import columns_for, training_file_batches

        info = torch.utils.data.get_worker_info()
        mine = self.files[info.id::info.num_workers] if info else self.files
        columns = columns_for(pq.read_schema(self.files[0]).names)
        for path in mine:  # the Ray Data task's own function, one file at a time
            yield from training_file_batches(pa.table({"path": [path]}), filesystem=None, columns=columns,
                                             micro_batch=self.micro_batch, task="mae", num_patches=self.num_patches,
                                             keep=self.keep)


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def local_shuffle(batches: Iterator[dict[str, np.ndarray]], *, buffer: int, batch_size: int,
                  seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data's local shuffle buffer for the DataLoader's consumer: once ``buffer`` rows and a batch
    are held, the rows are shuffled and batches are cut until ``buffer`` rows are left; full batches only."""
    rng = np.random.default_rng(seed)
    held: list[dict[str, np.ndarray]] = []
    rows = 0
    for batch in batches:
        held.append(batch)
        rows += len(batch["identity"])
        if rows < buffer + batch_size:
            continue
        block = {k: np.concatenate([b[k] for b in held]) for k in batch}
        order = rng.permutation(rows)
        block = {k: v[order] for k, v in block.items()}
        start = 0
        while rows - start >= buffer + batch_size:
            yield {k: v[start:start + batch_size] for k, v in block.items()}
            start += batch_size
        held, rows = [{k: v[start:] for k, v in block.items()}], rows - start
    if held:
        block = {k: np.concatenate([b[k] for b in held]) for k in held[0]}
        order = rng.permutation(rows)
        for start in range(0, rows - batch_size + 1, batch_size):
            yield {k: v[order[start:start + batch_size]] for k, v in block.items()}


def dataloader_delivery(config: Config, files: list[str], *, passes: int, workers: int) -> Delivery:
    """The same passes through a torch DataLoader with ``workers`` processes; its consumer shuffles in a
    buffer of ``train.shuffle_buffer`` rows and converts to tensors, as a Ray Train worker's iterator does."""
    from facemae.train.context import _to_tensors

    train = config.train
    loader = torch.utils.data.DataLoader(
        ShardBatches(files, passes=passes, micro_batch=train.micro_batch, num_patches=config.mask.num_patches,
                     keep=config.mask.keep), batch_size=None, num_workers=workers, prefetch_factor=2, collate_fn=_as_is)
    batches = local_shuffle(iter(loader), buffer=train.shuffle_buffer, batch_size=train.micro_batch) \
        if train.shuffle_buffer else loader
    return _delivery(_to_tensors(b) for b in batches)


def data_figures(run: MainRun, *, passes: int) -> dict[str, dict[str, Any]]:
    """``data_headroom`` and ``data_vs_dataloader`` over the FaceMAE run's own training shards."""
    import ray

    from facemae.cluster import ensure_ray
    from facemae.data.shards import read_manifest

    config = run.config
    files = read_manifest(run.dataset).files(run.dataset, "train")
    ensure_ray(config.ray)
    cpus = int(ray.cluster_resources()["CPU"])
    # One pass of each first: Ray's worker processes and the page cache warm, as on a running cluster.
    ray_data_delivery(config, files, passes=1)
    ray_data = ray_data_delivery(config, files, passes=passes)
    needed = consumption(run)
    dataloader_delivery(config, files, passes=1, workers=cpus)
    loader = dataloader_delivery(config, files, passes=passes, workers=cpus)
    stream = f"{passes} passes over {ray_data.images // passes} training faces in one stream (warm: after one pass)"
    out = {"data_headroom": figure(ray_data.rate, needed, goal=">= 4.0", unit="images/s",
                                   how=f"Ray Data, {stream}, to one streaming-split consumer on {cpus} CPUs, start-up "
                                       f"included (first batch after {ray_data.first_s:.1f} s) vs the main job's "
                                       f"FaceMAE step ({config.train.num_workers} workers x "
                                       f"{config.train.micro_batch} faces per median step)"),
           "data_vs_dataloader": figure(ray_data.rate, loader.rate, goal=">= 1.0", unit="images/s",
                                        how=f"the same vs a torch DataLoader with {cpus} processes over the same "
                                            f"shards, transform and shuffle buffer ({config.train.shuffle_buffer} rows; first batch after "
                                            f"{loader.first_s:.1f} s); start-up apart, {ray_data.running_rate:.0f} vs "
                                            f"{loader.running_rate:.0f} images/s "
                                            f"({ray_data.running_rate / loader.running_rate:.2f})")}
    for name in out:
        console.say(f"[perf] {name} {out[name]['ratio']:.3f}")
    return out


def _ds_vs_ddp(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker: the DeepSpeed engine's step and a DDP step of the same model, timed in turns."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from facemae.config import from_dict
    from facemae.train.engine import build_engine
    from facemae.train.tasks import build_task

    config = from_dict(Config, loop_config["config"]).validate()
    torch.set_num_threads(max(1, round(config.train.cpus_per_worker)))  # as RayContext
    retain_freed_memory()  # as WorkerContext
    world = ray.train.get_context().get_world_size()
    batch = _random_batch(config)
    timed: dict[str, list[float]] = {"deepspeed": [], "ddp": []}
    torch.manual_seed(0)
    engine = build_engine(build_task(config, num_classes=2, device=torch.device("cpu")), config.train,
                          world_size=world)
    engine.module.step = config.train.max_steps  # IRM at its full weight, as in most of a run
    torch.manual_seed(0)
    plain = build_task(config, num_classes=2, device=torch.device("cpu"))
    plain.step = config.train.max_steps
    ddp = DistributedDataParallel(plain)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=config.train.peak_lr(world), betas=(0.9, 0.95))

    def ds_step() -> None:
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()

    def ddp_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        ddp(batch)["loss"].backward()
        optimizer.step()

    for fn in (ds_step, ddp_step, ds_step, ddp_step):  # warm-up
        fn()
    for _ in range(loop_config["repeats"]):  # in turns: both see the same moments of the machine
        for name, fn in (("deepspeed", ds_step), ("ddp", ddp_step)):
            start = time.perf_counter()
            for _ in range(loop_config["inner"]):
                fn()
            timed[name].append((time.perf_counter() - start) / loop_config["inner"])
    medians = {name: statistics.median(times) for name, times in timed.items()}
    # The ratio of each round, then their median: a drift of the machine's speed between rounds cancels.
    medians["ratio"] = statistics.median(d / p for d, p in zip(timed["deepspeed"], timed["ddp"]))
    # Train V2's result holds the metrics of the last checkpoint only: rank 0 reports one with them.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "times.json").write_text(json.dumps(medians))
        ray.train.report(medians, checkpoint=ray.train.Checkpoint.from_directory(folder)
                         if ray.train.get_context().get_world_rank() == 0 else None)


def _random_batch(config: Config) -> dict[str, torch.Tensor]:
    """A FaceMAE training batch of random faces, in the model's input form."""
    from facemae.data.transforms import random_masks

    n = config.train.micro_batch
    masks = random_masks(n, num_patches=config.mask.num_patches, keep=config.mask.keep, rng=np.random.default_rng(0))
    return {"image": torch.rand(n, 3, 112, 112) * 2 - 1, "identity": torch.arange(n),
            "mask": torch.from_numpy(masks).float(), "teacher_emb": torch.randn(n, config.model.embedding_size)}


def ray_ds_figure(run: MainRun, work: Path, *, repeats: int) -> dict[str, Any]:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a script's module: workers cannot import it
    config = dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, teacher=str(run.teacher)))
    train = config.train
    trainer = TorchTrainer(_ds_vs_ddp, train_loop_config={"config": config.to_dict(), "repeats": repeats, "inner": 3},
                           scaling_config=ScalingConfig(num_workers=train.num_workers,
                                                        resources_per_worker={"CPU": train.cpus_per_worker}),
                           run_config=RunConfig(name="ds-vs-ddp", storage_path=str(work / "ray-bench")))
    times = trainer.fit().metrics
    out = figure(times["deepspeed"], times["ddp"], ratio=times["ratio"], goal="<= 1.10", unit="s/step",
                 how=f"train.yaml {config.model.mae} + IRM, ZeRO-{train.zero_stage} {train.precision}, "
                     f"{train.num_workers} Ray Train workers x {train.micro_batch}: DeepSpeed step "
                     f"{times['deepspeed'] * 1e3:.1f} ms vs DDP + AdamW {times['ddp'] * 1e3:.1f} ms "
                     f"(medians of {repeats} rounds of 3 steps each, in turns; the ratio is the median of the "
                     "rounds' ratios)")
    console.say(f"[perf] ray_ds_overhead {out['ratio']:.3f}")
    return out


FIXED_COST = """
import torch, deepspeed, ray.data
import facemae.train.trainer
from facemae.metrics import peak_rss_gib
from facemae.train.engine import ensure_process_group
ensure_process_group()
print(peak_rss_gib())
"""


def saved_for_backward(forward: Any) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``forward()`` (activations)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def worker_memory_figure(run: MainRun, work: Path, *, steps: int = 30) -> dict[str, Any]:
    """``experiment.yaml``'s FaceMAE trained in its own process on the main job's embedded shards."""
    from facemae.train.tasks import build_task

    overrides = [f"train.storage_path={work / 'memory-runs'}", f"train.max_steps={steps}",
                 f"train.checkpoint_every={steps}", f"train.teacher={run.teacher}", "train.warmup_steps=5"]
    code = ("import sys; from facemae.config import load_config; from facemae.train.trainer import train; "
            f"train(load_config({str(CONFIGS / 'experiment.yaml')!r}, sys.argv[2:]), dataset=sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(run.dataset), *overrides], cwd=work, check=True,
                   capture_output=True)
    config = load_config(CONFIGS / "experiment.yaml", overrides)
    peak = last_attempt(Path(config.run_dir()))[-1]["rss_peak_gib"]
    fixed = float(subprocess.run([sys.executable, "-c", FIXED_COST], check=True, capture_output=True,
                                 text=True).stdout.split()[-1])
    task = build_task(config, num_classes=2, device=torch.device("cpu"))
    task.step = config.train.max_steps  # IRM on: the step at its largest
    trained = sum(p.numel() for p in task.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in task.teacher.parameters())
    state = (16 * trained + 4 * frozen) / GIB  # fp32 weights + gradients + 2 AdamW moments; frozen weights
    activations = saved_for_backward(lambda: task(_random_batch(config))["loss"]) / GIB
    out = figure(peak - fixed, state, goal="<= 2.0", unit="GiB",
                 how=f"experiment.yaml {config.model.mae} + IRM, batch {config.train.micro_batch}, in-process: "
                     f"peak RSS {peak:.3f} GiB less the framework's {fixed:.3f} GiB (torch, DeepSpeed, Ray "
                     f"imported, process group up) over the state bound {state * 1024:.1f} MiB "
                     f"({trained / 1e6:.2f} M trained, {frozen / 1e6:.2f} M frozen parameters). The step's "
                     f"tensors saved for backward take {activations:.3f} GiB: "
                     f"{(peak - fixed) / (state + activations):.2f}x state and activations together")
    console.say(f"[perf] worker_memory {out['ratio']:.3f}")
    return out
