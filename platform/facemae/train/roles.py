"""The FR runs FaceMAE depends on, derived from its config: the IRM teacher and the privacy judge."""

from __future__ import annotations

import dataclasses

from facemae.config import Config


def teacher_config(config: Config) -> Config:
    """The FR run that trains the IRM teacher on the training identities."""
    return dataclasses.replace(
        config, name=f"{config.name}-teacher",
        train=dataclasses.replace(config.train, task="fr", fr_backbone=config.model.teacher,
                                  max_steps=config.train.teacher_steps, base_lr=config.train.teacher_base_lr,
                                  teacher="", judge="", val_every=0, debug_state_dir=""))


def judge_config(config: Config) -> Config:
    """The FR run that trains the privacy judge: the teacher's recipe with its own seed and backbone,
    so that privacy is never judged by the network FaceMAE was trained against (DESIGN.md 1)."""
    return dataclasses.replace(
        config, name=f"{config.name}-judge",
        train=dataclasses.replace(config.train, task="fr", fr_backbone=config.model.judge,
                                  max_steps=config.experiment.judge_steps, base_lr=config.train.teacher_base_lr,
                                  seed=config.train.seed + 1000, teacher="", judge="", val_every=0,
                                  debug_state_dir=""))
