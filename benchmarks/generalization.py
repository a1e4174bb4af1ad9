"""Cross-dataset releases, recorded (issue 28): FaceMAE trained on one dataset releasing another's identities.

Runs ``jobs/experiment.py``'s comparison with ``experiment.deploy`` set to a second dataset B (by default the
synthetic ``shifted`` domain: other people under other light, ``data.domain``): B's own rows train their
generators on B's training identities (in-domain), the ``-cross`` rows use FaceMAE and MAE trained on
``data`` (dataset A, the ``base`` domain) with no retraining, and every row is scored on B by B's judge, pairs
and FR recipe. Writes ``benchmarks/results/generalization.json`` (per-seed lists: ``rows.in_domain`` and
``rows.cross_domain``, each ``masked``/``mae``/``facemae`` -> ``accuracy``, ``identity_leak@1``..., with the
date, machine, commit and command), ``generalization.md`` (means with 95% t intervals and the paired
differences cross - in) and ``generalization_reconstructions.png``, ``generalization_privacy_utility.png``.
Every run, release and score is reused, so a stopped run continues where it was; with the same
``train.storage_path`` as ``benchmarks/science.py`` the ``-cross`` rows reuse its generators on A.

    python benchmarks/generalization.py [--config jobs/configs/experiment.yaml] [--set key=value ...]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from facemae import console
from facemae.cli import job_console, job_parser
from facemae.config import load_config
from facemae.eval.stats import mean_ci, paired_difference
from facemae.experiment import run_experiment
from provenance import RESULTS, provenance

DEPLOY = ["experiment.deploy.output=data/shifted", "experiment.deploy.domain=shifted"]
METHODS = ("masked", "mae", "facemae")
METRICS = ("accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio")


def _cell(values: list[float]) -> str:
    ci = mean_ci(values)
    return f"{ci.mean:.4f}" if len(values) < 2 else f"{ci.mean:.4f} ± {(ci.high - ci.low) / 2:.4f}"


def _said(dataset: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in dataset.items())


def markdown(body: dict[str, Any]) -> list[str]:
    """``generalization.md``: both scopes' means and the paired differences cross - in per method."""
    rows, seeds, data = body["rows"], body["seeds"], body["datasets"]
    lines = ["# Cross-dataset release: FaceMAE trained on one dataset, releasing another's identities", "",
             f"{body['date']} · {body['machine']} · commit {body['commit']} · `{body['command']}` · "
             f"{body['wall_minutes']} min", "",
             f"Deployed dataset B: {_said(data['deploy'])}. In-domain rows: generators trained on B's own training "
             f"identities. Cross-domain rows: FaceMAE and MAE trained on dataset A ({_said(data['train'])}), with no "
             "retraining. "
             "Every row is scored on B by the same judge, pairs and FR recipe; the masked release has no "
             f"generator, so it has one row, the same in both scopes. Cells: mean ± half-width of the 95% t interval over "
             f"{len(seeds)} seed(s) {seeds}.", "",
             "| release | generator trained on | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for method in METHODS:
        for scope, where in (("in_domain", "B (in-domain)"), ("cross_domain", "A (cross-domain)")):
            if method == "masked" and scope == "cross_domain":
                continue  # no generator: the same release and numbers in both scopes
            values = rows[scope][method]
            lines.append(f"| {method} | {where if method != 'masked' else 'none'} | "
                         + " | ".join(_cell(values[k]) if k in values else "-" for k in METRICS) + " |")
    if len(seeds) > 1:
        lines += ["", "Paired differences (same seed), mean [95% t interval]:", "",
                  "| difference | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        pairs = [(f"{m} cross - in", rows["cross_domain"][m], rows["in_domain"][m]) for m in ("mae", "facemae")]
        pairs += [(f"facemae - mae, {scope}", rows[scope]["facemae"], rows[scope]["mae"])
                  for scope in ("in_domain", "cross_domain")]
        pairs += [(f"facemae - masked, {scope}", rows[scope]["facemae"], rows[scope]["masked"])
                  for scope in ("in_domain", "cross_domain")]
        for name, a, b in pairs:
            cells = []
            for k in METRICS:
                d = paired_difference(a[k], b[k]) if k in a and k in b else None
                cells.append("-" if d is None else f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![releases: masked, MAE, FaceMAE (in-domain), MAE, FaceMAE (cross-domain), originals]"
                  "(generalization_reconstructions.png) ![privacy-utility](generalization_privacy_utility.png)", ""]
    return lines


def main() -> None:
    parser = job_parser(__doc__, default_config="jobs/configs/experiment.yaml", example="experiment.seeds=[0]")
    args = parser.parse_args()
    overrides = [o for o in DEPLOY if o.split("=")[0] not in {s.split("=")[0] for s in args.overrides}]
    config = load_config(args.config, overrides + args.overrides)
    meta = provenance()
    started = time.monotonic()
    with job_console("generalization", verbose=args.verbose):
        result = run_experiment(config, say=console.say)
    meta["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    report = Path(result.report).parent
    body = {**meta, **json.loads((report / "generalization.json").read_text()), "config": args.config}
    (RESULTS / "generalization.json").write_text(json.dumps(body, indent=1) + "\n")
    for figure in ("reconstructions.png", "privacy_utility.png"):
        shutil.copyfile(report / figure, RESULTS / f"generalization_{figure}")
    (RESULTS / "generalization.md").write_text("\n".join(markdown(body)))
    print(f"wrote {RESULTS / 'generalization.md'} ({meta['wall_minutes']} min)")


if __name__ == "__main__":
    main()
