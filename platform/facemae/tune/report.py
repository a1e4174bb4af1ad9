"""The sweep's report: every trial's values and metrics, and the privacy-utility Pareto front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from facemae import storage
from facemae.data.shards import atomic_write_text


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which points no other point dominates, both coordinates minimised.

    A point with a missing coordinate is never on the front. ``b`` dominates ``a`` when it is no
    worse in both coordinates and better in at least one.
    """
    known = [p[0] is not None and p[1] is not None for p in points]
    out = []
    for i, (a, ok) in enumerate(zip(points, known)):
        dominated = any(known[j] and b[0] <= a[0] and b[1] <= a[1] and b != a
                        for j, b in enumerate(points) if j != i) if ok else True
        out.append(ok and not dominated)
    return out


def write_sweep_report(table: list[dict[str, Any]], output: str, *, objective: str, sweep: str) -> tuple[str, str]:
    """Writes ``trials.json``, ``pareto.md`` (the table, front marked) and ``pareto.png`` into ``output``
    (a local folder or an object-store location); returns the locations of the last two."""
    keys = sorted({k for row in table for k in row["params"]})
    head = ["trial", *keys, "status", "step", "val_irm", "val_identity_leak@1", "val_image_leak@1",
            "val_recon_loss", "val_objective", "pareto"]
    lines = [f"# Sweep {sweep.rstrip('/').rsplit('/', 1)[-1]}", "",
             f"Objective: `{objective}` (minimised: `val_objective`). Utility is `val_irm`, the change of the "
             "frozen teacher's relations among held-out faces when they are reconstructed (lower is better); "
             "privacy is `val_identity_leak@1`, how often the judge's nearest original shares the identity "
             "(lower is more private). Pareto: no other trial is better in both.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in table:
        cells = [row["trial"], *(_fmt(row["params"].get(k)) for k in keys), row["status"], _fmt(row["step"]),
                 *(_fmt(row[k]) for k in head[len(keys) + 3:-1]), "yes" if row["pareto"] else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "![Pareto front](pareto.png)", ""]
    with storage.output_folder(output) as folder:
        atomic_write_text(folder / "trials.json", json.dumps(table, indent=1, default=str) + "\n")
        atomic_write_text(folder / "pareto.md", "\n".join(lines))
        _plot(table, folder / "pareto.png")
    return storage.join(output, "pareto.md"), storage.join(output, "pareto.png")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    scored = [r for r in table if r["val_irm"] is not None and r["val_identity_leak@1"] is not None]
    for row in scored:
        ax.scatter([row["val_identity_leak@1"]], [row["val_irm"]], marker="o" if row["pareto"] else "x",
                   color="tab:red" if row["pareto"] else "tab:grey")
        ax.annotate(row["trial"].split("_")[-1], (row["val_identity_leak@1"], row["val_irm"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((r["val_identity_leak@1"], r["val_irm"]) for r in scored if r["pareto"])
    if front:
        ax.step(*zip(*front), where="post", color="tab:red", label="Pareto front")
        ax.legend(loc="upper right")
    ax.set(xlabel="val_identity_leak@1 (privacy, lower is better)", ylabel="val_irm (utility loss, lower is better)",
           title="sweep: privacy-utility trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
