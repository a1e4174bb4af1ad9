"""MkDocs hook: serve benchmarks/results/ as the site's results/ section, and clusters/README.md.

The measurement journals and their figures are filed by the benchmark scripts under
benchmarks/results/, and the cluster walk-through sits beside the cluster files; the site shows them
from there instead of keeping a copy in docs/.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
KINDS = (".md", ".png")


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    """Adds every .md and .png of benchmarks/results/ as results/<name>, and clusters/README.md."""
    for path in sorted((ROOT / "benchmarks" / "results").iterdir()):
        if path.suffix in KINDS:
            files.append(_file(f"results/{path.name}", ROOT / "benchmarks", config))
    files.append(_file("clusters/README.md", ROOT, config))
    return files


def _file(path: str, src_dir: Path, config: MkDocsConfig) -> File:
    return File(path, src_dir=str(src_dir), dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls)
