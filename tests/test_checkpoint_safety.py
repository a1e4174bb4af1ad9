"""A checkpoint folder runs no code when loaded: every file is read with ``weights_only`` before DeepSpeed
unpickles it, and a crafted file stops a resume or an export with one line naming it."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from facemae.config import TrainConfig
from facemae.train import engine as ds
from facemae.train.engine import UntrustedCheckpointError
from facemae.train.trainer import consolidated_state

ROOT = Path(__file__).resolve().parents[1]
STAGES = [(0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")]  # each ZeRO stage; both file sets of CPU precisions
TAG = "step00000001"
FORMS = {"torch.save": lambda obj, path: torch.save({"module": obj}, path),
         "pickle.dumps": lambda obj, path: path.write_bytes(pickle.dumps(obj))}


class Payload:
    """Unpickled, runs ``touch <marker>``: what a crafted checkpoint file does with a real command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def process_group():
    """The one-rank gloo group DeepSpeed needs, as every in-process engine of the session shares it
    (test_sdk, test_tune): DeepSpeed caches groups made from it and reads the environment it set, so
    both stay. The ``F.linear`` a ZeRO 3 engine replaces for the whole process ("persists unless
    manually reset") is put back."""
    linear = nn.functional.linear
    ds.ensure_process_group()
    yield
    nn.functional.linear = linear


def _engine(stage: int, precision: str, *, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    train = TrainConfig(zero_stage=stage, precision=precision, micro_batch=2, max_steps=4, warmup_steps=1)
    return ds.build_engine(model, train, world_size=1)


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _write_checkpoint(folder: Path, stage: int, precision: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A real checkpoint after one optimizer step; the module weights and RNG state it saved."""
    engine = _engine(stage, precision, seed=0)
    loss = engine(torch.randn(2, 8, dtype=ds.engine_dtype(engine))).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    rng = ds.rng_state()
    ds.save(engine, folder, tag=TAG, rank=0, client_state={"progress": {"step": 1}})
    return _weights(engine), rng


@pytest.fixture(scope="module", params=STAGES, ids=[f"zero{s}-{p}" for s, p in STAGES])
def checkpoint(request, process_group, tmp_path_factory):
    """A checkpoint folder of one ZeRO stage: ``(folder, stage, precision, module weights, RNG state)``."""
    stage, precision = request.param
    folder = tmp_path_factory.mktemp(f"zero{stage}").resolve() / "checkpoint"
    return folder, stage, precision, *_write_checkpoint(folder, stage, precision)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / TAG).glob("*.pt"))


def test_a_clean_checkpoint_restores_exactly_and_consolidates(checkpoint):
    folder, stage, precision, saved, rng = checkpoint
    fresh = _engine(stage, precision, seed=1)
    assert ds.load(fresh, folder, rank=0)["progress"] == {"step": 1}
    restored = _weights(fresh)
    assert restored.keys() == saved.keys()
    for name, value in saved.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert ds.rng_state()["numpy"] == rng["numpy"] and ds.rng_state()["python"] == rng["python"]
    torch.testing.assert_close(ds.rng_state()["torch"], rng["torch"], rtol=0, atol=0)
    merged = consolidated_state(folder)
    assert merged.keys() == saved.keys() and all(v.dtype == torch.float32 for v in merged.values())
    for name, value in saved.items():  # the fp32 master weights, of which the module holds the bf16 copy
        torch.testing.assert_close(merged[name].to(value.dtype), value, rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_every_file_replaced_by_a_crafted_pickle_is_refused_before_it_runs(checkpoint, form, tmp_path):
    folder, stage, precision, _, _ = checkpoint
    fresh = _engine(stage, precision, seed=1)
    tmp_path = tmp_path.resolve()
    marker = tmp_path / "pwned"
    names = _files(folder)
    assert "rng_rank000.pt" in names and any("model_states" in n for n in names)
    for name in names:
        tampered = tmp_path / name / "checkpoint"
        shutil.copytree(folder, tampered)
        FORMS[form](Payload(marker), tampered / TAG / name)
        resume, export = partial(ds.load, fresh, tampered, rank=0), partial(consolidated_state, tampered)
        for load in (resume, export):
            with pytest.raises(UntrustedCheckpointError) as refused:
                load()
            message = str(refused.value)
            assert message.startswith(f"{tampered / TAG / name}: not a checkpoint this platform wrote")
            assert "\n" not in message and "resume from another checkpoint" in message
            if form == "torch.save":
                assert "it names posix.system" in message
        assert not marker.exists(), f"{name} ({form}) ran its code"


def test_a_file_swapped_after_the_check_is_still_refused(checkpoint, tmp_path, monkeypatch):
    """The window between the check and DeepSpeed's own load: the load itself allows no more than the check."""
    folder, stage, precision, _, _ = checkpoint
    fresh, marker = _engine(stage, precision, seed=1), tmp_path.resolve() / "pwned"
    tampered = tmp_path.resolve() / "checkpoint"
    shutil.copytree(folder, tampered)
    states = next(p for p in (tampered / TAG).glob("*model_states.pt"))
    checked = ds.check_checkpoint(tampered)

    def check_then_swap(directory):
        FORMS["torch.save"](Payload(marker), states)  # swapped once the check has passed
        return checked

    monkeypatch.setattr(ds, "check_checkpoint", check_then_swap)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        ds.load(fresh, tampered, rank=0)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize("form", FORMS)
def test_the_crafted_files_do_run_code_when_unpickled(form, tmp_path):
    # Without this the test above could pass on a payload that never worked.
    marker, path = tmp_path / "pwned", tmp_path / "x.pt"
    FORMS[form](Payload(marker), path)
    torch.load(path, weights_only=False) if form == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()


def test_a_tag_or_a_link_that_leaves_the_folder_is_refused(checkpoint, tmp_path):
    folder, tmp_path = checkpoint[0], tmp_path.resolve()
    outside = tmp_path / "elsewhere"
    shutil.copytree(folder / TAG, outside)
    for i, tag in enumerate(["../elsewhere", "/etc", "..", ""]):
        tampered = tmp_path / f"tag{i}"
        shutil.copytree(folder, tampered)
        (tampered / "latest").write_text(tag)
        with pytest.raises(UntrustedCheckpointError, match="latest: names the tag .*not a folder name"):
            ds.check_checkpoint(tampered)
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    target = linked / TAG / "rng_rank000.pt"
    target.unlink()
    target.symlink_to(outside / "rng_rank000.pt")
    with pytest.raises(UntrustedCheckpointError, match=f"{re.escape(str(target))}: links to {re.escape(str(outside))}"):
        ds.check_checkpoint(linked)
    shutil.rmtree(linked / TAG)
    (linked / TAG).symlink_to(outside)
    with pytest.raises(UntrustedCheckpointError, match="outside the checkpoint"):
        ds.check_checkpoint(linked)


def test_a_damaged_file_and_a_missing_latest_are_one_line_errors(checkpoint, tmp_path):
    folder, tmp_path = checkpoint[0], tmp_path.resolve()
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    states = next((broken / TAG).glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:300])
    with pytest.raises(UntrustedCheckpointError, match=f"{re.escape(str(states))}: not a readable checkpoint file"):
        ds.check_checkpoint(broken)
    (broken / "latest").unlink()
    with pytest.raises(ValueError, match="holds no DeepSpeed checkpoint"):
        consolidated_state(broken)


def test_a_torchscript_archive_is_refused(tmp_path):
    # torch.load(weights_only=False), as DeepSpeed calls it, hands a TorchScript zip to torch.jit.load.
    folder = tmp_path.resolve() / "checkpoint"
    (folder / TAG).mkdir(parents=True)
    (folder / "latest").write_text(TAG)
    torch.jit.save(torch.jit.trace(nn.ReLU(), torch.zeros(1)), folder / TAG / "mp_rank_00_model_states.pt")
    with pytest.raises(UntrustedCheckpointError, match="mp_rank_00_model_states.pt: not a readable checkpoint file"):
        ds.check_checkpoint(folder)


def test_deepspeeds_fp16_loss_scaler_passes_the_check(tmp_path):
    # fp16 runs only on a GPU: its optimizer states hold DeepSpeed's dynamic loss scaler, as here.
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    dynamic = {"init_scale": 2.0 ** 16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2,
               "consecutive_hysteresis": False}
    scaler = CreateLossScaler(torch.half, 0, True, dynamic)
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients}, tmp_path / "optim_states.pt")
    loaded = ds.read_checkpoint_file(tmp_path / "optim_states.pt")
    assert type(loaded["loss_scaler"]) is type(scaler) and vars(loaded["loss_scaler"]) == vars(scaler)


def test_an_rng_file_of_the_old_format_still_restores(tmp_path):
    import numpy as np

    old = {**ds.rng_state(), "numpy": np.random.get_state()}  # the keys as a numpy array
    torch.save(old, tmp_path / "rng_rank000.pt")
    np.random.rand(3)
    ds.set_rng_state(ds.read_checkpoint_file(tmp_path / "rng_rank000.pt"))
    np.testing.assert_array_equal(np.random.get_state()[1], old["numpy"][1])


def test_the_cli_refuses_a_tampered_resume_folder_with_one_line(process_group, tmp_path):
    tmp_path = tmp_path.resolve()
    tampered, marker = tmp_path / "tampered", tmp_path / "pwned"
    _write_checkpoint(tampered, 0, "fp32")
    FORMS["torch.save"](Payload(marker), tampered / TAG / "mp_rank_00_model_states.pt")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "facemae"), "train", "--config", str(ROOT / "jobs/configs/train_smoke.yaml"),
         "--set", "loss.lambda_irm=0", "--set", "data.workers=1", "--set", "train.metrics_port=0",
         "--set", f"train.resume_from={tampered}", "--num-workers", "0", "--data", str(tmp_path / "syn"),
         "--storage-path", str(tmp_path / "runs"), "--name", "tampered"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("facemae train:")]
    assert errors == [f"facemae train: error: {tampered / TAG / 'mp_rank_00_model_states.pt'}: not a checkpoint "
                      "this platform wrote: it names posix.system, which a checkpoint never holds; do not load it, "
                      "resume from another checkpoint"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not marker.exists()
