"""Validation of a FaceMAE run on held-out identities: the numbers a Tune sweep optimises.

The faces are a seeded draw of ``train.val_images`` from the ``val`` split of ``data.output``
(identities carved out of the training side that the run never trains on; never the owner's
deployment originals, which the trainer does not read), each masked exactly as the owner's ``facemae mask`` would
(``mask.seed`` and the image id fix the mask), so every trial of a sweep with the same mask ratio
is scored on the same inputs. Reported, with ``val_`` names:

- ``val_recon_loss``: masked-patch MSE of the reconstructions;
- ``val_psnr_masked`` / ``val_hf_ratio``: fidelity of the released images (:mod:`facemae.measures.fidelity`):
  PSNR over the masked patches, and high-frequency energy against the originals (1.0 = as sharp as
  real faces; well above 1 is a noise texture);
- ``val_irm``: IRM between the frozen teacher's embeddings of the originals and of the released
  images at the fixed temperature :data:`VAL_TAU`, so runs with different ``loss.tau`` (or
  ``lambda_irm = 0``) are compared on one scale. Lower keeps more of the relations that make
  reconstructions useful for face recognition (utility);
- ``val_identity_leak@1`` / ``val_image_leak@1`` with ``train.judge``: how often the judge's nearest
  original to a released face is of the same identity / the very source image (privacy, lower is
  more private). The judge is never the teacher (DESIGN.md 1);
- ``val_judge_irm``: the same relation KL as ``val_irm``, under the judge instead of the teacher: an
  FR network FaceMAE never trained against, so relations kept only by fooling the teacher (noise
  textures) show as a gap between the two;
- ``val_objective``: what ``tune.objective`` minimises (:func:`validation_objective`);
- ``val_corrupt_skipped``: drawn faces left out because their image would not decode
  (``data.skip_corrupt``; without it such a face stops the run with a message naming it).

Every rank runs the same forward passes (ZeRO-3 gathers parameters collectively), rank 0 reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from facemae import storage
from facemae.config import Config
from facemae.data.images import decode_rows
from facemae.data.masking import image_mask_seed, random_keep
from facemae.data.shards import verify_dataset
from facemae.losses.irm import irm_loss
from facemae.measures.fidelity import hf_ratio, masked_psnr
from facemae.measures.privacy import retrieval_leak
from facemae.models.fr import to_model_range, to_uint8

VAL_TAU = 0.1  # fixed, whatever loss.tau a run trains with


@dataclass
class ValidationSet:
    """Held-out faces with the owner's masks."""

    image_id: list[str]
    images: torch.Tensor  # [N, 3, 112, 112] model range
    mask: torch.Tensor  # [N, L] float, 1 = removed
    identity: torch.Tensor  # [N] int64
    skipped: list[str] = field(default_factory=list)  # image_ids drawn but left out as corrupt


PREVIEW_FACES = 8  # faces in a checkpoint's preview.png


def load_validation_set(config: Config, *, device: torch.device) -> ValidationSet:
    """Draws ``train.val_images`` faces of the ``val`` split of ``data.output`` and masks them.

    Raises:
        ValueError: The dataset has no validation split to validate on.
        CorruptImageError: A drawn face's image does not decode and ``data.skip_corrupt`` is off.
    """
    root = config.data.output
    manifest = verify_dataset(root, splits=["val"])
    files = manifest.files(root, "val") if "val" in manifest.splits else []
    if not files:
        raise ValueError(f"train.val_every needs validation identities, but {root} has no val split; ingest with "
                         "data.val_fraction > 0 (it carves them out of the training identities; --overwrite to "
                         "re-ingest) or set train.val_every=0")
    index = _index(files)
    n = min(config.train.val_images, len(index))
    picked = sorted(np.random.default_rng(config.train.seed).choice(len(index), n, replace=False))
    faces = _masked_faces(config, [index[j] for j in picked], device=device)
    if not faces.image_id and faces.skipped:
        raise ValueError(f"every face drawn for validation from {root} is corrupt ({faces.skipped[:3]}...); rebuild "
                         "the dataset or set train.val_every=0")
    return faces


def load_preview_set(config: Config, *, device: torch.device) -> ValidationSet:
    """The faces of every checkpoint's preview: of the ``val`` split of ``data.output`` (of ``train`` where there
    is none), the first image id of each identity, the first :data:`PREVIEW_FACES` of those by id (as many
    different people as there are; the next image ids fill the rest), masked as the owner would. Chosen by id, not
    by seed or batch, so the previews of two runs over the same data show the same faces side by side."""
    root = config.data.output
    manifest = verify_dataset(root, splits=["val"])
    split = "val" if manifest.splits.get("val") else "train"
    index = sorted(_index(manifest.files(root, split)), key=lambda c: c[2])
    firsts: dict[int, tuple[str, int, str, int]] = {}
    for c in index:  # in image id order: each identity's first image id, people in the order of those ids
        firsts.setdefault(c[3], c)
    people = list(firsts.values())[:PREVIEW_FACES]
    fill = [c for c in index if c not in people][:PREVIEW_FACES - len(people)]
    return _masked_faces(config, sorted(people + fill, key=lambda c: c[2]), device=device)


def _index(files: list[str]) -> list[tuple[str, int, str, int]]:
    """``(file, row, image_id, identity)`` of every row of the shards, in order."""
    paths, fs = storage.for_arrow(files)  # an s3:// dataset through its endpoint
    return [(f, i, image_id, identity) for f, path in zip(files, paths)
            for i, (image_id, identity) in enumerate(zip(*pq.read_table(path, columns=["image_id", "identity"],
                                                                        filesystem=fs).to_pydict().values()))]


def _masked_faces(config: Config, chosen: list[tuple[str, int, str, int]], *, device: torch.device) -> ValidationSet:
    """Decodes the chosen rows (corrupt ones left out and listed, or raised for) and masks each face with the
    owner's mask of its image id (``mask.seed``, ``mask.ratio``)."""
    paths, fs = storage.for_arrow(list(dict.fromkeys(c[0] for c in chosen)))
    path_of = dict(zip(dict.fromkeys(c[0] for c in chosen), paths))
    pixels, reasons = [], []
    for f in path_of:  # read each file's image column once
        images = pq.read_table(path_of[f], columns=["image"], filesystem=fs).column("image")
        rows = [c for c in chosen if c[0] == f]
        decoded, why = decode_rows([images[i].as_py() for _, i, _, _ in rows], image_ids=[c[2] for c in rows],
                                   paths=[f] * len(rows), skip_corrupt=config.data.skip_corrupt)
        pixels += list(decoded)
        reasons += why
    ordered = [c for f in path_of for c in chosen if c[0] == f]  # the order pixels were decoded in
    skipped = [c[2] for c, why in zip(ordered, reasons) if why]
    pixels = [p for p, why in zip(pixels, reasons) if not why]
    kept = [c for c, why in zip(ordered, reasons) if not why]
    mask = config.mask
    removed = np.ones((len(kept), mask.num_patches), dtype=np.float32)
    if kept:
        keep = np.stack([random_keep(mask.num_patches, mask.keep,
                                     rng=np.random.default_rng(image_mask_seed(c[2], mask.seed))) for c in kept])
        np.put_along_axis(removed, keep, 0.0, axis=1)
    images = np.stack(pixels) if pixels else np.zeros((0, 112, 112, 3), dtype=np.uint8)
    return ValidationSet(image_id=[c[2] for c in kept], images=to_model_range(torch.from_numpy(images)).to(device),
                         mask=torch.from_numpy(removed).to(device),
                         identity=torch.tensor([c[3] for c in kept], dtype=torch.int64, device=device),
                         skipped=skipped)


class Validator:
    """Scores a FaceMAE on the validation set every ``train.val_every`` steps and at the last step."""

    def __init__(self, config: Config, *, teacher: nn.Module | None, judge: nn.Module | None,
                 device: torch.device) -> None:
        self.config = config
        self.teacher, self.judge = teacher, judge
        self.data = load_validation_set(config, device=device)

    @classmethod
    def create(cls, config: Config, *, teacher: nn.Module | None, device: torch.device) -> "Validator | None":
        """A validator for FaceMAE runs with ``train.val_every``, else None; loads the teacher and judge
        it needs that the run itself does not hold (plain MAE runs train without a teacher)."""
        train = config.train
        if train.task != "mae" or train.val_every == 0:
            return None
        from facemae.models.weights import load_fr_backbone
        from facemae.train.tasks import FP32Teacher

        if teacher is None and train.teacher:
            teacher = FP32Teacher(load_fr_backbone(train.teacher)).to(device)
        judge = FP32Teacher(load_fr_backbone(train.judge)).to(device) if train.judge else None
        return cls(config, teacher=teacher, judge=judge, device=device)

    def due(self, step: int) -> bool:
        return step % self.config.train.val_every == 0 or step == self.config.train.max_steps

    @torch.no_grad()
    def __call__(self, mae: nn.Module, *, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """``val_*`` metrics of ``mae`` (the engine's module: every rank calls this at the same step).

        Args:
            mae: The FaceMAE inside the engine.
            dtype: The engine's compute dtype (bf16 / fp16 engines take inputs in it).
        """
        was_training = mae.training
        mae.eval()
        try:
            losses, released = [], []
            chunk = self.config.train.micro_batch
            for start in range(0, len(self.data.images), chunk):
                imgs = self.data.images[start:start + chunk]
                mask = self.data.mask[start:start + chunk]
                loss, pred, _ = mae(imgs.to(dtype), mask=mask)
                losses.append(float(loss) * len(imgs))
                released.append(mae.compose(imgs, pred.float(), mask, paste_visible=self.config.loss.paste_visible))
        finally:
            mae.train(was_training)
        out = {"val_recon_loss": sum(losses) / len(self.data.images), "val_corrupt_skipped": len(self.data.skipped)}
        recon = torch.cat(released)
        originals, pixels = (to_uint8(x.float().cpu()).numpy() for x in (self.data.images, recon))
        out["val_psnr_masked"] = masked_psnr(originals, pixels, self.data.mask.cpu().numpy(),
                                             patch_size=self.config.mask.patch_size)
        out["val_hf_ratio"] = hf_ratio(pixels, originals)
        if self.teacher is not None:
            out["val_irm"] = float(irm_loss(self.teacher(self.data.images), self.teacher(recon), tau=VAL_TAU))
        if self.judge is not None:
            ids = self.data.identity.cpu().numpy()  # query i's source is gallery row i
            queries, gallery = (self.judge(x).float() for x in (recon, self.data.images))
            out["val_judge_irm"] = float(irm_loss(gallery, queries, tau=VAL_TAU))
            queries, gallery = queries.cpu().numpy(), gallery.cpu().numpy()
            leak = retrieval_leak(queries, gallery, query_source=np.arange(len(ids)), query_identity=ids,
                                  gallery_identity=ids, ks=(1,))
            out.update({f"val_{k}": leak[k] for k in ("image_leak@1", "identity_leak@1")})
        objective = validation_objective(out, self.config)
        if objective is not None:
            out["val_objective"] = objective
        return out


def validation_objective(metrics: dict[str, float], config: Config) -> float | None:
    """The number a sweep minimises (``tune.objective``), or None when its inputs were not measured.

    ``utility``: ``val_irm``. ``privacy_utility``: ``val_irm + tune.privacy_weight * val_identity_leak@1``.
    """
    if "val_irm" not in metrics:
        return None
    if config.tune.objective == "utility":
        return metrics["val_irm"]
    if "val_identity_leak@1" not in metrics:
        return None
    return metrics["val_irm"] + config.tune.privacy_weight * metrics["val_identity_leak@1"]
