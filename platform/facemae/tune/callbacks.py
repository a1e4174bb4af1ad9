"""Tune callbacks: the sweep's progress bar, and Tune's side of a sweep's tracking (``tracking.*``): what a
trial's own training cannot do itself.

Each trial is a training run and tracks itself like any other (:mod:`facemae.tracking`): one MLflow run
nested under the sweep's, params the trial's whole config, every report at its step. Tune's own
``MLflowLoggerCallback`` is not used for that: it starts a second run per trial on every
``Tuner.restore``, logs only the sampled values, and counts steps in Tune iterations.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.logger import LoggerCallback, TBXLoggerCallback
from tqdm import tqdm

from facemae import console
from facemae.config import Config
from facemae.tracking import end_if_running


class TrialBar(Callback):
    """The sweep's one progress bar on the console: a trial counts when it ends (finished, stopped by the
    scheduler, or failed). Tune's own status table goes to the job's log."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._bar: Any = None  # made in setup: Tune pickles its callbacks with the experiment

    def setup(self, **info: Any) -> None:
        self._bar = tqdm(total=self._total, desc="sweep", unit="trial", file=console.bar_stream())

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._advance()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._advance()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __getstate__(self) -> dict[str, Any]:
        return {"_total": self._total, "_bar": None}


class EndTrialRuns(LoggerCallback):
    """Ends the MLflow run of a trial that Tune stopped (ASHA) or that failed: its process ends with it,
    before the trial's training could end its run. Trials that finished ended theirs and are left alone."""

    def __init__(self, base: Config) -> None:
        self._base = base

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        folder = self._base.train.run_dir_for(f"{self._base.name}-sweep-{trial.trial_id}")
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
