"""The facemae CLI and the jobs as a user runs them: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_folder

ROOT = Path(__file__).resolve().parents[1]
FACEMAE = [str(Path(sys.executable).parent / "facemae")]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, timeout=900)  # a slow machine is not a failure


SUBCOMMAND_FLAGS = {
    "ingest": ["--source", "--path", "--skip-corrupt", "--resize", "--convert-rgb", "--align", "--export-recordio",
               "--export-bin", "--set"],
    "mask": ["--patch-size", "--ratio", "--seed", "--output"],
    "verify": ["path"],
    "train": ["--config", "--set", "--address", "--name", "--data", "--storage-path", "--max-steps",
              "--num-workers", "--use-gpu", "--overwrite"],
    "generate": ["--weights", "--method", "--masked", "--output", "--actors", "--export-folder", "--export-recordio"],
    "evaluate": ["--fr", "--bin", "--pairs-from", "--pairs", "--judge", "--released", "--originals"],
    "experiment": ["--config", "--address", "--output", "--storage-path"],
    "tune": ["--config", "--set", "--address", "--output", "--no-restore"],
    "frontier": ["--config", "--set", "--address", "--name", "--data", "--storage-path", "--output", "--no-restore"],
    "export": ["--weights", "--onnx", "--opset"],
    "submit": ["--address", "--working-dir", "--runtime-env-json", "--submission-id", "--no-follow", "--timeout",
               "entrypoint"],
}


def test_top_level_help_lists_every_subcommand_with_its_purpose():
    from facemae.cli import COMMANDS

    out = run(*FACEMAE, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps the descriptions
    assert set(COMMANDS) == set(SUBCOMMAND_FLAGS)
    for command, purpose in COMMANDS.items():
        assert f"{command} {purpose}" in text


@pytest.mark.parametrize("command", list(SUBCOMMAND_FLAGS))
def test_each_subcommand_documents_its_options(command):
    from facemae.cli import build_parser

    out = run(*FACEMAE, command, "--help")
    assert out.returncode == 0
    for flag in SUBCOMMAND_FLAGS[command]:
        assert flag in out.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    undocumented = [a.dest for a in sub._actions if not a.help]
    assert not undocumented, f"facemae {command}: options without help text: {undocumented}"


def test_bad_options_give_a_clear_error(tmp_path):
    out = run(*FACEMAE, "ingest", "--source", "webdataset")
    assert out.returncode == 2 and "invalid choice: 'webdataset'" in out.stderr
    out = run(*FACEMAE, "ingest", "--set", "data.num_identites=3", cwd=tmp_path)
    assert out.returncode == 2 and "unknown key(s) data.num_identites" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(*FACEMAE, "frobnicate")
    assert out.returncode == 2 and "invalid choice: 'frobnicate'" in out.stderr
    out = run(*FACEMAE, "train", "--max-steps", "many")
    assert out.returncode == 2 and "--max-steps: invalid int value: 'many'" in out.stderr
    out = run(*FACEMAE, "train", "--config", "nowhere.yaml", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == ("facemae train: error: config file nowhere.yaml does not "
                                                          "exist (see jobs/configs/ for examples)")
    out = run(*FACEMAE, "evaluate", "--judge", "j.safetensors")
    assert out.returncode == 2 and "privacy needs both the judge's weights and the released dataset" in out.stderr
    out = run(*FACEMAE, "submit", "--address", "http://127.0.0.1:9")
    assert out.returncode == 2 and "no command to submit: put it after `--`" in out.stderr
    out = run(*FACEMAE, "submit", "--address", "http://127.0.0.1:9", "--", "python", "-c", "pass")
    assert out.returncode == 2 and "facemae submit: error: Failed to connect to Ray" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_from_the_command_line_shows_progress_and_sums_up_the_run(tmp_path):
    # Plain MAE in one local process (no Ray, no teacher): the CLI's path end to end in seconds.
    out = run(*FACEMAE, "train", "--config", str(ROOT / "jobs" / "configs" / "train_smoke.yaml"),
              "--set", "loss.lambda_irm=0", "--set", "data.workers=1", "--set", "train.metrics_port=0",
              "--num-workers", "0", "--data", str(tmp_path / "syn"), "--storage-path", str(tmp_path / "runs"),
              "--name", "cli-smoke", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train mae" in out.stderr and "6/6" in out.stderr  # the tqdm bar, on stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / "cli-smoke"
    assert summary["checkpoint"] == str(run_dir / "checkpoint_00000006") and summary["teacher"] is None
    assert summary["metrics"]["step"] == 6 and Path(summary["weights"]).is_file()
    assert f"checkpoint {run_dir / 'checkpoint_00000006'}" in out.stdout


def test_ingest_mask_verify_from_the_command_line(tmp_path):
    make_folder(tmp_path / "faces", identities=4, images=2)
    (tmp_path / "faces" / "person_01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = run(*FACEMAE, "ingest", "--source", "folder", "--path", str(tmp_path / "faces"), "--output",
              str(tmp_path / "ds"), "--workers", "1")
    assert out.returncode == 2
    assert f"bad input: {tmp_path / 'faces' / 'person_01' / 'broken.jpg'}: truncated or undecodable" in out.stderr
    out = run(*FACEMAE, "ingest", "--source", "folder", "--path", str(tmp_path / "faces"), "--output",
              str(tmp_path / "ds"), "--workers", "1", "--skip-corrupt")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["corrupt"] == 1
    assert summary["counts"]["train"]["images"] + summary["counts"]["deploy"]["images"] == 8
    out = run(*FACEMAE, "mask", "--input", str(tmp_path / "ds"), "--output", str(tmp_path / "masked"),
              "--ratio", "0.5", "--patch-size", "16")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "masked" / "manifest.json").read_text())["mask"]["keep"] == 24
    assert run(*FACEMAE, "verify", str(tmp_path / "masked")).returncode == 0
    shard = next((tmp_path / "masked").rglob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    out = run(*FACEMAE, "verify", str(tmp_path / "masked"))
    assert out.returncode == 2 and "does not match its checksum" in out.stderr


def test_an_ingested_folder_is_also_written_as_a_recordio_pack_and_a_verification_bin(tmp_path):
    """Align once, use the faces with other tools: the pack holds every stored image under its identity,
    the .bin pairs stored images with labels that say whether their identities agree."""
    from facemae.data.recordio import RecordIOReader
    from facemae.data.shards import iter_rows, read_manifest
    from facemae.data.verification_bin import load_verification_bin

    make_folder(tmp_path / "faces", identities=6, images=4)
    out = run(*FACEMAE, "ingest", "--source", "folder", "--path", str(tmp_path / "faces"), "--output",
              str(tmp_path / "ds"), "--workers", "1", "--export-recordio", str(tmp_path / "pack" / "train.rec"),
              "--export-bin", str(tmp_path / "faces.bin"), "--set", "eval.pairs=20", "--set", "eval.pair_seed=3")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["recordio_records"], summary["bin_pairs"]) == (24, 20)
    manifest = read_manifest(tmp_path / "ds")
    assert manifest.settings["data"]["align"] == "mtcnn"  # auto: a folder is aligned, its 112x112 crops kept
    stored = {r["image"]: r["identity"] for split in manifest.splits
              for r in iter_rows(manifest.files(tmp_path / "ds", split))}
    assert len(stored) == 24
    pack = RecordIOReader(tmp_path / "pack" / "train.rec")
    assert pack.has_header and {(im.image, im.label) for im in pack} == set(stored.items())
    pairs = load_verification_bin(tmp_path / "faces.bin")
    assert len(pairs.issame) == 20 and sum(pairs.issame) == 10
    assert all(im in stored for im in pairs.images)
    assert [stored[a] == stored[b] for a, b in zip(pairs.images[0::2], pairs.images[1::2])] == pairs.issame


# The main job from the command line (stages, teacher, checkpoint, export): tests/test_faults.py runs it,
# kills its driver part way and reruns the same command.
