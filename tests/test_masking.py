"""Owner-side masking: exact patches kept, seeded masks, and no masked pixel written anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_folder, noise_face
from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.data.masking import mask_face, patchify, unmask, unpatchify
from facemae.data.owner import mask_dataset
from facemae.data.shards import iter_rows, read_manifest, verify_dataset


@pytest.mark.parametrize("p", [8, 16])
def test_patchify_round_trip_and_layout(p):
    img = noise_face(1)
    patches = patchify(img, p)
    assert patches.shape == ((112 // p) ** 2, p * p * 3)
    np.testing.assert_array_equal(unpatchify(patches, p), img)
    # patch 1 is the second patch of the first row: rows 0..p-1, columns p..2p-1
    np.testing.assert_array_equal(patches[1].reshape(p, p, 3), img[:p, p:2 * p])


def test_mask_keeps_exactly_keep_patches_and_is_seeded():
    img = noise_face(2)
    vis, mask = mask_face(img, image_id="a", patch_size=8, keep=49, seed=0)
    m = np.frombuffer(mask, np.uint8)
    assert m.shape == (196,) and (m == 0).sum() == 49 and set(np.unique(m)) == {0, 1}
    assert len(vis) == 49 * 8 * 8 * 3
    assert mask_face(img, image_id="a", patch_size=8, keep=49, seed=0) == (vis, mask)
    assert mask_face(img, image_id="a", patch_size=8, keep=49, seed=1)[1] != mask
    assert mask_face(img, image_id="b", patch_size=8, keep=49, seed=0)[1] != mask
    view = unmask(vis, mask, patch_size=8)
    patches, shown = patchify(img, 8), patchify(view, 8)
    np.testing.assert_array_equal(shown[m == 0], patches[m == 0])
    assert not shown[m == 1].any()


def _dataset(tmp_path: Path, *, identities: int = 6, images: int = 4) -> tuple[dict[str, np.ndarray], object]:
    pixels = make_folder(tmp_path / "faces", identities=identities, images=images, seed=3)
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path / 'faces'}",
                             f"data.output={tmp_path / 'orig'}", "data.workers=1", "data.rows_per_shard=5",
                             f"mask.output={tmp_path / 'masked'}"])
    ingest(cfg)
    return pixels, cfg


def _every_byte(root: Path) -> bytes:
    """The raw bytes of every file under ``root`` plus every decoded value of every Parquet column,
    so that neither compression nor encoding can hide a pixel."""
    blobs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blobs.append(path.read_bytes())
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for column in table.columns:
                blobs.extend(v if isinstance(v, bytes) else str(v).encode() for v in column.to_pylist())
    return b"\x00".join(blobs)


@pytest.mark.parametrize("patch_size, ratio", [(8, 0.75), (16, 0.5)])
def test_masked_pixels_are_never_written(tmp_path, patch_size, ratio):
    pixels, cfg = _dataset(tmp_path)
    cfg.mask.patch_size, cfg.mask.ratio = patch_size, ratio
    manifest = mask_dataset(cfg)
    out = tmp_path / "masked"
    verify_dataset(out)
    assert manifest.num_images() == len(pixels)
    blob = _every_byte(out)
    rows = {r["image_id"]: r for split in manifest.splits for r in iter_rows(manifest.files(out, split))}
    assert set(rows) == set(pixels)
    p, hidden, shown = patch_size, 0, 0
    for image_id, img in pixels.items():
        m = np.frombuffer(rows[image_id]["mask"], np.uint8)
        assert (m == 0).sum() == cfg.mask.keep
        for index, patch in enumerate(patchify(img, p).reshape(-1, p, p * 3)):
            # Each pixel row of a noise patch is p*3 random bytes: found only if it was written.
            found = [blob.find(row.tobytes()) >= 0 for row in patch]
            if m[index]:
                assert not any(found), f"{image_id} patch {index} is masked but its pixels are in {out}"
                hidden += 1
            else:
                assert all(found), "a visible patch must be findable, or this search proves nothing"
                shown += 1
    assert hidden == len(pixels) * (cfg.mask.num_patches - cfg.mask.keep) and shown == len(pixels) * cfg.mask.keep
    schema = pq.read_schema(next(out.rglob("*.parquet")))
    assert schema.names == ["image_id", "source_id", "identity", "visible", "mask"]


def test_masked_records_rebuild_the_visible_view(tmp_path):
    pixels, cfg = _dataset(tmp_path, identities=3, images=2)
    manifest = mask_dataset(cfg)
    assert manifest.kind == "masked" and manifest.mask["keep"] == 49
    original = read_manifest(tmp_path / "orig")
    assert manifest.identities("deploy") == original.identities("deploy")
    for split in manifest.splits:
        for row in iter_rows(manifest.files(tmp_path / "masked", split)):
            m = np.frombuffer(row["mask"], np.uint8)
            view = patchify(unmask(row["visible"], row["mask"], patch_size=8), 8)
            np.testing.assert_array_equal(view[m == 0], patchify(pixels[row["image_id"]], 8)[m == 0])


def test_masking_is_deterministic_and_refuses_a_non_original_source(tmp_path):
    _, cfg = _dataset(tmp_path, identities=3, images=2)
    first = mask_dataset(cfg)
    again = mask_dataset(cfg, output=str(tmp_path / "again"))
    assert [s.sha256 for s in first.splits["train"]] == [s.sha256 for s in again.splits["train"]]
    with pytest.raises(ValueError, match="is a masked dataset; `facemae mask` reads an original one"):
        mask_dataset(cfg, source=str(tmp_path / "masked"), output=str(tmp_path / "twice"))


def test_several_masked_copies_per_face_each_with_its_own_mask(tmp_path):
    pixels, cfg = _dataset(tmp_path, identities=2, images=2)
    cfg.mask.copies = 3
    manifest = mask_dataset(cfg)
    rows = [r for split in manifest.splits for r in iter_rows(manifest.files(tmp_path / "masked", split))]
    assert len(rows) == 3 * len(pixels) and manifest.mask["copies"] == 3
    by_source: dict[str, list] = {}
    for r in rows:
        by_source.setdefault(r["source_id"], []).append(r)
    assert set(by_source) == set(pixels)
    for source, copies in by_source.items():
        assert sorted(r["image_id"] for r in copies) == [f"{source}#m{j}" for j in range(3)]
        assert len({r["mask"] for r in copies}) == 3  # three different masks of one face
        for r in copies:
            m = np.frombuffer(r["mask"], np.uint8)
            view = patchify(unmask(r["visible"], r["mask"], patch_size=8), 8)
            np.testing.assert_array_equal(view[m == 0], patchify(pixels[source], 8)[m == 0])
