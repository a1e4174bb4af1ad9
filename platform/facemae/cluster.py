"""Connecting to Ray: an address when given, the job's cluster under `ray job submit`, else embedded."""

from __future__ import annotations

import os

from facemae.config import RayConfig


def ensure_ray(config: RayConfig) -> None:
    """Initialises Ray once per process.

    With no address, a driver started by ``ray job submit`` (``RAY_ADDRESS`` set) joins its cluster;
    anything else starts an embedded local cluster with ``address="local"``, which never attaches
    to another Ray instance running on the same machine (REFERENCE.md table, row G).
    """
    import ray

    if ray.is_initialized():
        return
    if config.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.address or None, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=config.num_cpus)
