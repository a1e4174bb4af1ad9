"""The documentation: the site builds with --strict, and every command README and the getting-started page
show parses (its job script or `facemae` command accepts each flag it is given)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
PAGES_WITH_COMMANDS = ("README.md", "docs/getting-started.md")
# scripts/run.sh sets the environment up, then hands its arguments to jobs/train.py.
WRAPPERS = {"scripts/run.sh": "jobs/train.py"}


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    if not MKDOCS.exists():
        pytest.fail(f"{MKDOCS} is missing; run scripts/setup.sh (it installs mkdocs, mkdocs-material, mkdocstrings)")
    return subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120, cwd=config.parent,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(MKDOCS.parent)})


def test_the_docs_build_strict_with_the_api_reference_and_results(tmp_path: Path) -> None:
    done = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "sdk" / "index.html").read_text()
    assert "facemae.sdk.train" in reference  # mkdocstrings rendered the docstrings
    assert (tmp_path / "site" / "results" / "history" / "index.html").is_file()  # served from benchmarks/results
    assert (tmp_path / "site" / "results" / "science_reconstructions.png").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    # The same site with one link to a page that does not exist: --strict must refuse it.
    for name in ("mkdocs.yml", "platform", "benchmarks", "clusters"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    done = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr


def _fenced_commands(text: str) -> list[str]:
    """Command lines of the fenced bash blocks, with continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _parseable(line: str) -> tuple[list[str], list[str]] | None:
    """(the command to ask for --help, the flags the line gives it), or None for a line of another tool."""
    words = shlex.split(line)
    if words[:1] == ["bash"] and len(words) > 1 and words[1] in WRAPPERS:
        return [sys.executable, WRAPPERS[words[1]]], words[2:]
    if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("jobs/"):
        return [sys.executable, words[1]], words[2:]
    if words[:1] == ["facemae"] and len(words) > 1:
        return [sys.executable, "-m", "facemae.cli", words[1]], words[2:]
    return None


def _shown_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES_WITH_COMMANDS:
        for line in _fenced_commands((ROOT / page).read_text()):
            if _parseable(line) is not None:
                found.append((page, line))
    return found


def test_the_pages_show_job_and_cli_commands() -> None:
    pages = {page for page, _ in _shown_commands()}
    assert pages == set(PAGES_WITH_COMMANDS), pages  # a page whose commands vanished would test nothing


@pytest.mark.parametrize("page,line", _shown_commands())
def test_every_command_shown_parses(page: str, line: str) -> None:
    parsed = _parseable(line)
    assert parsed is not None
    command, args = parsed
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, f"{page}: `{line}`: --help exited {done.returncode}: {done.stderr[-2000:]}"
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", done.stdout))
    assert not unknown, f"{page}: `{line}` uses {unknown}, which `{' '.join(command[1:])} --help` does not list"
