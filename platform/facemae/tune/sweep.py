"""A Ray Tune sweep over FaceMAE training.

Each trial is a function that builds and fits its own ``TorchTrainer`` (Ray Train V2 does not take a
trainer inside ``Tuner``; REFERENCE.md 4): the same DeepSpeed loop as ``jobs/train.py``, under the
run name ``<name>-sweep-<trial id>``, so a restored sweep resumes each unfinished trial from its own
latest checkpoint. ``TuneReportCallback`` forwards rank 0's reports; every report carries the
validation of :mod:`facemae.train.validation` (utility ``val_irm``, privacy ``val_identity_leak@1``
by the judge, and ``val_objective``), which ASHA compares.

Before the trials, the sweep prepares what they share, reusing finished work: the dataset, the
frozen IRM teacher, the privacy judge and the teacher's embeddings of the originals.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from facemae import console, storage
from facemae.config import Config, RayConfig, from_dict, set_dotted
from facemae.tracking import TrackedRun, job_run, log_folder, nested_under
from facemae.tune.report import pareto_front, write_sweep_report

METRIC, MODE = "val_objective", "min"
REPORTED = ("val_objective", "val_irm", "val_identity_leak@1", "val_image_leak@1", "val_recon_loss")
DATA_CPUS = 0.5  # headroom per trial for its Ray Data read/decode tasks (REFERENCE.md table, row A)


@dataclass
class SweepResult:
    """What a sweep left behind."""

    path: str  # Tune experiment folder (restorable)
    best_config: dict[str, Any]  # the best trial's sampled values, dotted keys
    best_metrics: dict[str, Any]  # its last report
    best_checkpoint: str | None  # its newest DeepSpeed checkpoint folder
    best_weights: str | None  # its exported inference weights
    table: list[dict[str, Any]]  # one row per trial (params, status, val_* metrics, pareto)
    report: str  # pareto.md
    pareto_png: str


def run_sweep(config: Config, *, say: Callable[[str], None] = console.say, restore: bool = True) -> SweepResult:
    """Prepares the shared inputs, then runs (or, with ``restore``, resumes) the sweep.

    Raises:
        ValueError: An empty search space, or a trial the space makes impossible.
    """
    import ray

    from facemae.cluster import ensure_ray

    if not config.tune.space:
        raise ValueError("tune.space is empty; give at least one key, e.g. "
                         "--set 'tune.space={mask.ratio: {choice: [0.5, 0.75]}}'")
    _check_space(config)
    ensure_ray(_ray_config(config))
    # With tracking on, the sweep is one MLflow run: the teacher, the judge and every trial nest under it.
    with job_run(config, folder=_sweep_path(config), name=f"{config.name}-sweep", kind="sweep") as job:
        result = _sweep(config, say=say, restore=restore, job=job)
        log_folder(job, _report_folder(config), artifact_path="report",
                   tags={"facemae.best_trial": str(result.best_metrics.get("trial_id", "")),
                         "facemae.best_config": json.dumps(result.best_config),
                         **({"facemae.weights": result.best_weights} if result.best_weights else {})})
    return result


def _sweep(config: Config, *, say: Callable[[str], None], restore: bool, job: TrackedRun | None) -> SweepResult:
    """The sweep proper: shared inputs, the trials (nested under ``job``), the table and the report."""
    import ray

    base, dataset = prepare(config, say)
    concurrency = max_concurrent(config, ray.cluster_resources())
    tuner, path = _tuner(base, dataset, concurrency=concurrency, restore=restore, say=say, job=job)
    say(f"sweep    {path}: {count_trials(config.tune)} trials, {concurrency} at a time")
    grid = tuner.fit()
    table = trial_table(grid, base)
    if not any(row[METRIC] is not None for row in table):
        errors = "; ".join(f"{r['trial']}: {r['error']}" for r in table if r["error"])
        raise RuntimeError(f"no trial of {path} reported {METRIC}; {errors or 'see the trial logs there'}")
    best = min((r for r in table if r[METRIC] is not None), key=lambda r: r[METRIC])
    if best["weights"] is None and best["checkpoint"]:  # stopped before its own export
        best["weights"] = _export(base, best)
    output = _report_folder(config)
    report, png = write_sweep_report(table, output, objective=config.tune.objective, sweep=path)
    say(f"best     {best['trial']} {best['params']}: {METRIC} {best[METRIC]:.4f}")
    say(f"report   {report}")
    return SweepResult(path=str(path), best_config=best["params"], best_metrics=best["metrics"],
                       best_checkpoint=best["checkpoint"], best_weights=best["weights"], table=table,
                       report=str(report), pareto_png=str(png))


def prepare(config: Config, say: Callable[[str], None]) -> tuple[Config, str]:
    """Dataset, teacher, judge and teacher embeddings; returns the trials' base config and dataset."""
    from facemae.data.ingest import ingest
    from facemae.generate.embed import embed_dataset, embedded_output
    from facemae.train.roles import judge_config, teacher_config
    from facemae.train.trainer import train

    ingest(config)
    teacher = config.train.teacher or train(teacher_config(config)).weights
    judge = config.train.judge or train(judge_config(config)).weights
    say(f"teacher  {teacher}\njudge    {judge}")
    dataset = embedded_output(config.data.output, teacher, config.loss)
    embed_dataset(config, source=config.data.output, weights=teacher, output=dataset)
    t = config.train
    every = t.val_every or max(1, t.max_steps // 4)
    # Every report must carry the objective (Tune checks each result for the metric): reports come
    # at log steps, checkpoint steps and the last step, so all of them are validation steps.
    # Tune runs each trial in its own trial folder as working directory: paths must be absolute.
    base = dataclasses.replace(config, train=dataclasses.replace(
        t, task="mae", teacher=teacher, judge=judge, val_every=every, log_every=every,
        checkpoint_every=math.ceil(t.checkpoint_every / every) * every, metrics_port=0, debug_state_dir="")).absolute()
    return base, storage.absolute(dataset)


def trial_config(base: dict[str, Any], params: dict[str, Any], *, trial_id: str) -> Config:
    """A trial's config: the base with the sampled values, under the trial's own run name."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(raw, key, value)
    raw["name"] = f"{raw['name']}-sweep-{trial_id}"
    config = from_dict(Config, raw).validate()
    config.check_mae_patch_size()
    return config


def _trial(params: dict[str, Any], *, base: dict[str, Any], dataset: str, job: TrackedRun | None = None) -> None:
    """One trial: a whole Ray Train run whose reports reach Tune through ``TuneReportCallback`` (and, with
    tracking on, its MLflow run, nested under the sweep's ``job``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from facemae.train.trainer import train

    config = trial_config(base, params, trial_id=ray.tune.get_context().get_trial_id())
    with nested_under(job):
        train(config, dataset=dataset, callbacks=[TuneReportCallback()], show_progress=False)


def _export(base: Config, row: dict[str, Any]) -> str:
    from facemae.train.trainer import EXPORT_DIR, export_weights

    config = trial_config(base.to_dict(), row["params"], trial_id=row["trial"])
    return export_weights(row["checkpoint"], config, storage.join(config.run_dir(), EXPORT_DIR))


def _report_folder(config: Config) -> str:
    """Where the sweep's report goes: ``tune.output``, a local folder or an object-store location."""
    return config.tune.output or f"reports/{config.name}-sweep"


def _sweep_path(config: Config) -> str:
    """The Tune experiment folder of the sweep (restorable; it also keeps the sweep's ``mlflow.json``):
    a local path or an object-store location, beside the runs."""
    return storage.join(config.train.storage_root(), f"{config.name}-sweep")


def _tuner(base: Config, dataset: str, *, concurrency: int, restore: bool,
           say: Callable[[str], None], job: TrackedRun | None) -> tuple[Any, str]:
    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from facemae.tune.callbacks import TrialBar, tracking_callbacks

    tune = base.tune
    path = _sweep_path(base)
    (tune_path,), filesystem = storage.for_arrow([path])  # Tune reaches an S3-compatible store through it
    trainable = ray.tune.with_resources(functools.partial(_trial, base=base.to_dict(), dataset=dataset, job=job),
                                        {"cpu": tune.cpus_per_trial})
    if restore and ray.tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        say(f"restoring {path}: finished trials are kept, unfinished ones resume from their checkpoints")
        return ray.tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=filesystem), path
    scheduler = None
    if tune.scheduler == "asha":
        # One rung past the last report: a trial that reaches max_t is stopped by ASHA at once, before
        # its function returns and exports weights; trials end by finishing train.max_steps instead.
        scheduler = ray.tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=math.ceil(base.train.max_steps / base.train.val_every) + 1,
            grace_period=tune.grace_period, reduction_factor=tune.reduction_factor)
    tuner = ray.tune.Tuner(
        trainable, param_space=search_space(tune.space),
        # The limit goes to the generator itself: Tune ignores max_concurrent_trials when given a
        # BasicVariantGenerator instance (ray/tune/tune.py, "requires a Searcher instance").
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=tune.num_samples,
                                        search_alg=BasicVariantGenerator(random_state=tune.seed,
                                                                         max_concurrent=concurrency)),
        run_config=ray.tune.RunConfig(name=tune_path.rsplit("/", 1)[-1], storage_path=tune_path.rsplit("/", 1)[0],
                                      storage_filesystem=filesystem, verbose=1,
                                      callbacks=[TrialBar(count_trials(tune)), *tracking_callbacks(base)]))
    return tuner, path


def search_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """``tune.space`` as Ray Tune domains."""
    import ray.tune

    kinds = {"choice": lambda v: ray.tune.choice(v), "grid": lambda v: ray.tune.grid_search(v),
             "uniform": lambda v: ray.tune.uniform(*v), "loguniform": lambda v: ray.tune.loguniform(*v),
             "randint": lambda v: ray.tune.randint(int(v[0]), int(v[1]))}
    return {key: kinds[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def count_trials(tune: Any) -> int:
    """Trials of a sweep: ``num_samples`` times the number of grid points."""
    grid = math.prod(len(v) for spec in tune.space.values() for kind, v in spec.items() if kind == "grid")
    return tune.num_samples * grid


def per_trial_cpus(config: Config) -> float:
    """CPUs one running trial holds: its driver, its Train workers, and room for its Ray Data tasks."""
    t = config.train
    return config.tune.cpus_per_trial + t.num_workers * t.cpus_per_worker + DATA_CPUS


def max_concurrent(config: Config, resources: dict[str, float]) -> int:
    """``tune.max_concurrent``, or as many trials as the cluster's CPUs (and GPUs) hold now.

    On an autoscaling cluster the resources seen now may be the minimum: set ``tune.max_concurrent``.
    """
    trials = count_trials(config.tune)
    if config.tune.max_concurrent:
        return min(config.tune.max_concurrent, trials)
    cpus = (os.cpu_count() or 1) if _embedded(config) else resources.get("CPU", 1)
    fit = int(cpus // per_trial_cpus(config))
    if config.train.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // max(1, config.train.num_workers)))
    return max(1, min(fit, trials))


def _ray_config(config: Config) -> RayConfig:
    """An embedded cluster sized so that the sweep cannot hang.

    Finished Train V2 trials can keep their workers' placement group, and so their CPUs, for the
    rest of the Tune run (ray-project/ray#54305, REFERENCE.md 4): logical CPUs cover the trials that
    run at once plus every trial's workers, so a leak never starves the next trial.
    """
    if not _embedded(config) or config.ray.num_cpus is not None:
        return config.ray
    t = config.train
    running = max_concurrent(config, {})
    leak = count_trials(config.tune) * t.num_workers * t.cpus_per_worker
    return dataclasses.replace(config.ray, num_cpus=max(os.cpu_count() or 1,
                                                        math.ceil(running * per_trial_cpus(config) + leak)))


def _embedded(config: Config) -> bool:
    return not (config.ray.address or os.environ.get("RAY_ADDRESS"))


def _check_space(config: Config) -> None:
    """Fails before any training when a value of the space cannot be a config value."""
    base = config.to_dict()
    for key, spec in config.tune.space.items():
        kind, values = next(iter(spec.items()))
        for value in (values if kind in ("choice", "grid") else values[:2]):
            try:
                trial_config(base, {key: value}, trial_id="check")
            except ValueError as exc:
                raise ValueError(f"tune.space.{key}: the value {value!r} makes an invalid trial: {exc}") from exc


def trial_table(grid: Any, base: Config) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``: its values, status, last ``val_*`` metrics, artefacts."""
    from facemae.train.context import latest_checkpoint

    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        run_dir = base.train.run_dir_for(f"{base.name}-sweep-{trial_id}")
        weights = storage.join(run_dir, "export", "weights.safetensors")
        checkpoint = latest_checkpoint(run_dir)
        step = metrics.get("step")
        status = "ERROR" if result.error else "COMPLETED" if step == base.train.max_steps else "STOPPED"
        rows.append({"trial": trial_id, "params": dict(result.config or {}), "status": status, "step": step,
                     **{k: metrics.get(k) for k in REPORTED},
                     "checkpoint": checkpoint,
                     "weights": weights if storage.is_file(weights) else None,
                     "error": str(result.error).splitlines()[0] if result.error else None,
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}})
    front = pareto_front([(r["val_irm"], r["val_identity_leak@1"]) for r in rows])
    for row, on_front in zip(rows, front):
        row["pareto"] = on_front
    return sorted(rows, key=lambda r: r["trial"])
