"""Do the synthetic faces look like aligned photos to a model? Each style beside the real reference.

For every synthetic style (``facemae.data.synthetic.STYLES``) this measures, in one run:

1. the three image statistics of ``facemae.measures.image_stats`` (Laplacian variance, power-spectrum
   slope, grayscale standard deviation), quartiles over ``--faces`` faces of the main job's dataset
   (seed 0, ``--faces / 200`` images of each of 200 identities), beside the quartiles of 1,000 real
   aligned crops (LFW deep-funneled, MTCNN + ``norm_crop``; the synthetic-statistics issue);
2. identity separability: the experiment's FR recipe (``jobs/configs/experiment.yaml``, the
   ``originals`` row: fr_tiny trained on the deployment identities' originals, ``experiment.fr_steps``
   steps) and its held-out verification accuracy on ``eval.pairs`` pairs of the other identities, per
   seed, with the 95% t interval and the paired difference photo - cartoon (same seeds);
3. generation speed: images/s of each style, timed in turns, and the photo / cartoon time ratio
   (median of the per-round ratios);
4. a contact sheet PNG of each style's first faces.

Writes ``benchmarks/results/synthetic_stats.{json,md}`` and ``synthetic_stats_<style>.png``. The FR runs
and datasets are reused by a rerun (runs by name, datasets by their settings), so an interrupted run
continues where it stopped.

    python benchmarks/synthetic_stats.py [--faces 1000] [--seeds 0 1 2] [--rounds 5] [--skip-fr]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.data.synthetic import GENERATOR_VERSIONS, STYLES, generate_identity
from facemae.eval.evaluate import verify
from facemae.eval.stats import mean_ci, paired_difference
from facemae.experiment import fr_config
from facemae.measures.image_stats import REAL_ALIGNED_QUARTILES, image_statistics, inside_real_iqr, quartiles
from facemae.train.trainer import train
from provenance import RESULTS, provenance

IDENTITIES = 200  # the main job's (train.yaml) synthetic identities, seed 0
SHEET = (6, 10)  # contact sheet rows x columns: the first images of the first identities


def faces(style: str, *, count: int) -> np.ndarray:
    """``[count, 112, 112, 3]``: images ``0 .. count/200 - 1`` of each of the 200 identities, seed 0."""
    per = max(1, count // IDENTITIES)
    return np.concatenate([generate_identity(i, images=per, seed=0, style=style) for i in range(IDENTITIES)])[:count]


def style_statistics(images: np.ndarray) -> dict[str, dict[str, object]]:
    """Quartiles of each statistic and whether the median lies inside the real interquartile range."""
    out = {}
    for name, values in image_statistics(images).items():
        q = quartiles(values)
        out[name] = {"quartiles": [round(v, 3) for v in q], "median_inside_real_iqr": inside_real_iqr(name, q[1])}
    return out


def speed(*, images: int, rounds: int) -> dict[str, float]:
    """Images/s of each style (median over rounds, styles timed in turns) and the photo / cartoon time ratio."""
    rates: dict[str, list[float]] = {s: [] for s in STYLES}
    per = 20
    for _ in range(rounds):
        for style in STYLES:
            started = time.perf_counter()
            for identity in range(images // per):
                generate_identity(identity, images=per, seed=0, style=style)
            rates[style].append(images / (time.perf_counter() - started))
    ratios = [c / p for c, p in zip(rates["cartoon"], rates["photo"])]
    return {**{f"{s}_images_per_s": round(statistics.median(r), 1) for s, r in rates.items()},
            "photo_over_cartoon_time": round(statistics.median(ratios), 3)}


def separability(style: str, seeds: list[int], say) -> list[float]:
    """Held-out verification accuracy of the experiment's FR recipe trained on this style's faces, per seed."""
    config = load_config("jobs/configs/experiment.yaml",
                         [f"name=synthetic-stats-{style}", f"data.style={style}",
                          f"data.output=data/synthetic-stats-{style}"])
    ingest(config)
    accuracies = []
    for seed in seeds:
        fr = train(fr_config(config, seed, "originals"), dataset=config.data.output, split="deploy")
        accuracy = verify(config, fr.weights, pairs_from=config.data.output)["heldout_pairs"]["accuracy"]
        say(f"{style} seed {seed}: held-out verification accuracy {accuracy:.4f}")
        accuracies.append(float(accuracy))
    return accuracies


def contact_sheet(images: np.ndarray, path: Path) -> None:
    rows, cols = SHEET
    grid = images[:rows * cols].reshape(rows, cols, 112, 112, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(rows * 112, cols * 112, 3)).save(path)


def markdown(result: dict) -> list[str]:
    """The results page: statistics table, separability, speed, provenance."""
    styles = list(result["styles"])
    lines = ["# Synthetic faces against real aligned photos", "",
             "Quartiles 25 / 50 / 75 of each statistic (grayscale 0.299 R + 0.587 G + 0.114 B, 0-255) over "
             f"{result['faces']} faces of each style (seed 0, the main job's 200 identities), beside 1,000 real "
             "aligned 112x112 crops (LFW deep-funneled, MTCNN landmarks, InsightFace `norm_crop`; the "
             "synthetic-statistics issue). A style matches where its median lies inside the real interquartile "
             "range (**in**).", "",
             "| statistic | real aligned photos | " + " | ".join(
                 f"{s} (generator v{result['styles'][s]['generator_version']})" for s in styles) + " |",
             "|---" * (len(styles) + 2) + "|"]
    for name, real in REAL_ALIGNED_QUARTILES.items():
        cells = []
        for s in styles:
            stat = result["styles"][s]["statistics"][name]
            q = " / ".join(f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}" for v in stat["quartiles"])
            cells.append(f"{q} ({'**in**' if stat['median_inside_real_iqr'] else 'out'})")
        ref = " / ".join(f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" for v in real)
        lines.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    sep = result.get("separability")
    if sep:
        lines += ["", "Identity separability: the experiment's FR recipe (`jobs/configs/experiment.yaml`, the "
                  "originals row: fr_tiny trained on the deployment identities' originals) and its held-out "
                  f"verification accuracy, seeds {sep['seeds']}, mean ± 95% t interval:", "",
                  "| style | accuracy | per seed |", "|---|---|---|"]
        for s in styles:
            lines.append(f"| {s} | {sep[s]['interval']} | {', '.join(f'{a:.4f}' for a in sep[s]['accuracy'])} |")
        lines.append(f"| *paired: photo - cartoon* | {sep['paired_photo_minus_cartoon']} | |")
    sp = result["speed"]
    lines += ["", f"Generation, one process: photo {sp['photo_images_per_s']} images/s, cartoon "
              f"{sp['cartoon_images_per_s']} images/s; photo takes {sp['photo_over_cartoon_time']}x cartoon's "
              "time (median of per-round ratios, styles timed in turns).", "",
              " ".join(f"![{s}](synthetic_stats_{s}.png)" for s in styles), ""]
    lines += [f"- {k}: {result[k]}" for k in ("date", "machine", "commit", "command")]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds of 400 images per style")
    parser.add_argument("--skip-fr", action="store_true", help="statistics and speed only (seconds, not an hour)")
    args = parser.parse_args()
    result: dict = {**provenance(), "faces": args.faces, "real_reference": REAL_ALIGNED_QUARTILES, "styles": {}}
    for style in STYLES:
        images = faces(style, count=args.faces)
        contact_sheet(images, RESULTS / f"synthetic_stats_{style}.png")
        result["styles"][style] = {"generator_version": GENERATOR_VERSIONS[style],
                                   "statistics": style_statistics(images)}
        print(f"{style}: " + ", ".join(f"{k} {v['quartiles']}" for k, v in result["styles"][style]["statistics"].items()),
              flush=True)
    result["speed"] = speed(images=400, rounds=args.rounds)
    print(f"speed: {result['speed']}", flush=True)
    if not args.skip_fr:
        acc = {s: separability(s, args.seeds, say=lambda m: print(m, flush=True)) for s in STYLES}
        result["separability"] = {"seeds": args.seeds, **{s: {"accuracy": a, "interval": mean_ci(a).format()}
                                                          for s, a in acc.items()},
                                  "paired_photo_minus_cartoon": paired_difference(acc["photo"], acc["cartoon"]).format()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synthetic_stats.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "synthetic_stats.md").write_text("\n".join(markdown(result)))
    print(f"wrote {RESULTS / 'synthetic_stats.json'} and {RESULTS / 'synthetic_stats.md'}")


if __name__ == "__main__":
    main()
