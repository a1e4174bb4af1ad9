"""Ray Tune sweeps over FaceMAE training (one trial = one Ray Train run with its own DeepSpeed workers)."""

from facemae.tune.sweep import SweepResult, run_sweep

__all__ = ["SweepResult", "run_sweep"]
