"""GPU throughput of the paper-scale FaceMAE (train_gpu.yaml) on one NVIDIA GPU, through the real path.

Run by ``bash benchmarks/gpu.sh`` (which sets the environment up first). On an embedded local Ray cluster:

1. ingests ``--faces`` synthetic faces and masks the deployment split (Ray tasks, all CPU cores);
2. writes a freshly initialised IResNet-50 teacher and stores its embeddings of the originals through
   the Ray Data actor pool (on the GPU): the teacher's weights do not change its cost, and training one
   would take most of the time budget;
3. trains train_gpu.yaml's FaceMAE (ViT-B/8, bf16, ZeRO-2, IRM with stored teacher embeddings) for
   ``--steps`` steps on 1 GPU worker through Ray Train + DeepSpeed;
4. releases the deployment faces through the generation actor pool (1 GPU actor) with the trained weights.

It prints, and writes to ``benchmarks/results/gpu.json`` / ``gpu.md`` (date, machine, commit, command):

- ``images_per_s``: training throughput, the median of rank 0's reports after the first ``--warmup``
  steps (each report covers the batches since the one before);
- ``mfu``: model FLOP/s over the GPU's dense bf16 peak. Model FLOPs of one training step (forward and
  backward of FaceMAE and of the frozen teacher on the reconstructions; no optimizer) are counted with
  ``torch.utils.flop_counter`` on the same model and batch size; the peak is looked up from the device
  name (:data:`PEAK_BF16_TFLOPS`) or given with ``--peak-tflops``;
- ``data_wait``: the share of the whole run's wall time spent waiting for data, epoch starts included
  (each report's fraction weighted by the time it covers);
- ``gpu_mem_peak_gib``: the worker's ``torch.cuda.max_memory_allocated``;
- ``generate_images_per_s``: faces released per second by the generation pool, end to end (read,
  decode, forward, PNG encode, write).

``--cpu-smoke`` runs the same stages with the tiny CPU models for a few steps, to check the script itself
on a machine without a GPU (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, commit, provenance

from facemae import console
from facemae.cli import job_console

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; matched in order
# against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device named ``name``, or None when this table does not know it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _config(root: Path, args: argparse.Namespace, teacher: Path) -> Any:
    from facemae.config import load_config

    common = [f"data.output={root / 'faces'}", f"train.storage_path={root / 'runs'}", "train.num_workers=1",
              f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.val_every=0",
              f"train.log_every={args.log_every}", "train.metrics_port=0", f"train.teacher={teacher}",
              "ray.address=null", f"generate.output={root / 'released'}", "data.workers=0"]
    if args.cpu_smoke:
        return load_config("jobs/configs/train_smoke.yaml", [
            *common, "data.num_identities=8", "data.images_per_identity=6", "train.micro_batch=8",
            "ray.num_cpus=4"])
    per_identity = 50
    return load_config("jobs/configs/train_gpu.yaml", [
        *common, f"data.num_identities={max(2, args.faces // per_identity)}",
        f"data.images_per_identity={per_identity}", "data.rows_per_shard=1000", "generate.use_gpu=true",
        "generate.actors=1", f"train.micro_batch={args.batch}", f"train.warmup_steps={min(100, args.steps // 4)}"])


def _teacher(root: Path, model: str, embedding_size: int) -> Path:
    from facemae.models.registry import build_fr
    from facemae.models.weights import save_weights

    return save_weights(build_fr(model, embedding_size=embedding_size), root / "teacher",
                        {"task": "fr", "model": model, "embedding_size": embedding_size, "run": "gpu-benchmark"})


def step_flops(config: Any, *, batch: int, device: str) -> float:
    """Model FLOPs of one training step of ``batch`` faces: FaceMAE forward + backward with IRM on stored
    teacher embeddings, the teacher's forward + backward on the reconstructions included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from facemae.models.registry import build_fr, build_mae
    from facemae.train.steps import freeze_teacher, mae_irm_step

    model = build_mae(config.model.mae, norm_pix_loss=config.loss.norm_pix_loss).to(device)
    teacher = freeze_teacher(build_fr(config.model.teacher, embedding_size=config.model.embedding_size)).to(device)
    images = torch.randn(batch, 3, 112, 112, device=device)
    data = {"image": images, "identity": torch.arange(batch, device=device)}
    with torch.no_grad():
        data["teacher_emb"] = teacher(images)
    with FlopCounterMode(display=False) as counter:
        mae_irm_step(model, teacher, data, config, step=config.train.max_steps)["loss"].backward()
    return float(counter.get_total_flops())


def _reports(run_dir: Path, *, warmup: int) -> dict[str, float]:
    """Throughput and data wait from rank 0's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if m["step"] > warmup] or lines
    spans = [(b["time"] - a["time"], b["data_wait_fraction"]) for a, b in zip(lines, lines[1:])]
    total = sum(s for s, _ in spans)
    return {"images_per_s": statistics.median(m["images_per_s"] for m in steady),
            "step_time_s": statistics.median(m["step_time_s"] for m in steady),
            "data_wait": sum(s * f for s, f in spans) / total if total > 0 else lines[-1]["data_wait_fraction"],
            "gpu_mem_peak_gib": max((m.get("gpu_mem_peak_gib", 0.0) for m in lines), default=0.0),
            "reports": len(lines)}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch

    from facemae.data.ingest import ingest
    from facemae.data.owner import mask_dataset
    from facemae.generate.embed import embed_dataset, embedded_output
    from facemae.generate.release import generate_released
    from facemae.train.trainer import train

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run this on a machine with an NVIDIA GPU, or pass --cpu-smoke")
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if gpu else None)
    if gpu and peak is None:
        raise SystemExit(f"unknown peak for {name!r}: pass --peak-tflops <dense bf16 TFLOP/s>")
    probe = _config(root, args, teacher=Path("unused"))
    teacher = _teacher(root, probe.model.teacher, probe.model.embedding_size)
    config = _config(root, args, teacher=teacher)
    seconds: dict[str, float] = {}

    def timed(stage: str, work: Any) -> Any:
        started = time.perf_counter()
        out = work()
        seconds[stage] = time.perf_counter() - started
        console.say(f"{stage:9s}{seconds[stage]:8.1f} s")
        return out

    original = timed("ingest", lambda: ingest(config))
    timed("mask", lambda: mask_dataset(config))
    dataset = embedded_output(config.data.output, config.train.teacher, config.loss)
    timed("embed", lambda: embed_dataset(config, source=config.data.output, weights=config.train.teacher,
                                         output=dataset))
    result = timed("train", lambda: train(config, dataset=dataset))
    released = timed("generate", lambda: generate_released(config, masked=config.masked_output()))
    figures = _reports(Path(result.run_dir), warmup=args.warmup)
    flops = step_flops(config, batch=config.train.micro_batch, device="cuda" if gpu else "cpu")
    per_image = flops / config.train.micro_batch
    figures.update({
        "device": name, "peak_bf16_tflops": peak, "model_gflop_per_image": per_image / 1e9,
        "mfu": figures["images_per_s"] * per_image / (peak * 1e12) if peak else None,
        "generate_images_per_s": released.num_images() / seconds["generate"],
        "model": config.model.mae, "teacher": config.model.teacher, "precision": config.train.precision,
        "zero_stage": config.train.zero_stage, "micro_batch": config.train.micro_batch,
        "steps": config.train.max_steps, "faces": original.num_images(),
        "seconds": seconds})
    return figures


def table(figures: dict[str, Any]) -> str:
    mfu = f"{figures['mfu']:.3f}" if figures["mfu"] is not None else "n/a"
    return "\n".join([
        "| figure | value |", "|---|---|",
        f"| device | {figures['device']} (dense bf16 peak {figures['peak_bf16_tflops']} TFLOP/s) |",
        f"| model | {figures['model']} + {figures['teacher']} teacher, {figures['precision']}, ZeRO-"
        f"{figures['zero_stage']}, micro-batch {figures['micro_batch']}, {figures['steps']} steps |",
        f"| training images/s (median after warm-up) | {figures['images_per_s']:.1f} |",
        f"| model GFLOP per image (fwd + bwd) | {figures['model_gflop_per_image']:.2f} |",
        f"| MFU | {mfu} |",
        f"| data-wait fraction (whole run) | {figures['data_wait']:.3f} |",
        f"| peak GPU memory (GiB) | {figures['gpu_mem_peak_gib']:.2f} |",
        f"| generation pool images/s | {figures['generate_images_per_s']:.1f} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the throughput median")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="micro-batch of the one worker")
    parser.add_argument("--faces", type=int, default=20000, help="synthetic faces to ingest")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--cpu-smoke", action="store_true", help="check the script on CPU with tiny models")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray, DeepSpeed and torch output here, not in the log")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.log_every = min(args.steps, 6), 0, 1
    with tempfile.TemporaryDirectory(prefix="facemae-gpu-") as tmp, job_console("gpu-benchmark", verbose=args.verbose):
        figures = run(args, Path(args.keep or tmp))
    print(table(figures))
    if args.cpu_smoke:
        print("(--cpu-smoke: the figures check the script, not a machine; nothing written)")
        return
    record = {**provenance(), "machine": f"{figures['device']}, {platform.node()}, {os.cpu_count()} CPU cores",
              "figures": figures}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "gpu.md").write_text(f"# GPU benchmark\n\n{record['date']}, {record['machine']}, commit {commit()}, "
                                    f"`{record['command']}`\n\n{table(figures)}\n")
    print(f"wrote {RESULTS / 'gpu.json'} and gpu.md")


if __name__ == "__main__":
    sys.exit(main())
