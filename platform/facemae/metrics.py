"""Training metrics: Prometheus over HTTP from one process per run, and Ray's own metrics from every worker.

``prometheus_client.start_http_server`` in every Ray worker process would collide on a node, so only
rank 0 serves the run's endpoint (``train.metrics_port``, on ``train.metrics_host``, localhost by
default); every rank also records into ``ray.util.metrics`` when it runs inside Ray, which the
dashboard agent exports with a ``ray_`` prefix (REFERENCE.md section 6).
"""

from __future__ import annotations

import logging
import resource
import sys
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB: Linux's ``VmHWM``. ``ru_maxrss`` would do elsewhere,
    but on Linux it keeps the peak of the process that exec'ed this one (a job script's child reads
    at least what its parent held when it forked)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)


class TrainMetrics:
    """Per-step counters, gauges and histograms of one worker.

    Args:
        run: Run name (a label; kept low-cardinality: no per-sample tags).
        rank: World rank.
        world_size: Workers in the run, to turn this worker's rate into the run's.
        port: Serve Prometheus on this port from this process; ``None`` serves nothing.
        host: Address to bind the endpoint to.
        in_ray: Also record into ``ray.util.metrics``.
    """

    def __init__(self, *, run: str, rank: int, world_size: int, port: int | None, host: str = "127.0.0.1",
                 in_ray: bool = False) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = {"run": run}
        self._steps = Counter("facemae_train_steps", "Optimizer steps done", ["run"], registry=self.registry)
        # Run totals over all ranks: this rank's own count live, the others' added at each
        # :meth:`record_run_totals` (the loop's log steps), so rank 0's endpoint serves the run's numbers.
        self._images = Counter("facemae_train_images", "Images trained on by this run (all ranks)", ["run"],
                               registry=self.registry)
        self._corrupt = Counter("facemae_train_corrupt_skipped",
                                "Distinct corrupt rows this run skipped (data.skip_corrupt), all ranks", ["run"],
                                registry=self.registry)
        self._corrupt.labels(**labels)  # exported as 0 from the start, not only once a row was skipped
        self._step_gauge = Gauge("facemae_train_step", "Current optimizer step", ["run"], registry=self.registry)
        self._loss = Gauge("facemae_train_loss", "Last loss, by component", ["run", "component"],
                           registry=self.registry)
        self._rate = Gauge("facemae_train_images_per_second", "Run throughput (last 20 batches)", ["run"],
                           registry=self.registry)
        self._step_time = Histogram("facemae_train_step_seconds", "Compute time per batch", ["run"],
                                    buckets=STEP_BUCKETS, registry=self.registry)
        self._wait_time = Histogram("facemae_train_data_wait_seconds", "Time waiting for a batch", ["run"],
                                    buckets=STEP_BUCKETS, registry=self.registry)
        self._labels = labels
        self._world = world_size
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=20)
        self._totals = [0.0, 0.0]  # seconds of compute and of data wait since this process started
        self._last_step = 0
        self._server: Any = None
        self.port = self._serve(port, host) if port is not None else None
        self._ray = _RayMetrics(run=run, rank=rank) if in_ray else None

    def _serve(self, port: int, host: str) -> int | None:
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # a busy port must not kill a training run
            log.warning("Prometheus endpoint not started on %s:%s (%s); set train.metrics_port to a free port",
                        host, port, exc)
            return None
        self._server = server
        return server.server_port

    def close(self) -> None:
        """Stops this run's endpoint and frees its port: several runs trained one after another in one process
        (``train.num_workers: 0``, an experiment's stages) each serve their own numbers on the same port, where
        the first run's server would otherwise keep the port and its stale numbers for the process's life."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, *, images: int, step: int, step_s: float, wait_s: float, losses: dict[str, float]) -> None:
        """Records one micro-batch."""
        self._images.labels(**self._labels).inc(images)
        self._step_time.labels(**self._labels).observe(step_s)
        self._wait_time.labels(**self._labels).observe(wait_s)
        if step > self._last_step:
            self._steps.labels(**self._labels).inc(step - self._last_step)
            self._last_step = step
        self._step_gauge.labels(**self._labels).set(step)
        for name, value in losses.items():
            self._loss.labels(component=name, **self._labels).set(value)
        self._recent.append((images, step_s, wait_s))
        self._totals[0] += step_s
        self._totals[1] += wait_s
        rate = self.images_per_second()
        self._rate.labels(**self._labels).set(rate)
        if self._ray is not None:
            self._ray.observe(images=images, step=step, step_s=step_s, wait_s=wait_s, rate=rate)

    def record_run_totals(self, *, images: int, corrupt: int) -> None:
        """Raises the run-total counters to what all ranks together have done (counters only go up).

        Args:
            images: Images trained on by every rank so far.
            corrupt: Distinct corrupt rows skipped by any rank so far.
        """
        for counter, total, now in zip((self._images, self._corrupt), (images, corrupt), self.run_totals()):
            if total > now:
                counter.labels(**self._labels).inc(total - now)

    def run_totals(self) -> tuple[int, int]:
        """``(images trained, distinct corrupt rows skipped)`` as the run-total counters read now."""
        return tuple(int(self.registry.get_sample_value(f"{name}_total", self._labels) or 0)
                     for name in ("facemae_train_images", "facemae_train_corrupt_skipped"))

    def images_per_second(self) -> float:
        """Run throughput over the last batches: this worker's rate times the world size."""
        seconds = sum(s + w for _, s, w in self._recent)
        return self._world * sum(i for i, _, _ in self._recent) / seconds if seconds > 0 else 0.0

    def median_step_seconds(self) -> float:
        """Median compute time of the last batches (data wait excluded)."""
        times = sorted(s for _, s, _ in self._recent)
        return times[len(times) // 2] if times else 0.0

    def data_wait_fraction(self) -> float:
        """Share of the last batches' wall time spent waiting for data."""
        total = sum(s + w for _, s, w in self._recent)
        return sum(w for _, _, w in self._recent) / total if total > 0 else 0.0

    def seconds_totals(self) -> tuple[float, float]:
        """``(compute, data wait)`` seconds of every batch this process trained on: the whole attempt's
        data-wait fraction, epoch starts included, is ``wait / (compute + wait)``."""
        return self._totals[0], self._totals[1]


class _RayMetrics:
    """The same signals in Ray's metrics system, tagged by rank."""

    def __init__(self, *, run: str, rank: int) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"run": run, "rank": str(rank)}
        self._images = Counter("facemae_train_images", "Images trained on", tag_keys=("run", "rank"))
        self._step = Gauge("facemae_train_step", "Current optimizer step", tag_keys=("run", "rank"))
        self._rate = Gauge("facemae_train_images_per_second", "Run throughput", tag_keys=("run", "rank"))
        self._step_time = Histogram("facemae_train_step_seconds", "Compute time per batch",
                                    boundaries=list(STEP_BUCKETS), tag_keys=("run", "rank"))
        self._wait = Histogram("facemae_train_data_wait_seconds", "Time waiting for a batch",
                               boundaries=list(STEP_BUCKETS), tag_keys=("run", "rank"))
        for metric in (self._images, self._step, self._rate, self._step_time, self._wait):
            metric.set_default_tags(tags)

    def observe(self, *, images: int, step: int, step_s: float, wait_s: float, rate: float) -> None:
        self._images.inc(images)
        self._step.set(step)
        self._rate.set(rate)
        self._step_time.observe(step_s)
        self._wait.observe(wait_s)
