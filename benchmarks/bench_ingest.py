"""Synthetic ingest end to end (generate, PNG-encode, write shards): one process vs Ray tasks.

Runs each mode ``--repeats`` times into fresh folders and prints median images/s and the ratio
Ray / single process, both measured in this run (the embedded cluster is started once, before timing).

    python benchmarks/bench_ingest.py [--identities 200] [--images 20] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from facemae.cluster import ensure_ray
from facemae.config import load_config
from facemae.data.ingest import ingest


def _time_ingest(overrides: list[str], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            config = load_config(None, [*overrides, f"data.output={out}/ds"])
            start = time.perf_counter()
            manifest = ingest(config)
            seconds.append(time.perf_counter() - start)
            assert manifest.num_images() == config.data.num_identities * config.data.images_per_identity
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = [f"data.num_identities={args.identities}", f"data.images_per_identity={args.images}",
            "data.rows_per_shard=500"]
    n = args.identities * args.images
    single = statistics.median(_time_ingest([*base, "data.workers=1"], args.repeats))
    ensure_ray(load_config().ray)
    on_ray = statistics.median(_time_ingest([*base, f"data.workers={args.workers}"], args.repeats))
    print(f"ingest, one process:      {n / single:8.1f} images/s (median of {args.repeats} x {n})")
    print(f"ingest, Ray x{args.workers} tasks:    {n / on_ray:8.1f} images/s")
    print(f"Ray / one process:        {single / on_ray:8.2f}")


if __name__ == "__main__":
    main()
