"""The console a person reads: a line per stage, a progress bar per stage, our own warnings once, the summary.

Everything else a job's process and its embedded Ray print goes to the job's log file: Ray's driver log and
the worker lines it forwards (``log_to_driver``), DeepSpeed's and torch's messages, library warnings, and the
C++ logs that Ray's core worker writes straight to file descriptor 2. :func:`quiet` does it by pointing
descriptors 1 and 2 (and ``sys.stdout`` / ``sys.stderr``) at the log file and keeping private copies of the
terminal's streams for :func:`say` and :func:`bar_stream`. ``--verbose`` skips all of it: then the console
shows everything, as before.

Pure standard library, so that every layer (data runners, the trainer, the CLI) can use it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

PACKAGE_DIR = str(Path(__file__).resolve().parent)


@dataclass
class _Quiet:
    """The state of an active :func:`quiet`: the terminal's streams and the log they are kept from."""

    out: TextIO
    err: TextIO
    log: TextIO
    path: Path
    warned: set[str] = field(default_factory=set)


_active: _Quiet | None = None


def say(line: str) -> None:
    """Prints a stage line on the terminal's stdout (and into the log, when one is kept)."""
    if _active is None:
        print(line, flush=True)
        return
    print(line, file=_active.out, flush=True)
    print(f"[console] {line}", file=_active.log, flush=True)


def error(line: str) -> None:
    """Prints an error line on the terminal's stderr (and into the log, when one is kept)."""
    if _active is None:
        print(line, file=sys.stderr, flush=True)
        return
    print(line, file=_active.err, flush=True)
    print(f"[console] {line}", file=_active.log, flush=True)


def bar_stream() -> TextIO:
    """Where progress bars go: the terminal's stderr, also while library output goes to the log."""
    return _active.err if _active is not None else sys.stderr


def log_path() -> Path | None:
    """The log file of the active quiet console, or None (``--verbose``, or not a console job)."""
    return _active.path if _active is not None else None


def default_log_path(command: str) -> Path:
    """``logs/<command>-<UTC time>-<pid>.log``: one file per invocation, beside ``runs/`` and ``data/``
    (``$FACEMAE_LOG_DIR`` instead of ``logs/`` when set)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(os.environ.get("FACEMAE_LOG_DIR") or "logs") / f"{command}-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet(path: str | os.PathLike, *, verbose: bool = False) -> Iterator[Path | None]:
    """Sends everything but :func:`say`, :func:`error`, progress bars and this package's warnings to ``path``.

    Args:
        path: The log file (appended to; its folder is created).
        verbose: Show everything on the console instead; no log file is written.

    Yields:
        The log file, or None when ``verbose``.
    """
    global _active
    if verbose or _active is not None:  # nested jobs (the experiment's stages) share the outer log
        yield None if verbose else _active.path
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    out, out_fd = _terminal(sys.stdout, 1)
    err, err_fd = _terminal(sys.stderr, 2)
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    before = sys.stdout, sys.stderr, warnings.showwarning
    os.dup2(log.fileno(), 1)  # C++ logs and child processes' output, too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    _active = _Quiet(out=out, err=err, log=log, path=path)
    warnings.showwarning = _show_warning
    try:
        yield path
    except BaseException:
        traceback.print_exc(file=log)  # the terminal gets it too: it propagates past the restored streams
        raise
    finally:
        for stream in (sys.stdout, sys.stderr, out, err):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr, warnings.showwarning = before
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        for fd in (out_fd, err_fd):
            if fd is not None:
                os.close(fd)
        _active = None
        log.close()


def _terminal(stream: TextIO, fd: int) -> tuple[TextIO, int | None]:
    """A stream that still reaches where ``stream`` writes once descriptor ``fd`` points at the log.

    A real standard stream gets a private copy of its descriptor; anything else (pytest's capture, a
    notebook) is used as it is, since redirecting ``fd`` does not reach it.
    """
    try:
        own = stream.fileno() == fd
    except (AttributeError, ValueError, io.UnsupportedOperation):
        own = False
    if not own:
        return stream, None
    copy = os.dup(fd)
    return os.fdopen(copy, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace", closefd=False), copy


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Every warning goes to the log; this package's own go to the terminal too, once per message."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if _active is None:
        sys.stderr.write(text)
        return
    _active.log.write(text)
    if os.path.abspath(filename).startswith(PACKAGE_DIR) and str(message) not in _active.warned:
        _active.warned.add(str(message))
        print(f"warning: {message}", file=_active.err, flush=True)


def describe(path: Path | None) -> str:
    """The console's first line: where the rest went (or nothing with ``--verbose``)."""
    return f"log      {path} (Ray, DeepSpeed and library output; --verbose shows it here)" if path else ""

