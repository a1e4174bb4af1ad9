"""The main training job end to end: data, owner-side masking, the IRM teacher, FaceMAE.

Every stage reuses what an earlier run with the same settings finished (datasets by their
manifest's settings, runs by their name), so rerunning the job resumes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from facemae import console
from facemae.config import Config
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.shards import Manifest
from facemae.generate.embed import embed_dataset, embedded_output
from facemae.train.roles import teacher_config
from facemae.train.trainer import TrainResult, train


@dataclass
class JobResult:
    """What the training job produced."""

    dataset: Manifest
    masked: Manifest
    teacher: TrainResult | None
    result: TrainResult


def _skipped(manifest: Manifest, *, before: Manifest | None = None) -> str:
    """The end of a stage's line when it skipped corrupt rows (``data.skip_corrupt``), else nothing.

    Args:
        manifest: What the stage wrote.
        before: The dataset it copied, whose report it carries on (an embedded dataset's counts
            include the ones its ingest refused).
    """
    corrupt = manifest.report.get("corrupt", 0) - (before.report.get("corrupt", 0) if before else 0)
    return f", {corrupt} corrupt rows skipped (listed in its manifest)" if corrupt else ""


def run_training_job(config: Config, *, overwrite: bool = False,
                     say: Callable[[str], None] = console.say) -> JobResult:
    """Ingests, masks the deployment split, trains a teacher when IRM needs one, then trains."""
    if config.train.task == "mae":
        config.check_mae_patch_size()  # before hours of teacher training, not after
    original = ingest(config, overwrite=overwrite)
    say(f"dataset  {config.data.output}: {original.num_images('train')} training, {original.num_images('val')} "
        f"validation and {original.num_images('deploy')} deployment images, {original.report.get('corrupt', 0)} refused")
    masked = mask_dataset(config, overwrite=overwrite)
    say(f"masked   {config.masked_output()}: {masked.num_images()} faces, {masked.mask['keep']} of "
        f"{masked.mask['num_patches']} patches visible" + _skipped(masked))
    teacher, dataset = None, config.data.output
    if config.train.task == "mae" and config.loss.lambda_irm > 0:
        if not config.train.teacher:
            teacher = train(teacher_config(config))
            say(f"teacher  {teacher.weights} (accuracy {teacher.metrics.get('accuracy', float('nan')):.3f})")
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, teacher=teacher.weights))
        dataset = embedded_output(config.data.output, config.train.teacher, config.loss)
        embedded = embed_dataset(config, source=config.data.output, weights=config.train.teacher, output=dataset)
        say(f"embedded {dataset}: teacher embeddings of {embedded.num_images()} originals"
            + _skipped(embedded, before=original))
    result = train(config, dataset=dataset)
    corrupt = result.metrics.get("corrupt_skipped", 0)
    say(f"trained  {config.train.task} run {result.run_dir}: step {result.metrics.get('step')}, "
        f"loss {result.metrics.get('loss', float('nan')):.4f}"
        + (f", {corrupt} corrupt rows skipped (data.skip_corrupt)" if corrupt else ""))
    say(f"checkpoint {result.checkpoint}")
    say(f"weights  {result.weights}")
    return JobResult(dataset=original, masked=masked, teacher=teacher, result=result)
