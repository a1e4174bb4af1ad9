"""Connecting to Ray: an address when given, the job's cluster under `ray job submit`, else embedded."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from facemae.config import RayConfig


# Set in the driver before Ray starts: Ray Train passes its RAY_TRAIN_* variables on to the controller and
# the workers, and an embedded cluster's processes inherit the driver's environment.
TRAIN_ENV = {
    # Train V2's controller polls workers every 2 s, so each ray.train.report blocked ~1.6 s
    # (REFERENCE.md table, row D).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
EMBEDDED_ENV = {
    **TRAIN_ENV,
    # The watcher is one more actor process per training run (about 3 CPU-s to start on this 2-core machine)
    # that polls for nodes being drained, as an autoscaler drains spot nodes; a local cluster has no other
    # node and nothing that drains it. A cluster the job joins keeps Ray's default.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
_embedded = False  # this process started its own local cluster (and stops it: shutdown_embedded)


def ensure_ray(config: RayConfig) -> None:
    """Initialises Ray once per process.

    With no address, a driver started by ``ray job submit`` (``RAY_ADDRESS`` set) joins its cluster;
    anything else starts an embedded local cluster with ``address="local"``, which never attaches
    to another Ray instance running on the same machine (REFERENCE.md table, row G).
    """
    import ray

    global _embedded
    if ray.is_initialized():
        return
    joins = bool(config.address or os.environ.get("RAY_ADDRESS"))
    for key, value in (TRAIN_ENV if joins else EMBEDDED_ENV).items():
        os.environ.setdefault(key, value)
    if joins:
        ray.init(address=config.address or None, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=config.num_cpus, object_store_memory=config.object_store_bytes())
        _embedded = True


def shutdown_embedded() -> None:
    """Stops the local cluster :func:`ensure_ray` started in this process, if any; a cluster the process
    joined (an address, ``ray job submit``, a test session's) is left running."""
    global _embedded
    if not _embedded:
        return
    import ray

    _embedded = False
    if ray.is_initialized():
        ray.shutdown()


def input_error(exc: BaseException) -> BaseException | None:
    """The error a Ray failure carries that says what the user must fix, or None: a corrupt record
    (:class:`~facemae.data.images.CorruptImageError`), a bad dataset (:class:`~facemae.data.shards.DatasetError`),
    a checkpoint that could run code (:class:`~facemae.train.engine.UntrustedCheckpointError`) or a run
    that diverged (:class:`~facemae.train.guard.NonFiniteLossError`): any exception class of this package.

    Ray wraps what a task raised in a ``RayTaskError`` that keeps it as ``.cause`` (and also subclasses
    its type, while its ``str`` is the remote traceback); Ray Train V2 raises ``TrainingFailedError``
    with each rank's error in ``worker_failures``. (A Ray Data map task's error loses its cause on the way:
    the platform's Ray Data functions mark bad rows instead of raising, see
    :func:`facemae.data.images.corrupt_records`.)
    """
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):  # a wrapper, whatever types it also claims to be
            stack.append(cause)
        elif type(current).__module__.startswith("facemae."):  # ours: raised on purpose, its message says the fix
            return current
        else:
            stack.extend([current.__cause__, *dict(getattr(current, "worker_failures", None) or {}).values()])
    return None


@contextlib.contextmanager
def input_errors_unwrapped() -> Iterator[None]:
    """Re-raises a user-input error that reaches the driver inside Ray's wrappers as itself, so that
    callers (the CLI prints it as one line) see the message naming what to fix, not a remote traceback."""
    try:
        yield
    except Exception as exc:
        found = input_error(exc)
        if found is None or found is exc:
            raise
        raise found from None
