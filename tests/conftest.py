"""Shared fixtures: one real local Ray cluster per test session, small image helpers."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real embedded Ray cluster shared by the session's Ray tests.

    ``address="local"`` never attaches to another Ray on the machine, and its own temp dir keeps
    it apart from any `ray start` a test or a user runs (REFERENCE.md table, row G). Four logical
    CPUs on two cores leave room for Ray Data tasks beside two task slots (row A).
    """
    import ray

    from facemae.cluster import EMBEDDED_ENV

    os.environ.update(EMBEDDED_ENV)
    temp_dir = tempfile.mkdtemp(prefix="facemae-ray-")
    ray.init(address="local", num_cpus=4, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def noise_face(seed: int, size: int = 112) -> np.ndarray:
    """Random pixels: every 24-byte pixel row is unique, so a leaked row can be found byte for byte."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_folder(root: Path, identities: int, images: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes ``<root>/<identity>/<image>.png`` noise faces; returns ``{image_id: pixels}``."""
    out = {}
    for i in range(identities):
        (root / f"person_{i:02d}").mkdir(parents=True)
        for k in range(images):
            pixels = noise_face(seed * 100_000 + i * 1000 + k)
            (root / f"person_{i:02d}" / f"{k:03d}.png").write_bytes(png_bytes(pixels))
            out[f"person_{i:02d}/{k:03d}.png"] = pixels
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on this 2-core box, shared with other work, two OpenMP threads that wait on
    each other made a 2 s training loop take 50 s; one thread stays within about 2x of its best."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # tests talk only to clusters they start (REFERENCE row F)
