"""What the loop does when training goes wrong: non-finite losses, skipped steps, divergence.

Every rank sees the same verdict: the loop averages the loss over ranks before asking
(:func:`global_loss`), so all ranks skip, go on or stop together and no collective is left waiting.

- A non-finite loss stops the run (``train.nonfinite: stop``) or skips its micro-batch before
  backward and counts it (``skip``).
- An optimizer step DeepSpeed skipped by itself (gradient overflow: fp16 loss scaling, or ZeRO's
  overflow check in fp32) counts as non-finite too, and does not advance the step counter.
- ``train.max_nonfinite`` such events in a row stop the run, whatever the mode.
- A finite loss far above its running level (``train.diverge_factor`` times the level) stops the run:
  an fp32 run at a huge learning rate stays finite (loss 1e21) while its weights are already ruined.
- :meth:`StepGuard.check_state` is called before every checkpoint, on the weights about to be saved,
  so no checkpoint (and no export, which reads the last checkpoint) is written from a diverged state.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports the errors cheaply
    import torch

# Losses at initialisation set a floor under the running level: a well-fitted run whose loss is near 0
# must not call an ordinary spike a divergence. A tenth of the initial loss, times the factor, is still
# far above anything a healthy run returns to.
INITIAL_LOSSES = 5
INITIAL_FLOOR = 0.1
WINDOW = 50


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf (or steps kept being skipped); the message gives the step and what to change."""


class DivergedError(NonFiniteLossError):
    """The loss exploded far above its running level; the message gives the step, the loss and the level."""


_FIX = ("lower train.base_lr, raise train.warmup_steps, keep train.grad_clip on, or use precision fp32/bf16 "
        "instead of fp16")


class StepGuard:
    """Counts skipped micro-batches and keeps the running loss level of one run.

    Args:
        mode: ``stop`` or ``skip`` (see the module docstring).
        max_nonfinite: Non-finite losses or skipped steps in a row that stop the run.
        diverge_factor: A loss above this multiple of the running level stops the run; 0 turns it off.
    """

    def __init__(self, *, mode: str, max_nonfinite: int, diverge_factor: float) -> None:
        self.mode, self.max_nonfinite, self.diverge_factor = mode, max_nonfinite, diverge_factor
        self.skipped = 0  # micro-batches skipped for a non-finite loss, over the run
        self.overflows = 0  # optimizer steps DeepSpeed skipped, over the run
        self.in_a_row = 0
        self._initial: list[float] = []
        self._recent: deque[float] = deque(maxlen=WINDOW)

    def level(self) -> float | None:
        """The running loss level: median of recent accepted losses, floored by the initial loss."""
        if not self._initial:
            return None
        return max(statistics.median(self._recent), INITIAL_FLOOR * statistics.median(self._initial))

    def admit(self, loss: float, parts: dict[str, float], *, step: int) -> bool:
        """Decides on one micro-batch's loss (the mean over ranks) before backward.

        Returns:
            True to train on the micro-batch, False to skip it.

        Raises:
            NonFiniteLossError: A non-finite loss in ``stop`` mode, or too many in a row.
            DivergedError: A finite loss far above the running level.
        """
        if not math.isfinite(loss):
            if self.mode == "stop":
                raise NonFiniteLossError(f"loss is not finite at step {step + 1}: {parts}; {_FIX} "
                                         "(or set train.nonfinite=skip to skip such batches)")
            self.skipped += 1
            self._count_in_a_row(f"non-finite loss at step {step + 1} ({parts})")
            return False
        self._check_level(loss, step=step, what="loss")
        return True

    def accepted(self, loss: float) -> None:
        """An optimizer step was applied with this loss: it joins the running level."""
        self.in_a_row = 0
        if len(self._initial) < INITIAL_LOSSES:
            self._initial.append(loss)
        self._recent.append(loss)

    def overflowed(self, *, step: int) -> None:
        """DeepSpeed skipped the optimizer step (gradient overflow)."""
        self.overflows += 1
        self._count_in_a_row(f"gradient overflow, optimizer step {step + 1} skipped by DeepSpeed")

    def check_state(self, loss: float, *, step: int) -> None:
        """Refuses to checkpoint weights whose loss on the last batch is non-finite or exploded."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"the weights after step {step} give a non-finite loss ({loss}); no checkpoint "
                                     f"was written from them; {_FIX}")
        self._check_level(loss, step=step - 1, what="the loss of its weights (not checkpointed)")

    def state_dict(self) -> dict[str, Any]:
        """Counts and loss history, saved with each checkpoint so a resumed run keeps its level."""
        return {"skipped": self.skipped, "overflows": self.overflows, "in_a_row": self.in_a_row,
                "initial": list(self._initial), "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.overflows, self.in_a_row = state["skipped"], state["overflows"], state["in_a_row"]
        self._initial = [float(x) for x in state["initial"]]
        self._recent = deque((float(x) for x in state["recent"]), maxlen=WINDOW)

    def counters(self) -> dict[str, int]:
        """Cumulative counts for metrics.jsonl."""
        return {"nonfinite_skipped": self.skipped, "overflow_skipped": self.overflows}

    def _check_level(self, loss: float, *, step: int, what: str) -> None:
        level = self.level()
        if self.diverge_factor and level is not None and loss > self.diverge_factor * level:
            raise DivergedError(f"training diverged at step {step + 1}: {what} {loss:.4g} is over "
                                f"{self.diverge_factor:g}x its running level {level:.4g}; {_FIX} "
                                "(train.diverge_factor=0 turns this check off)")

    def _count_in_a_row(self, what: str) -> None:
        self.in_a_row += 1
        if self.in_a_row > self.max_nonfinite:
            raise NonFiniteLossError(f"{self.in_a_row} micro-batches in a row skipped, the last for {what}; "
                                     f"{_FIX} (train.max_nonfinite={self.max_nonfinite})")


def global_loss(loss: torch.Tensor, *, world_size: int) -> float:
    """The loss averaged over ranks (NaN or inf on any rank makes it non-finite); collective."""
    value = loss.detach().float().reshape(1).clone()  # (1,)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
        value /= world_size
    return float(value)


def probe_loss(engine: Any, batch: dict[str, torch.Tensor], *, world_size: int) -> float:
    """The loss of the engine's current weights on ``batch``, leaving no trace: RNG and buffers (BN
    running statistics) are restored, so a run with checkpoints trains exactly like one without."""
    import torch

    rng = torch.get_rng_state()
    buffers = {name: b.detach().clone() for name, b in engine.module.named_buffers()}
    try:
        with torch.no_grad():
            out = engine(batch)
        return global_loss(out["loss"], world_size=world_size)
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for name, b in engine.module.named_buffers():
                b.copy_(buffers[name])
