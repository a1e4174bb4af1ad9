"""The console a person reads (facemae.console): stage lines, bars and our warnings on the terminal; Ray,
DeepSpeed, torch and C++ chatter in the log file; ``--verbose`` shows everything.

The smoke main job's whole console is checked in test_faults.py (its killed and its resumed run).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from facemae import console

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_FILE = str(Path(logging.__file__))  # any file outside the package: a library's warning


def _chatter() -> None:
    """What libraries do while a job runs: prints, logs, warnings, C++ writes straight to fd 2."""
    print("library print on stdout")
    print("library print on stderr", file=sys.stderr)
    logging.getLogger("ray.data").warning("ray logger warning")
    warnings.warn_explicit("a library FutureWarning", FutureWarning, LIBRARY_FILE, 1)
    os.write(2, b"core_worker.cc:2465: C++ log line\n")
    os.write(1, b"child process output\n")


def test_quiet_sends_library_output_to_the_log_and_ours_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "job.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the dedup below must be the console's, not the filter's
        with console.quiet(log) as path:
            assert path == log and console.log_path() == log
            console.say("dataset  12 faces")
            _chatter()
            for _ in range(3):
                warnings.warn_explicit("ours: check the mask ratio", UserWarning, console.PACKAGE_DIR + "/x.py", 7)
            console.error("facemae train: error: bad input")
    out, err = capfd.readouterr()
    assert out == "dataset  12 faces\n"
    assert err == "warning: ours: check the mask ratio\nfacemae train: error: bad input\n"  # once, not 3 times
    text = log.read_text()
    for line in ("library print on stdout", "library print on stderr", "a library FutureWarning",
                 "core_worker.cc:2465: C++ log line", "child process output", "[console] dataset  12 faces",
                 "[console] facemae train: error: bad input"):
        assert line in text, line
    assert text.count("ours: check the mask ratio") == 3  # the log keeps every one
    assert console.log_path() is None  # restored


def test_after_quiet_the_streams_and_descriptors_are_restored(tmp_path, capfd):
    with console.quiet(tmp_path / "a.log"):
        pass
    print("after on stdout")
    os.write(2, b"after on fd 2\n")
    out, err = capfd.readouterr()
    assert out == "after on stdout\n" and err == "after on fd 2\n"
    assert (tmp_path / "a.log").read_text() == ""


def test_an_unexpected_error_is_logged_with_its_traceback_and_still_raised(tmp_path, capfd):
    with pytest.raises(ZeroDivisionError):
        with console.quiet(tmp_path / "b.log"):
            1 / 0
    assert "ZeroDivisionError" in (tmp_path / "b.log").read_text()
    print("terminal again")
    assert capfd.readouterr().out == "terminal again\n"


def test_verbose_writes_no_log_and_redirects_nothing(tmp_path, capfd):
    with console.quiet(tmp_path / "c.log", verbose=True) as path:
        assert path is None
        _chatter()
    out, err = capfd.readouterr()
    assert "library print on stdout" in out and "core_worker.cc:2465" in err
    assert not (tmp_path / "c.log").exists()


def test_nested_quiet_shares_the_outer_log(tmp_path, capfd):
    with console.quiet(tmp_path / "outer.log"):
        with console.quiet(tmp_path / "inner.log") as inner:
            assert inner == tmp_path / "outer.log"
            print("inside")
        print("still quiet")
    assert capfd.readouterr().out == ""
    assert not (tmp_path / "inner.log").exists()
    assert (tmp_path / "outer.log").read_text() == "inside\nstill quiet\n"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_cli_with_embedded_ray_keeps_rays_output_in_the_log_unless_verbose(tmp_path, verbose):
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "facemae.cli", "ingest", "--source", "synthetic", "--output",
               str(tmp_path / "syn"), "--workers", "2", "--set", "data.num_identities=4",
               "--set", "data.images_per_identity=2", "--set", "data.rows_per_shard=2", "--set", "ray.num_cpus=2"]
    out = subprocess.run(command + (["--verbose"] if verbose else []), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "FACEMAE_LOG_DIR": str(logs)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["counts"]["train"]["images"] > 0
    console_text = out.stdout + out.stderr
    if verbose:
        assert "Started a local Ray instance" in console_text
        assert not logs.exists()
        return
    [log] = logs.glob("ingest-*.log")
    assert out.stdout.splitlines()[0] == console.describe(log)
    assert "Started a local Ray instance" in log.read_text()
    assert "Ray" not in console_text.replace(console.describe(log), "")
    assert len(out.stdout.splitlines()) == 2  # where the log is, the summary
