"""Datasets on an object store (issue 12, part 1): facemae.storage against a real S3-compatible server
(moto's standalone server on localhost), then ingest -> mask -> verify on s3://, resume, bad locations."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_ports, make_folder
from facemae import cli, storage
from facemae.sdk import train_run
from facemae.config import load_config
from facemae.data import synthetic
from facemae.data.images import decode_rgb
from facemae.data.ingest import ingest
from facemae.data.runner import JOURNAL, UnitResult
from facemae.data.shards import MANIFEST, iter_rows, read_manifest

FACEMAE = str(Path(sys.executable).parent / "facemae")
SYNTHETIC = ["data.num_identities=6", "data.images_per_identity=3", "data.rows_per_shard=4", "data.val_fraction=0",
             "data.deploy_fraction=0.34"]


@pytest.fixture(autouse=True)
def default_storage():
    """Each test leaves this process's storage settings as it found them: the defaults."""
    yield
    storage.configure()


@pytest.fixture
def s3(s3_server):
    """The session's server, with this process's storage settings pointing at it for one test."""
    endpoint, bucket, client = s3_server
    storage.configure(endpoint_override=endpoint)
    return endpoint, bucket, client


def _objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    """``{key relative to prefix: its listing entry}`` of every object under ``prefix/``, but the empty
    ``folder/`` markers pyarrow leaves after a delete (storage.delete)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1:]: o for page in pages for o in page.get("Contents", [])
            if not (o["Key"].endswith("/") and o["Size"] == 0)}


def _body(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


# (a) The storage layer itself.

def test_a_long_log_on_a_store_is_uploaded_at_most_every_n_seconds_not_per_line(s3, monkeypatch):
    """1,000 report lines over 1,000 s of a run: one whole-log upload per line sends O(lines^2) bytes; at most
    one per 60 s (and the forced one at the end) sends a few dozen copies of the log at most."""
    _, bucket, client = s3
    clock = [0.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    sent = []
    upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda local, remote: sent.append(Path(local).stat().st_size)
                        or upload(local, remote))
    log = storage.AppendLog(f"s3://{bucket}/runs/long/metrics.jsonl", upload_every_s=60)
    line = json.dumps({"step": 0, "loss": 0.123456789, "lr": 0.001, "images_per_s": 123.45}) + "\n"
    for step in range(1000):
        log.write(line)
        log.flush()
        clock[0] += 1.0
        if step == 499:
            log.flush(force=True)  # a checkpoint: the store's copy reaches this step, whatever the clock
            assert _body(client, bucket, "runs/long/metrics.jsonl") == (line * 500).encode()
    log.close()
    total = len(line) * 1000
    assert _body(client, bucket, "runs/long/metrics.jsonl") == (line * 1000).encode()
    assert len(sent) <= 1000 // 60 + 3 and sum(sent) <= (1000 // 60 + 3) * total
    per_line = sum(len(line) * n for n in range(1, 1001))  # what an upload per line would have sent
    print(f"log uploads: {len(sent)}, {sum(sent)} bytes, against {per_line} bytes uploading at every line")
    assert sum(sent) < per_line / 25


def test_write_read_list_checksum_and_delete(s3):
    _, bucket, client = s3
    root = f"s3://{bucket}/unit"
    storage.write_text(storage.join(root, "a.txt"), "héllo\n")
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # several MiB
    storage.atomic_write(storage.join(root, "sub", "b.bin"), lambda tmp: Path(tmp).write_bytes(payload))
    assert storage.read_text(f"{root}/a.txt") == "héllo\n"
    assert storage.list_files(root) == ["a.txt", "sub/b.bin"]
    assert storage.list_files(f"s3://{bucket}/nothing-here") == []
    assert storage.is_file(f"{root}/sub/b.bin") and not storage.is_file(f"{root}/sub")
    assert storage.exists(f"{root}/sub") and not storage.exists(f"{root}/c.txt")
    assert _body(client, bucket, "unit/sub/b.bin") == payload
    assert storage.sha256(f"{root}/sub/b.bin") == hashlib.sha256(_body(client, bucket, "unit/sub/b.bin")).hexdigest()
    storage.delete(f"{root}/a.txt")
    storage.delete(f"{root}/a.txt")  # a missing object is fine
    assert set(_objects(client, bucket, "unit")) == {"sub/b.bin"}
    storage.delete_tree(root)
    assert _objects(client, bucket, "unit") == {}


def test_an_interrupted_write_leaves_nothing_under_the_final_key(s3):
    _, bucket, client = s3
    key = f"s3://{bucket}/atomic/shard.parquet"

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a shard")
        raise KeyboardInterrupt  # the writer is killed mid-shard

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(key, half_then_fail)
    assert _objects(client, bucket, "atomic") == {}
    storage.write_text(key, "whole")
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(key, half_then_fail)
    assert _body(client, bucket, "atomic/shard.parquet") == b"whole"  # the old object stands


def test_local_paths_keep_their_atomic_rename(tmp_path):
    target = tmp_path / "d" / "x.txt"
    storage.write_text(target, "one")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("tw")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        storage.atomic_write(target, half_then_fail)
    assert target.read_text() == "one" and storage.list_files(tmp_path) == ["d/x.txt"]  # no temp file left
    assert storage.join(tmp_path, "d", "x.txt") == str(target)


def _in_a_killed_process(code: str, env: dict[str, str]) -> str:
    """Runs ``code`` (facemae.storage imported as ``storage``) in a fresh Python that then ends with
    ``os._exit``, as a SIGKILLed Ray worker does: no ``atexit``, no ``finally``. Returns its stdout."""
    prelude = "import os, sys\nfrom facemae import storage\n"
    done = subprocess.run([sys.executable, "-c", prelude + code + "\nsys.stdout.flush(); os._exit(0)"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_cached_object_is_downloaded_once_per_version_for_every_process_and_outlives_a_killed_one(s3, tmp_path):
    """cached_file keeps one copy per object version in the node's cache: a second process reuses the first
    one's copy (same file, not written again) although the first was killed, nothing of it is left in the temp
    folder, and a changed object gets a copy of its own."""
    endpoint, bucket, client = s3
    client.put_object(Bucket=bucket, Key="cache/weights.safetensors", Body=b"first version")
    env = {"FACEMAE_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    fetch = (f"storage.configure(endpoint_override={endpoint!r})\n"
             f"print(storage.cached_file('s3://{bucket}/cache/weights.safetensors'))")

    first = Path(_in_a_killed_process(fetch, env).strip())
    assert first.read_bytes() == b"first version" and first.is_relative_to(tmp_path / "cache")
    assert first.name == "weights.safetensors"
    written = first.stat().st_ino, first.stat().st_mtime_ns
    time.sleep(0.05)
    second = Path(_in_a_killed_process(fetch, env).strip())
    assert second == first and second.stat().st_ino == written[0]  # not downloaded again
    assert second.stat().st_mtime_ns > written[1]  # its use recorded, for pruning
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p.name for p in second.parent.iterdir()] == ["weights.safetensors"]  # no download left half-done

    client.put_object(Bucket=bucket, Key="cache/weights.safetensors", Body=b"the second version")
    third = Path(_in_a_killed_process(fetch, env).strip())
    assert third != first and third.read_bytes() == b"the second version"
    assert first.read_bytes() == b"first version"  # another process may still read it; pruning removes it later


def test_a_killed_writers_temp_file_beside_its_target_is_removed_by_the_next_writer_there(tmp_path):
    """atomic_write's temp file lies beside the file it will replace (one filesystem: an atomic rename), named
    after its process: a writer killed mid-write leaves it; the next process writing in that folder removes
    it, and leaves a running process's temp alone."""
    target = tmp_path / "ds" / "part-00000.parquet"
    left = Path(_in_a_killed_process(
        f"storage.atomic_write({str(target)!r}, lambda tmp: (open(tmp, 'wb').write(b'PAR1 half'), print(tmp), "
        "sys.stdout.flush(), os._exit(0)))", {}).strip())
    assert left.parent == target.parent and left.name.startswith(".part-00000.parquet.") and left.suffix == ".tmp"
    assert left.read_bytes() == b"PAR1 half" and not target.exists()
    host, owner = left.name.split(".")[-3:-1]  # ".<name>.<host>.<pid>-<random>.tmp"
    assert owner.split("-")[0].isdigit() and int(owner.split("-")[0]) != os.getpid()
    running = target.parent / f".part-00009.parquet.{host}.{os.getpid()}-x.tmp"  # this (running) process's
    running.write_bytes(b"being written")

    _in_a_killed_process(f"storage.write_text({str(target.parent / 'manifest.json')!r}, '{{}}')", {})
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([running.name, "manifest.json"])


def test_prune_cache_removes_unused_copies_then_the_least_recently_used_beyond_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEMAE_CACHE_DIR", str(tmp_path))
    now, hour = time.time(), 3600

    def copy(name: str, size: int, age_s: float, file: str = "w.safetensors") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / file).write_bytes(b"x" * size)
        for path in (folder / file, folder):
            os.utime(path, (now - age_s, now - age_s))
        return folder

    copy("stale", 10, 8 * 24 * hour)  # unused for longer than CACHE_KEEP_S
    copy("old", 100, 3 * hour)
    copy("older", 100, 5 * hour)
    copy("recent", 100, 2 * hour)
    copy("in-use", 100, 60)  # used a minute ago: kept although over the limit
    copy("downloading", 500, 30, file=".w.safetensors.host.1.2.part")  # only a download in progress
    copy("killed", 500, 8 * 24 * hour, file=".w.safetensors.host.3.4.part")  # a download its process never finished

    removed = storage.prune_cache(max_bytes=250)
    assert sorted(Path(p).name for p in removed) == ["killed", "old", "older", "stale"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloading", "in-use", "recent"]
    assert storage.prune_cache(max_bytes=250) == []  # 200 bytes of copies and a download: within the limit


def test_scratch_of_a_killed_process_is_removed_by_the_next_one_and_a_running_ones_kept(tmp_path):
    """A process killed inside scratch_folder leaves its folder (and a scratch file); the next process that
    takes scratch space on this host removes both. A running process's scratch and another host's stay."""
    env = {"TMPDIR": str(tmp_path)}
    left = _in_a_killed_process("with storage.scratch_folder('ckpt') as d:\n"
                                "    open(os.path.join(d, 'model.pt'), 'wb').write(b'x')\n"
                                "    print(storage.scratch('upload', suffix='.tmp'))\n"
                                "    print(d); sys.stdout.flush(); os._exit(0)", env).split()
    assert sorted(Path(p).name.split("-")[1] for p in left) == ["ckpt", "upload"] and all(map(os.path.exists, left))
    host = Path(left[0]).name.split("-")[2].split(".")[0]
    mine = Path(tempfile.mkdtemp(prefix=f"facemae-ckpt-{host}.{os.getpid()}-", dir=tmp_path))  # running: kept
    other = tmp_path / "facemae-ckpt-00000000.1-abc"  # another host's (a shared temp folder): kept
    other.mkdir()
    unrelated = tmp_path / "facemae-test-logs-x"  # not scratch
    unrelated.mkdir()

    kept = _in_a_killed_process("print(storage.scratch('export', folder=True))", env).strip()
    assert not any(map(os.path.exists, left))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, unrelated.name,
                                                                Path(kept).name])


@pytest.mark.parametrize("url, says", [
    ("s3://", "no bucket named; write s3://<bucket>/<prefix>"),
    ("s3:///key", "no bucket named"),
    ("ftp://host/x", "unsupported storage scheme 'ftp://'; use a local path, s3://bucket/prefix or gs://"),
])
def test_malformed_urls_are_refused(url, says):
    with pytest.raises(storage.StorageLocationError, match="^" + re.escape(url) + ": "):
        storage.join(url, "manifest.json")
    with pytest.raises(ValueError, match=re.escape(says)):
        storage.resolve(url)


def test_a_missing_bucket_and_a_dead_endpoint_fail_fast_naming_the_fix(s3):
    endpoint, _, _ = s3
    with pytest.raises(storage.StorageUnreachableError, match="bucket 'no-such-bucket' does not exist"):
        storage.exists("s3://no-such-bucket/x")
    (port,) = free_ports(1)  # nothing listens there
    storage.configure(endpoint_override=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(storage.StorageUnreachableError, match=f"cannot reach s3://b at http://127.0.0.1:{port} .*"
                                                              "check storage.endpoint_override"):
        storage.exists("s3://b/x")
    assert time.monotonic() - start < 10


# (b) ingest -> mask -> verify on s3://, through the command line, Ray tasks writing the shards.

def _facemae(capsys, *argv: str) -> dict:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _facemae_process(*argv: str, cwd: Path | None = None) -> dict:
    """``facemae argv`` in its own process, with its own embedded Ray: its workers inherit this
    environment's AWS keys, as a real cluster's nodes have their own. (Workers of a Ray started
    before the keys were set would write anonymously, which moto accepts and stores wrongly.)"""
    done = subprocess.run([FACEMAE, *argv, "--set=ray.num_cpus=2"], capture_output=True, text=True, timeout=400,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_bucket_matches_manifest(client, bucket: str, prefix: str) -> dict:
    """Every shard the manifest names is an object whose bytes hash to its recorded SHA-256, and
    nothing else is there (no journal, no temp object)."""
    manifest = json.loads(_body(client, bucket, f"{prefix}/{MANIFEST}"))
    shards = [s for split in manifest["splits"].values() for s in split]
    objects = _objects(client, bucket, prefix)
    assert set(objects) == {MANIFEST, *(s["file"] for s in shards)}
    for s in shards:
        assert hashlib.sha256(_body(client, bucket, f"{prefix}/{s['file']}")).hexdigest() == s["sha256"], s["file"]
    return manifest


def test_ingest_mask_verify_on_s3_then_resume_redoes_only_the_missing_shard(s3, capsys, tmp_path, monkeypatch):
    endpoint, bucket, client = s3
    data, masked = f"s3://{bucket}/syn", f"s3://{bucket}/syn-masked"
    settings = [f"--set=storage.endpoint_override={endpoint}", *(f"--set={s}" for s in SYNTHETIC)]
    summary = _facemae_process("ingest", *settings, "--output", data, "--workers", "2")  # 5 shards: Ray tasks
    assert summary["counts"]["train"]["images"] + summary["counts"]["deploy"]["images"] == 18
    original = _check_bucket_matches_manifest(client, bucket, "syn")
    assert len(original["splits"]["train"]) == 3 and len(original["splits"]["deploy"]) == 2

    # Byte for byte the dataset a local ingest writes.
    local = ingest(load_config(None, [f"data.output={tmp_path / 'ds'}", "data.workers=1", *SYNTHETIC]))
    assert {s.file: s.sha256 for g in local.splits.values() for s in g} == \
        {s["file"]: s["sha256"] for g in original["splits"].values() for s in g}

    _facemae(capsys, "mask", *settings, f"--set=data.output={data}", "--output", masked)
    assert _check_bucket_matches_manifest(client, bucket, "syn-masked")["kind"] == "masked"

    # verify has no config: the endpoint comes from AWS_ENDPOINT_URL, as for the AWS tools.
    storage.configure()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert _facemae(capsys, "verify", data)["counts"] == summary["counts"]
    rows = list(iter_rows(read_manifest(data).files(data, "deploy")))
    identity, index = (int(x) for x in rows[0]["image_id"].split("-")[1:])
    np.testing.assert_array_equal(decode_rgb(rows[0]["image"]), synthetic.generate_image(identity, index, seed=0))

    # A run killed before its last shard: no manifest, a journal of the others, one shard missing.
    lost, finished = original["splits"]["train"][1]["file"], read_manifest(data).splits
    journal = [json.dumps({"fingerprint": original["settings"]})] + [
        json.dumps(asdict(UnitResult(split=split, shard=shard)))
        for split, shards in finished.items() for shard in shards if shard.file != lost]
    client.put_object(Bucket=bucket, Key=f"syn/{JOURNAL}", Body="\n".join(journal) + "\n")
    for key in (MANIFEST, lost):
        client.delete_object(Bucket=bucket, Key=f"syn/{key}")
    before = _objects(client, bucket, "syn")
    time.sleep(1.1)  # LastModified has one-second resolution
    _facemae(capsys, "ingest", *settings, "--output", data, "--workers", "2")
    after = _objects(client, bucket, "syn")
    rewritten = {k for k in after if k not in before or after[k]["LastModified"] != before[k]["LastModified"]}
    assert rewritten == {lost, MANIFEST} and JOURNAL not in after
    assert _check_bucket_matches_manifest(client, bucket, "syn") == original


def test_a_local_image_folder_ingests_to_s3_byte_for_byte(s3, tmp_path):
    endpoint, bucket, client = s3
    pixels = make_folder(tmp_path / "faces", identities=3, images=2)
    out = f"s3://{bucket}/folder-ds"
    ingest(load_config(None, ["data.source=folder", f"data.path={tmp_path / 'faces'}", f"data.output={out}",
                              "data.workers=1", "data.rows_per_shard=2", f"storage.endpoint_override={endpoint}"]))
    _check_bucket_matches_manifest(client, bucket, "folder-ds")
    rows = {r["image_id"]: r for split in ("train", "deploy") for r in iter_rows(read_manifest(out).files(out, split))}
    assert set(rows) == set(pixels)
    for image_id, row in rows.items():
        np.testing.assert_array_equal(decode_rgb(row["image"]), pixels[image_id])


# (c) The whole platform on the store: the main job (ingest, mask, IRM teacher, teacher embeddings,
# FaceMAE on 2 Ray workers with checkpoints), its resume, generation and evaluation, nothing local.

SMOKE = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train_smoke.yaml")


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_main_job_resume_generate_and_evaluate_run_entirely_on_s3(s3, tmp_path):
    endpoint, bucket, client = s3
    root = f"s3://{bucket}/e2e"
    settings = ["--config", SMOKE, f"--set=storage.endpoint_override={endpoint}", "--set=name=e2e",
                f"--set=data.output={root}/data", f"--set=train.storage_path={root}/runs", "--set=train.checkpoint_every=2"]
    work = tmp_path / "cwd"
    work.mkdir()

    first = _facemae_process("train", *settings, "--set=train.max_steps=3", cwd=work)
    assert first["metrics"]["step"] == 3 and first["teacher"] == f"{root}/runs/e2e-teacher/export/weights.safetensors"
    second = _facemae_process("train", *settings, "--set=train.max_steps=5", cwd=work)  # same run, resumed
    run = f"{root}/runs/e2e"
    assert second["checkpoint"] == f"{run}/checkpoint_00000005" and second["run_dir"] == run
    assert second["weights"] == f"{run}/export/weights.safetensors"

    # Every dataset is on the bucket whole: each shard's bytes hash to its manifest's checksum.
    prefixes = sorted({k.split("/")[0] for k in _objects(client, bucket, "e2e") if k.split("/")[0] != "runs"})
    embedded = [p for p in prefixes if p.startswith("data-teacher-")]
    assert prefixes == sorted(["data", "data-masked", *embedded]) and len(embedded) == 1
    for prefix in prefixes:
        _check_bucket_matches_manifest(client, bucket, f"e2e/{prefix}")

    # The run: Ray Train's checkpoints (the newest two), metrics of both attempts, exported weights.
    runs = _objects(client, bucket, "e2e/runs/e2e")
    checkpoints = sorted({k.split("/")[0] for k in runs if "/" in k and k.startswith("checkpoint_")})
    assert checkpoints == ["checkpoint_00000004", "checkpoint_00000005"]
    assert json.loads(_body(client, bucket, "e2e/runs/e2e/checkpoint_00000005/progress.json"))["step"] == 5
    assert _png_size(_body(client, bucket, "e2e/runs/e2e/checkpoint_00000005/preview.png")) == (8 * 112, 3 * 112)
    lines = [json.loads(x) for x in _body(client, bucket, "e2e/runs/e2e/metrics.jsonl").decode().splitlines()]
    assert [(x["step"], x["attempt"]) for x in lines] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    info = json.loads(_body(client, bucket, "e2e/runs/e2e/export/weights.json"))
    assert info["checkpoint"] == f"{run}/checkpoint_00000005" and info["task"] == "mae"
    weights = _body(client, bucket, "e2e/runs/e2e/export/weights.safetensors")
    teacher = f"{root}/runs/e2e-teacher/export/weights.safetensors"
    assert json.loads(_body(client, bucket, f"e2e/{embedded[0]}/{MANIFEST}"))["source"]["teacher"] == teacher

    # Generation reads the masked shards and the weights from the bucket and writes the release there.
    released = f"{root}/released"
    _facemae_process("generate", *settings, "--output", released, "--set=generate.actors=1", cwd=work)
    manifest = _check_bucket_matches_manifest(client, bucket, "e2e/released")
    assert manifest["settings"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["report"]["images"] == json.loads(_body(client, bucket, f"e2e/data-masked/{MANIFEST}"))[
        "report"]["images"]

    # Evaluation: verification pairs drawn from the bucket's originals, privacy of the release, both
    # embedded by Ray Data actor pools that load the teacher's weights from the bucket.
    scores = _facemae_process("evaluate", *settings, "--fr", teacher, "--pairs-from", f"{root}/data",
                              "--set=eval.pairs=20", "--set=eval.bins=[]", "--set=eval.ray_threshold=0",
                              "--judge", teacher, "--released", released, cwd=work)
    pairs = scores["verification"]["heldout_pairs"]
    assert pairs["n_pairs"] == 20 and 0.0 <= pairs["accuracy"] <= 1.0
    assert 0.0 <= scores["privacy"]["image_leak@1"] <= 1.0

    # Nothing went to the local disk but the jobs' logs.
    assert [p.name for p in work.rglob("*")] == [], sorted(str(p) for p in work.rglob("*"))


def test_a_one_process_run_checkpoints_resumes_and_exports_on_s3(s3, tmp_path, monkeypatch):
    """train.num_workers=0 (no Ray): its own checkpoint uploads, progress.json last, the newest two kept;
    metrics.jsonl and the sample-id log rewritten whole; the rerun resumes from the bucket."""
    endpoint, bucket, client = s3
    root = f"s3://{bucket}/local-run"
    overrides = [f"storage.endpoint_override={endpoint}", f"data.output={root}/data", "data.workers=1",
                 *SYNTHETIC, "name=solo", f"train.storage_path={root}/runs", "train.num_workers=0",
                 "train.task=fr", "model.fr=fr_tiny", "model.embedding_size=32", "train.micro_batch=4",
                 "train.checkpoint_every=1", "train.log_every=1", "train.log_sample_ids=true", "train.warmup_steps=1",
                 "tracking.tensorboard=true"]
    ingest(load_config(None, overrides))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the event file's local copy is written
    first = train_run(None, overrides=[*overrides, "train.max_steps=2"])
    assert first.checkpoint == f"{root}/runs/solo/checkpoint_00000002" and first.metrics["step"] == 2
    assert list(scratch.glob("facemae-tensorboard-*")) == []  # removed once uploaded and closed
    second = train_run(None, overrides=[*overrides, "train.max_steps=4"])
    assert second.checkpoint == f"{root}/runs/solo/checkpoint_00000004"
    assert second.weights == f"{root}/runs/solo/export/weights.safetensors"

    run = _objects(client, bucket, "local-run/runs/solo")
    assert sorted({k.split("/")[0] for k in run if k.startswith("checkpoint_")}) == \
        ["checkpoint_00000003", "checkpoint_00000004"]
    lines = [json.loads(x) for x in _body(client, bucket, "local-run/runs/solo/metrics.jsonl").decode().splitlines()]
    assert [(x["step"], x["attempt"]) for x in lines] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    ids = _body(client, bucket, "local-run/runs/solo/sample_ids/rank000.txt").decode().split()
    assert len(ids) == 4 * 4  # four steps of four faces, both attempts
    info = json.loads(_body(client, bucket, "local-run/runs/solo/export/weights.json"))
    assert info["checkpoint"] == second.checkpoint
    events = sorted(k for k in run if k.startswith("tensorboard/events.out.tfevents."))
    assert len(events) == 2  # one event file per start, each uploaded whole after every report
    assert all(_body(client, bucket, f"local-run/runs/solo/{k}").count(b"loss") >= 2 for k in events)
    # The exported weights load from the bucket, equal to the checkpoint's merged state.
    from facemae.models.weights import load_fr_backbone
    from facemae.train.trainer import consolidated_state

    model = load_fr_backbone(second.weights)
    with storage.local_folder(second.checkpoint) as local:
        state = consolidated_state(local)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"backbone.{key}"].float()), key
    # A third run of the same name finds it finished: nothing retrains, nothing is rewritten.
    before = _objects(client, bucket, "local-run/runs/solo")
    again = train_run(None, overrides=[*overrides, "train.max_steps=4"])
    assert again.checkpoint == second.checkpoint and _objects(client, bucket, "local-run/runs/solo") == before


def test_a_sweep_report_is_written_to_s3_whole(s3):
    from facemae.tune.report import write_sweep_report

    endpoint, bucket, client = s3
    table = [{"trial": f"t{i}", "params": {"mask.ratio": r}, "status": "COMPLETED", "step": 4, "val_irm": irm,
              "val_identity_leak@1": leak, "val_image_leak@1": leak / 2, "val_recon_loss": 0.1,
              "val_objective": irm + leak, "pareto": i < 2}
             for i, (r, irm, leak) in enumerate([(0.5, 0.1, 0.9), (0.75, 0.3, 0.4), (0.9, 0.5, 0.8)])]
    md, png = write_sweep_report(table, f"s3://{bucket}/reports/sweep", objective="balanced",
                                 sweep=f"s3://{bucket}/runs/demo-sweep")
    assert (md, png) == (f"s3://{bucket}/reports/sweep/pareto.md", f"s3://{bucket}/reports/sweep/pareto.png")
    assert set(_objects(client, bucket, "reports/sweep")) == {"trials.json", "pareto.md", "pareto.png"}
    assert json.loads(_body(client, bucket, "reports/sweep/trials.json")) == table
    text = _body(client, bucket, "reports/sweep/pareto.md").decode()
    assert text.startswith("# Sweep demo-sweep") and text.count("| yes |") == 2
    width, height = _png_size(_body(client, bucket, "reports/sweep/pareto.png"))
    assert width > 100 and height > 100


# (d) One clear line for a bad location or a store that cannot be reached.

def _error_line(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("output, says", [
    ("s3://", "data.output=s3://: no bucket named; write s3://<bucket>/<prefix>"),
    ("ftp://host/faces", "data.output=ftp://host/faces: unsupported storage scheme 'ftp://'"),
])
def test_a_bad_url_is_one_line(capsys, output, says):
    assert says in _error_line(capsys, "ingest", "--output", output, "--set=data.num_identities=2")


def test_a_bad_run_location_is_one_line_before_any_work(capsys):
    line = _error_line(capsys, "train", "--set=train.storage_path=s3:///runs")
    assert line.startswith("facemae train: error: train.storage_path=s3:///runs: no bucket named")


def test_missing_credentials_and_a_dead_endpoint_are_one_line_naming_what_to_set(capsys, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (port,) = free_ports(1)
    start = time.monotonic()
    line = _error_line(capsys, "ingest", "--output", "s3://facemae-test/x", "--set=data.num_identities=2",
                       f"--set=storage.endpoint_override=http://127.0.0.1:{port}")
    assert time.monotonic() - start < 15
    assert f"cannot reach s3://facemae-test at http://127.0.0.1:{port}" in line
    assert "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    assert "storage.endpoint_override" in line


def test_arrow_reads_refuse_a_mix_of_stores_instead_of_taking_urls_for_local_paths():
    assert storage.store_of("data/x.parquet") is None and storage.store_of("s3://bkt/a/x") == ("s3", "bkt")
    for mixed in (["data/x.parquet", "s3://bkt/a/x.parquet"], ["s3://one/x.parquet", "gs://two/x.parquet"]):
        with pytest.raises(storage.StorageLocationError, match="one store"):
            storage.for_arrow(mixed)
    # Local paths made absolute: Ray Data's read tasks run in working directories of their own.
    assert storage.for_arrow(["data/x.parquet", "/d/y.parquet"]) == ([os.path.abspath("data/x.parquet"),
                                                                      "/d/y.parquet"], None)
