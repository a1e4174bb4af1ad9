"""One typed config tree for every job, loaded from YAML with dotted ``--set a.b=c`` overrides.

Unknown keys and impossible combinations raise ``ValueError`` naming the fix. Derived values are
computed by methods (``MaskConfig.keep``), never written back into the tree.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from facemae import storage
from facemae.models.registry import FR_MODELS, MAE_MODELS, mae_patch_size

IMAGE_SIZE = 112
SOURCES = ("synthetic", "folder", "recordio")
SYNTHETIC_STYLES = ("photo", "cartoon")  # facemae.data.synthetic.STYLES (tests/test_synthetic.py checks they agree)
SYNTHETIC_DOMAINS = ("base", "shifted")  # facemae.data.synthetic.DOMAINS (likewise)
# The standard margin of each head (ArcFace: radians, CosFace: cosine), used when loss.m is unset.
DEFAULT_MARGIN_M = {"arcface": 0.5, "cosface": 0.4}
IRM_VIEWS = ("raw", "blur")
ALIGNERS = ("auto", "none", "mtcnn")  # face detection + ArcFace alignment of folder photos at ingest (facemae.data.align)
MULTIPLE_FACES = ("largest", "center")  # which face of a photo with several is aligned


@dataclass
class DataConfig:
    """Where faces come from and how they become Parquet shards.

    Attributes:
        source: ``synthetic`` (built-in generator), ``folder`` (``<identity>/<image>``) or
            ``recordio`` (InsightFace ``train.rec`` + ``train.idx``).
        path: Input folder or ``.rec`` file; unused for ``synthetic``.
        output: Dataset folder the shards and ``manifest.json`` are written to, or an object-store
            prefix ``s3://bucket/prefix`` / ``gs://bucket/prefix`` (see ``storage``).
        num_identities: Synthetic identities.
        images_per_identity: Synthetic images per identity.
        seed: Seed of the synthetic generator and of the identity split.
        style: Rendering of the synthetic faces: ``photo`` (the image statistics of aligned face
            photos: shading, texture, lens blur, sensor noise, JPEG) or ``cartoon`` (flat shapes under
            pixel noise, the generator before styles existed). Synthetic only.
        domain: Who the synthetic faces are and how they were photographed: ``base`` or ``shifted`` (another
            population: darker skin, rounder faces, more glasses and beards, harsh light, low exposure and
            JPEG quality, more head roll; different people from ``base`` at the same seed). A second
            dataset for cross-dataset releases (``experiment.deploy``). Synthetic only; in the manifest.
        deploy_fraction: Fraction of identities held out as the disjoint deployment set.
        val_fraction: Fraction of all identities carved out of the training side as the validation
            split (``val/``): held-out identities the trainer may read, for in-training validation
            (``train.val_every``), so that the trainer never opens a deployment original. Disjoint
            from ``train`` and ``deploy``; the deployment identities are the same as with 0.
        rows_per_shard: Target rows per Parquet shard.
        resize: Center-crop and resize images that are not 112x112 instead of rejecting them.
        convert_rgb: Convert grayscale / RGBA / palette images to RGB instead of rejecting them.
        skip_corrupt: Count undecodable or rejected images and go on, instead of stopping at the
            first one with an error naming it. Every stage that decodes images honours it: ingest,
            masking, teacher embedding and generation list the skipped rows in their manifest's report;
            training counts the distinct rows it skipped (``corrupt_skipped`` in its metrics and
            Prometheus); evaluation counts and names them in its results. Not part of a dataset's
            settings: turning it on for a rerun reuses what was built.
        workers: Parallel Ray tasks for synthetic generation; 0 picks by size (Ray above
            ``ray_threshold`` images), 1 forces a single process.
        ray_threshold: Synthetic datasets with more images than this are generated through Ray.
        align: ``mtcnn`` detects the face of each folder image that is not 112x112 (facenet-pytorch's
            MTCNN), maps its five landmarks onto InsightFace's ``arcface_dst`` template by a similarity
            and warps it to 112x112 as InsightFace's ``norm_crop`` does; 112x112 images are kept as
            already-aligned crops. ``none`` reads every image as an aligned crop (one that is not
            112x112 is refused, or center-cropped with ``resize``). ``auto`` (the default) is ``mtcnn``
            for a folder read without ``resize`` and ``none`` otherwise (:attr:`aligner`).
        align_min_score: Lowest detection score (MTCNN's last-stage probability) a face is aligned at;
            an image whose faces all score lower is refused as ``face score below``.
        align_min_face: Shortest side, in pixels of the photo, of a face box that is aligned; an image
            whose faces are all smaller is refused as ``face too small``.
        align_multiple: The face aligned in a photo with several: ``largest`` (box area) or ``center``
            (box centre nearest the photo's centre); such photos are counted in the report.
    """

    source: str = "synthetic"
    path: str | None = None
    output: str = "data/synthetic"
    num_identities: int = 200
    images_per_identity: int = 20
    seed: int = 0
    style: str = "photo"
    domain: str = "base"
    deploy_fraction: float = 0.2
    val_fraction: float = 0.1
    rows_per_shard: int = 1000
    resize: bool = False
    convert_rgb: bool = False
    skip_corrupt: bool = False
    workers: int = 0
    ray_threshold: int = 20_000
    align: str = "auto"
    align_min_score: float = 0.9
    align_min_face: int = 40
    align_multiple: str = "largest"

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {SOURCES}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (the input folder or .rec file)")
        if self.style not in SYNTHETIC_STYLES:
            raise ValueError(f"data.style={self.style!r} is not one of {SYNTHETIC_STYLES}")
        if self.domain not in SYNTHETIC_DOMAINS:
            raise ValueError(f"data.domain={self.domain!r} is not one of {SYNTHETIC_DOMAINS}")
        if self.source == "synthetic" and (self.num_identities < 2 or self.images_per_identity < 1):
            raise ValueError("synthetic data needs data.num_identities >= 2 and data.images_per_identity >= 1")
        if not 0.0 <= self.deploy_fraction < 1.0:
            raise ValueError(f"data.deploy_fraction={self.deploy_fraction} must be in [0, 1): it is the share "
                             "of identities held out for deployment")
        if self.val_fraction < 0 or self.deploy_fraction + self.val_fraction >= 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be >= 0 and leave training identities: "
                             f"data.deploy_fraction + data.val_fraction = {self.deploy_fraction + self.val_fraction} "
                             "must be below 1")
        if self.rows_per_shard < 1:
            raise ValueError(f"data.rows_per_shard={self.rows_per_shard} must be >= 1")
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers} must be >= 0 (0 = choose by dataset size)")
        self._validate_align()
        _check_location("data.output", self.output)

    def _validate_align(self) -> None:
        if self.align not in ALIGNERS:
            raise ValueError(f"data.align={self.align!r} is not one of {ALIGNERS}")
        if self.align_multiple not in MULTIPLE_FACES:
            raise ValueError(f"data.align_multiple={self.align_multiple!r} is not one of {MULTIPLE_FACES}")
        if not 0.0 < self.align_min_score <= 1.0:
            raise ValueError(f"data.align_min_score={self.align_min_score} must be in (0, 1]: it is the lowest "
                             "detection probability a face is aligned at (0.9 by default)")
        if self.align_min_face < 12:
            raise ValueError(f"data.align_min_face={self.align_min_face} must be >= 12 pixels, the smallest face "
                             "MTCNN detects")
        if self.align in ("none", "auto"):
            return
        if self.source != "folder":
            raise ValueError(f"data.align={self.align} reads photos from an image folder, not data.source="
                             f"{self.source!r} (whose faces are aligned already); set data.source=folder or "
                             "data.align=none")
        if self.resize:
            raise ValueError(f"data.resize and data.align={self.align} both handle images that are not "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE}; drop --resize to align faces, or --align to center-crop")

    @property
    def aligner(self) -> str:
        """What ``align`` does for this source: ``mtcnn`` or ``none``, ``auto`` resolved (``mtcnn`` for a
        folder read without ``resize``: photos are aligned, 112x112 crops kept as they are)."""
        if self.align != "auto":
            return self.align
        return "mtcnn" if self.source == "folder" and not self.resize else "none"


def _check_location(key: str, location: str) -> None:
    """Refuses a malformed object-store URL (``s3://`` without a bucket, ``ftp://...``) at load time."""
    if storage.is_remote(location):
        try:
            storage.split_url(location)
        except storage.StorageLocationError as exc:
            raise ValueError(f"{key}={exc}") from None


@dataclass
class MaskConfig:
    """Owner-side masking: which patches of each face are kept (visible) and released.

    Attributes:
        patch_size: Side of a square patch in pixels; must divide 112.
        ratio: Fraction of patches removed per image.
        seed: Mask seed; each image's mask depends only on this seed and its ``image_id``.
        splits: Dataset splits to mask (``train``, ``val``, ``deploy``); the owner's release masks
            ``deploy``, every job config says so. By default every split.
        output: Folder (or ``s3://`` / ``gs://`` prefix) of the masked dataset; empty means
            ``<data.output>-masked``.
        copies: Masked versions of each face, each with its own mask (``image_id#m<j>``), so that
            generation can release several reconstructions per face.
    """

    patch_size: int = 8
    ratio: float = 0.75
    seed: int = 0
    copies: int = 1
    splits: list[str] = field(default_factory=lambda: ["train", "val", "deploy"])
    output: str = ""

    @property
    def num_patches(self) -> int:
        """Patches per image, ``L = (112 / p)^2``."""
        return (IMAGE_SIZE // self.patch_size) ** 2

    @property
    def keep(self) -> int:
        """Visible patches per image, ``int(L * (1 - ratio))`` as in MAE's ``random_masking``."""
        return int(self.num_patches * (1 - self.ratio))

    def validate(self) -> None:
        if self.patch_size < 1 or IMAGE_SIZE % self.patch_size:
            raise ValueError(f"mask.patch_size={self.patch_size} must divide the image size {IMAGE_SIZE} "
                             "(use 4, 7, 8, 14, 16, 28 or 56)")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask.ratio={self.ratio} must be in [0, 1)")
        if self.keep < 1:
            raise ValueError(f"mask.ratio={self.ratio} with mask.patch_size={self.patch_size} keeps no patch "
                             f"of the {self.num_patches}; lower the ratio or the patch size")
        if self.copies < 1:
            raise ValueError(f"mask.copies={self.copies} must be >= 1")
        unknown = sorted(set(self.splits) - {"train", "val", "deploy"})
        if unknown or not self.splits:
            raise ValueError(f"mask.splits={self.splits} must be a non-empty subset of ['train', 'val', 'deploy']")
        _check_location("mask.output", self.output)


@dataclass
class PartialFCConfig:
    """The sharded margin head (``model.head: partial_fc``, :mod:`facemae.losses.partial_fc`).

    Attributes:
        sample_rate: Share of each worker's classes a step scores: every identity of the global batch and
            uniform negatives. 1.0 is the exact softmax over all identities; insightface trains
            WebFace-scale sets at 0.1-0.3.
    """

    sample_rate: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"model.partial_fc.sample_rate={self.sample_rate} must be in (0, 1] "
                             "(1.0 = every identity each step, 0.1-0.3 at 100k+ identities)")


HEADS = ("full", "partial_fc")


@dataclass
class ModelConfig:
    """Which named models a job builds (``facemae.models.registry``).

    Attributes:
        mae: FaceMAE size; its patch size must equal ``mask.patch_size``.
        teacher: FR backbone of the frozen IRM teacher.
        judge: FR backbone of the privacy judge, an instance trained apart from the teacher.
        fr: FR backbone trained downstream on released faces.
        embedding_size: Embedding dimension of every FR backbone.
        head: The margin head of every FR training (teacher, judge, downstream FR): ``full``, the class
            centres on every worker inside the DeepSpeed engine, or ``partial_fc``, sharded by class range
            over the workers with sampled negatives (100k to millions of identities; DESIGN.md, "Many
            identities").
        partial_fc: Its settings.
    """

    mae: str = "facemae_vit_base_p8"
    teacher: str = "fr_r50"
    judge: str = "fr_r50"
    fr: str = "fr_r50"
    embedding_size: int = 512
    head: str = "full"
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)

    def validate(self) -> None:
        if self.mae not in MAE_MODELS:
            raise ValueError(f"model.mae={self.mae!r} is not a registered FaceMAE; choose one of "
                             f"{', '.join(MAE_MODELS)}")
        for key in ("teacher", "judge", "fr"):
            name = getattr(self, key)
            if name not in FR_MODELS:
                raise ValueError(f"model.{key}={name!r} is not a registered FR backbone; choose one of "
                                 f"{', '.join(FR_MODELS)}")
        if self.embedding_size < 2:
            raise ValueError(f"model.embedding_size={self.embedding_size} must be >= 2 (512 is the standard)")
        if self.head not in HEADS:
            raise ValueError(f"model.head={self.head!r} must be one of {', '.join(HEADS)}")
        self.partial_fc.validate()


@dataclass
class LossConfig:
    """FaceMAE and face-recognition losses.

    Attributes:
        lambda_irm: Weight of the IRM loss; 0 trains a plain MAE.
        tau: Temperature of the IRM relation softmax.
        norm_pix_loss: Score per-patch-normalised targets (pre-training studies only: such
            predictions cannot become pixels, so it needs ``lambda_irm: 0``).
        paste_visible: Released image = predicted masked patches + the owner's visible patches;
            False releases the prediction everywhere.
        margin: FR margin head, ``arcface`` or ``cosface``.
        s: Logit scale of the margin head.
        m: Margin; unset means the head's standard, ``DEFAULT_MARGIN_M`` (ArcFace 0.5, CosFace 0.4).
        irm_view: What the teacher sees of both the originals and the released images: ``raw``
            (DESIGN.md 1's definition) or ``blur`` (a fixed Gaussian low-pass first, so IRM's gradient
            cannot reach the high frequencies where a frozen teacher is fooled by noise textures).
        irm_blur_sigma: Standard deviation in pixels of that Gaussian.
        irm_start: Fraction of ``train.max_steps`` trained on reconstruction alone before IRM is
            switched on (so it acts on faces, not on noise).
        irm_ramp: Fraction of ``train.max_steps`` over which IRM's weight then rises linearly from 0
            to ``lambda_irm``.

    DESIGN.md 1's IRM is ``lambda_irm: 1.0, irm_view: raw, irm_start: 0, irm_ramp: 0``; the defaults
    are the variant the seeded comparison measured to keep faces (README "Does it work?").
    """

    lambda_irm: float = 0.1
    tau: float = 0.1
    norm_pix_loss: bool = False
    paste_visible: bool = True
    margin: str = "arcface"
    s: float = 64.0
    m: float | None = None
    irm_view: str = "blur"
    irm_blur_sigma: float = 1.5
    irm_start: float = 0.25
    irm_ramp: float = 0.25

    def irm_weight(self, step: int | None, *, max_steps: int) -> float:
        """IRM's weight at optimizer step ``step`` (0-based; ``None`` = the schedule's end) of a run of
        ``max_steps``: 0 before ``round(irm_start * max_steps)``, then a linear ramp over
        ``round(irm_ramp * max_steps)`` steps to ``lambda_irm``."""
        if step is None or self.lambda_irm == 0:
            return self.lambda_irm
        start, ramp = round(self.irm_start * max_steps), round(self.irm_ramp * max_steps)
        if step < start:
            return 0.0
        if ramp == 0:
            return self.lambda_irm
        return self.lambda_irm * min(1.0, (step - start + 1) / ramp)

    @property
    def margin_m(self) -> float:
        """The margin in effect: ``m``, or the standard of the chosen head."""
        return DEFAULT_MARGIN_M[self.margin] if self.m is None else self.m

    def validate(self) -> None:
        if self.lambda_irm < 0:
            raise ValueError(f"loss.lambda_irm={self.lambda_irm} must be >= 0 (0 trains a plain MAE)")
        if self.tau <= 0:
            raise ValueError(f"loss.tau={self.tau} must be > 0 (0.1 is the default)")
        if self.norm_pix_loss and self.lambda_irm > 0:
            raise ValueError("loss.norm_pix_loss=true predicts per-patch-normalised values that cannot be "
                             "composed into pixels for IRM; set loss.lambda_irm=0 or loss.norm_pix_loss=false")
        if self.irm_view not in IRM_VIEWS:
            raise ValueError(f"loss.irm_view={self.irm_view!r} must be one of {IRM_VIEWS}")
        if self.irm_blur_sigma <= 0:
            raise ValueError(f"loss.irm_blur_sigma={self.irm_blur_sigma} must be > 0 (pixels; 1.5 is the default)")
        if not (0 <= self.irm_start <= 1 and 0 <= self.irm_ramp <= 1 and self.irm_start + self.irm_ramp <= 1):
            raise ValueError(f"loss.irm_start={self.irm_start} and loss.irm_ramp={self.irm_ramp} are fractions of "
                             "train.max_steps: each in [0, 1] and together at most 1 (0 and 0: IRM from the first step)")
        if self.margin not in DEFAULT_MARGIN_M:
            raise ValueError(f"loss.margin={self.margin!r} is not one of {sorted(DEFAULT_MARGIN_M)}")
        if self.s <= 0:
            raise ValueError(f"loss.s={self.s} must be > 0 (64 is the standard)")
        limit = math.pi / 2 if self.margin == "arcface" else 1.0
        if not 0.0 <= self.margin_m < limit:
            raise ValueError(f"loss.m={self.m} must be in [0, {limit:.4g}) for {self.margin}; leave it unset "
                             f"for the standard {DEFAULT_MARGIN_M[self.margin]}")


@dataclass
class TrainConfig:
    """Distributed training (Ray Train workers, each with a DeepSpeed engine).

    Attributes:
        task: ``mae`` (FaceMAE with IRM; plain MAE when ``loss.lambda_irm`` is 0) or ``fr`` (a
            face-recognition backbone with a margin head: the IRM teacher, the judge, downstream models).
        fr_backbone: Backbone an ``fr`` run trains; empty means ``model.fr``.
        teacher: ``weights.safetensors`` of a finished ``fr`` run, the frozen IRM teacher. Empty in
            a FaceMAE job with IRM: the job first trains one (run ``<name>-teacher``) on the
            training identities, ``teacher_steps`` steps at ``teacher_base_lr``.
        teacher_steps: Steps of that teacher run.
        teacher_base_lr: Base learning rate of that teacher run.
        num_workers: Ray Train workers; 0 runs one local process without Ray (debugging).
        use_gpu: One GPU per worker (nccl); otherwise CPU workers (gloo).
        cpus_per_worker: CPUs each worker reserves; below 1 leaves room for Ray Data on small machines.
        micro_batch: Images per worker per forward pass.
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps of the whole run (a resumed run continues up to it).
        base_lr: Learning rate per 256 images; the peak lr is ``base_lr * global_batch / 256`` (MAE).
        min_lr_ratio: Final lr of the cosine schedule, as a fraction of the peak.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        grad_clip: Gradient-norm clipping; 0 turns it off.
        zero_stage: DeepSpeed ZeRO stage, 0-3.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        checkpoint_every: Optimizer steps between checkpoints (one is always written at the end).
        keep_checkpoints: Newest checkpoints kept per run.
        log_every: Optimizer steps between metric reports.
        max_failures: Worker-group restarts from the last checkpoint before the run fails.
        resume_from: A checkpoint folder to start from when the run has none of its own.
        init_weights: An export's ``weights.safetensors`` (or its folder) whose weights start the model at
            step 0: a fine-tune. Of the same model as the run trains (an FR backbone for ``task: fr``, a
            FaceMAE for ``mae``); a run that restores a checkpoint of its own or ``resume_from`` ignores it.
        init_head: With ``init_weights`` and ``task: fr``, also start the class centres from the
            ``head.safetensors`` beside the weights (its class count must be the run's); ``false`` starts
            them fresh, for a fine-tune on other identities.
        storage_path: Folder of all runs; a run lives in ``<storage_path>/<name>``. A local path or
            ``s3://bucket/prefix`` / ``gs://bucket/prefix`` (checkpoints, metrics, exported weights).
        prefetch_batches: Batches Ray Data prepares ahead of each worker.
        shuffle_buffer: Rows of each worker's local shuffle buffer (shards are identity-sorted); 0 = off.
        metrics_port: Port of rank 0's Prometheus endpoint; 0 turns it off.
        metrics_host: Address the endpoint binds to.
        seed: Seed of model init and the local mode's data order.
        log_sample_ids: Each rank appends the ids of the images it trained on to
            ``<run>/sample_ids/rank<r>.txt`` (data lineage audits).
        log_upload_every_s: With ``storage_path`` on an object store: seconds between uploads of
            ``metrics.jsonl`` and the sample-id logs (an object cannot grow: each upload sends the whole
            log), besides the uploads at every checkpoint and at the end of the run.
        debug_state_dir: Write each rank's full training state after every save and restore there
            (resume audits; large).
        val_every: FaceMAE runs: optimizer steps between validations on held-out identities (the
            ``val`` split of ``data.output``: ``data.val_fraction``), also run at the last step; 0 turns it off. Each
            validation joins that step's report, so a Tune sweep has its objective at every report.
        val_images: Held-out faces of each validation (a seeded draw, masked as the owner would).
        judge: ``weights.safetensors`` of the privacy judge (an FR run apart from the teacher); with
            it, validation also reports the retrieval leak of the reconstructions.
        nonfinite: What a NaN or inf loss does: ``stop`` the run with the step and the loss components,
            or ``skip`` the micro-batch before backward and count it (``nonfinite_skipped`` in metrics).
        max_nonfinite: Non-finite losses or optimizer steps DeepSpeed skipped for gradient overflow,
            in a row, that stop the run in either mode (fp16 loss scaling skips a few by design).
        diverge_factor: A finite loss above this multiple of its running level stops the run as
            diverged, and is checked on the weights before every checkpoint; 0 turns it off.
    """

    task: str = "mae"
    fr_backbone: str = ""
    teacher: str = ""
    teacher_steps: int = 200
    teacher_base_lr: float = 0.01
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    micro_batch: int = 32
    grad_accum: int = 1
    max_steps: int = 200
    base_lr: float = 1.5e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 10
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: str = "fp32"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_failures: int = 0
    resume_from: str = ""
    init_weights: str = ""
    init_head: bool = True
    storage_path: str = "~/facemae-runs"
    prefetch_batches: int = 2
    shuffle_buffer: int = 256
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    seed: int = 0
    log_sample_ids: bool = False
    log_upload_every_s: float = 30.0
    debug_state_dir: str = ""
    val_every: int = 0
    val_images: int = 64
    judge: str = ""
    nonfinite: str = "stop"
    max_nonfinite: int = 20
    diverge_factor: float = 100.0

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all workers."""
        return self.micro_batch * self.grad_accum * max(1, world_size)

    def peak_lr(self, world_size: int) -> float:
        """``base_lr * global_batch / 256``, the linear scaling rule MAE uses."""
        return self.base_lr * self.global_batch(world_size) / 256

    def storage_root(self) -> str:
        """``storage_path`` as an absolute local path, or the object-store URL as written."""
        if storage.is_remote(self.storage_path):
            return self.storage_path.rstrip("/")
        return str(Path(self.storage_path).expanduser().resolve())

    def run_dir_for(self, name: str) -> str:
        return storage.join(self.storage_root(), name)

    def validate(self) -> None:
        for key in ("storage_path", "teacher", "judge", "resume_from", "init_weights"):
            _check_location(f"train.{key}", getattr(self, key))
        if self.task not in ("mae", "fr"):
            raise ValueError(f"train.task={self.task!r} must be 'mae' (FaceMAE) or 'fr' (face recognition)")
        if self.fr_backbone and self.fr_backbone not in FR_MODELS:
            raise ValueError(f"train.fr_backbone={self.fr_backbone!r} is not a registered FR backbone; choose one "
                             f"of {', '.join(FR_MODELS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={self.precision!r} must be fp32, bf16 or fp16")
        for key in ("micro_batch", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                    "teacher_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.num_workers < 0 or self.max_failures < 0 or self.warmup_steps < 0:
            raise ValueError("train.num_workers, train.max_failures and train.warmup_steps must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"train.cpus_per_worker={self.cpus_per_worker} must be > 0")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("train.precision=fp16 needs train.use_gpu=true: DeepSpeed's CPU accelerator trains "
                             "fp32 and bf16 only")
        if self.use_gpu and self.num_workers == 0:
            raise ValueError("train.use_gpu needs Ray Train workers: set train.num_workers >= 1")
        if self.base_lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.base_lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.log_upload_every_s < 0:
            raise ValueError(f"train.log_upload_every_s={self.log_upload_every_s} must be >= 0 (0 = at every report)")
        if self.val_every < 0 or self.val_images < 2:
            raise ValueError(f"train.val_every={self.val_every} must be >= 0 (0 = off) and train.val_images="
                             f"{self.val_images} >= 2")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={self.nonfinite!r} must be 'stop' or 'skip'")
        if self.max_nonfinite < 1 or self.diverge_factor < 0 or 0 < self.diverge_factor <= 1:
            raise ValueError(f"train.max_nonfinite={self.max_nonfinite} must be >= 1 and train.diverge_factor="
                             f"{self.diverge_factor} above 1 (0 turns the divergence check off)")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"train.metrics_port={self.metrics_port} must be a port number, or 0 to turn it off")


@dataclass
class GenerateConfig:
    """Deployment: reconstructing the owner's masked faces into the released dataset.

    Attributes:
        weights: FaceMAE ``weights.safetensors``; empty means this run's export,
            ``<train.storage_path>/<name>/export/weights.safetensors``.
        method: ``reconstruct`` (FaceMAE) or ``masked`` (release the masked view itself: a baseline).
        masked: Masked dataset to read; empty means ``mask.output`` / ``<data.output>-masked``.
        output: Released dataset folder; empty means ``<masked>-<method>``.
        batch_size: Faces per model forward (an actor call takes a whole shard).
        actors: Actors in the pool (one model each).
        cpus_per_actor: CPUs each actor reserves (below 1 on small machines, REFERENCE.md row B).
        use_gpu: One GPU per actor.
    """

    weights: str = ""
    method: str = "reconstruct"
    masked: str = ""
    output: str = ""
    batch_size: int = 64
    actors: int = 2
    cpus_per_actor: float = 0.5
    use_gpu: bool = False

    def validate(self) -> None:
        if self.method not in ("reconstruct", "masked"):
            raise ValueError(f"generate.method={self.method!r} must be 'reconstruct' or 'masked'")
        if self.batch_size < 1 or self.actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError("generate.batch_size and generate.actors must be >= 1, generate.cpus_per_actor > 0")
        for key in ("weights", "masked", "output"):
            _check_location(f"generate.{key}", getattr(self, key))


@dataclass
class EvalConfig:
    """Verification and privacy evaluation.

    Attributes:
        bins: InsightFace verification ``.bin`` files (LFW, CFP-FP, AgeDB-30 format) to report.
        pairs: Pairs the platform draws from held-out identities (the ``train`` split's originals, which
            downstream FR models trained on deployment identities never saw); 0 turns them off.
        pair_seed: Seed of those pairs.
        far: False-accept rate of the TAR@FAR figure.
        batch_size: Images per embedding batch.
        ray_threshold: Embeddings of more images than this (a privacy evaluation: originals and release
            together) are computed by one Ray Data actor pool.
    """

    bins: list[str] = field(default_factory=list)
    pairs: int = 600
    pair_seed: int = 0
    far: float = 1e-3
    batch_size: int = 64
    ray_threshold: int = 20_000

    def validate(self) -> None:
        if self.pairs < 0 or self.pairs % 20:
            raise ValueError(f"eval.pairs={self.pairs} must be a multiple of 20 (10 folds of positives and "
                             "negatives), or 0")
        if not 0 < self.far < 1:
            raise ValueError(f"eval.far={self.far} must be in (0, 1)")


@dataclass
class ExperimentConfig:
    """The paper's comparison (``jobs/experiment.py``).

    Attributes:
        output: Report folder (``report.md``, ``report.json``, PNGs).
        judge_steps: Steps of the privacy judge, an FR model trained apart from the teacher.
        fr_steps: Steps of each downstream FR model; identical for every row of the table.
        fr_base_lr: Base learning rate of those FR runs.
        seeds: One full repetition per seed: FaceMAE, MAE and every row's FR model are trained with
            ``train.seed`` = that seed (the teacher and the judge once, with ``train.seed``); the
            report gives means, 95% intervals and paired differences over them.
        attacks: Also the stronger attackers of :mod:`facemae.attacks` on every row and seed: the adaptive
            attacker's leaks (``adaptive_identity_leak@1``...) and membership inference by the judge and by
            the adaptive attacker (``mia_auc``, ``mia_tpr@1%fpr``, ``adaptive_mia_*``).
        adaptive_steps: Steps of the adaptive attacker's fine-tune of the judge (the judge's recipe).
        nonmembers: An ingested dataset of people never released, for membership inference; empty with
            synthetic faces draws one (``data.seed + 1``, as many identities as are deployed).
        deploy: Another dataset (B, a ``data`` section of its own: a synthetic domain, a folder, a RecordIO
            file; the keys it leaves out but ``output`` are ``data``'s) whose deployment identities the
            experiment releases and scores: in-domain rows from
            generators trained on B's own training identities, ``-cross`` rows from FaceMAE and MAE trained on
            ``data`` with no retraining (``generalization.json``). Empty: ``data``'s own identities.
    """

    output: str = "reports/experiment"
    judge_steps: int = 200
    fr_steps: int = 200
    fr_base_lr: float = 0.02
    seeds: list[int] = field(default_factory=lambda: [0])
    attacks: bool = False
    adaptive_steps: int = 200
    nonmembers: str = ""
    deploy: DataConfig | None = None

    def validate(self) -> None:
        if self.deploy is not None:
            self.deploy.validate()
        if self.judge_steps < 1 or self.fr_steps < 1 or self.adaptive_steps < 1:
            raise ValueError("experiment.judge_steps, experiment.fr_steps and experiment.adaptive_steps must be >= 1")
        _check_location("experiment.nonmembers", self.nonmembers)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment.seeds={self.seeds} must be a non-empty list of distinct seeds, e.g. [0, 1, 2]")
        _check_location("experiment.output", self.output)


FRONTIER_METHODS = ("masked", "mae", "facemae")


@dataclass
class FrontierConfig:
    """The privacy-utility frontier sweep (``jobs/frontier.py``): one Ray Tune trial per generator.

    Each point is a method at a mask ratio (and, for FaceMAE, an IRM weight): its generator is trained,
    the deployment faces are released and one identical FR model is trained on the release and scored
    (``experiment.fr_steps``, the experiment's judge and pairs). The first seed runs at every point; the
    other seeds only at the points on or next to a method's frontier.

    Attributes:
        methods: Of ``masked`` (no generator: the masked faces themselves), ``mae`` (lambda 0) and ``facemae``.
        mask_ratios: The mask ratios swept; each has its own masked dataset.
        lambdas: FaceMAE's IRM weights (``loss.lambda_irm``); MAE is lambda 0.
        paste_visible: Release options (``loss.paste_visible``): ``[true]`` pastes the owner's visible
            patches back (today's release); ``[true, false]`` adds the decoder's prediction everywhere.
        seeds: The first runs at every point, the rest where they decide (on or next to a frontier).
        output: Report folder (``frontier.json``, ``frontier.md``, ``frontier.png``, ``reconstructions.png``).
        max_concurrent: Trials at once (each trains in its own process; 1 on a 2-core machine).
        cpus_per_trial: CPUs each trial reserves and trains with (its training runs in its own process, its
            releases on Ray Data beside it).
        ledger: Folder of finished points, one small JSON per point and seed (its row of scores and the
            digest of the settings it was measured with), written by the trial as it ends. A rerun skips
            every point found there with the same settings, so a sweep continues from this folder alone,
            in another checkout or on another machine (commit it, or keep it on an object store). Empty:
            ``<output>/points``.
    """

    methods: list[str] = field(default_factory=lambda: list(FRONTIER_METHODS))
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.75, 0.85, 0.9])
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.3])
    paste_visible: list[bool] = field(default_factory=lambda: [True])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output: str = "reports/frontier"
    max_concurrent: int = 1
    cpus_per_trial: float = 2.0
    ledger: str = ""

    def validate(self) -> None:
        unknown = sorted(set(self.methods) - set(FRONTIER_METHODS))
        if unknown or not self.methods:
            raise ValueError(f"frontier.methods={self.methods}: each must be one of {', '.join(FRONTIER_METHODS)}")
        if not self.mask_ratios or not all(0 < r < 1 for r in self.mask_ratios):
            raise ValueError(f"frontier.mask_ratios={self.mask_ratios} must be a non-empty list in (0, 1)")
        if "facemae" in self.methods and (not self.lambdas or not all(x > 0 for x in self.lambdas)):
            raise ValueError(f"frontier.lambdas={self.lambdas} must be FaceMAE's IRM weights, each > 0 "
                             "(MAE, lambda 0, is its own method)")
        if not self.paste_visible or len(set(self.paste_visible)) != len(self.paste_visible):
            raise ValueError(f"frontier.paste_visible={self.paste_visible} must be [true], [false] or [true, false]")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"frontier.seeds={self.seeds} must be a non-empty list of distinct seeds, e.g. [0, 1, 2]")
        if self.max_concurrent < 1 or self.cpus_per_trial <= 0:
            raise ValueError("frontier.max_concurrent must be >= 1 and frontier.cpus_per_trial > 0")
        _check_location("frontier.output", self.output)
        if self.ledger:
            _check_location("frontier.ledger", self.ledger)


SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
OBJECTIVES = ("utility", "privacy_utility")


@dataclass
class TuneConfig:
    """A Ray Tune sweep over FaceMAE training (``jobs/tune.py``).

    Attributes:
        space: Search space, ``{dotted config key: {kind: values}}`` with kind ``choice`` / ``grid``
            (a list of values), ``uniform`` / ``loguniform`` / ``randint`` (``[low, high]``), e.g.
            ``{"mask.ratio": {"choice": [0.5, 0.75]}, "train.base_lr": {"loguniform": [1e-3, 1e-2]}}``.
        num_samples: Trials drawn from the space (each grid point is repeated this often).
        max_concurrent: Trials running at once; 0 sizes it to the cluster's CPUs (or GPUs).
        objective: ``utility`` (minimise ``val_irm``: how much the teacher's relations among held-out
            faces change in reconstruction) or ``privacy_utility`` (minimise ``val_irm +
            privacy_weight * val_identity_leak@1``, which needs the judge). Both are reported anyway.
        privacy_weight: Weight of the leak in the ``privacy_utility`` objective.
        scheduler: ``asha`` (early stopping) or ``fifo`` (every trial runs to ``train.max_steps``).
        grace_period: Validations every trial gets before ASHA may stop it.
        reduction_factor: ASHA's halving rate.
        cpus_per_trial: CPUs each trial's driver function reserves (its Train workers reserve their own).
        output: Folder of the sweep report (``trials.json``, ``pareto.md``, ``pareto.png``); empty means
            ``reports/<name>-sweep``.
        seed: Seed of the search.
    """

    space: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = 4
    max_concurrent: int = 0
    objective: str = "utility"
    privacy_weight: float = 1.0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 0.25
    output: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        # YAML 1.1 reads "1e-3" (no dot) as a string; the space's numbers are parsed here, once.
        self.space = {k: {kind: [_number(v) for v in values] if isinstance(values, list) else values
                          for kind, values in spec.items()} if isinstance(spec, dict) else spec
                      for k, spec in self.space.items()}

    def validate(self) -> None:
        _check_location("tune.output", self.output)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"tune.objective={self.objective!r} must be one of {OBJECTIVES}")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"tune.scheduler={self.scheduler!r} must be 'asha' or 'fifo'")
        if self.num_samples < 1 or self.max_concurrent < 0 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("tune.num_samples and tune.grace_period must be >= 1, tune.max_concurrent >= 0 "
                             "(0 = by cluster size), tune.reduction_factor >= 2")
        if self.cpus_per_trial < 0 or self.privacy_weight < 0:
            raise ValueError("tune.cpus_per_trial and tune.privacy_weight must be >= 0")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(f"tune.space.{key} must be one mapping {{kind: values}} with kind one of "
                                 f"{SPACE_KINDS}, e.g. {{choice: [0.5, 0.75]}}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.space.{key}.{kind} must be a non-empty list")
            if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
                raise ValueError(f"tune.space.{key}.{kind} must be [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"tune.space.{key}.loguniform needs low > 0, got {values}")


EMBEDDED_OBJECT_STORE_MIB = 1024  # the platform's streams keep a few shards in flight: tens of MiB
MIN_OBJECT_STORE_MIB = 80  # Ray refuses less than 75 MB


@dataclass
class RayConfig:
    """How a job reaches Ray.

    Attributes:
        address: Cluster address (``auto``, ``ray://...``); ``None`` starts an embedded local cluster.
        num_cpus: Logical CPUs of an embedded cluster; ``None`` lets Ray count them.
        object_store_mib: Object store of an embedded cluster, MiB; ``None`` means
            :data:`EMBEDDED_OBJECT_STORE_MIB`. Ray's own default is 30% of the machine's memory, and its
            store keeps every page it ever wrote mapped, so a job's memory grew with the faces it streamed
            until the store was full (``benchmarks/results/load.md``); a bounded store bounds it. A cluster
            the job joins keeps its own setting.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_mib: int | None = None

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus={self.num_cpus} must be >= 1")
        if self.object_store_mib is not None and self.object_store_mib < MIN_OBJECT_STORE_MIB:
            raise ValueError(f"ray.object_store_mib={self.object_store_mib} is below Ray's minimum object store; "
                             f"use at least {MIN_OBJECT_STORE_MIB}")
        for key in ("num_cpus", "object_store_mib"):
            if self.address is not None and getattr(self, key) is not None:
                raise ValueError(f"ray.{key} applies only to an embedded cluster; drop it when ray.address is set")

    def object_store_bytes(self) -> int:
        """The object store an embedded cluster starts with, in bytes."""
        return (self.object_store_mib or EMBEDDED_OBJECT_STORE_MIB) * 2**20


@dataclass
class StorageConfig:
    """Object stores (``facemae.storage``): dataset locations may be ``s3://bucket/prefix`` or
    ``gs://bucket/prefix`` besides local paths. Credentials come the standard way, never from here:
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE`` for S3,
    ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS.

    Attributes:
        endpoint_override: Endpoint of an S3-compatible store (MinIO, Ceph, moto), e.g.
            ``http://127.0.0.1:9000``; the scheme picks http or https. Empty means ``AWS_ENDPOINT_URL``
            when set, else AWS S3 itself.
        region: S3 region; empty means ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the SDK's default.
    """

    endpoint_override: str = ""
    region: str = ""

    def validate(self) -> None:
        scheme, sep, host = self.endpoint_override.partition("://")  # "host:port" alone means https
        if " " in self.endpoint_override or (sep and (scheme not in ("http", "https") or not host)):
            raise ValueError(f"storage.endpoint_override={self.endpoint_override!r} must be an S3 endpoint such as "
                             "http://127.0.0.1:9000 or https://s3.example.com (or empty for AWS S3)")
        if " " in self.region:
            raise ValueError(f"storage.region={self.region!r} must be an S3 region name such as us-east-1")


TRACKING_SCHEMES = ("http", "https", "databricks")


@dataclass
class TrackingConfig:
    """Experiment tracking of training runs, sweeps and experiments (``facemae.tracking``); off by default.

    Attributes:
        mlflow_uri: MLflow tracking server, e.g. ``http://127.0.0.1:5000`` (``mlflow server``), or
            ``databricks``; empty turns MLflow off. Each training run becomes one MLflow run (params: the
            whole config; every reported metric at its step; preview PNGs; the exported weights' path),
            nested under its sweep's or experiment's run, and a rerun of the same name continues it.
        mlflow_experiment: MLflow experiment the runs go to (created when missing).
        tensorboard: Rank 0 also writes every reported metric and the previews as TensorBoard events to
            ``<run>/tensorboard`` (needs ``tensorboardX``, which ``ray[tune]`` installs).
    """

    mlflow_uri: str = ""
    mlflow_experiment: str = "facemae"
    tensorboard: bool = False

    def validate(self) -> None:
        if not self.mlflow_uri:
            return
        from urllib.parse import urlparse

        url = urlparse(self.mlflow_uri)
        databricks = self.mlflow_uri == "databricks" or url.scheme == "databricks"
        if not databricks and (url.scheme not in TRACKING_SCHEMES or not url.netloc):
            raise ValueError(f"tracking.mlflow_uri={self.mlflow_uri!r} must be an MLflow tracking server's "
                             "http(s)://host:port address (start one with `mlflow server --backend-store-uri "
                             "sqlite:///mlflow.db --port 5000`) or databricks; file and database stores need "
                             "the full mlflow package on every Ray worker and are not supported")
        if not self.mlflow_experiment.strip():
            raise ValueError("tracking.mlflow_experiment must be a non-empty MLflow experiment name "
                             "(default: facemae)")


# The settings that name local files and folders (besides ``train.storage_path``), per section: what
# :meth:`Config.absolute` resolves. A new path setting belongs here.
LOCAL_PATHS = {"data": ("path", "output"), "mask": ("output",),
               "train": ("teacher", "judge", "init_weights", "resume_from", "debug_state_dir"),
               "generate": ("weights", "masked", "output"), "experiment": ("output", "nonmembers"),
               "frontier": ("output", "ledger"), "tune": ("output",)}


@dataclass
class Config:
    """The root of every job's config.

    Attributes:
        name: Run name; a rerun with the same name resumes.
        data: Ingest settings.
        mask: Owner-side masking settings.
        model: Named models.
        loss: Loss settings.
        train: Distributed training settings.
        generate: Deployment (released dataset) settings.
        eval: Verification and privacy evaluation.
        experiment: The paper's comparison.
        tune: Hyperparameter sweeps.
        frontier: The privacy-utility frontier sweep.
        ray: Cluster connection.
        tracking: Experiment tracking (MLflow, TensorBoard).
        storage: Object-store endpoint and region for ``s3://`` / ``gs://`` locations.
    """

    name: str = "facemae"
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> "Config":
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty run name without '/'")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        for key in self.tune.space:
            _check_dotted_key(key, where="tune.space")
        deploy = self.experiment.deploy
        if deploy is not None and deploy.output.rstrip("/") == self.data.output.rstrip("/"):
            raise ValueError(f"experiment.deploy.output={deploy.output} is data.output: the deployed dataset needs a "
                             "folder of its own, e.g. experiment.deploy.output=data/shifted")
        return self

    def check_mae_patch_size(self) -> None:
        """Jobs that run FaceMAE call this: the model reads the owner's masked shards token for token,
        so both must cut the same patches. (Masking alone does not need a model, so ``validate``
        leaves it out.)

        Raises:
            ValueError: The sizes differ; the message names the models that would fit.
        """
        patch = mae_patch_size(self.model.mae)
        if patch == self.mask.patch_size:
            return
        same = [n for n in MAE_MODELS if mae_patch_size(n) == self.mask.patch_size]
        fix = (f"set model.mae to one of {', '.join(same)} or mask.patch_size={patch}" if same else
               f"no registered FaceMAE uses it; set mask.patch_size to one of "
               f"{', '.join(str(q) for q in sorted({mae_patch_size(n) for n in MAE_MODELS}))}")
        raise ValueError(f"model.mae={self.model.mae} uses patch size {patch} but mask.patch_size="
                         f"{self.mask.patch_size}; {fix}")

    def run_dir(self) -> str:
        """This run's folder: checkpoints, metrics, exported weights."""
        return self.train.run_dir_for(self.name)

    def masked_output(self) -> str:
        """Folder of the masked dataset."""
        return self.mask.output or f"{self.data.output.rstrip('/')}-masked"

    def absolute(self) -> "Config":
        """This config with every local file and folder it names (:data:`LOCAL_PATHS`, ``train.storage_path``)
        absolute against the driver's working directory, for a process that runs elsewhere: a Ray Train worker
        starts in a folder of its own, where ``data/...`` names nothing. URLs and empty values stay as they are."""
        def resolved(section: Any, keys: Sequence[str]) -> Any:
            return dataclasses.replace(section, **{k: storage.absolute(v) for k in keys if (v := getattr(section, k))})

        sections = {name: resolved(getattr(self, name), keys) for name, keys in LOCAL_PATHS.items()}
        sections["train"] = dataclasses.replace(sections["train"], storage_path=self.train.storage_root())
        if self.experiment.deploy is not None:
            sections["experiment"] = dataclasses.replace(
                sections["experiment"], deploy=resolved(self.experiment.deploy, LOCAL_PATHS["data"]))
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds a validated config from a YAML file and ``a.b=c`` overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: Dotted assignments applied in order, values parsed as YAML scalars.

    Raises:
        ValueError: A file that is not YAML (naming its line and column), a ``!!python/...`` or
            other tag, an unknown key, a value of the wrong type or an impossible combination.
        FileNotFoundError: ``path`` does not exist.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    _inherit_deploy(raw)
    return from_dict(Config, raw).validate()


def _inherit_deploy(raw: dict[str, Any]) -> None:
    """``experiment.deploy`` takes every ``data`` key it does not set but ``output``: dataset B is A but for
    what the user says (``domain: shifted``, another ``source`` and ``path``...)."""
    experiment = raw.get("experiment")
    deploy = experiment.get("deploy") if isinstance(experiment, dict) else None
    if isinstance(deploy, dict) and "output" not in deploy:
        raise ValueError("experiment.deploy.output is not set: the deployed dataset needs a folder of its own, "
                         "e.g. experiment.deploy.output=data/shifted")
    if isinstance(deploy, dict) and isinstance(raw.get("data", {}), dict):
        experiment["deploy"] = {**{k: v for k, v in raw.get("data", {}).items() if k != "output"}, **deploy}


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a config file holds, or a one-line error naming the file, line and column."""
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist (see jobs/configs/ for examples)")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a file; give a YAML file such as jobs/configs/train.yaml")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file such as "
                         "jobs/configs/train.yaml") from None
    except yaml.YAMLError as exc:
        where, problem = _yaml_problem(exc, fix="fix the file there (indent with spaces; quote a value holding "
                                                "': ' or ' #')")
        line_column = f":{where[0]}:{where[1]}" if where else ""
        raise ValueError(f"{path}{line_column}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level (section: {{key: value}}), "
                         f"found a {type(raw).__name__}")
    return raw


def _yaml_problem(exc: yaml.YAMLError, *, fix: str) -> tuple[tuple[int, int] | None, str]:
    """``((line, column) from 1 or None, what is wrong and its fix)`` of a YAML error; ``fix`` is the
    advice for a syntax error."""
    mark = getattr(exc, "problem_mark", None)
    where = (mark.line + 1, mark.column + 1) if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        tag = problem.rsplit(" ", 1)[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
        # safe_load refuses these on purpose: a !!python/... tag would run code while loading.
        return where, (f"the tag {tag} is not allowed; a config holds plain YAML values (mappings, lists, "
                       "numbers, strings): remove the tag")
    context, started = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and started is not None and (started.line + 1, started.column + 1) != where:
        context += f" started at line {started.line + 1} column {started.column + 1}"
    return where, f"not valid YAML: {problem}{f' ({context})' if context else ''}; {fix}"


def from_dict(cls: type, raw: dict[str, Any], *, where: str = "") -> Any:
    """Builds dataclass ``cls`` from a nested mapping, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, where=f"{where}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, where=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where=where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        _, inner = typing.get_args(hint)
        return {str(k): _coerce(inner, v, where=f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(inner, v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and isinstance(_number(value), float):
        return _number(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _number(value: Any) -> Any:
    """A string that reads as a number, as a float (YAML 1.1 reads "1e-3", no dot, as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_dotted_key(key: str, *, where: str) -> None:
    """Raises ``ValueError`` unless ``key`` (``section.name``) names a value of the config tree."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in names:
            valid = ", ".join(sorted(names)) if names else "(none: it is a value)"
            raise ValueError(f"{where}.{key}: unknown key {'.'.join(parts[:i + 1])}; valid keys there: {valid}")
        node = typing.get_type_hints(node)[part]
    if dataclasses.is_dataclass(node):
        raise ValueError(f"{where}.{key} is a section; name one of its values, e.g. {key}."
                         f"{dataclasses.fields(node)[0].name}")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``section.name`` in a nested config mapping, making the sections it needs.

    Raises:
        ValueError: A part of ``key`` before the last names a value, not a section.
    """
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {part} is a value, not a section")
    node[parts[-1]] = value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        where, problem = _yaml_problem(exc, fix=f"quote a value meant as text, e.g. --set '{key}=\"...\"'")
        column = f", column {where[1]} of the value" if where else ""
        raise ValueError(f"override {item!r}{column}: {problem}") from None
    try:
        set_dotted(raw, key, value)
    except ValueError as exc:
        raise ValueError(f"override {item!r}: {exc}") from None
