"""Stronger attackers (facemae.attacks): a fine-tune that starts from the judge (train.init_weights), the
adaptive attacker against a planted weak release, and membership inference on datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from facemae.config import load_config
from facemae.data.images import decode_rgb, encode_png
from facemae.data.shards import RELEASED_SCHEMA, Manifest, read_table, verify_dataset, write_shard
from facemae.models.registry import build_fr
from facemae.models.weights import WeightsError, check_init_weights, save_head, save_weights

CLASSES, DIM = 5, 64


def _export(folder: Path, *, classes: int = CLASSES) -> tuple[str, dict[str, torch.Tensor], torch.Tensor]:
    """An FR export as a run writes it: fr_tiny's weights and a head of ``classes`` centres beside them."""
    torch.manual_seed(3)
    backbone = build_fr("fr_tiny", embedding_size=DIM)
    for p in backbone.parameters():  # away from any fresh initialisation
        p.data.add_(torch.randn_like(p) * 0.1)
    info = {"task": "fr", "model": "fr_tiny", "embedding_size": DIM}
    path = save_weights(backbone, folder, info)
    centres = torch.randn(classes, DIM)
    save_head(centres, {**info, "num_classes": classes}, folder)
    return str(path), {k: v.clone() for k, v in backbone.state_dict().items()}, centres


def _fr_config(tmp_path: Path, *overrides: str):
    return load_config(None, ["train.task=fr", "train.fr_backbone=fr_tiny", f"model.embedding_size={DIM}",
                              f"train.storage_path={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize("head", ["full", "partial_fc"])
def test_init_weights_start_the_backbone_and_the_class_centres(tmp_path, head):
    path, state, centres = _export(tmp_path / "export")
    config = _fr_config(tmp_path, f"train.init_weights={path}", f"model.head={head}")
    if head == "partial_fc":  # the shard lives in a process group, as in the local mode's one-rank gloo group
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        _check_task(config, state, centres)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _check_task(config, state: dict[str, torch.Tensor], centres: torch.Tensor) -> None:
    from facemae.train.tasks import build_task

    task = build_task(config, num_classes=CLASSES, device=torch.device("cpu"))
    loaded = task.backbone.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(task.head.weight.detach(), centres)

    fresh = build_task(dataclasses.replace(config, train=dataclasses.replace(config.train, init_head=False)),
                       num_classes=CLASSES, device=torch.device("cpu"))
    assert all(torch.equal(fresh.backbone.state_dict()[k], state[k]) for k in state)
    assert not torch.allclose(fresh.head.weight.detach(), centres)  # init_head=false: centres start fresh


def test_init_weights_that_do_not_fit_are_refused_with_the_fix(tmp_path):
    path, _, _ = _export(tmp_path / "export")
    assert check_init_weights(path, task="fr", model="fr_tiny", embedding_size=DIM, num_classes=CLASSES).info["model"] \
        == "fr_tiny"
    with pytest.raises(WeightsError, match=r"head holds 5 classes .* this run's data 7 .*train.init_head=false"):
        check_init_weights(path, task="fr", model="fr_tiny", embedding_size=DIM, num_classes=7)
    with pytest.raises(WeightsError, match=r"embeds in 64 dimensions, this run in 128: set model.embedding_size=64"):
        check_init_weights(path, task="fr", model="fr_tiny", embedding_size=128, num_classes=None)
    with pytest.raises(WeightsError, match=r"FaceMAE \(task=mae\) is needed"):
        check_init_weights(path, task="mae", model="facemae_vit_tiny_p8", embedding_size=DIM, num_classes=None)
    (tmp_path / "export" / "head.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no head.safetensors beside it .*train.init_head=false"):
        check_init_weights(path, task="fr", model="fr_tiny", embedding_size=DIM, num_classes=CLASSES)
    # Without the head (init_head=false) the backbone alone still starts the run.
    check_init_weights(path, task="fr", model="fr_tiny", embedding_size=DIM, num_classes=None)


def _planted(originals: str, out: Path) -> str:
    """A weak release planted for the test: every face of every split through a fixed colour inversion (channels
    swapped, values flipped) and a Gaussian blur; same shard names as the originals, each row's source its own."""
    from scipy.ndimage import gaussian_filter

    manifest = verify_dataset(originals)
    splits = {}
    for split, shards in manifest.splits.items():
        splits[split] = []
        for shard in shards:
            rows = read_table(f"{originals}/{shard.file}", columns=["image_id", "identity", "image"]).to_pydict()
            images = [encode_png(np.clip(gaussian_filter(255.0 - decode_rgb(b)[..., ::-1], sigma=(1.5, 1.5, 0)),
                                         0, 255).astype(np.uint8)) for b in rows["image"]]
            table = pa.table({"image_id": rows["image_id"], "source_id": rows["image_id"],
                              "identity": rows["identity"], "image": images}, schema=RELEASED_SCHEMA)
            splits[split].append(write_shard(out, shard.file, table))
    Manifest(kind="released", source={"type": "dataset", "path": originals, "kind": "original", "method": "planted"},
             splits=splits, report={"images": sum(s.rows for v in splits.values() for s in v)}).write(out)
    return str(out)


@pytest.mark.slow
def test_the_adaptive_attacker_sees_through_a_planted_release_the_judge_does_not(tmp_path):
    """Originals through a fixed colour-and-blur transform: the judge, trained on whole faces, finds few of their
    identities; the adaptive attacker, fine-tuned on the public faces through the same transform, finds nearly all,
    never more than the originals themselves leak. Membership inference of a release that is the members' own
    originals is certain."""
    from facemae.attacks import adaptive_attacker, attacker_training_set, nonmember_sets, nonmembers
    from facemae.data.ingest import ingest
    from facemae.eval.evaluate import membership, privacy
    from facemae.train.roles import judge_config
    from facemae.train.trainer import train

    config = load_config(None, [
        f"data.output={tmp_path / 'faces'}", "data.num_identities=40", "data.images_per_identity=10",
        "data.deploy_fraction=0.5", "data.val_fraction=0", "data.workers=0", "model.judge=fr_tiny",
        f"model.embedding_size={DIM}", f"train.storage_path={tmp_path / 'runs'}", "train.num_workers=0",
        "train.micro_batch=32", "train.warmup_steps=10", "train.checkpoint_every=1000", "train.metrics_port=0",
        "train.teacher_base_lr=0.02", "experiment.judge_steps=150", "experiment.adaptive_steps=100", "name=planted"])
    ingest(config)
    judge = train(judge_config(config), show_progress=False).weights
    release = _planted(config.data.output, tmp_path / "planted")
    fixed = privacy(config, judge, released=release, originals=config.data.output)
    ceiling = privacy(config, judge, released=config.data.output, originals=config.data.output)

    # The public faces beside their release: twice the training rows, the originals marked by their ids.
    both = verify_dataset(attacker_training_set(config, release))
    assert both.num_images("train") == 2 * verify_dataset(config.data.output).num_images("train")
    attacker = adaptive_attacker(config, judge=judge, public=release, name="planted-adaptive", seed=0)
    adaptive = privacy(config, attacker, released=release, originals=config.data.output)
    assert fixed["identity_leak@1"] < 0.5, fixed  # 0.105 measured
    assert adaptive["identity_leak@1"] >= 0.9, adaptive  # 1.0 measured
    assert adaptive["identity_leak@1"] <= ceiling["identity_leak@1"] == 1.0

    outsiders = nonmembers(config)  # synthetic: other people, drawn with data.seed + 1
    assert verify_dataset(outsiders).source["seed"] == config.data.seed + 1
    certain = membership(config, judge, released=config.data.output, members=(config.data.output, "deploy"),
                         nonmembers=nonmember_sets(outsiders))
    assert certain["mia_auc"] == 1.0 and certain["mia_tpr@1%fpr"] == 1.0
    assert certain["n_members"] == 200 and certain["n_nonmembers"] == 200
    with pytest.raises(ValueError, match="same faces"):
        membership(config, judge, released=release, members=(config.data.output, "deploy"),
                   nonmembers=[(config.data.output, "train")])
