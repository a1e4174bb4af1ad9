"""Tune's side of a sweep's tracking (``tracking.*``): what a trial's own training cannot do itself.

Each trial is a training run and tracks itself like any other (:mod:`facemae.tracking`): one MLflow run
nested under the sweep's, params the trial's whole config, every report at its step. Tune's own
``MLflowLoggerCallback`` is not used for that: it starts a second run per trial on every
``Tuner.restore``, logs only the sampled values, and counts steps in Tune iterations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback, TBXLoggerCallback

from facemae.config import Config
from facemae.tracking import end_if_running


class EndTrialRuns(LoggerCallback):
    """Ends the MLflow run of a trial that Tune stopped (ASHA) or that failed: its process ends with it,
    before the trial's training could end its run. Trials that finished ended theirs and are left alone."""

    def __init__(self, base: Config) -> None:
        self._base = base

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        folder = Path(self._base.train.run_dir_for(f"{self._base.name}-sweep-{trial.trial_id}"))
        end_if_running(folder, uri=self._base.tracking.mlflow_uri, status="FAILED" if failed else "FINISHED",
                       tags={"facemae.tune_status": "ERROR" if failed else "STOPPED"})


def tracking_callbacks(base: Config) -> list[Any]:
    """The Tune callbacks ``tracking.*`` asks for: :class:`EndTrialRuns` with MLflow, and Tune's
    ``TBXLoggerCallback`` (each trial's results as TensorBoard events in its Tune folder) with
    ``tracking.tensorboard``."""
    callbacks: list[Any] = []
    if base.tracking.mlflow_uri:
        callbacks.append(EndTrialRuns(base))
    if base.tracking.tensorboard:
        callbacks.append(TBXLoggerCallback())
    return callbacks
