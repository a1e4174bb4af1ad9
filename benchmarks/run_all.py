"""Every performance figure of the platform as a ratio against a baseline measured in the same run.

Writes ``benchmarks/results/performance.json`` (``{"date", "machine", "commit", "command", "figures":
{name: {"value", "baseline", "ratio", "goal", "met", "unit", "how"}}}``) and ``performance.md``.
Each timed figure is the median of ``--repeats`` repeats; its baseline is timed in the same run, on the
same threads, so the ratio holds across machines where the absolute numbers do not.

Figures (their goals from the performance issue):

- ``train_step_mfu``: model FLOP/s of the main job's training step (``train.yaml``'s FaceMAE + IRM with
  stored teacher embeddings, forward + backward + AdamW on one micro-batch; FLOPs counted by
  ``torch.utils.flop_counter``) over the measured fp32 GEMM rate on the same threads, the two timed in
  turns (a drift of the machine within the run moves both). Goal >= 0.50.
- ``experiment_mae_step_mfu`` / ``experiment_fr_step_mfu``: the same for ``experiment.yaml``'s FaceMAE
  and FR (ArcFace) steps. Goal >= 0.60.
- ``irm_overhead``: the FaceMAE + IRM step (stored embeddings) over the plain MAE step plus one teacher
  forward + backward (to its input, weights frozen) on the released batch, each timed apart. Goal <= 1.10.
- ``generate_pool`` / ``embed_pool``: images/s of the generation and teacher-embedding Ray Data actor
  pools (read, decode, model, encode, write shards) over a bare forward of the same model on the same
  images in one process with as many threads as the pool has actors. Goal >= 0.80.
  ``generate_pool_marginal``: the generation pool's per-face rate once started (two dataset sizes, the
  fixed cost per run in ``how``), over the same bare forward.

The figures of the Ray path (``data_wait``, ``data_headroom``, ``data_vs_dataloader``, ``ray_ds_overhead``,
``worker_memory``) are measured by ``perf_pipeline.py`` around one run of the main job (see its docstring).

    python benchmarks/run_all.py [--repeats 5] [--threads 1] [--quick] [--only compute|pipeline|pools]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from facemae import console
from facemae.allocator import retain_freed_memory
from facemae.cli import job_console
from facemae.config import Config, load_config
from facemae.losses.margin import build_head
from facemae.models.fr import fold_batchnorm
from facemae.models.registry import build_fr, build_mae
from facemae.train.steps import fr_step, mae_irm_step
from facemae.train.tasks import FP32Teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_pipeline  # noqa: E402  (sibling scripts, not a package)
from figures import figure, median_seconds, seconds_in_turns  # noqa: E402
from provenance import RESULTS, provenance  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
GROUPS = ["compute", "pipeline", "pools"]  # single-process steps; the main job's Ray path; the actor pools
GEMM_SIZE = 1024  # square fp32 matmul of the GEMM baseline: large enough to run at the BLAS peak

@dataclasses.dataclass
class Gemm:
    """The hardware baseline of every MFU: square fp32 matmuls on this process's threads."""

    run: Callable[[], None]
    flops: int  # of one ``run``


def gemm(calls: int = 5) -> Gemm:
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return Gemm(run=run, flops=calls * 2 * GEMM_SIZE ** 3)


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclasses.dataclass
class Step:
    """One training step to time: ``run`` is forward + backward + update, ``compute`` forward + backward."""

    run: Callable[[], None]
    compute: Callable[[], None]


def mae_step(config: Config, *, batch: int, irm: bool = True,
             **shape: Any) -> tuple[Step, torch.nn.Module, dict[str, Any]]:
    """The FaceMAE (+ IRM with stored teacher embeddings, as the main job trains) step on random faces;
    ``shape`` overrides the named model's (``embed_dim``, ``depth``...)."""
    model = build_mae(config.model.mae, norm_pix_loss=config.loss.norm_pix_loss, **shape)
    teacher = FP32Teacher(build_fr(config.model.teacher, embedding_size=config.model.embedding_size))  # as trained
    if not irm:
        config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, lambda_irm=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data: dict[str, Any] = {"image": torch.rand(batch, 3, 112, 112) * 2 - 1, "identity": torch.arange(batch)}
    with torch.no_grad():
        data["teacher_emb"] = teacher(data["image"])
    generator = torch.Generator().manual_seed(0)

    def compute() -> None:
        mae_irm_step(model, teacher, data, config, generator=generator)["loss"].backward()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        compute()
        optimizer.step()

    return Step(run=run, compute=compute), teacher, data


def fr_train_step(config: Config, *, batch: int, **shape: Any) -> Step:
    """The FR (margin head) step of an FR model trained on a dataset, on random faces; ``shape`` overrides
    the named backbone's (``widths``...)."""
    backbone = build_fr(config.model.fr, embedding_size=config.model.embedding_size, **shape)
    head = build_head(config.loss.margin, config.model.embedding_size, max(2, batch), s=config.loss.s,
                      m=config.loss.margin_m)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    data = {"image": torch.rand(batch, 3, 112, 112) * 2 - 1, "identity": torch.arange(batch) % max(2, batch)}

    def compute() -> None:
        fr_step(backbone, head, data, config)["loss"].backward()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        compute()
        optimizer.step()

    return Step(run=run, compute=compute)


def mfu(step: Step, baseline: Gemm, *, repeats: int, warmup: int = 2) -> tuple[float, float, float, int]:
    """``(MFU, step seconds, GEMM FLOP/s, step FLOPs)``: the step and the GEMM timed in turns, so a drift of
    the machine's speed within the run hits both alike; the MFU is the median of the rounds' ratios, the
    seconds and the rate the medians of their own rounds."""
    flops = counted_flops(step.compute)
    turns = seconds_in_turns({"step": step.run, "gemm": baseline.run}, repeats=repeats, warmup=warmup)
    ratio = statistics.median((flops / s) / (baseline.flops / g) for s, g in zip(turns["step"], turns["gemm"]))
    return ratio, statistics.median(turns["step"]), baseline.flops / statistics.median(turns["gemm"]), flops


def mfu_figure(step: Step, baseline: Gemm, *, repeats: int, goal: str, what: str) -> dict[str, Any]:
    ratio, seconds, rate, flops = mfu(step, baseline, repeats=repeats)
    return figure(flops / seconds, rate, ratio=ratio, goal=goal, unit="FLOP/s",
                  how=f"{what}: {flops / 1e9:.2f} GFLOP per step in {seconds * 1e3:.1f} ms against the GEMM at "
                      f"{rate / 1e9:.1f} GFLOP/s, timed in turns (medians of {repeats} rounds; the ratio is the "
                      f"median of the rounds' ratios)")


def compute_figures(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The single-process figures: MFU of the training steps and IRM's overhead."""
    torch.manual_seed(0)
    baseline = gemm()  # timed in turns with each step, not once here
    train = load_config(CONFIGS / "train.yaml")
    experiment = load_config(CONFIGS / "experiment.yaml")
    out: dict[str, dict[str, Any]] = {}
    main_step, teacher, data = mae_step(train, batch=train.train.micro_batch)
    out["train_step_mfu"] = mfu_figure(main_step, baseline, repeats=args.repeats, goal=">= 0.50",
                                       what=f"train.yaml {train.model.mae} + IRM ({train.model.teacher}), "
                                            f"batch {train.train.micro_batch}")
    # The same code at a width the GEMM fills: is the gap the model's size or our step?
    wide = dataclasses.replace(train, model=dataclasses.replace(train.model, mae="facemae_vit_small_p8"))
    wide_step, _, _ = mae_step(wide, batch=8, irm=False)
    wide_mfu = mfu(wide_step, baseline, repeats=3, warmup=1)[0]
    out["train_step_mfu"]["how"] += (f"; the plain MAE step of facemae_vit_small_p8 (width 384, batch 8) runs at "
                                     f"{wide_mfu:.2f} of the GEMM rate")
    console.say(f"[perf] train_step_mfu {out['train_step_mfu']['ratio']:.3f} (width 384: {wide_mfu:.2f}; fp32 GEMM "
                f"{GEMM_SIZE}^3 on {torch.get_num_threads()} thread(s) beside it: "
                f"{out['train_step_mfu']['baseline'] / 1e9:.1f} GFLOP/s)")
    exp_step, _, _ = mae_step(experiment, batch=experiment.train.micro_batch)
    out["experiment_mae_step_mfu"] = mfu_figure(exp_step, baseline, repeats=args.repeats, goal=">= 0.60",
                                                what=f"experiment.yaml {experiment.model.mae} + IRM, "
                                                     f"batch {experiment.train.micro_batch}")
    console.say(f"[perf] experiment_mae_step_mfu {out['experiment_mae_step_mfu']['ratio']:.3f}")
    out["experiment_fr_step_mfu"] = mfu_figure(fr_train_step(experiment, batch=experiment.train.micro_batch),
                                               baseline, repeats=args.repeats, goal=">= 0.60",
                                               what=f"experiment.yaml {experiment.model.fr} + "
                                                    f"{experiment.loss.margin}, batch {experiment.train.micro_batch}")
    console.say(f"[perf] experiment_fr_step_mfu {out['experiment_fr_step_mfu']['ratio']:.3f}")

    # IRM's overhead: the whole step against its two parts timed apart.
    mae_only, _, _ = mae_step(train, batch=train.train.micro_batch, irm=False)
    released = data["image"].clone().requires_grad_(True)

    def teacher_pass() -> None:
        teacher(released).sum().backward()  # IRM's backward reaches the images through the frozen teacher
        released.grad = None

    turns = seconds_in_turns({"whole": main_step.run, "mae": mae_only.run, "teacher": teacher_pass},
                             repeats=args.repeats, inner=3)
    ratio = statistics.median(w / (m + t) for w, m, t in zip(turns["whole"], turns["mae"], turns["teacher"]))
    whole, parts = statistics.median(turns["whole"]), statistics.median(turns["mae"]) + statistics.median(turns["teacher"])
    out["irm_overhead"] = figure(whole, parts, ratio=ratio, goal="<= 1.10", unit="s/step",
                                 how=f"FaceMAE + IRM step {whole * 1e3:.1f} ms vs MAE step + teacher forward and "
                                     f"backward {parts * 1e3:.1f} ms (medians of {args.repeats} rounds of 3 steps "
                                     f"each, in turns; the ratio is the median of the rounds' ratios)")
    console.say(f"[perf] irm_overhead {out['irm_overhead']['ratio']:.3f}")
    return out


def pool_figures(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Generation and teacher-embedding actor pools against a bare forward of their model, same images."""
    import numpy as np

    from facemae.cluster import ensure_ray
    from facemae.data.images import decode_rows
    from facemae.data.ingest import ingest
    from facemae.data.owner import mask_dataset
    from facemae.data.shards import iter_rows, read_manifest
    from facemae.generate.embed import embed_dataset
    from facemae.generate.release import generate_released
    from facemae.losses.irm import irm_view
    from facemae.data.images import encode_png
    from facemae.models.fr import to_model_range, to_uint8
    from facemae.models.mae import masked_record_input
    from facemae.models.weights import save_weights

    ids = 20 if args.quick else 200
    config = load_config(CONFIGS / "train_smoke.yaml", [
        f"data.output={work / 'data'}", f"data.num_identities={ids}", "data.images_per_identity=10",
        "data.deploy_fraction=0.5", "data.rows_per_shard=100", f"train.storage_path={work / 'runs'}",
        "generate.actors=2", "ray.num_cpus=2"])
    mae_weights = save_weights(build_mae(config.model.mae), work / "mae", {
        "task": "mae", "model": config.model.mae, "norm_pix_loss": False, "run": "benchmark"})
    fr_weights = save_weights(build_fr(config.model.teacher, embedding_size=config.model.embedding_size),
                              work / "teacher", {"task": "fr", "model": config.model.teacher,
                                                 "embedding_size": config.model.embedding_size, "run": "benchmark"})
    config = dataclasses.replace(config, generate=dataclasses.replace(config.generate, weights=str(mae_weights)))
    ingest(config)
    mask_dataset(config)
    ensure_ray(config.ray)
    # Each actor runs torch on one thread (Ray sets OMP_NUM_THREADS=1 for a fractional CPU): the bare
    # forward gets as many threads as the pool has actors.
    cpus = config.generate.actors
    threads = torch.get_num_threads()
    out: dict[str, dict[str, Any]] = {}

    # Generation: the pool end to end (read, decode, FaceMAE, PNG encode, shards) vs the bare forward.
    masked = config.masked_output()
    images = read_manifest(masked).num_images()
    # The pool's fixed cost per run (actor start-up, pipeline start) apart from its per-face rate: the
    # same pool on a quarter of the faces, the two timed in turns.
    small = dataclasses.replace(config, data=dataclasses.replace(config.data, output=str(work / "small"),
                                                                 num_identities=ids // 4))
    ingest(small)
    mask_dataset(small)
    few = read_manifest(small.masked_output()).num_images()
    turns = seconds_in_turns({
        "all": lambda: generate_released(config, output=str(work / "released"), overwrite=True),
        "quarter": lambda: generate_released(small, output=str(work / "released-small"), overwrite=True)},
        repeats=args.pool_repeats, warmup=1)
    pool, small_pool = statistics.median(turns["all"]), statistics.median(turns["quarter"])
    records = list(iter_rows(read_manifest(masked).files(masked, "deploy")))
    model = build_mae(config.model.mae).eval()
    size = config.generate.batch_size
    batches = [masked_record_input([r["visible"] for r in records[i:i + size]], [r["mask"] for r in records[i:i + size]],
                                   patch_size=model.patch_size) for i in range(0, len(records), size)]

    def bare_generate() -> None:
        with torch.inference_mode():
            for x, m in batches:
                model.reconstruct(x, m)

    with torch.inference_mode():
        released = np.concatenate([to_uint8(model.reconstruct(x, m)).numpy() for x, m in batches])

    torch.set_num_threads(cpus)
    bare = median_seconds(bare_generate, repeats=args.pool_repeats, warmup=1)
    torch.set_num_threads(1)  # where a pool actor's time per face goes, on its one thread
    per_face = {name: median_seconds(fn, repeats=args.pool_repeats, warmup=1) / images * 1e3 for name, fn in (
        ("records in", lambda: [masked_record_input([r["visible"] for r in records[i:i + size]],
                                                    [r["mask"] for r in records[i:i + size]],
                                                    patch_size=model.patch_size) for i in range(0, images, size)]),
        ("FaceMAE", bare_generate),
        ("PNG out", lambda: [encode_png(p) for p in released]))}
    torch.set_num_threads(threads)
    out["generate_pool"] = figure(images / pool, images / bare, goal=">= 0.80", unit="images/s",
                                  how=f"{images} faces, {config.generate.actors} actors x 1 thread vs one process "
                                      f"on {cpus} threads "
                                      f"(medians of {args.pool_repeats})")
    console.say(f"[perf] generate_pool {out['generate_pool']['ratio']:.3f}")

    # Seconds per face between the two sizes, round by round: the difference of two runs a round apart
    # moves with the machine far less than that of two medians minutes apart (which read 4.2 once).
    per_face_s = statistics.median((b - s) / (images - few) for b, s in zip(turns["all"], turns["quarter"]))
    marginal = 1 / per_face_s if per_face_s > 0 else None
    fixed = f"{small_pool - few * per_face_s:.1f} s" if marginal else "not separable (noise)"
    ready = median_seconds(lambda: actors_ready(str(mae_weights), actors=config.generate.actors,
                                                cpus=config.generate.cpus_per_actor),
                           repeats=args.pool_repeats, warmup=0)
    out["generate_pool_marginal"] = figure(marginal, images / bare, goal=">= 0.80", unit="images/s",
                                           how=f"the pool's per-face rate between {few} and {images} faces "
                                               f"({small_pool:.1f} s and {pool:.1f} s, medians; the rate from the "
                                               f"median of the rounds' differences); its fixed cost per run "
                                               f"{fixed}, of which {ready:.1f} s start {config.generate.actors} "
                                               "bare Ray actors that import torch and timm and load the weights. "
                                               "Per face on one thread: "
                                               + ", ".join(f"{k} {v:.2f} ms" for k, v in per_face.items()))
    if marginal:
        console.say(f"[perf] generate_pool_marginal {out['generate_pool_marginal']['ratio']:.3f}, fixed {fixed}")

    # Teacher embeddings: the pool over every original vs the bare teacher forward in the IRM view.
    originals = config.data.output
    n = read_manifest(originals).num_images()
    pool = median_seconds(lambda: embed_dataset(config, source=originals, weights=str(fr_weights),
                                                output=str(work / "embedded"), overwrite=True),
                          repeats=args.pool_repeats, warmup=1)
    rows = [r for split in ("train", "deploy") for r in iter_rows(read_manifest(originals).files(originals, split))]
    pixels, _ = decode_rows([r["image"] for r in rows], image_ids=[r["image_id"] for r in rows],
                            paths=["-"] * len(rows), skip_corrupt=False)
    faces = to_model_range(torch.from_numpy(np.asarray(pixels)))
    # The pool's model, folded as TeacherEmbedder folds it: the same work in both.
    teacher = fold_batchnorm(build_fr(config.model.teacher, embedding_size=config.model.embedding_size))
    size = config.train.micro_batch

    def bare_embed() -> None:
        with torch.inference_mode():
            for i in range(0, len(faces), size):
                teacher(irm_view(faces[i:i + size], view=config.loss.irm_view, sigma=config.loss.irm_blur_sigma))

    actors = max(1, config.train.num_workers)  # embed_dataset's pool size
    torch.set_num_threads(actors)
    bare = median_seconds(bare_embed, repeats=args.pool_repeats, warmup=1)
    torch.set_num_threads(threads)
    out["embed_pool"] = figure(n / pool, n / bare, goal=">= 0.80", unit="images/s",
                               how=f"{n} faces, {actors} actors x 1 thread vs one process on {actors} threads "
                                   f"(medians of {args.pool_repeats})")
    console.say(f"[perf] embed_pool {out['embed_pool']['ratio']:.3f}")
    return out


def actors_ready(weights: str, *, actors: int, cpus: float) -> None:
    """Starts ``actors`` plain Ray actors that load the FaceMAE ``weights`` as a pool's actors do, waits
    until all are ready and kills them: the part of a pool's fixed cost that is not Ray Data's."""
    import ray

    @ray.remote(num_cpus=cpus)
    class Loader:
        def __init__(self, path: str) -> None:
            from facemae.models.weights import load_mae

            self.model = load_mae(path)

        def ready(self) -> bool:
            return True

    started = [Loader.remote(weights) for _ in range(actors)]
    ray.get([a.ready.remote() for a in started])
    for actor in started:
        ray.kill(actor)


def write_results(figures: dict[str, dict[str, Any]], meta: dict[str, Any], *, stem: str = "performance") -> Path:
    """Writes ``benchmarks/results/<stem>.json`` and ``<stem>.md``; returns the second. Figures another script
    filed there with their own provenance (``experiment_cost``, by ``science.py --cost``) are kept."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if (RESULTS / f"{stem}.json").exists():
        filed = json.loads((RESULTS / f"{stem}.json").read_text())["figures"]
        figures = {**figures, **{k: f for k, f in filed.items() if "date" in f and k not in figures}}
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "figures": figures}, indent=1) + "\n")
    lines = ["# Performance", "", f"{meta['date']}, {meta['machine']}, commit {meta['commit']}: `{meta['command']}`",
             "", "| figure | value | baseline | ratio | goal | met | how |", "|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        cells = [name, _fmt(f["value"], f["unit"]), _fmt(f["baseline"], f["unit"]),
                 "-" if f["ratio"] is None else f"{f['ratio']:.3f}", f["goal"],
                 "yes" if f["met"] else ("not measured" if f["value"] is None else "no"), f["how"]]
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{stem}.md"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "FLOP/s":
        return f"{value / 1e9:.2f} GFLOP/s"
    return f"{value:.4g} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each timed step (median)")
    parser.add_argument("--pool-repeats", type=int, default=3, help="repeats of each actor-pool run (median)")
    # One thread, as a training worker with one reserved CPU runs (facemae.train.context).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller datasets, fewer steps (a smoke run of the script)")
    parser.add_argument("--only", choices=GROUPS, help="one group of figures, written to "
                        "results/performance-<group>.{json,md} beside the whole table (which it leaves as it is)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray and torch output here, not in the log")
    args = parser.parse_args()
    meta = provenance()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as every training worker and pool actor does: the steps are timed as they run
    groups = [args.only] if args.only else GROUPS
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="facemae-perf-") as work, job_console("performance", verbose=args.verbose):
        if "compute" in groups:
            figures.update(compute_figures(args))
        if "pipeline" in groups:
            run = perf_pipeline.run_main_job(Path(work), quick=args.quick)
            figures["data_wait"] = perf_pipeline.data_wait_figure(run)
            console.say(f"[perf] data_wait {figures['data_wait']['ratio']:.3f}")
            figures.update(perf_pipeline.data_figures(run, passes=args.pool_repeats + 1))
            figures["ray_ds_overhead"] = perf_pipeline.ray_ds_figure(run, Path(work), repeats=args.repeats)
            figures["worker_memory"] = perf_pipeline.worker_memory_figure(run, Path(work))
        if "pools" in groups:
            figures.update(pool_figures(args, Path(work)))
    table = write_results(figures, meta, stem=f"performance-{args.only}" if args.only else "performance")
    met = sum(f["met"] for f in figures.values())
    console.say(f"[perf] {met} of {len(figures)} goals met; {table}")


if __name__ == "__main__":
    main()
