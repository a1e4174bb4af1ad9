"""Figures of the experiment report: reconstruction grid, ROC curves, privacy-utility plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from facemae.data.images import decode_rgb
from facemae.data.shards import iter_rows, read_manifest

GRID_ROWS = ("masked", "mae", "facemae", "originals")


def _deploy_rows(root: str) -> list[dict[str, Any]]:
    manifest = read_manifest(root)
    return list(iter_rows(manifest.files(root, "deploy")))


def reconstruction_grid(sets: dict[str, str], path: Path, *, faces: int = 8, order: Sequence[str] = GRID_ROWS) -> None:
    """One column per deployment face, one row per released set (``order``: masked, MAE, FaceMAE, original;
    the frontier's releases across mask ratios name their own)."""
    originals = sorted(_deploy_rows(sets["originals"]), key=lambda r: r["image_id"])
    step = max(1, len(originals) // faces)
    picked = [r["image_id"] for r in originals[::step][:faces]]
    rows = []
    for name in (n for n in order if n in sets):
        by_source: dict[str, bytes] = {}
        for r in sorted(_deploy_rows(sets[name]), key=lambda r: r["image_id"]):
            by_source.setdefault(r.get("source_id", r["image_id"]), r["image"])  # first masked copy
        rows.append(np.concatenate([decode_rgb(by_source[i]) for i in picked], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def plot_roc(table: dict[str, dict[str, Any]], path: Path) -> None:
    """ROC (mean over the 10 folds) of each row's FR model on the first verification target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for row, r in table.items():
        target, scores = next(iter(r["verification"].items()))
        ax.plot(scores["fpr"], scores["tpr"], label=f"{row} ({scores['accuracy']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC on {target}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_membership_roc(table: dict[str, dict[str, Any]], path: Path) -> None:
    """Membership inference ROC of each row (``attacks``: ``mia_roc`` by the fixed judge, solid;
    ``adaptive_mia_roc`` by the adaptive attacker, dashed), log-scaled false positives to show 1%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, (row, r) in enumerate(table.items()):
        attacks = r.get("attacks") or {}
        for prefix, style in (("", "-"), ("adaptive_", "--")):
            roc = attacks.get(f"{prefix}mia_roc")
            if roc:
                who = "adaptive" if prefix else "judge"
                ax.plot(np.maximum(roc["fpr"], 1e-4), roc["tpr"], style, color=f"C{i}",
                        label=f"{row}, {who} (AUC {attacks[f'{prefix}mia_auc']:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], ":", color="grey")
    ax.axvline(0.01, color="grey", lw=0.5)
    ax.set(xscale="log", xlim=(1e-3, 1), ylim=(0, 1.01), xlabel="false positive rate (non-members flagged)",
           ylabel="true positive rate (members found)", title="membership inference")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_privacy_utility(summary: dict[str, dict[str, dict[str, float]]], path: Path, *, chance: float) -> None:
    """Each row at its seed means, identity_leak@1 (privacy, lower is better) against verification accuracy,
    with crosses of the 95% t intervals over the seeds (none for a single seed).

    Args:
        summary: ``row -> metric -> {mean, ci95_low, ci95_high, n}`` (the experiment's ``summarise``).
        path: The PNG to write.
        chance: identity_leak@1 of a judge that guesses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def half(interval: dict[str, float]) -> float:
        width = (interval["ci95_high"] - interval["ci95_low"]) / 2
        return 0.0 if np.isnan(width) else width

    fig, ax = plt.subplots(figsize=(5, 4))
    seeds = 0
    for row, metrics in summary.items():
        leak, acc = metrics["identity_leak@1"], metrics["accuracy"]
        seeds = max(seeds, int(acc["n"]))
        # Named in the legend, not beside the point: rows a few hundredths apart (the cross-dataset rows) would
        # print their names over each other.
        ax.errorbar([leak["mean"]], [acc["mean"]], xerr=[half(leak)], yerr=[half(acc)], fmt="o", capsize=3, label=row)
    ax.axvline(chance, linestyle=":", color="grey", label="chance leak")
    ax.set(xlabel="identity_leak@1 (lower is more private)", ylabel="verification accuracy",
           title=f"privacy-utility plane ({seeds} seed{'s' if seeds > 1 else ''}, 95% intervals)",
           xlim=(0, 1.05))  # leak is a fraction; keep the chance line in view
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
