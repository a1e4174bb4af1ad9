"""Why IRM hurts, measured: FaceMAE variants trained on one config, scored on held-out identities.

Every variant trains the experiment's FaceMAE (same data, teacher, steps, seed) with its own loss
overrides, then the validator scores it on ``train.val_images`` faces of the deployment identities
(never trained on), masked as the owner would:

- ``val_recon_loss`` / ``val_psnr_masked``: reconstruction of the masked patches;
- ``val_hf_ratio``: high-frequency energy against the originals (1.0 = real faces, > 2 noise texture);
- ``val_irm``: relation KL under the IRM teacher (what IRM optimises);
- ``val_judge_irm``: the same KL under the independent judge: relations kept for real, not by fooling
  the teacher;
- ``val_identity_leak@1``: the judge's retrieval of the true identity (privacy, lower is better).

The teacher and the judge are the experiment's own runs (trained once and reused), so the probe and
``jobs/experiment.py`` share them. Writes ``benchmarks/results/irm_probe.{json,md}``.

    python benchmarks/irm_probe.py [--config jobs/configs/experiment.yaml] [--variants raw_l1 mae ...]

On this 2-core machine two probes with ``OMP_NUM_THREADS=1`` and different ``--variants`` side by side
finish sooner than one with both threads (the tiny models scale poorly across threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from facemae.config import load_config
from provenance import RESULTS, provenance
from facemae.data.ingest import ingest
from facemae.experiment import shared_models
from facemae.train.trainer import train

# name -> loss overrides, each complete (the config's own IRM settings never leak into a variant).
# "mae" is the baseline (no IRM); "raw_l1" is DESIGN.md's definition (lambda 1, raw view, from step 0);
# "default" is the platform's default (README "Does it work?").
_RAW = ["loss.irm_view=raw", "loss.irm_start=0", "loss.irm_ramp=0"]
_BLUR = ["loss.irm_view=blur", "loss.irm_blur_sigma=1.5", "loss.irm_start=0", "loss.irm_ramp=0"]
_LATE = ["loss.irm_start=0.25", "loss.irm_ramp=0.25"]
VARIANTS: dict[str, list[str]] = {
    "mae": ["loss.lambda_irm=0"],
    "raw_l1": ["loss.lambda_irm=1.0", *_RAW],
    "raw_l0.1": ["loss.lambda_irm=0.1", *_RAW],
    "raw_l0.1_late": ["loss.lambda_irm=0.1", *_RAW, *_LATE],
    "blur_l1": ["loss.lambda_irm=1.0", *_BLUR],
    "blur_l0.1": ["loss.lambda_irm=0.1", *_BLUR],
    "blur_l1_late": ["loss.lambda_irm=1.0", *_BLUR, *_LATE],
    "default": ["loss.lambda_irm=0.1", *_BLUR, *_LATE],
    "blur3_l0.1_late": ["loss.lambda_irm=0.1", *_BLUR, "loss.irm_blur_sigma=3.0", *_LATE],
}
KEYS = ("val_recon_loss", "val_psnr_masked", "val_hf_ratio", "val_irm", "val_judge_irm", "val_identity_leak@1",
        "val_image_leak@1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/experiment.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for all")
    parser.add_argument("--output", default=str(RESULTS / "irm_probe"))
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    ingest(base)
    shared = shared_models(base, lambda s: print(s, flush=True))
    out = Path(args.output)
    for name in args.variants:
        cfg = load_config(args.config, [*args.overrides, *VARIANTS[name]])
        irm = cfg.loss.lambda_irm > 0
        cfg = dataclasses.replace(cfg, name=f"{base.name}-probe-{name}", train=dataclasses.replace(
            cfg.train, task="mae", teacher=shared["teacher"], judge=shared["judge"], val_every=cfg.train.max_steps,
            val_images=args.val_images))
        started = time.monotonic()
        result = train(cfg, dataset=shared["embedded"] if irm else None, show_progress=False)
        row = {k: result.metrics.get(k) for k in KEYS}
        row.update(overrides=VARIANTS[name], seconds=round(time.monotonic() - started, 1),
                   preview=str(Path(result.checkpoint or "") / "preview.png"))
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        _write(out, args, name, row)


def _write(out: Path, args: argparse.Namespace, name: str, row: dict) -> None:
    """Adds one variant's row to the JSON and table (re-read first: probes of other variants may run
    beside this one, one thread each, and write to the same files)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = json.loads(out.with_suffix(".json").read_text())["variants"] if out.with_suffix(".json").is_file() else {}
    meta = {**provenance(), "config": args.config}
    variants[name] = {**row, "commit": meta["commit"], "date": meta["date"]}  # rows may come from several runs
    out.with_suffix(".json").write_text(json.dumps({**meta, "variants": variants}, indent=1) + "\n")
    render(out)


def render(out: Path) -> None:
    """Writes ``<out>.md`` from ``<out>.json``."""
    saved = json.loads(out.with_suffix(".json").read_text())
    meta, variants = {k: v for k, v in saved.items() if k != "variants"}, saved["variants"]
    lines = [f"# IRM probe ({meta.get('config')})", "", "Last run:", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "Each variant trains experiment.yaml's FaceMAE (400 steps, seed 0, the shared teacher) with the "
             "overrides shown; scored on held-out faces. Lower recon_loss / irm / judge_irm / leak is better; "
             "hf_ratio 1.0 is as sharp as real faces.", "",
             "| variant | overrides | " + " | ".join(k.removeprefix("val_") for k in KEYS) + " | s | commit |",
             "|---" * (len(KEYS) + 4) + "|"]
    for name, row in variants.items():
        cells = " | ".join("-" if row.get(k) is None else f"{row[k]:.4f}" for k in KEYS)
        lines.append(f"| {name} | {' '.join(row['overrides'])} | {cells} | {row['seconds']:.0f} | "
                     f"{row.get('commit', '-')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
