"""What every file under benchmarks/results/ records about where its numbers came from."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The checked-out commit, marked ``+uncommitted`` when tracked files differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
            f"Python {platform.python_version()}")


def provenance() -> dict[str, str]:
    """``date``, ``machine``, ``commit`` and ``command`` of this run."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "commit": commit(), "command": "python " + " ".join(sys.argv)}
