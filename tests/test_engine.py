"""DeepSpeed's CPU communication op is compiled once per environment, whichever way a job is started, and
kept in that environment; DeepSpeed imports without MLflow, which its autotuner alone would import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# A one-rank engine in a process of its own; prints the op DeepSpeed loaded and its file's mtime.
ENGINE = """
import json, os
from torch import nn
from deepspeed.comm import comm
from facemae.config import TrainConfig
from facemae.train import engine as ds
ds.ensure_process_group()
ds.build_engine(nn.Linear(4, 2), TrainConfig(micro_batch=2, max_steps=2, warmup_steps=1), world_size=1)
op = comm.cdb.shm_comm_op
print(json.dumps(op and {"file": op.__file__, "mtime_ns": os.stat(op.__file__).st_mtime_ns}))
"""


def _loaded_op(path: str) -> dict | None:
    out = subprocess.run([sys.executable, "-c", ENGINE], env={**os.environ, "PATH": path},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_op_is_not_rebuilt_when_a_job_finds_another_ninja_first():
    """The environment's ninja (1.13) and the system's (1.11) each read the other's build log as stale: jobs
    started from an activated environment and as ``.venv/bin/python`` took turns recompiling the op, 50-75 s
    on both cores, four times in one test session. The second engine here must load the first one's file."""
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                             if p and Path(p).resolve() != BIN.resolve())
    if shutil.which("ninja", path=system) is None:
        pytest.skip("no ninja on PATH besides the environment's: there is no other build tool to take turns with")
    activated = _loaded_op(f"{BIN}{os.pathsep}{system}")
    if activated is None:
        pytest.skip("this accelerator has no shared-memory op to build")
    assert _loaded_op(system) == activated  # the same file, not written again
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        # built against this environment's torch, so kept in it: another checkout's environment neither
        # loads it nor rebuilds it over this one's
        assert Path(activated["file"]).is_relative_to(sys.prefix), activated


IMPORTS = """
import json, sys
{before}
from facemae.train.engine import import_deepspeed
ds = import_deepspeed()
loaded = "mlflow" in sys.modules
from deepspeed.autotuning import autotuner
import mlflow  # a later import (the tracking code's) is not refused
print(json.dumps([loaded, autotuner.has_mlflow, mlflow.__name__, ds.__name__]))
"""


@pytest.mark.parametrize("before, expected", [("", [False, False]), ("import mlflow", [True, True])])
def test_deepspeed_imports_without_mlflow_which_still_imports_after(before, expected):
    """The autotuner's ``import mlflow`` was 1.8 of import deepspeed's 2.4 s in every training process."""
    code = IMPORTS.format(before=before)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [*expected, "mlflow", "deepspeed"]
