"""Deployment: the released dataset from the owner's masked shards, by a real Ray Data actor pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facemae.config import load_config
from facemae.data.images import decode_rgb
from facemae.data.ingest import ingest
from facemae.data.masking import patchify
from facemae.data.owner import mask_dataset
from facemae.data.recordio import RecordIOReader
from facemae.data.runner import JOURNAL
from facemae.data.shards import iter_rows, read_manifest, verify_dataset
from facemae.generate.export import export_image_folder, export_recordio
from facemae.generate.release import generate_released
from facemae.models.weights import save_weights

PNG = b"\x89PNG\r\n\x1a\n"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """Originals, the owner's masked deployment split (2 masks per face), and an untrained tiny FaceMAE."""
    from facemae.models.registry import build_mae

    root = tmp_path_factory.mktemp("owner")
    args = [f"data.output={root / 'orig'}", "data.num_identities=8", "data.images_per_identity=4",
            "data.deploy_fraction=0.5", "data.rows_per_shard=4", "data.workers=1", f"mask.output={root / 'masked'}",
            "mask.splits=[deploy]", "mask.copies=2", "model.mae=facemae_vit_tiny_p8"]
    config = load_config(None, args)
    ingest(config)
    mask_dataset(config)
    torch.manual_seed(0)
    weights = save_weights(build_mae("facemae_vit_tiny_p8"), root / "mae",
                           {"task": "mae", "model": "facemae_vit_tiny_p8", "norm_pix_loss": False})
    return root, args + [f"generate.weights={weights}", "generate.batch_size=8"]


def _rows(root: Path) -> list[dict]:
    manifest = read_manifest(root)
    return [r for split in manifest.splits for r in iter_rows(manifest.files(root, split))]


@pytest.mark.ray
def test_each_shard_reaches_the_actor_pool_whole_and_is_read_by_the_actor(owner, ray_cluster):
    import ray.data

    from facemae.data.stream import shard_rows

    root, _ = owner
    masked = read_manifest(root / "masked")
    files = masked.files(root / "masked", "deploy")

    class Same:  # local: pickled by value, so Ray's workers need not import the test module
        def __call__(self, batch: dict) -> dict:
            return batch

    ds = shard_rows(files, columns=["image_id"], num_cpus=0.5).map_batches(
        Same, batch_size=None, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    calls = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    # One call per shard, holding that shard's rows in its order, named by its file.
    assert len(calls) == len(files) == 4
    by_file = {str(c["path"][0]): list(c["image_id"]) for c in calls}
    assert all(len(set(c["path"])) == 1 for c in calls)
    assert by_file == {str(f): [r["image_id"] for r in iter_rows([f])] for f in files}
    # The read is fused into the pool: the actors read their shards, no read tasks start beside them.
    assert "MapBatches(shard_file_rows)->MapBatches(Same)" in ds.stats()


@pytest.mark.ray
def test_the_gpu_pools_are_given_a_batch_size_ray_data_accepts(owner, ray_cluster):
    """Found on an H200: Ray Data refuses ``batch_size=None`` for a pool that asks for GPUs, so the
    embedding and release pools failed there as they were built. Building their plans checks it (nothing
    runs, so no GPU is needed)."""
    import ray.data

    from facemae.data.stream import pool_batch_size, shard_rows
    from facemae.generate.embed import embedding_pool
    from facemae.generate.release import release_pool

    root, _ = owner
    masked = read_manifest(root / "masked")
    todo = {str(root / "masked" / s.file): ("deploy", s) for s in masked.splits["deploy"]}
    assert pool_batch_size(todo, num_cpus=0.5) is None  # CPU pools keep a whole shard per call
    assert pool_batch_size(todo, num_gpus=1) == max(s.rows for s in masked.splits["deploy"]) > 0

    class Same:
        def __call__(self, batch: dict) -> dict:
            return batch

    with pytest.raises(ValueError, match="batch_size"):  # what the pools did before
        shard_rows(list(todo), num_gpus=1).map_batches(Same, batch_size=None, num_gpus=1,
                                                       compute=ray.data.ActorPoolStrategy(size=1))
    config = load_config(None, ["train.use_gpu=true", "generate.use_gpu=true"])
    for ds in (embedding_pool(config, todo, weights="unused"),
               release_pool(config, todo, weights="unused", patch_size=8)):
        assert isinstance(ds, ray.data.Dataset)


@pytest.mark.ray
@pytest.mark.parametrize("paste", [True, False])
def test_release_pastes_the_owners_pixels_bit_exact_and_lists_every_row_once(tmp_path, owner, paste, ray_cluster):
    root, args = owner
    out = tmp_path / "released"
    manifest = generate_released(load_config(None, [*args, f"generate.output={out}", f"loss.paste_visible={paste}"]))
    verify_dataset(out)
    masked = {r["image_id"]: r for r in _rows(root / "masked")}
    released = _rows(out)
    assert manifest.kind == "released" and manifest.num_images() == len(masked) == 2 * 16
    assert sorted(r["image_id"] for r in released) == sorted(masked)  # every input row once
    exact = []
    for r in released:
        m = masked[r["image_id"]]
        assert (r["source_id"], r["identity"]) == (m["source_id"], m["identity"])
        mask = np.frombuffer(m["mask"], np.uint8)
        patches = patchify(decode_rgb(r["image"]), 8)  # (196, 192)
        owner_visible = np.frombuffer(m["visible"], np.uint8).reshape(-1, 192)
        exact.append(np.array_equal(patches[mask == 0], owner_visible))
        assert np.ptp(patches[mask == 1]) > 0  # predicted, not a flat fill
    assert all(exact) if paste else not any(exact)


@pytest.mark.ray
def test_masked_baseline_releases_the_masked_view(tmp_path, owner, ray_cluster):
    root, args = owner
    out = tmp_path / "masked-view"
    generate_released(load_config(None, [*args, f"generate.output={out}", "generate.method=masked"]))
    masked = {r["image_id"]: r for r in _rows(root / "masked")}
    for r in _rows(out):
        mask = np.frombuffer(masked[r["image_id"]]["mask"], np.uint8)
        patches = patchify(decode_rgb(r["image"]), 8)
        assert np.array_equal(patches[mask == 0], np.frombuffer(masked[r["image_id"]]["visible"], np.uint8).reshape(-1, 192))
        assert (patches[mask == 1] == 128).all()  # removed patches at mid-grey


def test_a_killed_generation_reruns_to_exactly_the_input_rows(tmp_path, owner):
    root, args = owner
    # One face per shard (16 masked shards of 2 rows), so the kill lands between shards.
    args = [a.replace(str(root / "orig"), str(tmp_path / "orig")).replace(str(root / "masked"), str(tmp_path / "masked"))
            .replace("data.rows_per_shard=4", "data.rows_per_shard=1") for a in args]
    config = load_config(None, args)
    ingest(config)
    mask_dataset(config)
    root, out = tmp_path, tmp_path / "released"
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(ROOT / "jobs/configs/train_smoke.yaml"),
           *[x for a in args for x in ("--set", a)], "--set", f"generate.output={out}", "--set", "generate.actors=1",
           "--set", "generate.batch_size=1", "--set", "ray.num_cpus=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # its own process group: the kill takes its Ray too
    journal = out / JOURNAL
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # header + 2 finished shards
            break
        time.sleep(0.01)
    assert proc.poll() is None, "generation finished before it could be killed; make the test input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = {json.loads(line)["shard"]["file"]: (out / json.loads(line)["shard"]["file"]).stat().st_mtime_ns
            for line in journal.read_text().splitlines()[1:]}
    assert 2 <= len(done) < len(read_manifest(root / "masked").splits["deploy"])

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = verify_dataset(out)  # every shard's checksum and row count
    ids = [r["image_id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == manifest.num_images() == 32
    assert sorted(ids) == sorted(r["image_id"] for r in _rows(root / "masked"))
    for rel, mtime in done.items():
        assert (out / rel).stat().st_mtime_ns == mtime, f"{rel} was complete and must not be rewritten"


def test_a_folder_export_names_each_file_as_its_image(tmp_path):
    from conftest import make_folder

    from facemae.generate.export import export_name

    assert export_name("person_01/img.jpg#m1", PNG) == "img#m1.png"
    assert export_name("person_01/img.JPEG", b"\xff\xd8\xff\xe0") == "img.jpg"
    assert export_name("syn-000001-0002", PNG) == "syn-000001-0002.png"
    assert export_name("rec-000000007#m0", PNG) == "rec-000000007#m0.png"
    faces = make_folder(tmp_path / "in", 2, 2)
    ingest(load_config(None, ["data.source=folder", f"data.path={tmp_path / 'in'}", f"data.output={tmp_path / 'ds'}",
                              "data.workers=1", "data.deploy_fraction=0", "data.val_fraction=0"]))
    assert export_image_folder(str(tmp_path / "ds"), str(tmp_path / "out"), splits=("train",)) == 4
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.*")) == sorted(faces)


@pytest.mark.ray
def test_exports_read_back_as_folder_and_recordio(tmp_path, owner, ray_cluster):
    root, args = owner
    released = tmp_path / "released"
    generate_released(load_config(None, [*args, f"generate.output={released}"]))
    rows = _rows(released)
    assert export_image_folder(str(released), str(tmp_path / "folder")) == len(rows)
    files = sorted((tmp_path / "folder").rglob("*.png"))
    assert len(files) == len(rows) and {f.read_bytes() for f in files} == {r["image"] for r in rows}
    assert export_recordio(str(released), str(tmp_path / "pack" / "train.rec")) == len(rows)
    with RecordIOReader(tmp_path / "pack" / "train.rec") as reader:
        assert reader.has_header and len(reader) == len(rows)
        got = sorted((img.label, img.image) for img in reader)
    assert got == sorted((r["identity"], r["image"]) for r in rows)


@pytest.mark.ray
def test_privacy_embeds_originals_and_release_in_one_actor_pool_as_one_process_does(tmp_path, owner, ray_cluster,
                                                                                    monkeypatch):
    from facemae.eval import evaluate
    from facemae.models.registry import build_fr

    root, args = owner
    out = tmp_path / "released"
    generate_released(load_config(None, [*args, f"generate.output={out}"]))
    torch.manual_seed(0)
    judge = str(save_weights(build_fr("fr_tiny", embedding_size=32), tmp_path / "judge",
                             {"task": "fr", "model": "fr_tiny", "embedding_size": 32, "run": "judge"}))
    pools, real = [], evaluate._embed_on_ray

    def counted(config, weights, files):  # the real pool, counted
        pools.append(files)
        return real(config, weights, files)

    monkeypatch.setattr(evaluate, "_embed_on_ray", counted)

    def leak(threshold: int) -> dict:
        config = load_config(None, [*args, f"eval.ray_threshold={threshold}"])
        return evaluate.privacy(config, judge, released=str(out), originals=str(root / "orig"))

    in_process, on_ray = leak(10 ** 6), leak(0)
    originals = read_manifest(root / "orig").files(root / "orig", "deploy")
    assert pools == [originals + read_manifest(out).files(out, "deploy")]  # one pool, both sets
    assert on_ray.keys() == in_process.keys()
    for key in in_process:
        assert on_ray[key] == pytest.approx(in_process[key], abs=1e-6), key
    assert in_process["image_leak@1"] > 0  # the untrained FaceMAE's releases keep the owner's visible pixels


def test_a_cached_gallery_scores_a_release_as_a_fresh_one_and_embeds_only_the_release(tmp_path, owner, monkeypatch):
    """The judge's embeddings of the originals are kept once per (judge, originals, split): every release
    scored against them embeds only its own faces, with the same leak as a fresh run."""
    from facemae.eval import evaluate
    from facemae.models.registry import build_fr

    root, args = owner
    out = tmp_path / "released"
    config = load_config(None, [*args, f"generate.output={out}", "eval.ray_threshold=1000000"])
    generate_released(config)
    torch.manual_seed(0)
    judge = str(save_weights(build_fr("fr_tiny", embedding_size=32), tmp_path / "judge",
                             {"task": "fr", "model": "fr_tiny", "embedding_size": 32, "run": "judge"}))
    embedded, real = [], evaluate.embed_splits

    def counted(config, weights, sets):
        embedded.append([str(r) for r, _ in sets])
        return real(config, weights, sets)

    monkeypatch.setattr(evaluate, "embed_splits", counted)
    kwargs = {"released": str(out), "originals": str(root / "orig")}
    fresh = evaluate.privacy(config, judge, **kwargs)
    cache = tmp_path / "galleries"
    first = evaluate.privacy(config, judge, **kwargs, gallery_cache=str(cache))
    (kept,) = cache.glob("gallery-*.npz")
    again = evaluate.privacy(config, judge, **kwargs, gallery_cache=str(cache))
    assert embedded == [[str(root / "orig"), str(out)]] * 2 + [[str(out)]]  # the third call: the release only
    assert fresh == first == again
    # Another judge is another key: its gallery is embedded, not read from the first one's file.
    torch.manual_seed(1)
    other = str(save_weights(build_fr("fr_tiny", embedding_size=32), tmp_path / "judge2",
                             {"task": "fr", "model": "fr_tiny", "embedding_size": 32, "run": "judge2"}))
    evaluate.privacy(config, other, **kwargs, gallery_cache=str(cache))
    assert embedded[-1] == [str(root / "orig"), str(out)] and len(list(cache.glob("gallery-*.npz"))) == 2
    kept.write_bytes(b"not an npz")  # a damaged cache file is rebuilt, not trusted
    assert evaluate.privacy(config, judge, **kwargs, gallery_cache=str(cache)) == fresh
