"""Throughput of the synthetic face generator, single process, arrays only (no encoding).

Times 2,000 images three times and reports the median images/s, next to a baseline that only draws
uniform noise images of the same shape in the same run, so the ratio is comparable across machines.

    python benchmarks/bench_synthetic.py [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from facemae.data.synthetic import generate_identity

_IMAGES_PER_IDENTITY = 20


def _faces(images: int) -> None:
    for identity, first in enumerate(range(0, images, _IMAGES_PER_IDENTITY)):
        generate_identity(identity, images=min(_IMAGES_PER_IDENTITY, images - first), seed=0)


def _noise(images: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(images):
        rng.integers(0, 256, (112, 112, 3))


def _median_rate(make: Callable[[int], None], *, images: int, repeats: int) -> float:
    """Median images/s over ``repeats`` timed runs of ``make(images)``."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        make(images)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    faces = _median_rate(_faces, images=args.images, repeats=args.repeats)
    noise = _median_rate(_noise, images=args.images, repeats=args.repeats)
    print(f"synthetic faces: {faces:8.1f} images/s (median of {args.repeats} x {args.images})")
    print(f"noise baseline:  {noise:8.1f} images/s")
    print(f"faces / noise:   {faces / noise:8.3f}")
    print(f"10,000 faces would take {10_000 / faces:.1f} s on one core")


if __name__ == "__main__":
    main()
