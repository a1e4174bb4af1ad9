"""Face alignment at ingest, per core: aligned faces per second of one process on one thread.

Times what a work unit does per photo (decode, EXIF, MTCNN, Umeyama + warp, PNG encode) on
scikit-image's astronaut portrait at several photo sizes, after loading the detector once (as a unit
does). One thread per process is what a Ray task gets (OMP_NUM_THREADS=1), so a cluster aligns about
this rate times its cores. The detector's share and the alignment's (similarity + warp) are shown apart.

    python benchmarks/align.py [--photos 40] [--sizes 512 1024 2048]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from facemae.data.align import FaceAligner, norm_crop


def _jpeg(photo: np.ndarray, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).resize((side, side), Image.BILINEAR).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=40, help="photos timed per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="photo sides in pixels")
    args = parser.parse_args()
    try:
        from skimage.data import astronaut
    except ImportError:
        raise SystemExit("benchmarks/align.py needs scikit-image for its test photo: pip install scikit-image")
    torch.set_num_threads(1)  # one core, as one Ray task
    start = time.perf_counter()
    aligner = FaceAligner(min_score=0.9, min_face=40, multiple="largest")
    print(f"detector load: {time.perf_counter() - start:.2f} s (once per work unit)")
    photo = astronaut()
    for side in args.sizes:
        data = _jpeg(photo, side)
        aligner.prepare(data, where="warm-up", convert_rgb=False)
        start = time.perf_counter()
        for _ in range(args.photos):
            aligned = aligner.prepare(data, where="bench", convert_rgb=False)[1]
        per_photo = (time.perf_counter() - start) / args.photos
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        start = time.perf_counter()
        for _ in range(args.photos):
            norm_crop(pixels, aligned.face.landmarks)
        warp = (time.perf_counter() - start) / args.photos
        print(f"{side:5d} px photos: {1 / per_photo:7.1f} aligned faces/s/core "
              f"({per_photo * 1e3:6.1f} ms each, of which similarity + warp {warp * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
