"""The release's PNG encoder against Pillow's and OpenCV's, per face and end to end.

Issue 32 keeps the hand-written encoder (:func:`facemae.data.images.encode_png`: numpy ``Up`` filter on
every row, zlib level 1) only if no library matches its speed where it matters: inside a generation
actor, which turns a batch of masked records into released PNGs. This script times, on one thread and in
turns (each round runs every encoder once, the figure is the median of the rounds):

- the encoder alone on released-like faces (the synthetic photo faces: the image statistics of aligned
  crops), with the bytes per face and a lossless round trip checked for each;
- the actor's whole call (``Reconstructor.__call__``: records in, FaceMAE at ``jobs/configs/train.yaml``'s
  model, encode, rows out) with the encoder swapped in, on the same masked records.

    python benchmarks/png.py [--faces 256] [--repeats 5]

Writes ``benchmarks/results/png.{json,md}``. OpenCV is optional (``pip install opencv-python-headless``);
without it its rows are left out and the report says so.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

import facemae.generate.release as release
from facemae.config import load_config
from facemae.data.images import decode_rgb, encode_png
from facemae.data.masking import mask_face
from facemae.data.synthetic import generate_image
from facemae.models.registry import build_mae
from facemae.models.weights import save_weights
from provenance import RESULTS, provenance

ROOT = Path(__file__).resolve().parents[1]


def _pillow(level: int) -> Callable[[np.ndarray], bytes]:
    def encode(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    return encode


def _opencv(level: int) -> Callable[[np.ndarray], bytes] | None:
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)

    def encode(pixels: np.ndarray) -> bytes:
        ok, out = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level])
        assert ok
        return out.tobytes()
    return encode


def in_turns(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls run in turn in every round (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=256, help="faces encoded per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one generation actor's thread
    encoders = {"ours (Up filter, zlib 1)": encode_png, "Pillow compress_level=1": _pillow(1),
                "Pillow default (6)": _pillow(6), "OpenCV compression 1": _opencv(1),
                "OpenCV default (3)": _opencv(3)}
    missing = [name for name, enc in encoders.items() if enc is None]
    encoders = {name: enc for name, enc in encoders.items() if enc is not None}
    faces = [generate_image(i // 4, i % 4, seed=0) for i in range(args.faces)]
    for name, enc in encoders.items():  # every encoder is lossless, or it is not a candidate
        assert all(np.array_equal(decode_rgb(enc(f)), f) for f in faces[:16]), name
    sizes = {name: statistics.fmean(len(enc(f)) for f in faces) for name, enc in encoders.items()}
    alone = in_turns({name: (lambda enc=enc: [enc(f) for f in faces]) for name, enc in encoders.items()},
                     args.repeats)

    config = load_config(ROOT / "jobs" / "configs" / "train.yaml", [])
    model_dir = Path("/tmp/facemae-png-bench")
    weights = save_weights(build_mae(config.model.mae), model_dir, {
        "task": "mae", "model": config.model.mae, "norm_pix_loss": False, "run": "benchmark"})
    patch = config.mask.patch_size
    keep = round((112 // patch) ** 2 * (1 - config.mask.ratio))
    records = [mask_face(f, image_id=str(i), patch_size=patch, keep=keep, seed=0) for i, f in enumerate(faces)]
    batch = {"image_id": np.array([str(i) for i in range(len(faces))], dtype=object),
             "source_id": np.array([str(i) for i in range(len(faces))], dtype=object),
             "identity": np.arange(len(faces)), "path": np.array(["-"] * len(faces), dtype=object),
             "visible": np.array([v for v, _ in records], dtype=object),
             "mask": np.array([m for _, m in records], dtype=object)}
    actor = release.Reconstructor(str(weights), method="reconstruct", patch_size=patch, paste_visible=True,
                                  batch_size=config.generate.batch_size)

    def actor_call(enc: Callable[[np.ndarray], bytes]) -> Callable[[], Any]:
        def call() -> Any:
            release.encode_png = enc
            try:
                return actor(batch)
            finally:
                release.encode_png = encode_png
        return call

    whole = in_turns({name: actor_call(enc) for name, enc in encoders.items()}, args.repeats)
    ours = "ours (Up filter, zlib 1)"
    rows = [{"encoder": name, "encode_ms_per_face": alone[name] / len(faces) * 1e3,
             "encode_ratio_to_ours": alone[name] / alone[ours], "bytes_per_face": sizes[name],
             "size_ratio_to_ours": sizes[name] / sizes[ours],
             "actor_ms_per_face": whole[name] / len(faces) * 1e3, "actor_ratio_to_ours": whole[name] / whole[ours]}
            for name in encoders]
    fastest = min((r for r in rows if r["encoder"] != ours), key=lambda r: r["actor_ratio_to_ours"])
    keep_ours = fastest["actor_ratio_to_ours"] > 1.0
    verdict = (f"keep ours: the fastest library, {fastest['encoder']}, takes {fastest['actor_ratio_to_ours']:.2f}x "
               f"ours per face end to end ({fastest['encode_ratio_to_ours']:.2f}x for the encoding alone)"
               if keep_ours else
               f"replace ours: {fastest['encoder']} matches it end to end ({fastest['actor_ratio_to_ours']:.2f}x)")
    out = {**provenance(), "faces": len(faces), "repeats": args.repeats, "model": config.model.mae,
           "not_installed": missing, "rows": rows, "verdict": verdict}
    (RESULTS / "png.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# PNG encoding of released faces: ours vs Pillow and OpenCV", "",
             f"{out['date']} · {out['machine']} · commit {out['commit']} · `{out['command']}`", "",
             f"{len(faces)} synthetic photo faces (112x112), one thread, medians of {args.repeats} rounds run in "
             f"turns. \"Actor\" is a generation actor's whole call on their masked records ({config.model.mae}, "
             f"mask ratio {config.mask.ratio}, the encoder swapped in; its weights untrained: the time does not depend on "
             f"them, but its predicted patches are noisier than a trained model's, which costs every encoder more). "
             f"Every encoder is checked lossless.", "",
             "| encoder | encode ms/face | vs ours | bytes/face | vs ours | actor ms/face | vs ours |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['encode_ms_per_face']:.3f} | {r['encode_ratio_to_ours']:.2f}x | "
              f"{r['bytes_per_face']:.0f} | {r['size_ratio_to_ours']:.3f}x | {r['actor_ms_per_face']:.2f} | "
              f"{r['actor_ratio_to_ours']:.2f}x |" for r in rows]
    lines += ["", f"Verdict: {verdict}."]
    if missing:
        lines += ["", f"Not installed, not measured: {', '.join(missing)}."]
    (RESULTS / "png.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
