"""Connecting to Ray: an address when given, the job's cluster under `ray job submit`, else embedded."""

from __future__ import annotations

import os

from facemae.config import RayConfig


# Read by processes the embedded cluster starts (they inherit the driver's environment).
EMBEDDED_ENV = {
    # Train V2's controller polls workers every 2 s, so each ray.train.report blocked ~1.6 s
    # (REFERENCE.md table, row D).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def ensure_ray(config: RayConfig) -> None:
    """Initialises Ray once per process.

    With no address, a driver started by ``ray job submit`` (``RAY_ADDRESS`` set) joins its cluster;
    anything else starts an embedded local cluster with ``address="local"``, which never attaches
    to another Ray instance running on the same machine (REFERENCE.md table, row G).
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in EMBEDDED_ENV.items():
        os.environ.setdefault(key, value)
    if config.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.address or None, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=config.num_cpus)
