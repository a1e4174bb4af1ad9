"""Face detection and ArcFace alignment at ingest: the similarity, the warp, a real photo, refusals, Ray."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import noise_face, png_bytes
from facemae.config import load_config
from facemae.data.align import (ARCFACE_DST, Face, FaceAligner, FaceNotAlignedError, choose_face, estimate_norm,
                                umeyama, warp_affine)
from facemae.data.images import CorruptImageError, decode_rgb
from facemae.data.ingest import ingest
from facemae.data.shards import DatasetError, iter_rows, read_manifest

pytest.importorskip("facenet_pytorch", reason="the align extra: pip install --no-deps facenet-pytorch==2.5.3")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image, for its test photo (astronaut)")
from skimage.transform import SimilarityTransform, warp  # noqa: E402

LANDMARK_TOLERANCE_PX = 4.0  # MTCNN's own landmark jitter on one face across scales is 1-3 px in a 112 crop


def _similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _skimage_estimate(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        return SimilarityTransform.from_estimate(src, dst).params
    tform = SimilarityTransform()
    assert tform.estimate(src, dst)
    return tform.params


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner(min_score=0.9, min_face=40, multiple="largest")


@pytest.fixture(scope="module")
def redetector() -> FaceAligner:
    """MTCNN for re-detecting landmarks on 112x112 crops (the face there is about 80 px)."""
    return FaceAligner(min_score=0.9, min_face=20, multiple="largest")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # [512, 512, 3] uint8, one face


def test_a_known_similarity_is_recovered_to_float_precision():
    dst = ARCFACE_DST.astype(np.float64)
    known = _similarity(0.4, 2.7, (130.0, -42.5))  # template -> photo
    photo_points = _apply(known, dst)
    matrix = estimate_norm(photo_points)  # photo -> template
    np.testing.assert_allclose(np.vstack([matrix, [0, 0, 1]]) @ known, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(_apply(np.vstack([matrix, [0, 0, 1]]), photo_points), dst, atol=1e-10)


def test_umeyama_equals_an_independent_least_squares_solve_and_scikit_image():
    rng = np.random.default_rng(3)
    dst = ARCFACE_DST.astype(np.float64)
    src = _apply(_similarity(-0.3, 0.8, (20.0, 35.0)), dst) + rng.normal(0, 3.0, dst.shape)  # real landmarks miss
    # x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty), so plain least squares.
    rows = np.concatenate([np.stack([src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)], axis=1),
                           np.stack([src[:, 1], src[:, 0], np.zeros(5), np.ones(5)], axis=1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    expected = np.array([[a, -b, tx], [b, a, ty], [0, 0, 1]])
    np.testing.assert_allclose(umeyama(src, dst), expected, atol=1e-9)
    np.testing.assert_allclose(umeyama(src, dst), _skimage_estimate(src, dst), atol=1e-12)
    with pytest.raises(ValueError, match="coincide"):
        umeyama(np.ones((5, 2)), dst)


def _plain_bilinear(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """One output pixel at a time: invert the map, read four neighbours (black outside), blend."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    h, w = image.shape[:2]
    out = np.zeros((size, size, image.shape[2]), np.uint8)
    for y in range(size):
        for x in range(size):
            sx, sy, _ = inverse @ (x, y, 1.0)
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            acc = np.zeros(image.shape[2])
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        acc += wy * wx * image[yy, xx]
            out[y, x] = np.clip(np.round(acc), 0, 255)
    return out


def test_the_warp_equals_a_plain_bilinear_sampler_within_one_grey_level():
    image = noise_face(11, size=150)[:, :130]  # [150, 130, 3]
    # Rotated, shrunk and shifted so that part of the output falls outside the image (black border).
    matrix = _similarity(0.5, 0.9, (40.0, -30.0))[:2]
    ours = warp_affine(image, matrix, size=112)
    theirs = _plain_bilinear(image, matrix, 112)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert (ours == 0).all(axis=2).mean() > 0.05, "the test must cover the black border"


def test_the_astronaut_is_found_and_aligned_as_insightface_does(aligner, astronaut):
    result = aligner.align(astronaut, where="astronaut")
    assert result.faces == 1 and result.face.score > 0.99
    # The InsightFace way on the same landmarks: skimage's SimilarityTransform, then a warp of its own.
    params = _skimage_estimate(result.face.landmarks, ARCFACE_DST.astype(np.float64))
    reference = warp(astronaut, SimilarityTransform(params).inverse, output_shape=(112, 112), order=1,
                     mode="constant", cval=0, preserve_range=True)
    assert np.abs(result.pixels.astype(int) - np.rint(reference).astype(int)).max() <= 1


def _variants(photo: np.ndarray) -> dict[str, np.ndarray]:
    img = Image.fromarray(photo)
    canvas = np.zeros((700, 640, 3), np.uint8)
    canvas[150:662, 100:612] = photo
    return {"rotated -20": np.asarray(img.rotate(-20, resample=Image.BILINEAR, expand=True)),
            "rotated +20": np.asarray(img.rotate(20, resample=Image.BILINEAR, expand=True)),
            "scaled 0.6": np.asarray(img.resize((307, 307), Image.BILINEAR)),
            "scaled 1.5": np.asarray(img.resize((768, 768), Image.BILINEAR)),
            "shifted": canvas}


def test_rotated_scaled_and_shifted_copies_align_to_the_same_crop(aligner, redetector, astronaut):
    def crop_landmarks(photo: np.ndarray) -> np.ndarray:
        faces = redetector.detect(aligner.align(photo, where="copy").pixels)
        assert len(faces) == 1
        return faces[0].landmarks  # [5, 2] in crop pixels

    base = crop_landmarks(astronaut)
    for name, photo in _variants(astronaut).items():
        error = np.abs(crop_landmarks(photo) - base).max()
        assert error <= LANDMARK_TOLERANCE_PX, f"{name}: landmarks moved {error:.2f} px in the crop"


def test_exif_orientation_is_honoured(aligner, astronaut):
    upright, turned = io.BytesIO(), io.BytesIO()
    Image.fromarray(astronaut).save(upright, format="JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are turned; rotate 90 degrees clockwise to view
    Image.fromarray(astronaut).transpose(Image.ROTATE_90).save(turned, format="JPEG", quality=95, exif=exif)
    a = decode_rgb(aligner.prepare(upright.getvalue(), where="upright", convert_rgb=False)[0])
    b = decode_rgb(aligner.prepare(turned.getvalue(), where="turned", convert_rgb=False)[0])
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 6


def test_no_face_a_low_score_and_a_small_face_are_refused_saying_why(aligner, astronaut):
    for name, photo in (("noise", noise_face(5, size=240)), ("blank", np.full((200, 200, 3), 40, np.uint8))):
        with pytest.raises(FaceNotAlignedError, match=f"{name}: no face of at least 40 px found;.*--skip-corrupt") as e:
            aligner.align(photo, where=name)
        assert e.value.kind == "no_face"
    with pytest.raises(FaceNotAlignedError, match=r"no face scores 1.0 or more \(best 0.99") as e:
        FaceAligner(min_score=1.0, min_face=40, multiple="largest").align(astronaut, where="astronaut")
    assert e.value.kind == "low_score"
    with pytest.raises(FaceNotAlignedError, match=r"face too small \(\d+ px < data.align_min_face=100\)") as e:
        FaceAligner(min_score=0.9, min_face=100, multiple="largest").align(astronaut, where="astronaut")
    assert e.value.kind == "too_small"
    back = pickle.loads(pickle.dumps(e.value))  # how a Ray task ships it to the driver
    assert (back.kind, back.where, str(back)) == ("too_small", "astronaut", str(e.value))


def test_of_several_faces_the_policy_picks_the_largest_or_the_centre_one(aligner, astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((300, 300), Image.BILINEAR))
    two = np.zeros((560, 1000, 3), np.uint8)  # the big face left of centre, the small one nearer it
    two[:512, :512], two[130:430, 560:860] = astronaut, small
    largest = aligner.align(two, where="two")
    center = FaceAligner(min_score=0.9, min_face=40, multiple="center").align(two, where="two")
    assert largest.faces == center.faces == 2
    assert largest.face.box[0] < 500 < center.face.box[0]
    boxes = [Face(np.array(b, float), 0.99, np.zeros((5, 2))) for b in ([0, 0, 50, 50], [40, 40, 70, 70])]
    assert choose_face(boxes, policy="largest", width=100, height=100) is boxes[0]
    assert choose_face(boxes, policy="center", width=100, height=100) is boxes[1]


@pytest.mark.parametrize("override, message", [
    ("data.align=dlib", r"data.align='dlib' is not one of \('auto', 'none', 'mtcnn'\)"),
    ("data.align_multiple=first", r"data.align_multiple='first' is not one of"),
    ("data.align_min_score=0", r"data.align_min_score=0.0 must be in \(0, 1\]"),
    ("data.align_min_face=5", r"data.align_min_face=5 must be >= 12 pixels"),
])
def test_bad_align_settings_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.source=folder", "data.path=x", override])


def test_align_needs_a_folder_and_is_not_combined_with_resize():
    with pytest.raises(ValueError, match="data.align=mtcnn reads photos from an image folder, not data.source="):
        load_config(None, ["data.align=mtcnn"])
    with pytest.raises(ValueError, match="drop --resize to align faces, or --align to center-crop"):
        load_config(None, ["data.source=folder", "data.path=x", "data.align=mtcnn", "data.resize=true"])


def test_auto_aligns_a_folder_read_without_resize_and_nothing_else():
    def aligner(*overrides: str) -> str:
        return load_config(None, list(overrides)).data.aligner

    assert load_config(None, []).data.align == "auto"
    assert aligner("data.source=folder", "data.path=x") == "mtcnn"
    assert aligner("data.source=folder", "data.path=x", "data.resize=true") == "none"  # center-crop asked for
    assert aligner("data.source=recordio", "data.path=x.rec") == "none"  # a pack's faces are aligned already
    assert aligner() == "none"  # synthetic
    assert aligner("data.source=folder", "data.path=x", "data.align=none") == "none"


def test_by_default_a_folder_of_photos_is_aligned_and_its_crops_never_load_the_detector(tmp_path, monkeypatch,
                                                                                         astronaut):
    import facemae.data.align as align_mod

    crops = tmp_path / "crops"
    for i in range(2):
        (crops / f"person_{i}").mkdir(parents=True)
        for k in range(2):
            (crops / f"person_{i}" / f"{k}.png").write_bytes(png_bytes(noise_face(10 * i + k)))
    real_load = align_mod.load_mtcnn

    def no_detector(**kwargs):
        raise AssertionError("the detector was loaded for a folder of 112x112 crops")

    monkeypatch.setattr(align_mod, "load_mtcnn", no_detector)
    config = load_config(None, ["data.source=folder", f"data.path={crops}", f"data.output={tmp_path / 'crops-ds'}",
                                "data.workers=1", "data.val_fraction=0", "data.deploy_fraction=0.5"])
    manifest = ingest(config)
    assert (manifest.report["align"]["aligned"], manifest.report["align"]["already_aligned"]) == (0, 4)
    monkeypatch.setattr(align_mod, "load_mtcnn", real_load)
    (crops / "person_0" / "photo.jpg").write_bytes(png_bytes(astronaut, "JPEG"))
    manifest = ingest(dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                           output=str(tmp_path / "photos-ds"))))
    assert (manifest.report["align"]["aligned"], manifest.report["align"]["already_aligned"]) == (1, 4)
    assert read_manifest(tmp_path / "photos-ds").settings["data"]["align"] == "mtcnn"


def test_the_align_flag_sets_data_align():
    from facemae.cli import INGEST_FLAGS, _flag_overrides, build_parser

    args = build_parser().parse_args(["ingest", "--source", "folder", "--path", "p", "--align"])
    assert "data.align=mtcnn" in _flag_overrides(args, INGEST_FLAGS)
    args = build_parser().parse_args(["ingest", "--align", "none"])
    assert "data.align=none" in _flag_overrides(args, INGEST_FLAGS)


def _mixed_folder(root: Path, photo: np.ndarray) -> None:
    """Three identities of photos (the astronaut and transformed copies), 112x112 crops, two photos
    without a face and a broken file: 8 aligned, 3 kept, 2 refused, 1 corrupt."""
    variants = list(_variants(photo).values())
    for i in range(3):
        (root / f"person_{i}").mkdir(parents=True)
        (root / f"person_{i}" / "crop.png").write_bytes(png_bytes(noise_face(i)))
    for k, variant in enumerate([photo, *variants, photo[::-1, ::-1].copy(), photo[:, ::-1].copy()]):
        (root / f"person_{k % 3}" / f"photo{k}.jpg").write_bytes(png_bytes(variant, "JPEG"))
    (root / "person_0" / "noise.png").write_bytes(png_bytes(noise_face(9, size=240)))
    (root / "person_1" / "blank.png").write_bytes(png_bytes(np.full((200, 200, 3), 40, np.uint8)))
    (root / "person_2" / "broken.jpg").write_bytes(png_bytes(photo, "JPEG")[:300])


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, ["data.source=folder", f"data.path={tmp_path / 'photos'}",
                              f"data.output={tmp_path / 'ds'}", "data.align=mtcnn", "data.deploy_fraction=0.34",
                              "data.val_fraction=0", "data.rows_per_shard=3", *overrides])


@pytest.mark.ray
@pytest.mark.slow
def test_a_mixed_folder_runs_through_ingest_on_ray_with_the_right_counts(tmp_path, ray_cluster, astronaut):
    """Photos flipped upside down (photo6) have no face MTCNN finds upright: refused like the noise."""
    _mixed_folder(tmp_path / "photos", astronaut)
    with pytest.raises(CorruptImageError, match="--skip-corrupt"):
        ingest(_cfg(tmp_path, "data.workers=2"))
    manifest = ingest(_cfg(tmp_path, "data.workers=2", "data.skip_corrupt=true"), overwrite=True)
    report, align = manifest.report, manifest.report["align"]
    refused = sorted(Path(r["where"]).name for r in report["corrupt_records"] if "refused" in r)
    assert refused == ["blank.png", "noise.png", "photo6.jpg"], json.dumps(report["corrupt_records"])
    assert (report["inputs"], report["images"], report["corrupt"]) == (14, 10, 4)
    assert (align["aligned"], align["already_aligned"], align["refused"]["no_face"]) == (7, 3, 3)
    assert align["scores"]["count"] == 7 and align["scores"]["min"] >= 0.9
    assert sum(align["scores"]["histogram"].values()) == 7
    assert align["sheets"] == ["aligned.png", "refused.png"]
    sheet = np.asarray(Image.open(tmp_path / "ds" / "aligned.png"))
    assert sheet.shape[0] == 116 and sheet.shape[1] == 7 * 114 + 2  # one row of seven crops
    rows = list(iter_rows([tmp_path / "ds" / s.file for shards in manifest.splits.values() for s in shards]))
    assert all(decode_rgb(r["image"]).shape == (112, 112, 3) for r in rows)
    assert read_manifest(tmp_path / "ds").settings["data"]["align"] == "mtcnn"


def test_an_unaligned_dataset_is_not_reused_and_an_aligned_ingest_resumes_with_its_counts(tmp_path, monkeypatch,
                                                                                         astronaut):
    import facemae.data.ingest as ingest_mod

    _mixed_folder(tmp_path / "photos", astronaut)
    (tmp_path / "photos" / "person_2" / "broken.jpg").unlink()
    unaligned = ingest(_cfg(tmp_path, "data.workers=1", "data.skip_corrupt=true", "data.align=none"))
    assert unaligned.num_images() == 3 and "align" not in unaligned.report  # the photos refused for their size
    cfg = _cfg(tmp_path, "data.workers=1", "data.skip_corrupt=true")
    with pytest.raises(DatasetError, match=r"other settings \(differs in data\.align: built with None, now 'mtcnn'"):
        ingest(cfg)
    real_build, built = ingest_mod.build_unit, []

    def dying_build(unit):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(unit.rel)
        return real_build(unit)

    monkeypatch.setattr(ingest_mod, "build_unit", dying_build)
    with pytest.raises(KeyboardInterrupt):
        ingest(cfg, overwrite=True)
    done, built = list(built), []
    monkeypatch.setattr(ingest_mod, "build_unit", lambda unit: built.append(unit.rel) or real_build(unit))
    manifest = ingest(cfg)
    assert built and not set(done) & set(built), "a finished shard was built again"
    align = manifest.report["align"]  # the finished shards' counts come back from the journal
    assert (align["aligned"], align["already_aligned"], align["refused_total"]) == (7, 3, 3)
    assert manifest.num_images() == 10
