"""A mistake in the input of any command or SDK call: one line on stderr that names the file and the
fix, exit status 2, no traceback, and no Ray work started before the mistake is found (issue 11)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import make_folder
from facemae import cli
from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.shards import MANIFEST, DatasetError, read_manifest
from facemae.models.weights import WeightsError, check_weights, load_fr_backbone, load_mae, save_weights

FACEMAE = str(Path(sys.executable).parent / "facemae")


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs ``facemae argv`` in this process; returns its one stderr line after checking exit status 2."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails the test if anything asks for a Ray cluster, or one came up in this process."""
    import ray

    import facemae.cluster

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started before the input mistake was found")

    monkeypatch.setattr(facemae.cluster, "ensure_ray", refuse)
    before = ray.is_initialized()  # True only when an earlier test of the session started one
    yield
    assert ray.is_initialized() == before


# 1. Identity folder and image names that are not UTF-8; hidden files.

def test_non_utf8_names_are_refused_by_name_before_any_image_is_read(tmp_path, capsys):
    make_folder(tmp_path / "faces", identities=3, images=2)
    try:
        faces = os.fsencode(tmp_path / "faces")
        os.rename(faces + b"/person_01", faces + b"/caf\xe9")
        os.rename(faces + b"/person_02/001.png", faces + b"/person_02/\xe9.png")
    except OSError as exc:  # a file system that itself insists on UTF-8 names
        pytest.skip(f"cannot make a non-UTF-8 name here: {exc}")
    line = error_line(capsys, "ingest", "--source", "folder", "--path", str(tmp_path / "faces"),
                      "--output", str(tmp_path / "out"), "--set", "data.workers=1")
    assert line.startswith(f"facemae ingest: error: {tmp_path / 'faces'}: 2 identity folder or image name(s) are "
                           "not valid UTF-8: b'caf\\xe9', b'person_02/\\xe9.png' (the first reads 'café' as Latin-1)")
    assert "rename them to UTF-8, e.g. `convmv -f latin1 -t utf-8 -r --notest" in line
    assert not (tmp_path / "out").exists()  # refused while listing, before the output folder is made


def test_hidden_files_are_counted_in_the_report_and_the_summary(tmp_path, capsys):
    make_folder(tmp_path / "faces", identities=3, images=2)
    for hidden in (".DS_Store", "person_00/.DS_Store", "person_01/._000.png"):
        (tmp_path / "faces" / hidden).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    code = cli.main(["ingest", "--source", "folder", "--path", str(tmp_path / "faces"), "--output",
                     str(tmp_path / "out"), "--set", "data.workers=1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["hidden_skipped"] == 3 and summary["corrupt"] == 0
    report = read_manifest(tmp_path / "out").report
    assert report["hidden_skipped"] == 3 and report["images"] == 6
    assert report["hidden_files"] == [".DS_Store", "person_00/.DS_Store", "person_01/._000.png"]


# 2, 3. Damaged manifests and shards.

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished synthetic dataset, its owner's masked twin, and the overrides that wrote them."""
    root = tmp_path_factory.mktemp("data")
    args = [f"data.output={root / 'orig'}", "data.num_identities=4", "data.images_per_identity=2",
            "data.deploy_fraction=0.5", "data.workers=1", f"mask.output={root / 'masked'}", "mask.splits=[deploy]"]
    config = load_config(None, args)
    ingest(config)
    mask_dataset(config)
    return root, args


def _set_rows(text: str, rows: object) -> str:
    raw = json.loads(text)
    raw["splits"]["train"][0]["rows"] = rows
    return json.dumps(raw)


@pytest.mark.parametrize("damage, says", [
    (lambda text: text[:text.index('"splits"') + 4], "not valid JSON (Unterminated string starting at: line"),
    (lambda text: "[]", "expected a JSON object, found list"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "splits"}), "missing key(s) splits"),
    (lambda text: _set_rows(text, "4"), 'splits.train[0]: rows must be an integer, found "4"'),
    (lambda text: json.dumps({**json.loads(text), "colour": 1}), "unknown key(s) colour"),
])
def test_a_damaged_manifest_names_the_file_and_the_fix(tmp_path, capsys, dataset, damage, says):
    root, args = dataset
    copy = tmp_path / "orig"
    shutil.copytree(root / "orig", copy)
    (copy / MANIFEST).write_text(damage((copy / MANIFEST).read_text()))
    with pytest.raises(DatasetError):
        read_manifest(copy)
    line = error_line(capsys, "verify", str(copy))
    assert line.startswith(f"facemae verify: bad input: {copy / MANIFEST} is damaged: ") and says in line
    assert line.endswith("restore it from a backup, or rerun the command that wrote it (`facemae ingest`, `mask` or "
                         "`generate`) with --overwrite to rewrite it")
    overrides = [a for a in args if not a.startswith("data.output=")] + [f"data.output={copy}"]
    set_flags = [x for a in overrides for x in ("--set", a)]
    assert error_line(capsys, "ingest", *set_flags) == line.replace("facemae verify:", "facemae ingest:")
    assert cli.main(["ingest", *set_flags, "--overwrite"]) == 0  # the advice works
    read_manifest(copy)


def test_a_changed_shard_says_to_rewrite_with_overwrite(tmp_path, capsys, dataset):
    root, args = dataset
    copy = tmp_path / "masked"
    shutil.copytree(root / "masked", copy)
    shard = next(copy.glob("deploy/*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"x")
    line = error_line(capsys, "verify", str(copy))
    assert line == (f"facemae verify: bad input: {copy}: deploy/{shard.name} does not match its checksum; restore the "
                    "changed files, or rerun `facemae mask` (or `facemae train`) with --overwrite to rewrite it")
    mask = ["mask", "--input", str(root / "orig"), "--output", str(copy), "--set", "mask.splits=[deploy]"]
    assert error_line(capsys, *mask).endswith(line.split(": bad input: ", 1)[1])  # without it, the same error
    assert cli.main([*mask, "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(copy)]) == 0


# 4. Config files and overrides.

@pytest.mark.parametrize("text, says", [
    ("data:\n  num_identities: [1, 2\n  source: folder\n",
     "bad.yaml:3:9: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence started at "
     "line 2 column 19); fix the file there"),
    ("data:\n\tnum_identities: 3\n", "bad.yaml:2:1: not valid YAML: found character '\\t' that cannot start any "
                                     "token (while scanning for the next token); fix the file there (indent with "
                                     "spaces"),
    ("data: !!python/object/apply:os.system ['touch pwned']\n",
     "bad.yaml:1:7: the tag !!python/object/apply:os.system is not allowed; a config holds plain YAML values "
     "(mappings, lists, numbers, strings): remove the tag"),
    ("- data\n", "bad.yaml: a config file must hold a mapping at the top level (section: {key: value}), found a list"),
])
def test_a_broken_config_names_file_line_column_and_fix(tmp_path, capsys, monkeypatch, text, says):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(text)
    with pytest.raises(ValueError, match="^bad.yaml"):
        load_config("bad.yaml")
    assert error_line(capsys, "train", "--config", "bad.yaml").startswith(f"facemae train: error: {says}")
    assert not Path("pwned").exists()


@pytest.mark.parametrize("config, says", [
    ("nowhere.yaml", "config file nowhere.yaml does not exist (see jobs/configs/ for examples)"),
    (".", "config file . is not a file; give a YAML file such as jobs/configs/train.yaml"),
    ("binary.yaml", "binary.yaml: not UTF-8 text (byte 0); a config is a YAML text file"),
])
def test_a_config_path_that_is_no_yaml_file_is_named(tmp_path, capsys, monkeypatch, config, says):
    monkeypatch.chdir(tmp_path)
    Path("binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert error_line(capsys, "ingest", "--config", config).startswith(f"facemae ingest: error: {says}")


def test_an_override_that_is_not_yaml_names_the_column_and_the_fix(capsys):
    line = error_line(capsys, "ingest", "--set", "data.path=[faces")
    assert line == ("facemae ingest: error: override 'data.path=[faces', column 7 of the value: not valid YAML: "
                    "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence started at line 1 "
                    "column 1); quote a value meant as text, e.g. --set 'data.path=\"...\"'")


def test_run_job_prints_the_same_one_line(tmp_path, capsys):
    from facemae import sdk

    (tmp_path / "bad.yaml").write_text("train: {max_steps: 5\n")
    assert cli.run_job("train.py", lambda: sdk.train(str(tmp_path / "bad.yaml"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train.py: {tmp_path / 'bad.yaml'}:2:1: not valid YAML")


# 5. Weights files.

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Right and wrong weights files: an FR backbone, FaceMAEs of two patch sizes, FaceMAEs whose
    tensors are not what their description says, a torch.save file, a text file."""
    from safetensors.torch import save_file

    from facemae.models.registry import build_fr, build_mae

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    out = {
        "fr": save_weights(build_fr("fr_tiny", embedding_size=32), root / "fr",
                           {"task": "fr", "model": "fr_tiny", "embedding_size": 32, "run": "teacher"}),
        "mae": save_weights(build_mae("facemae_vit_tiny_p8"), root / "mae",
                            {"task": "mae", "model": "facemae_vit_tiny_p8", "run": "smoke"}),
        "mae_p16": save_weights(build_mae("facemae_vit_tiny_p16"), root / "mae16",
                                {"task": "mae", "model": "facemae_vit_tiny_p16", "run": "smoke16"}),
        "resized": save_weights(build_mae("facemae_vit_tiny_p16"), root / "resized",
                                {"task": "mae", "model": "facemae_vit_tiny_p8", "run": "edited"}),
        "pickle": root / "model.pth",
        "text": root / "notes.safetensors",
    }
    torch.save(build_mae("facemae_vit_tiny_p8").state_dict(), out["pickle"])
    state = build_mae("facemae_vit_tiny_p8").state_dict()
    del state["decoder_pred.bias"]
    out["cut"] = root / "cut.safetensors"
    save_file(state, str(out["cut"]), metadata={"facemae": json.dumps({"task": "mae", "model": "facemae_vit_tiny_p8"})})
    out["text"].write_text("not weights at all\n")
    return out


def test_load_and_check_name_what_a_file_holds_and_what_was_needed(weights):
    with pytest.raises(WeightsError) as exc:
        load_fr_backbone(weights["mae"])
    assert str(exc.value) == (f"{weights['mae']} holds FaceMAE weights (task=mae, model=facemae_vit_tiny_p8, "
                              "run=smoke), but an FR backbone (task=fr) is needed here; pass the "
                              "export/weights.safetensors of a train.task=fr run (e.g. the IRM teacher's)")
    with pytest.raises(WeightsError, match=r"holds FR backbone weights \(task=fr, model=fr_tiny, embedding_size=32"):
        load_mae(weights["fr"])
    with pytest.raises(WeightsError, match=r"its tensors do not fit the facemae_vit_tiny_p8 its description names "
                                           r"\(pos_embed is \[1, 50, 64\], not \[1, 197, 64\]; "):
        load_mae(weights["resized"])
    with pytest.raises(WeightsError, match=r"names \(missing decoder_pred.bias\); export the weights again"):
        load_mae(weights["cut"])
    with pytest.raises(WeightsError, match=r"model.pth is not a readable safetensors file \(it looks like a torch"):
        load_mae(weights["pickle"])
    with pytest.raises(WeightsError, match="notes.safetensors is not a readable safetensors file"):
        check_weights(weights["text"], task="mae")
    with pytest.raises(WeightsError, match="is a folder without weights.safetensors"):
        check_weights(weights["text"].parent, task="fr")
    assert check_weights(weights["fr"].parent, task="fr").path == weights["fr"]  # the export folder will do
    assert load_mae(weights["mae"]).patch_size == 8


@pytest.mark.parametrize("kind, says", [
    ("fr", "holds FR backbone weights (task=fr, model=fr_tiny, embedding_size=32, run=teacher), but a FaceMAE "
           "(task=mae) is needed here; pass the export/weights.safetensors of a train.task=mae run"),
    ("mae_p16", "holds FaceMAE weights (task=mae, model=facemae_vit_tiny_p16, run=smoke16) with 16-pixel patches, "
                "but {masked} was masked with 8-pixel patches; pass a FaceMAE trained with mask.patch_size=8, or "
                "mask again with --patch-size 16"),
    ("resized", "its tensors do not fit the facemae_vit_tiny_p8 its description names"),
    ("pickle", "is not a readable safetensors file (it looks like a torch.save checkpoint); pass the weights"),
    ("text", "is not a readable safetensors file"),
])
def test_generate_with_wrong_weights_stops_on_the_driver(tmp_path, capsys, dataset, weights, no_ray, kind, says):
    root, _ = dataset
    start = time.monotonic()
    line = error_line(capsys, "generate", "--masked", str(root / "masked"), "--weights", str(weights[kind]),
                      "--output", str(tmp_path / "released"))
    assert time.monotonic() - start < 30  # seconds, not the ~90 s of a Ray actor pool failing
    assert line.startswith(f"facemae generate: error: {weights[kind]}") and says.format(masked=root / "masked") in line
    assert not (tmp_path / "released").exists()


def test_evaluate_checks_every_weights_file_before_any_work(tmp_path, capsys, dataset, weights, no_ray, monkeypatch):
    import facemae
    import facemae.eval.evaluate

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("verification ran before the judge's weights were checked")

    monkeypatch.setattr(facemae.eval.evaluate, "verify", refuse)
    root, _ = dataset
    line = error_line(capsys, "evaluate", "--fr", str(weights["fr"]), "--bin", str(tmp_path / "lfw.bin"),
                      "--judge", str(weights["mae"]), "--released", str(root / "masked"),
                      "--originals", str(root / "orig"))
    assert line.startswith(f"facemae evaluate: error: {weights['mae']} holds FaceMAE weights (task=mae, ")
    assert "an FR backbone (task=fr) is needed here" in line
    assert error_line(capsys, "evaluate", "--fr", str(weights["text"]), "--pairs-from", str(root / "orig")) \
        .startswith(f"facemae evaluate: error: {weights['text']} is not a readable safetensors file")
    with pytest.raises(WeightsError, match="is needed here"):  # the SDK raises what the CLI prints
        facemae.evaluate(fr=str(weights["mae"]), pairs_from=str(root / "orig"))


def test_teacher_embedding_checks_the_teacher_on_the_driver(tmp_path, dataset, weights, no_ray):
    from facemae.generate.embed import embed_dataset

    root, args = dataset
    with pytest.raises(WeightsError, match="holds FaceMAE weights .*, but an FR backbone"):
        embed_dataset(load_config(None, args), source=str(root / "orig"), weights=str(weights["mae"]),
                      output=str(tmp_path / "embedded"))
    assert not (tmp_path / "embedded").exists()


def test_a_facemae_run_checks_its_teacher_and_judge_on_the_driver_naming_the_key(tmp_path, dataset, weights, no_ray):
    from facemae.train.trainer import train

    root, args = dataset
    base = [*args, "train.task=mae", "model.mae=facemae_vit_tiny_p8", "train.num_workers=2", "train.max_steps=2",
            f"train.storage_path={tmp_path / 'runs'}"]
    missing = tmp_path / "no-teacher" / "weights.safetensors"
    with pytest.raises(WeightsError) as exc:
        train(load_config(None, [*base, f"train.teacher={missing}"]))
    assert str(exc.value).startswith(f"train.teacher={missing}: {missing} does not exist; pass the weights")
    with pytest.raises(WeightsError, match=rf"^train.judge={weights['mae']}: .* holds FaceMAE weights .*, but an FR "):
        train(load_config(None, [*base, f"train.teacher={weights['fr']}", f"train.judge={weights['mae']}",
                                 "train.val_every=1"]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("error, says", [
    (PermissionError(13, "Permission denied", "/data/faces/manifest.json"),
     "/data/faces/manifest.json: permission denied; give this user access to it (chmod / chown) or choose another "
     "location"),
    (IsADirectoryError(21, "Is a directory", "/data/lfw.bin"),
     "/data/lfw.bin: is a directory; a file is needed there, not a folder: give the file's path"),
    (NotADirectoryError(20, "Not a directory", "/data/notes.txt/part-0.parquet"),
     "/data/notes.txt/part-0.parquet: not a directory; a part of the path is a file, not a folder: fix the path"),
])
def test_a_refused_path_is_one_line_naming_it_and_the_fix(capsys, monkeypatch, error, says):
    def refuse(path: str) -> None:
        raise error

    monkeypatch.setattr(cli, "verify_dataset", refuse)  # where the file system said no is not what is tested
    assert error_line(capsys, "verify", "/data/faces") == f"facemae verify: error: {says}"


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    # /sys refuses new folders even to root (EPERM), where chmod would not stop a root test run.
    try:
        os.mkdir("/sys/facemae-probe")
    except PermissionError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. a read-only /sys (EROFS)
        pytest.skip(f"/sys refuses with {exc.strerror}, not a permission error, here")
    else:  # pragma: no cover - a machine where /sys takes folders
        os.rmdir("/sys/facemae-probe")
        pytest.skip("/sys accepts new folders here")
    line = error_line(capsys, "ingest", "--output", "/sys/facemae-out", "--set", "data.num_identities=2",
                      "--set", "data.images_per_identity=1", "--set", "data.workers=1")
    assert line.startswith("facemae ingest: error: /sys/facemae-out: operation not permitted; give this user access")


# 6. What a user sees: a real process, one line, no traceback.

def test_the_command_line_shows_one_line_and_no_traceback(tmp_path, dataset, weights):
    root, _ = dataset
    out = subprocess.run([FACEMAE, "generate", "--masked", str(root / "masked"), "--weights", str(weights["fr"]),
                          "--output", str(tmp_path / "released")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # One line in all: a Ray cluster that had started would have logged its own lines.
    assert out.stderr.count("\n") == 1 and f"{weights['fr']} holds FR backbone weights" in out.stderr
    (tmp_path / "bad.yaml").write_text("data: {source: folder\n")
    out = subprocess.run([FACEMAE, "ingest", "--config", str(tmp_path / "bad.yaml")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith(f"facemae ingest: error: {tmp_path / 'bad.yaml'}:2:1: not valid YAML")
