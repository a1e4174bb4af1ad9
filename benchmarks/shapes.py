"""Would wider CPU model shapes meet the MFU goals, and would they buy it back in release quality?

The performance issue's MFU rows (``run_all.py``) sit at 0.3-0.36 of the GEMM rate with the CPU configs'
tiny models, and names "model shapes the CPU executes efficiently" as a lever. This script measures both
halves of that trade on one thread, as a training worker runs:

1. **MFU by shape**: the FaceMAE step (with IRM through ``experiment.yaml``'s fr_tiny teacher, stored
   embeddings, and without IRM) for encoder widths 64 (``facemae_vit_tiny_p8``), 128, 192 and 256, and the
   FR (ArcFace) step for IResNet widths x1 (``fr_tiny``: 8-64 channels) up to x8 (insightface's 64-512), at
   ``experiment.yaml``'s batch; each against the fp32 GEMM timed in turns (``run_all.mfu``).
2. **Release quality at equal wall time**: the tiny FaceMAE and width 192 (``WIDE``), each trained with ``experiment.yaml``'s recipe (batch, AdamW, warmup-cosine lr, clipping)
   for the seconds that experiment.yaml's 400 tiny FaceMAE + IRM steps take: the tiny model gets its 400
   steps, the wide one the steps of its own FaceMAE + IRM step that fit in the same time (the step times
   measured in turns). Both train the reconstruction loss only: IRM needs a trained teacher, so its cost
   is charged and its effect left out, as it would act on both shapes. Scored on held-out identities with
   one fixed 75% mask per face: masked-patch PSNR (dB) and hf_ratio (``facemae.measures.fidelity``), mean
   and 95% t interval over seeds and the paired difference.

Writes ``benchmarks/results/shapes.{json,md}`` and ``shapes_reconstructions.png`` (first seed: masked,
tiny, wide, original; one column per held-out face).

    python benchmarks/shapes.py [--seeds 0,1,2] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facemae import console
from facemae.allocator import retain_freed_memory
from facemae.cli import job_console
from facemae.config import Config, load_config
from facemae.data.masking import random_keep
from facemae.data.synthetic import generate_identity
from facemae.eval.stats import mean_ci, paired_difference
from facemae.measures.fidelity import hf_ratio, masked_psnr, patch_pixel_mask
from facemae.models.fr import to_model_range, to_uint8
from facemae.models.registry import FR_SPECS, build_mae
from facemae.train.engine import adamw, lr_lambda
from facemae.train.steps import mae_irm_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import seconds_in_turns  # noqa: E402
from provenance import RESULTS, provenance  # noqa: E402
from run_all import CONFIGS, fr_train_step, gemm, mae_step, mfu  # noqa: E402

# Encoder widths over the tiny model's depths (2 encoder blocks, 1 decoder block); heads of 32 dims past
# width 128, the decoder at most 128 wide. Width 64 is facemae_vit_tiny_p8 itself.
MAE_WIDTHS = [64, 128, 192, 256]
# The wide side of the equal-time comparison: the narrowest width whose FaceMAE + IRM step passes
# train_step_mfu's 0.50 (results/shapes.md at dc6a051: 0.55; width 128: 0.45).
WIDE = 192
FR_SCALES = [1, 2, 3, 4, 8]  # x fr_tiny's widths (8, 16, 32, 64); x8 is insightface's (64, 128, 256, 512)


def mae_shape(width: int) -> dict[str, int]:
    return {"embed_dim": width, "num_heads": max(4, width // 32), "decoder_embed_dim": min(width, 128)}


def fr_shape(scale: int) -> dict[str, tuple[int, ...]]:
    return {"widths": tuple(scale * w for w in FR_SPECS["fr_tiny"].widths)}


def mfu_rows(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    baseline, batch, rows = gemm(), config.train.micro_batch, []
    for width in MAE_WIDTHS:
        for irm in (True, False):
            step, _, _ = mae_step(config, batch=batch, irm=irm, **mae_shape(width))
            ratio, seconds, rate, flops = mfu(step, baseline, repeats=repeats)
            rows.append({"model": "FaceMAE + IRM" if irm else "MAE", "shape": f"width {width}", "mfu": ratio,
                         "step_ms": seconds * 1e3, "gflop": flops / 1e9, "gemm_gflops": rate / 1e9})
            console.say(f"[shapes] {rows[-1]['model']} width {width}: MFU {ratio:.3f}, {seconds * 1e3:.0f} ms")
    for scale in FR_SCALES:
        shape = fr_shape(scale)
        # The full insightface width takes ~25 s a step here: fewer rounds.
        ratio, seconds, rate, flops = mfu(fr_train_step(config, batch=batch, **shape), baseline,
                                          repeats=repeats if scale < 8 else 3, warmup=2 if scale < 8 else 1)
        rows.append({"model": "FR", "shape": f"widths {shape['widths']}", "mfu": ratio, "step_ms": seconds * 1e3,
                     "gflop": flops / 1e9, "gemm_gflops": rate / 1e9})
        console.say(f"[shapes] FR widths {shape['widths']}: MFU {ratio:.3f}, {seconds * 1e3:.0f} ms")
    return rows


def faces(identities: range, per_identity: int, *, seed: int) -> np.ndarray:
    return np.concatenate([generate_identity(i, images=per_identity, seed=seed) for i in identities])


def fixed_masks(n: int, *, num_patches: int, ratio: float, seed: int) -> torch.Tensor:
    """``[n, L]``, 1 = removed: one mask per face, drawn as the owner's masking draws them."""
    rng, keep = np.random.default_rng(seed), int(num_patches * (1 - ratio))
    mask = torch.ones(n, num_patches)
    for row in mask:
        row[torch.from_numpy(random_keep(num_patches, keep, rng=rng))] = 0
    return mask


def train_mae(config: Config, width: int, *, steps: int, images: torch.Tensor, seed: int) -> torch.nn.Module:
    """``steps`` reconstruction-only steps of ``config``'s recipe on ``images`` (epochs reshuffled)."""
    torch.manual_seed(seed)
    model = build_mae(config.model.mae, norm_pix_loss=config.loss.norm_pix_loss, **mae_shape(width))
    recipe = dataclasses.replace(config.train, max_steps=steps)
    plain = dataclasses.replace(config, loss=dataclasses.replace(config.loss, lambda_irm=0.0), train=recipe)
    optimizer = adamw(model, recipe, world_size=1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    masks, order = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    batch, queue = recipe.micro_batch, torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if len(queue) < batch:
            queue = torch.randperm(len(images), generator=order)
        picked, queue = queue[:batch], queue[batch:]
        optimizer.zero_grad(set_to_none=True)
        mae_irm_step(model, None, {"image": images[picked]}, plain, generator=masks, step=step)["loss"].backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
    return model.eval()


def release(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(torch.cat([model.reconstruct(images[i:i + 100], mask[i:i + 100])
                                   for i in range(0, len(images), 100)])).numpy()


def equal_time(config: Config, wide: int, *, seeds: list[int], repeats: int, quick: bool) -> dict[str, Any]:
    batch = config.train.micro_batch
    tiny_step, _, _ = mae_step(config, batch=batch, **mae_shape(MAE_WIDTHS[0]))
    wide_step, _, _ = mae_step(config, batch=batch, **mae_shape(wide))
    turns = seconds_in_turns({"tiny": tiny_step.run, "wide": wide_step.run}, repeats=repeats)
    cost = statistics.median(w / t for w, t in zip(turns["wide"], turns["tiny"]))  # wide step / tiny step
    tiny_steps = 40 if quick else config.train.max_steps
    steps = {MAE_WIDTHS[0]: tiny_steps, wide: max(1, round(tiny_steps / cost))}
    console.say(f"[shapes] FaceMAE + IRM step: width {wide} costs {cost:.2f}x width 64; equal time: "
                f"{steps[MAE_WIDTHS[0]]} vs {steps[wide]} steps")
    data = config.data
    train_ids = range(20 if quick else data.num_identities // 2)
    test_ids = range(train_ids.stop, train_ids.stop + (10 if quick else data.num_identities // 2))
    train_px = faces(train_ids, data.images_per_identity, seed=data.seed)
    test_px = faces(test_ids, 4, seed=data.seed)
    train_x, test_x = to_model_range(torch.from_numpy(train_px)), to_model_range(torch.from_numpy(test_px))
    patch = config.mask.patch_size
    num_patches = (test_x.shape[-1] // patch) ** 2
    mask = fixed_masks(len(test_x), num_patches=num_patches, ratio=config.mask.ratio, seed=data.seed)
    removed = mask.numpy().astype(bool)
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in steps}
    for seed in seeds:
        hidden = patch_pixel_mask(removed[:8], patch_size=patch, img_size=test_px.shape[1])
        grid = [np.where(hidden[..., None], 0, test_px[:8])]
        for width, n in steps.items():
            started = time.perf_counter()
            released = release(train_mae(config, width, steps=n, images=train_x, seed=seed), test_x, mask)
            runs[width].append({"seed": seed, "steps": n, "train_s": time.perf_counter() - started,
                                "psnr_masked": masked_psnr(test_px, released, removed, patch_size=patch),
                                "hf_ratio": hf_ratio(released, test_px)})
            grid.append(released[:8])
            console.say(f"[shapes] seed {seed} width {width}: {n} steps, masked PSNR "
                        f"{runs[width][-1]['psnr_masked']:.2f} dB, hf_ratio {runs[width][-1]['hf_ratio']:.2f}")
        if seed == seeds[0]:
            rows = [np.concatenate(list(g), axis=1) for g in [*grid, test_px[:8]]]
            Image.fromarray(np.concatenate(rows, axis=0)).save(RESULTS / "shapes_reconstructions.png")
    tiny = MAE_WIDTHS[0]
    summary = {metric: {"tiny": mean_ci([r[metric] for r in runs[tiny]]).to_dict(),
                        "wide": mean_ci([r[metric] for r in runs[wide]]).to_dict(),
                        "wide_minus_tiny": paired_difference([r[metric] for r in runs[wide]],
                                                             [r[metric] for r in runs[tiny]]).to_dict()}
               for metric in ("psnr_masked", "hf_ratio")}
    return {"wide_width": wide, "step_cost": cost, "steps": {str(w): n for w, n in steps.items()},
            "train_faces": len(train_px), "test_faces": len(test_px), "runs": {str(w): r for w, r in runs.items()},
            "summary": summary}


def _ci(d: dict[str, float]) -> str:
    half = (d["ci95_high"] - d["ci95_low"]) / 2
    return f"{d['mean']:.2f} ± {half:.2f}"


def write(result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shapes.json").write_text(json.dumps(result, indent=1) + "\n")
    eq = result["equal_time"]
    lines = ["# CPU model shapes: MFU and release quality at equal wall time", "",
             *(f"- {k}: {result[k]}" for k in ("date", "machine", "commit", "command")), "",
             "## MFU by shape (one thread, batch " + str(result["batch"]) + ", fp32 GEMM timed in turns)", "",
             "| step | shape | MFU | ms per step | GFLOP per step |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['shape']} | {r['mfu']:.3f} | {r['step_ms']:.0f} | {r['gflop']:.2f} |"
              for r in result["mfu"]]
    tiny, wide = str(MAE_WIDTHS[0]), str(eq["wide_width"])
    lines += ["", f"## Release quality at equal wall time: width {tiny} vs width {wide}", "",
              f"The width-{wide} FaceMAE + IRM step costs {eq['step_cost']:.2f}x the width-{tiny} one (in turns), so in "
              f"the time of {eq['steps'][tiny]} tiny steps the wide model takes {eq['steps'][wide]}. Reconstruction "
              f"loss only; {eq['train_faces']} training faces, {eq['test_faces']} held-out faces of other identities, "
              f"one fixed mask each. Mean ± 95% t interval over seeds {[r['seed'] for r in eq['runs'][tiny]]}.", "",
              f"| metric | width {tiny} | width {wide} | paired {wide} - {tiny} |", "|---|---|---|---|"]
    for metric, s in eq["summary"].items():
        lines.append(f"| {metric} | {_ci(s['tiny'])} | {_ci(s['wide'])} | {_ci(s['wide_minus_tiny'])} |")
    lines += ["", "Per seed: " + "; ".join(
        f"width {w} seed {r['seed']}: {r['steps']} steps in {r['train_s']:.0f} s, {r['psnr_masked']:.2f} dB, "
        f"hf {r['hf_ratio']:.2f}" for w, rs in eq["runs"].items() for r in rs), "",
        "![masked, width 64, wide, originals](shapes_reconstructions.png)"]
    (RESULTS / "shapes.md").write_text("\n".join(lines) + "\n")
    return RESULTS / "shapes.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each step (median)")
    parser.add_argument("--quick", action="store_true", help="few steps and faces (a smoke run of the script)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    meta = provenance()
    torch.set_num_threads(1)  # as a training worker with one CPU runs
    retain_freed_memory()
    config = load_config(CONFIGS / "experiment.yaml")
    with job_console("shapes", verbose=args.verbose):
        rows = mfu_rows(config, repeats=2 if args.quick else args.repeats)
        eq = equal_time(config, WIDE, seeds=[int(s) for s in args.seeds.split(",")],
                        repeats=2 if args.quick else args.repeats, quick=args.quick)
        path = write({**meta, "batch": config.train.micro_batch, "mfu": rows, "equal_time": eq})
        console.say(f"[shapes] wrote {path}")


if __name__ == "__main__":
    main()
