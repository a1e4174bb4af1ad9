"""Distributed training: real Ray Train workers with real DeepSpeed engines on synthetic shards."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from facemae.config import Config, load_config
from facemae.data.shards import iter_rows, read_manifest
from facemae.data.transforms import image_uid
from facemae.models.weights import load_mae

TINY = ["model.mae=facemae_vit_tiny_p8", "model.fr=fr_tiny", "model.teacher=fr_tiny", "model.embedding_size=64",
        "train.micro_batch=8", "train.metrics_port=0", "train.base_lr=0.016", "train.warmup_steps=2"]


@pytest.fixture(scope="session")
def dataset(tiny_dataset) -> str:
    return tiny_dataset


@pytest.fixture(scope="session")
def teacher(tiny_teacher) -> str:
    return tiny_teacher


def _config(tmp_path: Path, dataset: str, teacher: str, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"data.output={dataset}", f"train.teacher={teacher}",
                              f"train.storage_path={tmp_path / 'runs'}", *overrides])


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_two_workers_zero2_learn_from_one_stream_of_passes_and_checkpoint(tmp_path, dataset, teacher, ray_cluster):
    from facemae.train.trainer import train

    config = _config(tmp_path, dataset, teacher, "name=two-workers", "train.num_workers=2", "train.zero_stage=2",
                     "train.max_steps=30", "train.log_every=2", "train.checkpoint_every=15",
                     "train.log_sample_ids=true")
    result = train(config)

    history = _metrics(result.run_dir)
    assert [m["step"] for m in history] == sorted({*range(2, 31, 2), 15})  # logs and checkpoints
    first, last = history[0]["recon_loss"], np.mean([m["recon_loss"] for m in history[-2:]])
    print(f"recon loss {first:.4f} -> {last:.4f}; irm {history[0]['irm_loss']:.4f} -> {history[-1]['irm_loss']:.4f}")
    assert last < 0.7 * first
    assert all(m["irm_loss"] > 0 for m in history)
    # Rank 0's seconds of compute and data wait add up over the run; 30 batches of the median step time.
    totals = [(m["compute_total_s"], m["data_wait_total_s"]) for m in history]
    assert all(b[0] > a[0] and b[1] >= a[1] for a, b in zip(totals, totals[1:]))
    step = float(np.median([m["step_time_s"] for m in history]))
    assert history[-1]["compute_total_s"] > 0.5 * 30 * step
    assert all(0.2 < m["rss_peak_gib"] < 8 for m in history)  # a worker with torch and DeepSpeed loaded

    # One stream of 6 passes over the 96 training images (3 shards), dealt to the ranks as they ask:
    # 6 batches of 8 per rank and epoch, 30 steps = 5 epochs = 480 rows. Every training row was
    # trained on, no row of another split, none more often than the stream holds it; each rank's
    # 256-row shuffle buffer (2.7 passes here) mixes the passes, so which 96 rows stay unused is random.
    train_uids = {image_uid(r["image_id"]) for r in iter_rows(read_manifest(dataset).files(dataset, "train"))}
    seen = [[int(x) for x in (Path(result.run_dir) / "sample_ids" / f"rank{r:03d}.txt").read_text().split()]
            for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 30 * 8
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == train_uids and max(counts.values()) <= 6, counts

    ckpt = Path(result.checkpoint)
    assert ckpt.name == "checkpoint_00000030"
    tag = (ckpt / "latest").read_text().strip()
    files = {p.name for p in (ckpt / tag).iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank000.pt", "rng_rank001.pt"} <= files
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 30
    assert (ckpt / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = sorted(p.name for p in Path(result.run_dir).glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000015", "checkpoint_00000030"]

    mae = load_mae(result.weights)
    images = torch.zeros(2, 3, 112, 112)
    loss, pred, mask = mae(images, mask_ratio=0.75)
    assert pred.shape == (2, 196, 192) and torch.isfinite(loss)

    # The session's cluster is embedded, as a job's own is: Ray Train started no preemption watcher actor.
    from ray.util.state import list_actors

    # The session cluster's address: a machine may run other Ray instances (a job in the background).
    address = ray_cluster.get_runtime_context().gcs_address
    classes = {a.class_name for a in list_actors(address=address, limit=10_000)}
    assert "RayTrainWorker" in classes and "PreemptionWatcher" not in classes, classes


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_only_an_embedded_cluster_turns_rays_preemption_watcher_off(monkeypatch, address):
    """An embedded cluster's runs start no PreemptionWatcher (one actor process less per run); a cluster the
    job joins, where an autoscaler may drain spot nodes, keeps Ray's default. Both get the health-check
    interval. An embedded cluster's object store is bounded (1 GiB, not Ray's 30% of the machine's memory,
    every page of which the store keeps once written); a joined cluster keeps its own."""
    import ray

    from facemae import cluster
    from facemae.config import RayConfig

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs, env=dict(os.environ)))
    monkeypatch.setattr(cluster, "_embedded", False)
    for key in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.delenv(key, raising=False)
    cluster.ensure_ray(RayConfig(address=address, num_cpus=2 if address is None else None))
    assert seen["address"] == (address or "local") and cluster._embedded == (address is None)
    assert seen["env"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    assert seen["env"].get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") == ("0" if address is None else None)
    assert seen.get("object_store_memory") == (1024 * 2**20 if address is None else None)


def _assert_same(saved, restored, where: str = "state") -> int:
    """Compares nested training states tensor by tensor; returns the number of tensors compared."""
    if isinstance(saved, torch.Tensor):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
        return 1
    if isinstance(saved, np.ndarray):
        np.testing.assert_array_equal(restored, saved, err_msg=where)
        return 1
    if isinstance(saved, dict):
        assert saved.keys() == restored.keys(), where
        return sum(_assert_same(saved[k], restored[k], f"{where}.{k}") for k in saved)
    if isinstance(saved, (list, tuple)):
        assert len(saved) == len(restored), where
        return sum(_assert_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(saved, restored)))
    if hasattr(saved, "__dict__"):  # e.g. DeepSpeed's loss scaler object
        assert type(saved) is type(restored), where
        return _assert_same(vars(saved), vars(restored), where)
    assert saved == restored, f"{where}: {saved!r} != {restored!r}"
    return 0


@pytest.mark.ray
@pytest.mark.parametrize("tasks", [None, 2])
def test_the_training_stream_holds_each_pass_whole_with_fresh_masks(tmp_path, dataset, teacher, ray_cluster,
                                                                     monkeypatch, tasks):
    """One read task per shard and pass, and (``tasks=2``) the same stream with more reads than tasks."""
    from facemae.train import trainer
    from facemae.train.trainer import passes_needed, training_dataset

    if tasks:
        monkeypatch.setattr(trainer, "STREAM_TASKS", tasks)
    config = _config(tmp_path, dataset, teacher, "train.num_workers=2", "train.max_steps=10")
    files = read_manifest(dataset).files(dataset, "train")
    assert len(files) * 3 > (tasks or 0)
    # 96 rows, 2 workers x 8: 6 batches per epoch; 10 steps need 2 epochs, and one pass to spare.
    assert passes_needed(config.train, 96) == 3
    rows = training_dataset(config, files, passes=3).take_all()
    train_uids = {image_uid(r["image_id"]) for r in iter_rows(files)}
    uids = Counter(int(r["uid"]) for r in rows)
    assert set(uids) == train_uids and set(uids.values()) == {3}  # every row once per pass, none dropped
    masks: dict[int, list[bytes]] = {}
    for r in rows:
        assert r["mask"].shape == (config.mask.num_patches,) and int(r["mask"].sum()) == config.mask.num_patches - config.mask.keep
        assert r["image"].shape == (112, 112, 3) and r["corrupt"] == "" and r["path"].endswith(".parquet")
        masks.setdefault(int(r["uid"]), []).append(r["mask"].tobytes())
    assert all(len(set(m)) == 3 for m in masks.values())  # masked afresh in every pass


@pytest.mark.ray
def test_resume_restores_exact_state_and_continues_at_the_next_step(tmp_path, dataset, teacher, ray_cluster):
    from facemae.train.trainer import train

    common = ["name=resume", "train.num_workers=2", "train.zero_stage=2", "train.log_every=1",
              "train.checkpoint_every=5", f"train.debug_state_dir={tmp_path / 'states'}"]
    first = train(_config(tmp_path, dataset, teacher, *common, "train.max_steps=5"))
    assert Path(first.checkpoint).name == "checkpoint_00000005"
    # The same run name and storage: Ray Train V2 hands the workers the run's latest checkpoint.
    second = train(_config(tmp_path, dataset, teacher, *common, "train.max_steps=8"))

    compared = 0
    for rank in (0, 1):
        saved = torch.load(tmp_path / "states" / f"saved_step00000005_rank{rank}.pt", weights_only=False)
        restored = torch.load(tmp_path / "states" / f"restored_step00000005_rank{rank}.pt", weights_only=False)
        assert restored["global_steps"] == 5
        for part in ("module", "optimizer", "scheduler", "global_steps", "global_samples", "rng"):
            compared += _assert_same(saved[part], restored[part], f"rank{rank}.{part}")
        moments = [s for s in restored["optimizer"]["base_optimizer_state"]["state"].values()]
        assert moments and all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in moments)  # real Adam moments
    print(f"resume: {compared} tensors and values identical across 2 ranks")
    steps = [m["step"] for m in _metrics(second.run_dir)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # 6 follows 5: the second run did not start at step 0
    assert Path(second.checkpoint).name == "checkpoint_00000008"
    progress = json.loads((Path(second.checkpoint) / "progress.json").read_text())
    assert progress["step"] == 8 and progress["epoch"] == 1  # 6 batches per epoch per worker


@pytest.mark.ray
def test_teacher_embeddings_from_an_actor_pool_match_a_direct_computation(tmp_path, dataset, teacher, ray_cluster):
    from facemae.data.images import decode_rgb
    from facemae.generate.embed import embed_dataset
    from facemae.losses.irm import gaussian_blur
    from facemae.models.fr import to_model_range
    from facemae.models.weights import load_fr_backbone

    config = _config(tmp_path, dataset, teacher, "train.num_workers=2")
    out = str(tmp_path / "embedded")
    manifest = embed_dataset(config, source=dataset, weights=teacher, output=out)
    original = read_manifest(dataset)
    # The trainer's splits only: the deployment originals are the owner's and are never embedded.
    assert set(manifest.splits) == {"train", "val"} and original.num_images("deploy") > 0
    assert manifest.num_images() == original.num_images("train") + original.num_images("val")
    assert [s.file for s in manifest.splits["train"]] == [s.file for s in original.splits["train"]]
    rows = [r for split in manifest.splits for r in iter_rows(manifest.files(out, split))]
    model = load_fr_backbone(teacher)
    pixels = torch.from_numpy(np.stack([decode_rgb(r["image"]) for r in rows[:16]]))
    assert manifest.source["teacher_view"] == "blur1.5"  # the default IRM view: embeddings of the low-pass
    with torch.no_grad():
        direct = model(gaussian_blur(to_model_range(pixels), sigma=1.5)).numpy()
    stored = np.stack([np.asarray(r["teacher_emb"], np.float32) for r in rows[:16]])
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)
    assert embed_dataset(config, source=dataset, weights=teacher, output=out).to_json() == manifest.to_json()


@pytest.mark.ray
def test_a_facemae_run_and_its_validation_open_no_deployment_original(tmp_path, teacher, ray_cluster, monkeypatch):
    """DESIGN.md "Who sees what": once the owner has masked them, the deployment originals are taken out of
    the trainer's view (their shards deleted); the teacher embedding (a Ray Data pool), a two-worker FaceMAE
    run and its validation still run, from the train and val splits alone.

    Every folder is given relative to the working directory, as README's job gives ``data/...``: Ray Train
    workers start in folders of their own, where the validation and preview faces were not found."""
    from facemae.data.ingest import ingest
    from facemae.data.owner import mask_dataset
    from facemae.generate.embed import embed_dataset
    from facemae.train.trainer import train

    monkeypatch.chdir(tmp_path)
    shutil.copytree(Path(teacher).parent, "teacher")  # the export: weights and what they are
    root, embedded, teacher = Path("orig"), "embedded", "teacher/weights.safetensors"
    config = load_config(None, [*TINY, "data.output=orig", f"train.teacher={teacher}", "train.storage_path=runs",
                                "name=no-deploy", "data.num_identities=12",
                                "data.images_per_identity=4", "data.deploy_fraction=0.25", "data.val_fraction=0.17",
                                "data.rows_per_shard=16", "data.workers=1", "mask.output=masked",
                                "mask.splits=[deploy]", "train.num_workers=2", "train.max_steps=4",
                                "train.val_every=2", "train.val_images=8", "train.checkpoint_every=4"])
    original = ingest(config)
    mask_dataset(config)
    deploy = original.files(str(root), "deploy")
    assert deploy and original.identities("val") and not set(original.identities("val")) & set(
        original.identities("deploy"))
    for shard in deploy:
        Path(shard).unlink()
    assert set(embed_dataset(config, source=str(root), weights=teacher, output=embedded).splits) == {"train", "val"}
    result = train(config, dataset=embedded)
    validated = [m for m in _metrics(result.run_dir) if "val_psnr_masked" in m]
    assert [m["step"] for m in validated] == [2, 4] and all(np.isfinite(m["val_psnr_masked"]) for m in validated)
    assert Path(result.checkpoint).name == "checkpoint_00000004"
    assert (Path(result.checkpoint) / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(result.run_dir) == tmp_path / "runs" / "no-deploy"


def test_previews_of_two_runs_over_the_same_data_show_the_same_faces(tmp_path, dataset, teacher):
    from PIL import Image

    from facemae.data.images import decode_rgb
    from facemae.train.trainer import train

    grids = []
    for seed in (0, 1):
        config = _config(tmp_path, dataset, teacher, f"name=preview-{seed}", f"train.seed={seed}", "train.num_workers=0",
                         "train.max_steps=2", "train.checkpoint_every=1", "loss.lambda_irm=0")
        run = Path(train(config).run_dir)
        first, last = (np.asarray(Image.open(run / f"checkpoint_0000000{s}" / "preview.png")) for s in (1, 2))
        np.testing.assert_array_equal(first[224:], last[224:])  # the same originals at every checkpoint
        grids.append(last)
    assert grids[0].shape == (3 * 112, 8 * 112, 3)
    np.testing.assert_array_equal(grids[0][:112], grids[1][:112])  # the same owner's masks
    np.testing.assert_array_equal(grids[0][224:], grids[1][224:])  # the same faces ...
    assert not np.array_equal(grids[0][112:224], grids[1][112:224])  # ... reconstructed by different runs
    # ... each validation identity's first image id, then the next image ids to fill 8 faces, in id order.
    rows = sorted(iter_rows(read_manifest(dataset).files(dataset, "val")), key=lambda r: r["image_id"])
    people = [r for i, r in enumerate(rows) if r["identity"] not in {q["identity"] for q in rows[:i]}]
    chosen = sorted(people[:8] + [r for r in rows if r not in people][:8 - len(people[:8])],
                    key=lambda r: r["image_id"])
    assert len({r["identity"] for r in chosen}) == min(8, len(people)) > 1  # several people, not one person 8 times
    np.testing.assert_array_equal(grids[0][224:], np.concatenate([decode_rgb(r["image"]) for r in chosen], axis=1))


def test_a_killed_and_rerun_local_run_marks_the_steps_it_trains_again(tmp_path, dataset, teacher, monkeypatch):
    from facemae.train.context import LocalContext
    from facemae.train.trainer import train

    config = _config(tmp_path, dataset, teacher, "name=killed-local", "train.num_workers=0", "train.max_steps=5",
                     "train.log_every=1", "train.checkpoint_every=2", "loss.lambda_irm=0")
    report = LocalContext.report

    def dies_after_logging_step_3(self, metrics, directory):
        report(self, metrics, directory)
        if metrics["step"] == 3:
            raise KeyboardInterrupt  # killed after step 3's line, its last checkpoint at step 2

    monkeypatch.setattr(LocalContext, "report", dies_after_logging_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(LocalContext, "report", report)
    lines = _metrics(train(config).run_dir)
    assert [(m["step"], m["attempt"], m.get("repeat", False)) for m in lines] == \
        [(1, 1, False), (2, 1, False), (3, 1, False), (3, 2, True), (4, 2, False), (5, 2, False)]


def test_training_refuses_teacher_embeddings_of_another_view(tmp_path, dataset, teacher):
    from facemae.train.trainer import _check_teacher_view

    source = {"embedded_from": dataset, "teacher": teacher, "teacher_view": "blur1.5"}
    _check_teacher_view(_config(tmp_path, dataset, teacher), source, "emb")  # the default view: accepted
    with pytest.raises(ValueError, match="'blur1.5' IRM view but this run trains with 'raw'"):
        _check_teacher_view(_config(tmp_path, dataset, teacher, "loss.irm_view=raw"), source, "emb")
    old = {"embedded_from": dataset, "teacher": teacher}  # embedded before views existed: raw
    with pytest.raises(ValueError, match="'raw' IRM view but this run trains with 'blur3'"):
        _check_teacher_view(_config(tmp_path, dataset, teacher, "loss.irm_blur_sigma=3"), old, "emb")
    _check_teacher_view(_config(tmp_path, dataset, teacher, "loss.lambda_irm=0"), old, "emb")  # no IRM: unused


def _train_in_subprocess(overrides: list[str]) -> dict:
    """Local mode sets up a process group, so it runs in a process of its own."""
    import subprocess
    import sys

    script = ("import json, sys\nfrom facemae.config import load_config\nfrom facemae.train.trainer import train\n"
              "r = train(load_config(None, sys.argv[1:]))\n"
              "print(json.dumps({'checkpoint': r.checkpoint, 'weights': r.weights, 'metrics': r.metrics}))\n")
    out = subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_run_starts_from_an_explicit_checkpoint(tmp_path, dataset, teacher):
    common = [*TINY, f"data.output={dataset}", f"train.teacher={teacher}", f"train.storage_path={tmp_path}",
              "train.num_workers=0", "train.checkpoint_every=2", "train.log_every=1"]
    first = _train_in_subprocess([*common, "name=first", "train.max_steps=4"])
    second = _train_in_subprocess([*common, "name=second", "train.max_steps=6",
                                   f"train.resume_from={first['checkpoint']}"])
    steps = [m["step"] for m in _metrics(str(tmp_path / "second"))]
    assert steps == [5, 6]  # continued from step 4 of the other run
    assert Path(second["checkpoint"]).parent.name == "second"


def test_irm_schedule_reaches_the_loop_and_a_finished_run_is_reused(tmp_path, dataset, teacher):
    common = [*TINY, f"data.output={dataset}", f"train.teacher={teacher}", f"train.storage_path={tmp_path}",
              "train.num_workers=0", "train.checkpoint_every=2", "train.log_every=1", "name=sched",
              "loss.irm_start=0.5", "loss.irm_ramp=0.5", "loss.irm_view=blur", "loss.lambda_irm=1"]
    first = _train_in_subprocess([*common, "train.max_steps=4"])
    lines = _metrics(str(tmp_path / "sched"))
    # IRM from 0-based step round(0.5 * 4) = 2, full after 2 more. Step s (1-based, logged after the
    # update) trained with the weight of 0-based step s - 1.
    assert [m["irm_weight"] for m in lines] == [0.0, 0.0, 0.5, 1.0]
    assert all(m["irm_loss"] > 0 for m in lines)  # logged before the schedule starts too
    weights = Path(first["weights"])
    stamp = weights.stat().st_mtime_ns
    again = _train_in_subprocess([*common, "train.max_steps=4"])  # finished: nothing trained or re-exported
    assert again["weights"] == first["weights"] and weights.stat().st_mtime_ns == stamp
    assert len(_metrics(str(tmp_path / "sched"))) == 4
    longer = _train_in_subprocess([*common, "train.max_steps=6"])  # a higher max_steps resumes the run
    assert [m["step"] for m in _metrics(str(tmp_path / "sched"))][4:] == [5, 6]
    assert Path(longer["checkpoint"]).name == "checkpoint_00000006"


@pytest.mark.parametrize("stage, precision, task", [(0, "fp32", "fr"), (1, "fp32", "mae"), (2, "bf16", "mae"),
                                                     (3, "fp32", "mae"), (3, "fp32", "fr")])
def test_local_mode_trains_each_zero_stage_and_exports_weights(tmp_path, dataset, teacher, stage, precision, task):
    """One process, no Ray: the debugging path, through the same loop and a real DeepSpeed engine."""
    result = _train_in_subprocess([*TINY, f"data.output={dataset}", f"train.teacher={teacher}",
                                   f"train.storage_path={tmp_path}", "name=local", "train.num_workers=0",
                                   f"train.zero_stage={stage}", f"train.precision={precision}", f"train.task={task}",
                                   "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1"])
    assert result["metrics"]["step"] == 4 and np.isfinite(result["metrics"]["loss"])
    assert Path(result["checkpoint"]).name == "checkpoint_00000004"
    from facemae.models.weights import load_fr_backbone, read_weights

    state, info = read_weights(result["weights"])
    assert info["task"] == task and all(v.dtype == torch.float32 for v in state.values())
    if task == "fr":
        assert load_fr_backbone(result["weights"])(torch.zeros(2, 3, 112, 112)).shape == (2, 64)
    else:
        assert load_mae(result["weights"])(torch.zeros(1, 3, 112, 112))[1].shape == (1, 196, 192)
    if (stage, task) == (0, "fr"):
        # A finished FR run exported before FR runs kept their head: a rerun re-exports from its last checkpoint,
        # the same weights byte for byte and the head beside them, and trains nothing.
        export = Path(result["weights"]).parent
        head, before = (export / "head.safetensors").read_bytes(), Path(result["weights"]).read_bytes()
        (export / "head.safetensors").unlink()
        again = _train_in_subprocess([*TINY, f"data.output={dataset}", f"train.storage_path={tmp_path}", "name=local",
                                      "train.num_workers=0", "train.zero_stage=0", "train.task=fr",
                                      "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1"])
        assert again["weights"] == result["weights"] and Path(again["weights"]).read_bytes() == before
        assert (export / "head.safetensors").read_bytes() == head
        assert [m["step"] for m in _metrics(str(tmp_path / "local"))] == [1, 2, 3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_is_scraped_over_http_while_training(tmp_path, dataset):
    import http.client
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    args = [*TINY, f"data.output={dataset}", f"train.storage_path={tmp_path}", "name=metrics", "train.task=fr",
            "train.num_workers=0", "train.max_steps=60", "train.checkpoint_every=60", f"train.metrics_port={port}"]
    script = "import sys\nfrom facemae.config import load_config\nfrom facemae.train.trainer import train\n" \
             "train(load_config(None, sys.argv[1:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    steps, text = [], ""
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except (OSError, http.client.HTTPException):  # a reply cut off as the process exits is no OSError
                time.sleep(0.2)  # not serving yet (DeepSpeed still starting) or just finished
                continue
            found = re.search(r'^facemae_train_step\{run="metrics"\} (\S+)$', body, re.M)
            if not found:  # a scrape cut short as the run ends reads empty: keep the last whole one
                time.sleep(0.1)
                continue
            text = body
            if found and (not steps or float(found.group(1)) != steps[-1]):
                steps.append(float(found.group(1)))
            time.sleep(0.1)
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    print(f"scraped step values: {steps}")
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] > steps[0]
    assert re.search(r'^facemae_train_images_total\{run="metrics"\} [1-9]', text, re.M)
    assert 'facemae_train_data_wait_seconds_bucket{le="0.01",run="metrics"}' in text
    assert re.search(r'^facemae_train_loss\{component="loss",run="metrics"\} \d', text, re.M)


def test_runs_trained_one_after_another_in_one_process_each_serve_their_own_metrics_on_the_port():
    """A run's context frees the metrics port when it closes: the next run in the same process (an experiment's
    in-process stages) serves its own numbers there, not the first run's, and a closed endpoint answers nothing."""
    import urllib.error
    import urllib.request

    from facemae.metrics import TrainMetrics
    from facemae.train.context import WorkerContext

    port = _free_port()

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    for run, steps in (("first", 3), ("second", 7)):
        config = load_config(None, [f"name={run}", f"train.metrics_port={port}"]).validate()
        ctx = WorkerContext(config, rank=0, world_size=1, device=torch.device("cpu"), num_classes=2,
                            run_dir=".", in_ray=False)
        assert ctx.metrics.port == port
        ctx.metrics.observe(images=4, step=steps, step_s=0.1, wait_s=0.0, losses={"total": 1.0})
        body = scrape()
        assert f'facemae_train_step{{run="{run}"}} {float(steps)}' in body, body
        assert "first" not in body or run == "first"
        ctx.close()
        with pytest.raises(urllib.error.URLError):
            scrape()
    # The metrics object alone closes too, and twice is harmless.
    metrics = TrainMetrics(run="alone", rank=0, world_size=1, port=port)
    assert metrics.port == port
    metrics.close()
    metrics.close()


@pytest.mark.ray
def test_a_lost_worker_restarts_the_group_from_the_last_checkpoint(tmp_path, dataset, teacher, ray_cluster):
    import threading
    import time

    import psutil

    from facemae.train.trainer import train

    config = _config(tmp_path, dataset, teacher, "name=failover", "train.num_workers=2", "train.max_steps=24",
                     "train.checkpoint_every=5", "train.log_every=1", "train.max_failures=1")
    started = time.time()
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=train(config)), daemon=True)
    thread.start()
    log = Path(config.run_dir()) / "metrics.jsonl"
    while thread.is_alive() and not (log.exists() and max((m["step"] for m in _metrics(config.run_dir())),
                                                            default=0) >= 7):
        time.sleep(0.2)
    workers = [p for p in psutil.process_iter(["cmdline", "create_time"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started - 1]
    assert len(workers) == 2, [p.info["cmdline"] for p in workers]
    killed_at = max(m["step"] for m in _metrics(config.run_dir()))
    workers[-1].kill()  # a worker lost mid-run, as a preempted node would lose it
    thread.join(timeout=600)
    assert "result" in box, "training did not finish after the worker group restart"

    steps = [m["step"] for m in _metrics(config.run_dir())]
    drops = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(drops) == 1, steps  # exactly one restart
    resumed = steps[drops[0]]
    print(f"killed a worker at step {killed_at}; the group restarted at step {resumed}: {steps}")
    assert (resumed - 1) % 5 == 0 and resumed - 1 <= steps[drops[0] - 1]  # from the last checkpoint
    lines = _metrics(config.run_dir())  # the retried steps are marked: attempt 2, repeat where logged before
    assert [m["attempt"] for m in lines] == [1] * drops[0] + [2] * (len(lines) - drops[0])
    assert [m["step"] for m in lines if m.get("repeat")] == [s for s in steps[drops[0]:] if s <= steps[drops[0] - 1]]
    assert steps[-1] == 24 and Path(box["result"].checkpoint).name == "checkpoint_00000024"


@pytest.mark.ray
def test_a_stream_of_more_reads_than_tasks_reads_every_entry_once_in_shared_tasks(ray_cluster):
    from facemae.data.stream import per_file

    def _entry_and_task(table: pa.Table) -> pa.Table:  # a read function that names its entry and its Ray task
        import ray

        return pa.table({"path": table["path"], "task": [ray.get_runtime_context().get_task_id()] * table.num_rows})

    entries = [f"/shards/part-{i % 3:05d}.parquet" for i in range(2000)]  # 667 passes over three shards
    rows = per_file(entries, _entry_and_task, fn_kwargs={}, tasks=64).take_all()
    assert Counter(r["path"] for r in rows) == Counter(entries)  # each read once, as many as listed
    per_task = Counter(r["task"] for r in rows)
    assert len(per_task) == 64 and set(per_task.values()) <= {31, 32}  # 2000 reads over 64 tasks
    rows = per_file(entries[:10], _entry_and_task, fn_kwargs={}).take_all()
    assert sorted(r["path"] for r in rows) == sorted(entries[:10]) and len({r["task"] for r in rows}) == 10


@pytest.mark.ray
def test_a_partial_fc_head_trains_on_two_workers_exports_one_head_and_resumes_on_one(tmp_path, dataset, teacher,
                                                                                     ray_cluster):
    from safetensors.torch import load_file

    from facemae.losses.partial_fc import class_range, merge_shards
    from facemae.models.weights import load_fr_backbone
    from facemae.train.trainer import train

    head = ["train.task=fr", "model.head=partial_fc", "model.partial_fc.sample_rate=0.5", "train.zero_stage=0",
            "train.base_lr=0.02", "train.log_every=1"]
    config = _config(tmp_path, dataset, teacher, "name=pfc", "train.num_workers=2", "train.max_steps=12",
                     "train.checkpoint_every=6", *head)
    result = train(config)
    history = _metrics(result.run_dir)
    assert [m["step"] for m in history] == list(range(1, 13))
    classes = max(read_manifest(dataset).identities("train")) + 1
    shard_rows = class_range(classes, 2, 0)[1]  # rank 0's classes, the larger shard
    # Each step moved every positive of the global batch of 16 and random others: at least half the shard.
    assert all(-(-shard_rows // 2) <= m["head_rows"] <= shard_rows for m in history), history
    assert np.mean([m["loss"] for m in history[-3:]]) < 0.9 * np.mean([m["loss"] for m in history[:3]])

    ckpt = Path(result.checkpoint)
    tag = ckpt / (ckpt / "latest").read_text().strip()
    shards = [torch.load(tag / f"head_shard_rank{r:03d}.pt", weights_only=True) for r in (0, 1)]
    assert [(s["start"], s["stop"], s["world_size"]) for s in shards] == [(*class_range(classes, 2, r), 2)
                                                                         for r in (0, 1)]
    assert not any(k.startswith("head.") for k in torch.load(tag / "mp_rank_00_model_states.pt",
                                                               weights_only=False)["module"])  # outside DeepSpeed
    export = Path(result.weights).parent
    exported = load_file(str(export / "head.safetensors"))["weight"]
    assert exported.shape == (classes, 64)
    torch.testing.assert_close(exported, merge_shards(tag), rtol=0, atol=0)
    assert load_fr_backbone(result.weights)(torch.zeros(2, 3, 112, 112)).shape == (2, 64)  # an ordinary model

    # The two workers' checkpoint resumes on one (the local mode): both shards cut into one, training goes on.
    common = [*TINY, f"data.output={dataset}", f"train.teacher={teacher}", f"train.storage_path={tmp_path}",
              "train.num_workers=0", "train.checkpoint_every=4", *head]
    again = _train_in_subprocess([*common, "name=pfc-one", "train.max_steps=16", f"train.resume_from={ckpt}"])
    resumed = _metrics(str(tmp_path / "pfc-one"))
    assert [m["step"] for m in resumed] == [13, 14, 15, 16]
    assert abs(resumed[0]["loss"] - np.mean([m["loss"] for m in history[-3:]])) < 0.5 * history[0]["loss"]
    one = Path(again["checkpoint"])
    one_tag = one / (one / "latest").read_text().strip()
    assert [p.name for p in one_tag.glob("head_shard_rank*.pt")] == ["head_shard_rank000.pt"]
    assert torch.load(one_tag / "head_shard_rank000.pt", weights_only=True)["steps"].max() > 12 * 0.5
