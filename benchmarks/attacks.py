"""Stronger attackers against the frontier's releases at one setting (issue 28): the adaptive attacker and
membership inference, recorded.

At one mask ratio (and FaceMAE lambda) of ``frontier.yaml``, for each seed: the originals, the masked faces,
MAE's and FaceMAE's releases of the deployment identities (the frontier's own runs and releases, reused; a
seed the frontier has no generators for trains them), then :func:`facemae.attacks.attack_scores` on each.
Writes ``benchmarks/results/attacks.json`` (per-seed lists, the issue's schema, with the date, machine, commit
and command), ``attacks.md`` (means with 95% t intervals, paired differences) and ``attacks_roc.png`` (the
membership inference ROC of the first seed), after every seed. Each row and seed's scores also go to the ledger
``benchmarks/results/attacks-points/`` (committed, under the digest of the settings they were measured with), so a
stopped run keeps what it finished and a rerun continues, in this checkout (every run, release and score reused) or
in a fresh one (the ledger's rows not measured again; the teacher and judge are trained only for rows it lacks).

    python benchmarks/attacks.py [--config jobs/configs/frontier.yaml] [--ratio 0.9] [--lam 0.3] [--seeds 1 2 0]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

from facemae import console
from facemae.cli import job_console, job_parser
from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.shards import atomic_write_text
from facemae.eval.stats import mean_ci, paired_difference
from facemae.experiment import ATTACK_METRICS, autoencoder_config, row_attacks, shared_models
from facemae.frontier import _ratio_config, _release, settings_digest
from facemae.report import plot_membership_roc
from facemae.train.trainer import train
from provenance import RESULTS, provenance

ROWS = ("originals", "masked", "mae", "facemae")
PAIRS = (("facemae", "mae"), ("facemae", "masked"), ("mae", "masked"))


LEDGER = RESULTS / "attacks-points"


def _point(rc: Any, row: str, *, ratio: float, lam: float, seed: int) -> Path:
    """A row and seed's file in the ledger: ``facemae-l0.3-r0.9-s1.json``, ``originals-r0.9-s1.json``."""
    tag = f"facemae-l{lam:g}" if row == "facemae" else row
    return LEDGER / f"{tag}-r{ratio:g}-s{seed}.json"


def _settings(rc: Any) -> dict[str, Any]:
    """What a ledger row's numbers depend on: the frontier's settings digest and the attacker's own settings."""
    return {"settings": settings_digest(rc), "adaptive_steps": rc.experiment.adaptive_steps,
            "nonmembers": bool(rc.experiment.nonmembers)}


def seed_rows(config: Any, shared: Callable[[], dict[str, str]], *, ratio: float, lam: float,
              seed: int) -> dict[str, dict[str, Any]]:
    """Every row's attack numbers at one seed: from the ledger, else measured (the frontier's generators and
    releases reused) and recorded there. ``shared()`` gives the teacher, judge and embedded dataset."""
    rc = _ratio_config(config, ratio, seed)
    out: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        point = _point(rc, row, ratio=ratio, lam=lam, seed=seed)
        entry = json.loads(point.read_text()) if point.is_file() else {}
        if {k: entry.get(k) for k in _settings(rc)} == _settings(rc):
            out[row] = entry["scores"]
            console.say(f"seed {seed}: {row:9s} from the ledger {point.relative_to(RESULTS.parent.parent)}")
            continue
        out[row] = _measure(config, rc, row, shared(), lam=lam, seed=seed)
        LEDGER.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(point), json.dumps({**_settings(rc), "scores": out[row]}, indent=1, sort_keys=True,
                                                 default=float) + "\n")
    return out


def _measure(config: Any, rc: Any, row: str, shared: dict[str, str], *, lam: float, seed: int) -> dict[str, Any]:
    """One row's attack numbers at one seed (the frontier's generators and releases, reused)."""
    mask_dataset(rc)  # the ratio's masked faces: the frontier's prepare() makes them, reused here when finished
    weights, tag = "", row
    if row in ("mae", "facemae"):
        lam_row = lam if row == "facemae" else 0.0
        generator = autoencoder_config(dataclasses.replace(rc, name=f"{rc.name}-l{lam_row:g}",
                                                           loss=dataclasses.replace(rc.loss, lambda_irm=lam_row)),
                                       seed, row, teacher=shared["teacher"])
        weights = train(generator, dataset=shared["embedded"] if row == "facemae" else None,
                        show_progress=False).weights
        tag = f"facemae-l{lam:g}" if row == "facemae" else "mae"
    if row == "originals":
        released = config.data.output
    else:
        released = _release(rc, method=row if row == "masked" else "reconstruct", weights=weights, paste=True,
                            tag=tag if row == "masked" else f"{tag}-s{seed}")
    cache = str(Path(config.train.run_dir_for(f"{rc.name}-attacks")) / f"{tag}-s{seed}")
    Path(cache).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scores = row_attacks(rc, row, seed, judge=shared["judge"], weights=weights, released=released, cache=cache,
                         name=f"{tag}-s{seed}")
    console.say(f"seed {seed}: {row:9s} adaptive_identity_leak@1 {scores['adaptive_identity_leak@1']:.3f} "
                f"mia_auc {scores['mia_auc']:.3f} adaptive_mia_auc {scores['adaptive_mia_auc']:.3f} "
                f"({time.monotonic() - started:.0f} s)")
    return scores


def _cell(values: list[float]) -> str:
    ci = mean_ci(values)
    return f"{ci.mean:.3f}" if len(values) < 2 else f"{ci.mean:.3f} ± {(ci.high - ci.low) / 2:.3f}"


def write(meta: dict[str, Any], seeds: list[int], runs: dict[int, dict[str, dict[str, Any]]], *, ratio: float,
          lam: float, steps: int, judge_leak: dict[str, list[float]]) -> None:
    rows = {row: {k: [float(runs[s][row][k]) for s in seeds] for k in ATTACK_METRICS if k != "identity_leak@1"}
            for row in ROWS}
    for row in ROWS:
        rows[row] = {"identity_leak@1": judge_leak[row], **rows[row]}
    body = {**meta, "setting": {"mask_ratio": ratio, "lambda_irm": lam, "adaptive_steps": steps}, "seeds": seeds,
            "rows": rows, "roc": {row: {k: runs[seeds[0]][row][k] for k in ("mia_roc", "adaptive_mia_roc")}
                                  for row in ROWS}}
    (RESULTS / "attacks.json").write_text(json.dumps(body, indent=1) + "\n")
    metrics = list(rows["facemae"])
    lines = ["# Stronger attackers: adaptive attacker and membership inference", "",
             f"{meta['date']} · {meta['machine']} · commit {meta['commit']} · `{meta['command']}`", "",
             f"frontier.yaml's releases at mask ratio {ratio:g} (FaceMAE lambda {lam:g}), seeds {seeds}. The adaptive "
             f"attacker fine-tunes the judge for {steps} steps on the public faces (the training identities) beside "
             "their release by the row's own method; membership inference scores each original by its nearest "
             "released face (members: the deployment identities; non-members: people never released). Cells: "
             f"mean ± half-width of the 95% t interval over {len(seeds)} seed(s).", "",
             "| release | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(_cell(rows[row][k]) for k in metrics) + " |" for row in ROWS]
    if len(seeds) > 1:
        lines += ["", "Paired differences (same seed), mean [95% t interval]:", "",
                  "| difference | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for a, b in PAIRS:
            cells = []
            for k in metrics:
                d = paired_difference(rows[a][k], rows[b][k])
                cells.append(f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    lines += ["", "![membership inference ROC, first seed](attacks_roc.png)", ""]
    (RESULTS / "attacks.md").write_text("\n".join(lines))
    plot_membership_roc({row: {"attacks": runs[seeds[0]][row]} for row in ROWS}, RESULTS / "attacks_roc.png")


def main() -> None:
    parser = job_parser(__doc__, default_config="jobs/configs/frontier.yaml", example="experiment.adaptive_steps=100")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--lam", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 0])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    meta = provenance()
    frontier = json.loads((RESULTS / "frontier.json").read_text())
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    with job_console("attacks", verbose=args.verbose):
        @functools.cache
        def shared() -> dict[str, str]:  # only for rows the ledger lacks
            ingest(config)  # the frontier's dataset, reused when finished (a fresh checkout has none)
            return shared_models(config, console.say)

        for seed in args.seeds:
            runs[seed] = seed_rows(config, shared, ratio=args.ratio, lam=args.lam, seed=seed)
            done = list(runs)
            # The fixed judge's identity_leak@1 of the same releases, from the frontier's own scores.
            judge_leak = {row: [_frontier_leak(frontier, row, args.ratio, args.lam, s) for s in done] for row in ROWS}
            write(meta, done, runs, ratio=args.ratio, lam=args.lam, steps=config.experiment.adaptive_steps,
                  judge_leak=judge_leak)
            console.say(f"wrote {RESULTS / 'attacks.md'} (seeds {done})")


def _frontier_leak(frontier: dict[str, Any], row: str, ratio: float, lam: float, seed: int) -> float:
    if row == "originals":
        values = frontier["originals"]
        return float(values["identity_leak@1"][values["seeds"].index(seed)])
    want = {"masked": ("masked", 0.0), "mae": ("mae", 0.0), "facemae": ("facemae", lam)}[row]
    for p in frontier["points"]:
        if (p["method"], p["lambda_irm"]) == want and p["mask_ratio"] == ratio and seed in p["seeds"]:
            return float(p["identity_leak@1"][p["seeds"].index(seed)])
    return float("nan")


if __name__ == "__main__":
    main()
