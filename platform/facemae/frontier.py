"""The privacy-utility frontier sweep (``jobs/frontier.py``): is FaceMAE's trade-off better than MAE's?

One point is a method (``masked``, ``mae`` = lambda 0, ``facemae`` at one IRM weight) at one mask ratio with
one release option (``loss.paste_visible``). A point's seed trains its generator, releases the deployment
faces, trains the experiment's FR recipe on the release and scores it with the experiment's judge and
pairs (:func:`facemae.experiment.release`-style folders, :func:`facemae.experiment.fr_config` runs, the
cached scores of :func:`facemae.experiment._scores`), so every row of every point is evaluated alike.

The sweep runs through Ray Tune, one trial per generator (method, ratio, lambda, seed), which releases and
scores each of its release options. Seeds go where they decide: the first seed at every point, then the
other seeds at the points on or next to a method's frontier (its Pareto set and their neighbours along
the mask ratio). Before the trials the driver prepares what they share, reusing finished work: the
dataset, the IRM teacher, the judge, the teacher's embeddings and one masked dataset (and its masked
release) per ratio. Every stage reuses finished runs, releases and scores by name and settings, and Tune
restores an interrupted phase, so a stopped sweep continues where it was. Each finished point and seed is
also written to ``frontier.ledger`` (its row of scores and the digest of its settings): a sweep continues
from the ledger alone, in a fresh checkout or on another machine, measuring only the points missing there.

Writes ``frontier.json`` (the frontier issue's schema), ``frontier.md``, ``frontier.png`` and a
reconstruction grid across mask ratios to ``frontier.output``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from facemae import console, storage
from facemae.config import Config, from_dict
from facemae.data.ingest import ingest
from facemae.data.shards import MANIFEST
from facemae.data.owner import mask_dataset
from facemae.eval import frontier as frontiers
from facemae.experiment import SCIENCE_METRICS, _row_metrics, _scores, autoencoder_config, fr_config, shared_models
from facemae.generate.release import generate_released
from facemae.train.trainer import train

ORIGINALS = "originals"  # the ceiling: FR on the deployment originals, one per seed
# Settings that do not change a point's numbers (names, folders, where and how widely it runs): left out of
# the digest a ledger row is reused by. Everything else, the FR recipe and the judge's included, must match.
UNSCORED = {"": ("name", "frontier", "tune", "ray", "tracking", "storage"),
            "data": ("output", "workers", "ray_threshold"), "mask": ("output",),
            "generate": ("weights", "masked", "output", "actors", "cpus_per_actor", "use_gpu"),
            "train": ("storage_path", "metrics_port", "metrics_host", "log_sample_ids", "log_upload_every_s",
                      "debug_state_dir"),
            "experiment": ("output", "seeds", "attacks", "adaptive_steps", "nonmembers")}
# Settings added after rows were measured, at the value that behaves as before they existed: left out of the
# digest at that value, so a new setting does not orphan the ledger; any other value is part of it.
AS_BEFORE = {"model": {"head": "full", "partial_fc": {"sample_rate": 1.0}},
             "train": {"init_weights": "", "init_head": True}, "data": {"domain": "base"},
             "experiment": {"deploy": None}}


@dataclass
class FrontierResult:
    """Where the report went and its numbers.

    Attributes:
        report: ``frontier.md``.
        points: ``frontier.json``'s points (per-seed lists).
        summary: ``frontier.json``'s body (points, comparison, verdict); None when a method is missing.
        errors: ``trial -> error`` of the trials that failed (their points are left out).
    """

    report: str
    points: list[dict[str, Any]]
    summary: dict[str, Any] | None
    errors: dict[str, str]


def generators(config: Config, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every trial of the first phase: one per (method, ratio, lambda) and seed, with all release options;
    and the originals' FR model per seed (the ceiling)."""
    f = config.frontier
    out = [{"method": ORIGINALS, "mask_ratio": 0.0, "lambda_irm": 0.0, "seed": s, "paste_visible": [True]}
           for s in seeds]
    for method in f.methods:
        lambdas = f.lambdas if method == "facemae" else [0.0]
        pastes = [True] if method == "masked" else list(f.paste_visible)
        out += [{"method": method, "mask_ratio": r, "lambda_irm": lam, "seed": s, "paste_visible": pastes}
                for r in f.mask_ratios for lam in lambdas for s in seeds]
    return out


def _ratio_config(config: Config, ratio: float, seed: int) -> Config:
    """The config of one mask ratio and seed: its own masked dataset, named after the ratio."""
    masked = f"{config.data.output.rstrip('/')}-masked-r{ratio:g}"
    return dataclasses.replace(config, name=f"{config.name}-r{ratio:g}",
                               mask=dataclasses.replace(config.mask, ratio=ratio, output=masked, splits=["deploy"]),
                               train=dataclasses.replace(config.train, seed=seed))


def _release(config: Config, *, method: str, weights: str, paste: bool, tag: str) -> str:
    """The deployment faces of one generator and release option (``masked``: the masked faces)."""
    kind = "masked" if method == "masked" else "reconstruct"
    out = f"{config.masked_output().rstrip('/')}-{tag}"
    generate_released(dataclasses.replace(
        config, loss=dataclasses.replace(config.loss, paste_visible=paste),
        generate=dataclasses.replace(config.generate, method=kind, weights=weights, output="")), output=out)
    return out


def _tag(point: dict[str, Any], paste: bool) -> str:
    """A point's name in run and release folders."""
    if point["method"] in ("masked", ORIGINALS):
        return point["method"]
    lam = f"-l{point['lambda_irm']:g}" if point["method"] == "facemae" else ""
    return f"{point['method']}{lam}" + ("" if paste else "-nopaste")


def evaluate_generator(config: Config, shared: dict[str, str], trial: dict[str, Any]) -> list[dict[str, Any]]:
    """One trial: trains the generator of ``trial`` (method, ratio, lambda, seed), releases once per release
    option, trains the FR recipe on each release and scores it; returns one per-seed row per option."""
    seed, method = trial["seed"], trial["method"]
    if method == ORIGINALS:  # scored like every row; its fidelity is not computed, so any ratio's masked set
        config = dataclasses.replace(_ratio_config(config, config.frontier.mask_ratios[0], seed), name=config.name)
        sets = {True: config.data.output}
    else:
        config = _ratio_config(config, trial["mask_ratio"], seed)
        weights = ""
        if method != "masked":
            lam = trial["lambda_irm"] if method == "facemae" else 0.0
            row = "facemae" if method == "facemae" else "mae"
            generator = autoencoder_config(
                dataclasses.replace(config, name=f"{config.name}-l{lam:g}",
                                    loss=dataclasses.replace(config.loss, lambda_irm=lam)),
                seed, row, teacher=shared["teacher"])
            weights = train(generator, dataset=shared["embedded"] if row == "facemae" else None,
                            show_progress=False).weights
        sets = {paste: _release(config, method=method, weights=weights, paste=paste,
                                tag=_tag(trial, paste) + ("" if method == "masked" else f"-s{seed}"))
                for paste in trial["paste_visible"]}
    rows = []
    for paste, dataset in sets.items():
        fr = train(fr_config(config, seed, _tag(trial, paste)), dataset=dataset, split="deploy", show_progress=False)
        scores = _scores(config, "originals" if method == ORIGINALS else method, fr.weights, dataset=dataset,
                         judge=shared["judge"], cache=fr.run_dir)
        metrics = _row_metrics(scores)
        rows.append({"method": method, "mask_ratio": trial["mask_ratio"], "lambda_irm": trial["lambda_irm"],
                     "options": {} if method in ("masked", ORIGINALS) else {"paste_visible": paste},
                     "seed": seed, "dataset": dataset,
                     **{k: metrics.get(k, math.nan) for k in SCIENCE_METRICS}})
    return rows


def _trial(params: dict[str, Any], *, base: dict[str, Any], shared: dict[str, str]) -> None:
    """A Tune trial: :func:`evaluate_generator` in the trial's process, its rows written to the ledger and
    reported as JSON."""
    import ray.tune
    import torch

    config = from_dict(Config, base).validate()
    # Ray starts the trial with OMP_NUM_THREADS = its CPUs, rounded down (1 for a fraction): the training
    # in this process uses the CPUs the trial reserved.
    torch.set_num_threads(max(1, round(config.frontier.cpus_per_trial)))
    rows = evaluate_generator(config, shared, params["trial"])
    record(config, rows)
    ray.tune.report({"rows_json": json.dumps(rows, default=float), "points": len(rows)})


def ledger_folder(config: Config) -> str:
    """``frontier.ledger``, or ``<frontier.output>/points``."""
    return config.frontier.ledger or storage.join(config.frontier.output, "points")


def settings_digest(config: Config) -> str:
    """The digest of the settings a point's numbers depend on (:data:`UNSCORED` left out, and
    :data:`AS_BEFORE` at its old behaviour; ``data.align`` as it resolves): equal digests, equal measurements."""
    settings = config.to_dict()
    settings["data"]["align"] = config.data.aligner
    for section, keys in UNSCORED.items():
        for key in keys:
            (settings[section] if section else settings).pop(key, None)
    for section, before in AS_BEFORE.items():
        if all(settings[section].get(key) == value for key, value in before.items()):
            for key in before:
                settings[section].pop(key)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def row_name(row: dict[str, Any], paste: bool) -> str:
    """A point and seed's file in the ledger: ``facemae-l0.1-r0.75-s1.json``, ``originals-s0.json``."""
    ratio = "" if row["method"] == ORIGINALS else f"-r{row['mask_ratio']:g}"
    return f"{_tag(row, paste)}{ratio}-s{row['seed']}.json"


def record(config: Config, rows: Sequence[dict[str, Any]], *, source: str = "") -> None:
    """Writes each row to the ledger (atomically), under the digest of the settings it was measured with."""
    folder, digest = ledger_folder(config), settings_digest(config)
    storage.make_dirs(folder)
    for row in rows:
        entry = {"settings": digest, "row": {k: _json_float(v) if isinstance(v, float) else v for k, v in row.items()},
                 **({"source": source} if source else {})}
        storage.write_text(storage.join(folder, row_name(row, row["options"].get("paste_visible", True))),
                           json.dumps(entry, indent=1, sort_keys=True) + "\n")


def recorded(config: Config, trials: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, trials)``: the ledger's rows of the trials found there whole (every release option) with
    these settings, and the trials still to run. A row measured with other settings is not reused."""
    folder, digest = ledger_folder(config), settings_digest(config)
    rows, todo = [], []
    for trial in trials:
        found = []
        for paste in trial["paste_visible"]:
            path = storage.join(folder, row_name(trial, paste))
            entry = json.loads(storage.read_text(path)) if storage.is_file(path) else {}
            if entry.get("settings") == digest:
                found.append({k: math.nan if v is None and k in SCIENCE_METRICS else v
                              for k, v in entry["row"].items()})
        if len(found) == len(trial["paste_visible"]):
            rows += found
        else:
            todo.append(trial)
    return rows, todo


def collect(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed rows merged into ``frontier.json``'s points: one per (method, ratio, lambda, options), in that
    order (Tune returns trials in any order), per-seed lists in seed order."""
    points: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        key = json.dumps([row["method"], row["mask_ratio"], row["lambda_irm"], row["options"]])
        p = points.setdefault(key, {"method": row["method"], "mask_ratio": row["mask_ratio"],
                                    "lambda_irm": row["lambda_irm"], "options": row["options"], "seeds": [],
                                    **{k: [] for k in SCIENCE_METRICS}})
        if row["seed"] in p["seeds"]:
            continue
        p["seeds"].append(row["seed"])
        for k in SCIENCE_METRICS:
            p[k].append(float(row[k]))
    return sorted(points.values(), key=lambda p: (p["method"], p["mask_ratio"], p["lambda_irm"],
                                                  json.dumps(p["options"], sort_keys=True)))


def deciding(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points where more seeds decide: on a method's frontier (seed means) or next to such a point
    along the mask ratio (same method, lambda and options)."""
    picked: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != ORIGINALS):
        mine = [p for p in points if p["method"] == method]
        for p in (mine[i] for i in frontiers.pareto_frontier(*frontiers.seed_means(mine)).members):
            series = sorted((q for q in mine if q["lambda_irm"] == p["lambda_irm"] and q["options"] == p["options"]),
                            key=lambda q: q["mask_ratio"])
            i = series.index(p)
            for q in series[max(0, i - 1):i + 2]:
                picked[json.dumps([q["method"], q["mask_ratio"], q["lambda_irm"], q["options"]])] = q
    return list(picked.values())


def more_seeds(config: Config, points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The second phase's trials: the other seeds at the deciding points and for the originals."""
    later = list(config.frontier.seeds[1:])
    trials: dict[str, dict[str, Any]] = {}
    for p in deciding(points):
        for s in later:
            key = json.dumps([p["method"], p["mask_ratio"], p["lambda_irm"], s])
            t = trials.setdefault(key, {"method": p["method"], "mask_ratio": p["mask_ratio"],
                                        "lambda_irm": p["lambda_irm"], "seed": s, "paste_visible": []})
            paste = p["options"].get("paste_visible", True)
            if paste not in t["paste_visible"]:
                t["paste_visible"].append(paste)
    originals = [{"method": ORIGINALS, "mask_ratio": 0.0, "lambda_irm": 0.0, "seed": s, "paste_visible": [True]}
                 for s in later]
    return originals + list(trials.values()) if trials else []


def prepare(config: Config, say: Callable[[str], None]) -> dict[str, str]:
    """What every trial shares: dataset, teacher, judge, the teacher's embeddings, and per mask ratio the
    masked dataset and its masked release (made here, so that no two trials write the same folder)."""
    ingest(config)
    shared = shared_models(config, say)
    for ratio in config.frontier.mask_ratios:
        ratio_config = _ratio_config(config, ratio, config.train.seed)
        mask_dataset(ratio_config)
        if "masked" in config.frontier.methods:
            _release(ratio_config, method="masked", weights="", paste=True, tag="masked")
    return {k: storage.absolute(v) for k, v in shared.items()}


def _ray_config(config: Config) -> Any:
    """An embedded cluster with room for the trials at once and, beside them, a release pool and its reads
    (logical CPUs may exceed the cores: the trials train in turn with the pool's actors, which wait)."""
    import os

    if config.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster's own resources
        return config.ray
    f, g = config.frontier, config.generate
    need = f.max_concurrent * (f.cpus_per_trial + g.actors * g.cpus_per_actor) + 0.5
    return dataclasses.replace(config.ray, num_cpus=max(config.ray.num_cpus or os.cpu_count() or 1, math.ceil(need)))


def _phase(config: Config, shared: dict[str, str], trials: list[dict[str, Any]], *, label: str,
           restore: bool, say: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Runs (or restores) one phase's trials through Ray Tune; returns their rows and their errors.

    Trials the ledger holds are not run. The rest are named after their list, so a rerun of the same list
    restores it (finished trials kept, unfinished ones rerun, their finished stages reused) and a different
    list starts a new one."""
    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from facemae.tune.callbacks import TrialBar

    rows, trials = recorded(config, trials)
    if rows:
        say(f"{label:8s} {len(rows)} rows from the ledger {ledger_folder(config)}")
    if not trials:
        return rows, {}
    digest = hashlib.sha256(json.dumps(trials, sort_keys=True).encode()).hexdigest()[:8]
    path = storage.join(config.train.storage_root(), f"{config.name}-frontier-{label}-{digest}")
    (tune_path,), filesystem = storage.for_arrow([path])
    trainable = ray.tune.with_resources(functools.partial(_trial, base=config.to_dict(), shared=shared),
                                        {"cpu": config.frontier.cpus_per_trial})
    if restore and ray.tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        say(f"restoring {path}: finished trials are kept, the others rerun (their finished stages reused)")
        tuner = ray.tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=filesystem)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space={"trial": ray.tune.grid_search(trials)},
            tune_config=ray.tune.TuneConfig(search_alg=BasicVariantGenerator(
                max_concurrent=min(config.frontier.max_concurrent, len(trials)))),
            run_config=ray.tune.RunConfig(name=tune_path.rsplit("/", 1)[-1], storage_path=tune_path.rsplit("/", 1)[0],
                                          storage_filesystem=filesystem, verbose=0,
                                          callbacks=[TrialBar(len(trials))]))
    say(f"{label:8s} {path}: {len(trials)} trials")
    errors = {}
    for result in tuner.fit():
        if result.error or not (result.metrics or {}).get("rows_json"):
            errors[Path(result.path).name] = str(result.error or "no rows reported").splitlines()[0][:300]
            continue
        done = json.loads(result.metrics["rows_json"])
        record(config, done)  # again: a trial restored from Tune's state was recorded in another place, or not
        rows += done
    return rows, errors


def run_frontier(config: Config, *, restore: bool = True, say: Callable[[str], None] = console.say) -> FrontierResult:
    """Runs (or continues) the sweep and writes the report to ``frontier.output``."""
    from facemae.cluster import ensure_ray

    config.check_mae_patch_size()
    config = config.absolute()  # the same folders in the driver and in every trial's own folder
    ensure_ray(_ray_config(config))
    shared = prepare(config, say)
    first = config.frontier.seeds[:1]
    rows, errors = _phase(config, shared, generators(config, first), label="first", restore=restore, say=say)
    later = more_seeds(config, collect([r for r in rows if r["method"] != ORIGINALS]))
    if later:
        more, more_errors = _phase(config, shared, later, label="seeds", restore=restore, say=say)
        rows, errors = rows + more, {**errors, **more_errors}
    for trial, error in errors.items():
        say(f"trial {trial} failed: {error}")
    result = write_report(config, rows, errors)
    say(f"report   {result.report}")
    return result


def write_report(config: Config, rows: Sequence[dict[str, Any]], errors: dict[str, str]) -> FrontierResult:
    """``frontier.json``, ``frontier.md``, ``frontier.png`` and ``reconstructions.png`` in ``frontier.output``."""
    from facemae.eval.stats import mean_ci
    from facemae.report import reconstruction_grid

    points = collect([r for r in rows if r["method"] != ORIGINALS])
    ceiling_rows = [r for r in rows if r["method"] == ORIGINALS]
    methods = {p["method"] for p in points}
    summary = frontiers.summarise(points) if {"facemae", "mae"} <= methods else None
    body = summary or {"points": points, "comparison": [], "verdict": "no comparison: the sweep needs both mae "
                                                                      "and facemae points"}
    ceiling = None
    if ceiling_rows:
        ceiling = (mean_ci([r["identity_leak@1"] for r in ceiling_rows]).mean,
                   mean_ci([r["accuracy"] for r in ceiling_rows]).mean)
    meta = {"config": config.name, "mask ratios": config.frontier.mask_ratios, "lambdas": config.frontier.lambdas,
            "release options (paste_visible)": config.frontier.paste_visible, "seeds": config.frontier.seeds,
            "FR recipe": f"{config.model.fr}, {config.experiment.fr_steps} steps, lr {config.experiment.fr_base_lr}",
            "originals (ceiling)": ("-" if ceiling is None else
                                    f"identity_leak@1 {ceiling[0]:.3f}, accuracy {ceiling[1]:.3f}"),
            **({"failed trials": errors} if errors else {})}
    with storage.output_folder(config.frontier.output) as out:
        (out / "frontier.json").write_text(json.dumps({**body, "originals": _ceiling_json(ceiling_rows),
                                                       "errors": errors}, indent=1, default=_json_float) + "\n")
        (out / "frontier.md").write_text("\n".join(frontiers.markdown(body, meta=meta)))
        frontiers.plot(points, str(out / "frontier.png"), ceiling=ceiling)
        grid = _grid_sets(config, rows)
        if grid:
            reconstruction_grid(grid, out / "reconstructions.png", order=list(grid))
    return FrontierResult(report=storage.join(config.frontier.output, "frontier.md"), points=points,
                          summary=summary, errors=errors)


def _ceiling_json(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r["seed"])
    return {"seeds": [r["seed"] for r in rows], "accuracy": [r["accuracy"] for r in rows],
            "identity_leak@1": [r["identity_leak@1"] for r in rows]}


def _json_float(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else float(value)


def _grid_sets(config: Config, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """FaceMAE's releases (first lambda, pasted) across mask ratios, each of the lowest seed whose release
    is on disk (a ledger row from elsewhere names a folder that may not be), with the originals."""
    lam = (config.frontier.lambdas or [0.0])[0]
    method = "facemae" if any(r["method"] == "facemae" for r in rows) else "mae"
    picked: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: (r["mask_ratio"], r["seed"])):
        if (r["method"] == method and r["options"].get("paste_visible", True)
                and (method == "mae" or r["lambda_irm"] == lam)
                and r.get("dataset") and storage.exists(storage.join(r["dataset"], MANIFEST))):
            picked.setdefault(f"r{r['mask_ratio']:g}", r["dataset"])
    return {**picked, "originals": config.data.output} if picked else {}
