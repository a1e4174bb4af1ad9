"""Ingest into Parquet shards: every source, the identity split, bad input, atomic writes, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_folder, noise_face, png_bytes
from facemae.config import load_config
from facemae.data import synthetic
from facemae.data.images import CorruptImageError, decode_rgb, encode_png
from facemae.data.ingest import carve_validation, ingest, split_identities
from facemae.data.recordio import write_recordio
from facemae.data.runner import JOURNAL
from facemae.data.shards import DatasetError, iter_rows, read_manifest, verify_dataset


def _rows(root: Path) -> dict[str, dict]:
    manifest = read_manifest(root)
    paths = [p for split in manifest.splits for p in manifest.files(root, split)]
    return {r["image_id"]: r for r in iter_rows(paths)}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.output={tmp_path / 'ds'}", "data.workers=1", *overrides])


def test_the_validation_split_is_carved_from_training_identities_disjoint_and_seeded():
    train, deploy = split_identities(range(50), fraction=0.2, seed=1)
    rest, val = carve_validation(train, count=5, seed=1)
    assert len(val) == 5 and not set(val) & set(rest) and sorted(rest + val) == train
    assert not set(val) & set(deploy)
    assert carve_validation(train, count=5, seed=1) == (rest, val)
    assert carve_validation(train, count=5, seed=2)[1] != val
    assert carve_validation([3, 4], count=5, seed=0)[0] != []  # at least one training identity stays
    assert carve_validation(train, count=0, seed=1) == (train, [])


def test_a_validation_split_leaves_the_deployment_identities_as_they_were(tmp_path):
    args = ["data.num_identities=10", "data.images_per_identity=2", "data.deploy_fraction=0.3"]
    with_val = ingest(_cfg(tmp_path, *args, "data.val_fraction=0.2"))
    without = ingest(load_config(None, [f"data.output={tmp_path / 'noval'}", "data.workers=1", *args,
                                        "data.val_fraction=0"]))
    assert with_val.identities("deploy") == without.identities("deploy")
    assert len(with_val.identities("val")) == 2 and without.identities("val") == []
    assert sorted(with_val.identities("train") + with_val.identities("val")) == without.identities("train")
    assert "val_fraction" not in without.settings["data"]  # as a dataset made before the split existed
    with pytest.raises(ValueError, match="val_fraction"):
        _cfg(tmp_path, "data.deploy_fraction=0.5", "data.val_fraction=0.5")


def test_split_is_disjoint_exhaustive_and_seeded():
    train, deploy = split_identities(range(50), fraction=0.2, seed=1)
    assert len(deploy) == 10 and not set(train) & set(deploy) and sorted(train + deploy) == list(range(50))
    assert split_identities(range(50), fraction=0.2, seed=1) == (train, deploy)
    assert split_identities(range(50), fraction=0.2, seed=2)[1] != deploy
    assert len(split_identities(range(3), fraction=0.01, seed=0)[1]) == 1  # at least one held out


def test_our_png_encoder_is_lossless_standard_png_the_size_of_pillows():
    rng = np.random.default_rng(0)
    faces = [synthetic.generate_image(i, k, seed=0) for i in range(4) for k in range(3)]
    for pixels in [*faces, rng.integers(0, 256, (7, 5, 3), dtype=np.uint8), np.zeros((1, 1, 3), np.uint8)]:
        data = encode_png(pixels)
        with Image.open(io.BytesIO(data)) as img:  # Pillow's decoder checks the chunks' CRCs
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (pixels.shape[1], pixels.shape[0]))
            np.testing.assert_array_equal(np.asarray(img), pixels)
    ours = sum(len(encode_png(f)) for f in faces)
    pillow = 0  # Pillow at zlib level 1, as this platform encoded before
    for f in faces:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG", compress_level=1)
        pillow += len(buf.getvalue())
    assert ours < 1.05 * pillow, (ours, pillow)


def test_synthetic_ingest_round_trip(tmp_path):
    cfg = _cfg(tmp_path, "data.num_identities=6", "data.images_per_identity=3", "data.rows_per_shard=4",
               "data.deploy_fraction=0.34")
    manifest = ingest(cfg)
    root = tmp_path / "ds"
    assert verify_dataset(root).to_json() == manifest.to_json()
    assert manifest.num_images() == 18 and manifest.report["corrupt"] == 0
    train, deploy = set(manifest.identities("train")), set(manifest.identities("deploy"))
    val = set(manifest.identities("val"))  # data.val_fraction 0.1 of 6 identities: one, from the training side
    assert len(deploy) == 2 and len(val) == 1 and not train & deploy and not val & (train | deploy)
    assert train | val | deploy == set(range(6))
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["split_identities"]["deploy"] == sorted(deploy)
    assert on_disk["split_identities"]["val"] == sorted(val)
    assert on_disk["counts"]["train"]["images"] == 9
    rows = _rows(root)
    assert len(rows) == 18
    for image_id, row in rows.items():
        identity, index = (int(x) for x in image_id.split("-")[1:])
        assert row["identity"] == identity
        np.testing.assert_array_equal(decode_rgb(row["image"]), synthetic.generate_image(identity, index, seed=0))
    assert not list(root.rglob("*.tmp")) and not (root / JOURNAL).exists()


def test_rerun_reuses_and_other_settings_are_refused(tmp_path):
    cfg = _cfg(tmp_path, "data.num_identities=3", "data.images_per_identity=2")
    first = ingest(cfg)
    mtime = (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns
    assert ingest(cfg).to_json() == first.to_json()
    assert (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(DatasetError, match="built with other settings .*pass --overwrite"):
        ingest(_cfg(tmp_path, "data.num_identities=4", "data.images_per_identity=2"))
    assert ingest(_cfg(tmp_path, "data.num_identities=4", "data.images_per_identity=2"),
                  overwrite=True).num_images() == 8


def test_the_manifest_names_the_domain_and_a_dataset_of_another_is_refused(tmp_path):
    args = ["data.num_identities=3", "data.images_per_identity=2"]
    base = ingest(_cfg(tmp_path, *args))
    # The base domain is what every dataset before domains drew: its settings leave the key out, so they stay
    # reusable; the manifest's source names it.
    assert base.source["domain"] == "base" and "domain" not in base.settings["data"]
    with pytest.raises(DatasetError, match="differs in data.domain: built with None, now 'shifted'.*pass --overwrite"):
        ingest(_cfg(tmp_path, *args, "data.domain=shifted"))
    shifted = ingest(_cfg(tmp_path, *args, "data.domain=shifted"), overwrite=True)
    assert shifted.source["domain"] == "shifted" and shifted.settings["data"]["domain"] == "shifted"
    for image_id, row in _rows(tmp_path / "ds").items():
        identity, index = (int(x) for x in image_id.split("-")[1:])
        np.testing.assert_array_equal(decode_rgb(row["image"]),
                                      synthetic.generate_image(identity, index, seed=0, domain="shifted"))
    assert ingest(_cfg(tmp_path, *args, "data.domain=shifted")).settings == shifted.settings  # reused


def test_the_manifest_records_the_generator_and_another_version_is_refused_in_one_line(tmp_path):
    args = ["data.num_identities=3", "data.images_per_identity=2"]
    cartoon = ingest(_cfg(tmp_path, *args, "data.style=cartoon"))
    assert (cartoon.source["style"], cartoon.source["generator_version"]) == ("cartoon", 1)
    assert cartoon.settings["generator_version"] == 1
    with pytest.raises(DatasetError) as refused:
        ingest(_cfg(tmp_path, *args))  # the default style: photo, version 2
    message = str(refused.value)
    assert "\n" not in message
    assert "generator version 1 (style cartoon), not version 2 (style photo)" in message
    assert "data.style=cartoon" in message and "--overwrite" in message
    photo = ingest(_cfg(tmp_path, *args), overwrite=True)
    assert (photo.source["style"], photo.source["generator_version"]) == ("photo", 2)
    for image_id, row in _rows(tmp_path / "ds").items():
        identity, index = (int(x) for x in image_id.split("-")[1:])
        np.testing.assert_array_equal(decode_rgb(row["image"]), synthetic.generate_image(identity, index, seed=0))


def test_a_dataset_from_before_styles_is_version_1_the_cartoon_style(tmp_path):
    args = ["data.num_identities=3", "data.images_per_identity=2"]
    ingest(_cfg(tmp_path, *args, "data.style=cartoon"))
    path = tmp_path / "ds" / "manifest.json"
    legacy = json.loads(path.read_text())  # what a manifest written before styles existed holds
    for key in ("style", "generator_version"):
        del legacy["source"][key]
    del legacy["settings"]["data"]["style"], legacy["settings"]["generator_version"]
    path.write_text(json.dumps(legacy))
    with pytest.raises(DatasetError, match=r"version 1 \(style cartoon\), not version 2 \(style photo\)"):
        ingest(_cfg(tmp_path, *args))
    mtime = path.stat().st_mtime_ns
    assert ingest(_cfg(tmp_path, *args, "data.style=cartoon")).num_images() == 6  # reused as it is
    assert path.stat().st_mtime_ns == mtime


def test_an_interrupted_ingest_of_another_style_is_rebuilt_not_mixed(tmp_path, monkeypatch):
    import facemae.data.shards as shards_mod

    args = ["data.num_identities=4", "data.images_per_identity=3", "data.rows_per_shard=3", "data.deploy_fraction=0.25"]
    real_write_table, calls = pq.write_table, []

    def dying_write_table(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:
            raise _Crash()
        return real_write_table(table, where, **kwargs)

    monkeypatch.setattr(shards_mod.pq, "write_table", dying_write_table)
    with pytest.raises(_Crash):
        ingest(_cfg(tmp_path, *args, "data.style=cartoon"))
    monkeypatch.setattr(shards_mod.pq, "write_table", real_write_table)
    manifest = ingest(_cfg(tmp_path, *args))  # photo: the two cartoon shards of the journal are not kept
    assert manifest.source["style"] == "photo"
    rows = _rows(tmp_path / "ds")
    assert len(rows) == 12
    for image_id, row in rows.items():
        identity, index = (int(x) for x in image_id.split("-")[1:])
        np.testing.assert_array_equal(decode_rgb(row["image"]), synthetic.generate_image(identity, index, seed=0))


def test_a_folder_dataset_ignores_the_synthetic_style(tmp_path):
    src = tmp_path / "in"
    make_folder(src, 2, 1)
    built = ingest(_cfg(tmp_path, "data.source=folder", f"data.path={src}"))
    assert "style" not in built.settings["data"] and "generator_version" not in built.settings
    mtime = (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns
    ingest(_cfg(tmp_path, "data.source=folder", f"data.path={src}", "data.style=cartoon"))  # reused
    assert (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns == mtime


def test_folder_round_trip_keeps_bytes_and_names(tmp_path):
    pixels = make_folder(tmp_path / "faces", identities=5, images=3)
    manifest = ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'faces'}"))
    rows = _rows(tmp_path / "ds")
    assert set(rows) == set(pixels)
    for image_id, row in rows.items():
        np.testing.assert_array_equal(decode_rgb(row["image"]), pixels[image_id])
        assert row["image"] == (tmp_path / "faces" / image_id).read_bytes()  # clean PNG stored as is
        assert manifest.identity_names[str(row["identity"])] == image_id.split("/")[0]


def test_recordio_pack_with_and_without_header(tmp_path):
    faces = [(label, png_bytes(noise_face(label * 10 + k))) for label in range(4) for k in range(3)]
    for header in (True, False):
        rec = tmp_path / f"h{header}" / "train.rec"
        rec.parent.mkdir()
        write_recordio(rec, rec.with_suffix(".idx"), faces, insightface_header=header)
        out = tmp_path / f"ds{header}"
        manifest = ingest(load_config(None, ["data.source=recordio", f"data.path={rec}", f"data.output={out}",
                                             "data.workers=1"]))
        assert manifest.source["has_header"] is header
        rows = sorted(_rows(out).values(), key=lambda r: r["image_id"])
        assert [(r["identity"], r["image"]) for r in rows] == faces


def _bad_folder(root: Path) -> None:
    make_folder(root, identities=3, images=2)
    good = (root / "person_00" / "000.png").read_bytes()
    (root / "person_00" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "person_01" / "notes.txt").write_text("not an image")
    gray = Image.fromarray(np.zeros((112, 112), np.uint8))
    gray.save(root / "person_01" / "gray.png")
    Image.fromarray(np.zeros((112, 112, 4), np.uint8)).save(root / "person_02" / "rgba.png")
    Image.fromarray(noise_face(7, size=150)[:112]).save(root / "person_02" / "big.png")  # 150 wide, 112 high


@pytest.mark.parametrize("name, align, message", [
    ("person_00/truncated.png", "auto", "truncated or undecodable image"),
    ("person_01/notes.txt", "auto", "truncated or undecodable image"),
    ("person_01/gray.png", "auto", "image mode is L, not RGB"),
    ("person_02/rgba.png", "auto", "image mode is RGBA, not RGB"),
    ("person_02/big.png", "none", "image is 150x112, not 112x112"),
    ("person_02/big.png", "auto", "no face of at least 40 px found"),  # a photo, to align: noise has no face
])
def test_each_bad_image_is_an_error_naming_the_file(tmp_path, name, align, message):
    faces = tmp_path / "faces"
    make_folder(faces, identities=3, images=2)
    _bad_folder(tmp_path / "all")
    bad = faces / name
    bad.write_bytes((tmp_path / "all" / name).read_bytes())
    with pytest.raises(CorruptImageError, match=message) as info:
        ingest(_cfg(tmp_path, "data.source=folder", f"data.path={faces}", f"data.align={align}"))
    assert str(bad) in str(info.value) and "--skip-corrupt" in str(info.value)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_skip_corrupt_counts_every_refused_image(tmp_path):
    _bad_folder(tmp_path / "faces")
    manifest = ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'faces'}", "data.skip_corrupt=true"))
    report = manifest.report
    assert report["inputs"] == 11 and report["images"] == 6 and report["corrupt"] == 5
    assert report["inputs"] == report["images"] + report["corrupt"]
    refused = {Path(r["where"]).relative_to(tmp_path / "faces").as_posix() for r in report["corrupt_records"]}
    assert refused == {"person_00/truncated.png", "person_01/notes.txt", "person_01/gray.png",
                       "person_02/rgba.png", "person_02/big.png"}


def test_opt_in_resize_and_convert(tmp_path):
    _bad_folder(tmp_path / "faces")
    (tmp_path / "faces" / "person_00" / "truncated.png").unlink()
    (tmp_path / "faces" / "person_01" / "notes.txt").unlink()
    manifest = ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'faces'}",
                           "data.resize=true", "data.convert_rgb=true"))
    assert manifest.report["converted"] == 3 and manifest.num_images() == 9
    big = decode_rgb(_rows(tmp_path / "ds")["person_02/big.png"]["image"])
    np.testing.assert_array_equal(big, noise_face(7, size=150)[:112, 19:131])  # center square, no scaling needed


def test_empty_and_malformed_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty: an image folder holds one sub-folder"):
        ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'empty'}"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png_bytes(noise_face(0)))
    with pytest.raises(ValueError, match=r"expected only identity folders .* found files a.png"):
        ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'flat'}"))
    (tmp_path / "hollow" / "person").mkdir(parents=True)
    with pytest.raises(ValueError, match="all 1 identity folders are empty"):
        ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'hollow'}"))


def test_recordio_index_disagreeing_with_data(tmp_path):
    rec = tmp_path / "train.rec"
    write_recordio(rec, tmp_path / "train.idx", [(k % 2, png_bytes(noise_face(k))) for k in range(4)],
                   insightface_header=False)
    lines = (tmp_path / "train.idx").read_text().splitlines()
    key, offset = lines[2].split("\t")
    lines[2] = f"{key}\t{int(offset) + 8}"  # points inside a record
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    args = ["data.source=recordio", f"data.path={rec}", f"data.output={tmp_path / 'ds'}", "data.workers=1"]
    with pytest.raises(ValueError, match=f"index disagrees with the data file: key {key} offset"):
        ingest(load_config(None, args))
    manifest = ingest(load_config(None, [*args, "data.skip_corrupt=true"]))
    assert manifest.num_images() == 3 and manifest.report["corrupt"] == 1
    assert f"key {key}" in manifest.report["corrupt_records"][0]["where"]


class _Crash(Exception):
    pass


def test_interrupted_ingest_leaves_no_half_shard_and_resumes(tmp_path, monkeypatch):
    import facemae.data.ingest as ingest_mod
    import facemae.data.shards as shards_mod

    cfg = _cfg(tmp_path, "data.num_identities=4", "data.images_per_identity=3", "data.rows_per_shard=3",
               "data.deploy_fraction=0.25")
    real_write_table, calls = pq.write_table, []

    def dying_write_table(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:  # die half-way through writing the third shard
            Path(where).write_bytes(b"PAR1 half a shard")
            raise _Crash()
        return real_write_table(table, where, **kwargs)

    monkeypatch.setattr(shards_mod.pq, "write_table", dying_write_table)
    with pytest.raises(_Crash):
        ingest(cfg)
    root = tmp_path / "ds"
    assert not (root / "manifest.json").exists()
    assert sorted(p.name for p in root.rglob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(root.rglob("*.tmp")), "the half-written shard must not stay behind"
    with pytest.raises(DatasetError, match="not a finished facemae dataset"):
        verify_dataset(root)

    monkeypatch.setattr(shards_mod.pq, "write_table", real_write_table)
    built = []
    real_build = ingest_mod.build_unit
    monkeypatch.setattr(ingest_mod, "build_unit", lambda unit: built.append(unit.rel) or real_build(unit))
    manifest = ingest(cfg)
    assert built == ["train/part-00002.parquet", "deploy/part-00000.parquet"]  # only what was missing
    assert manifest.num_images() == 12 and len(_rows(root)) == 12
    verify_dataset(root)


@pytest.mark.ray
def test_synthetic_through_ray_equals_single_process(tmp_path, ray_cluster):
    args = ["data.num_identities=8", "data.images_per_identity=4", "data.rows_per_shard=8"]
    local = ingest(load_config(None, [*args, f"data.output={tmp_path / 'local'}", "data.workers=1"]))
    on_ray = ingest(load_config(None, [*args, f"data.output={tmp_path / 'ray'}", "data.workers=2"]))
    assert on_ray.num_images() == 32
    assert _rows(tmp_path / "local") == _rows(tmp_path / "ray")
    assert [s.identities for s in local.splits["train"]] == [s.identities for s in on_ray.splits["train"]]


@pytest.mark.ray
def test_corrupt_image_error_surfaces_from_a_ray_task(tmp_path, ray_cluster):
    _bad_folder(tmp_path / "faces")
    with pytest.raises(CorruptImageError, match="--skip-corrupt"):
        ingest(_cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'faces'}", "data.workers=2",
                    "data.rows_per_shard=2"))


def test_insightface_fixtures_built_from_synthetic_faces(tmp_path):
    """A WebFace-style pack (JPEG records, header record 0) and an lfw.bin-style pair file made of
    synthetic faces read back to the same pixels and labels."""
    from facemae.data.verification_bin import load_verification_bin, save_verification_bin

    faces = {(i, k): synthetic.generate_image(i, k, seed=5) for i in range(3) for k in range(4)}
    jpegs = {key: png_bytes(img, "JPEG") for key, img in faces.items()}
    rec = tmp_path / "train.rec"
    write_recordio(rec, tmp_path / "train.idx", [(i, jpegs[(i, k)]) for i, k in sorted(jpegs)])
    ingest(load_config(None, ["data.source=recordio", f"data.path={rec}", f"data.output={tmp_path / 'ds'}",
                              "data.workers=1"]))
    rows = sorted(_rows(tmp_path / "ds").values(), key=lambda r: r["image_id"])
    assert [r["identity"] for r in rows] == [i for i, _ in sorted(jpegs)]
    for row, key in zip(rows, sorted(jpegs)):
        assert row["image"] == jpegs[key]  # a clean 112x112 JPEG is stored without re-encoding
        np.testing.assert_array_equal(decode_rgb(row["image"]), decode_rgb(jpegs[key]))
        assert np.abs(decode_rgb(row["image"]).astype(int) - faces[key]).mean() < 8  # JPEG, not noise

    pairs = [((0, 0), (0, 1), True), ((1, 2), (2, 3), False), ((2, 0), (2, 1), True)]
    images = [jpegs[k] for a, b, _ in pairs for k in (a, b)]
    save_verification_bin(tmp_path / "lfw.bin", (images, [same for _, _, same in pairs]))
    loaded = load_verification_bin(tmp_path / "lfw.bin")
    assert loaded.issame == [True, False, True] and len(loaded) == 3
    for (a, b, _), (left, right, _) in zip(pairs, loaded.pairs()):
        np.testing.assert_array_equal(decode_rgb(left), decode_rgb(jpegs[a]))
        np.testing.assert_array_equal(decode_rgb(right), decode_rgb(jpegs[b]))
