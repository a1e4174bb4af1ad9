"""RecordIO (InsightFace train.rec / train.idx) written and read without mxnet; layout checked by hand."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemae.data.recordio import RecordIOError, RecordIOReader, pack_header, write_recordio

MAGIC = b"\x0a\x23\xd7\xce"  # uint32 0xced7230a, little endian
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def faces() -> list[tuple[int, bytes, np.ndarray]]:
    """(label, encoded, pixels): random 112x112 RGB noise, PNG (lossless) except one JPEG."""
    rng = np.random.default_rng(0)
    out = []
    for i, label in enumerate(LABELS):
        pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        out.append((label, _encode(pixels, "JPEG" if i == 4 else "PNG"), pixels))
    return out


def _pack(tmp_path: Path, images: list[tuple[int, bytes]], *, header: bool) -> tuple[Path, Path]:
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    assert write_recordio(rec, idx, images, insightface_header=header) == len(images)
    return rec, idx


def _idx_offsets(idx: Path) -> dict[int, int]:
    return {int(k): int(v) for k, v in (line.split("\t") for line in idx.read_text().splitlines())}


def _scan_parts(rec: Path) -> list[tuple[int, int, int]]:
    """(position, cflag, length) of every part, walking the file by the format's own rules."""
    data, pos, parts = rec.read_bytes(), 0, []
    while pos < len(data):
        assert data[pos:pos + 4] == MAGIC, f"no magic at {pos}"
        (lrec,) = struct.unpack_from("<I", data, pos + 4)
        length = lrec & ((1 << 29) - 1)
        parts.append((pos, lrec >> 29, length))
        pos += 8 + (length + 3) // 4 * 4
    assert pos == len(data)
    return parts


def _hand_record(payload: bytes) -> bytes:
    """One unsplit record: magic + lrec (cflag 0) + payload + zero padding to 4."""
    return MAGIC + struct.pack("<I", len(payload)) + payload + b"\0" * (-len(payload) % 4)


# -- round trips ---------------------------------------------------------------------------------------------


def test_round_trip_with_insightface_header(tmp_path: Path, faces: list) -> None:
    rec, idx = _pack(tmp_path, [(label, data) for label, data, _ in faces], header=True)
    with RecordIOReader(rec) as reader:  # idx found next to the .rec
        n = len(faces)
        assert reader.has_header
        assert reader.keys == list(range(n + 1 + 3))  # header, 9 images, 3 identities
        assert reader.image_keys == list(range(1, n + 1))
        assert len(reader) == n
        assert reader.identity_ranges == {n + 1: (1, 4), n + 2: (4, 6), n + 3: (6, 10)}
        records = list(reader)
        assert [r.key for r in records] == reader.image_keys
        assert [r.label for r in records] == LABELS
        assert [reader.read_label(k) for k in reader.image_keys] == LABELS
        offsets = _idx_offsets(idx)
        for record, (_, data, pixels) in zip(records, faces):
            assert record.image == data
            assert record.offset == offsets[record.key]
            if data.startswith(b"\x89PNG"):
                np.testing.assert_array_equal(_decode(record.image), pixels)
        assert _decode(records[4].image).shape == (112, 112, 3)  # the JPEG decodes too


def test_round_trip_without_header(tmp_path: Path, faces: list) -> None:
    rec, idx = _pack(tmp_path, [(label, data) for label, data, _ in faces], header=False)
    reader = RecordIOReader(rec, idx)
    assert not reader.has_header
    assert reader.identity_ranges is None
    assert reader.keys == reader.image_keys == list(range(len(faces)))
    assert [(r.label, r.image) for r in reader] == [(label, data) for label, data, _ in faces]
    np.testing.assert_array_equal(_decode(reader.read_image(0).image), faces[0][2])
    clone = pickle.loads(pickle.dumps(reader))  # Ray ships readers to workers: the handle must not travel
    assert clone.read_image(3) == reader.read_image(3)
    reader.close()
    clone.close()


def test_multi_label_image_at_key_0_is_not_a_header(tmp_path: Path) -> None:
    # im2rec packs may store [label, ...] float labels; record 0 then has flag > 0 but carries an image.
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    rec.write_bytes(_hand_record(pack_header(label=[7.0, 1.0]) + b"img"))
    idx.write_text("0\t0\n")
    with RecordIOReader(rec, idx) as reader:
        assert not reader.has_header
        assert reader.read_image(0).label == 7 and reader.read_image(0).image == b"img"


def test_labels_must_be_contiguous_with_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label 0 already had images"):
        write_recordio(tmp_path / "x.rec", tmp_path / "x.idx", [(0, b"a"), (1, b"b"), (0, b"c")])
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    assert write_recordio(tmp_path / "x.rec", tmp_path / "x.idx", [(0, b"a"), (1, b"b"), (0, b"c")],
                          insightface_header=False) == 3


# -- byte layout, computed another way ------------------------------------------------------------------------


def test_pack_header_matches_struct() -> None:
    assert pack_header(label=5, id=3, id2=4) == struct.pack("<IfQQ", 0, 5.0, 3, 4)
    assert pack_header(label=[1.0, 9.0]) == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 1.0, 9.0)


@pytest.mark.parametrize("header", [True, False])
def test_first_record_bytes_and_idx_offsets(tmp_path: Path, header: bool) -> None:
    images = [(3, b"x" * 13), (3, b"yy"), (4, b"z" * 8), (5, b"w")]  # lengths exercise every padding
    rec, idx = _pack(tmp_path, images, header=header)
    if header:  # face2rec2 header: flag 2, label 0, id 0, id2 0, then [a, b) = [5, 8) as float32
        payload = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 8.0)
    else:
        payload = struct.pack("<IfQQ", 0, 3.0, 0, 0) + b"x" * 13
    expected = _hand_record(payload)
    assert rec.read_bytes()[:len(expected)] == expected
    starts = [pos for pos, cflag, _ in _scan_parts(rec) if cflag in (0, 1)]
    assert list(_idx_offsets(idx).values()) == starts
    assert list(_idx_offsets(idx)) == list(range(len(starts)))


def test_payload_holding_the_magic_is_split_like_dmlc(tmp_path: Path) -> None:
    # Image bytes start at payload offset 24: MAGIC at image offset 0 and 8 is 4-aligned in the payload (split),
    # at 13 it is not (kept inline), and two back-to-back give an empty middle part.
    image = MAGIC + b"A" * 4 + MAGIC + b"B" + MAGIC + b"C" * 3 + MAGIC + MAGIC + b"D" * 2
    rec, idx = _pack(tmp_path, [(1, b"plain"), (2, image)], header=False)
    with RecordIOReader(rec, idx) as reader:
        record = reader.read_image(1)
        assert (record.label, record.image) == (2, image)
        assert reader.read_label(1) == 2  # the first part ends inside IRHeader + label: falls back to joining

    payload = struct.pack("<IfQQ", 0, 2.0, 1, 0) + image
    cuts = [i for i in range(0, len(payload) // 4 * 4, 4) if payload[i:i + 4] == MAGIC]
    assert cuts == [24, 32, 44, 48]
    bounds = [0, *[c + 4 for c in cuts]]
    pieces = [payload[start:cut] for start, cut in zip(bounds, cuts)] + [payload[bounds[-1]:]]
    flags = [1, 2, 2, 2, 3]
    expected = b"".join(MAGIC + struct.pack("<I", (f << 29) | len(p)) + p for f, p in zip(flags, pieces))
    expected += b"\0" * (-len(pieces[-1]) % 4)
    start = _idx_offsets(idx)[1]
    assert rec.read_bytes()[start:] == expected
    assert [cflag for pos, cflag, _ in _scan_parts(rec) if pos >= start] == flags


def _dmlc_write_record(payload: bytes) -> bytes:
    """Line-by-line transcription of dmlc-core ``RecordIOWriter::WriteRecord`` (src/recordio.cc)."""
    out, dptr, size = b"", 0, len(payload)
    lower_align, upper_align = (size >> 2) << 2, ((size + 3) >> 2) << 2
    for i in range(0, lower_align, 4):
        if payload[i:i + 4] == MAGIC:
            out += MAGIC + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
    out += MAGIC + struct.pack("<I", ((3 if dptr != 0 else 0) << 29) | (size - dptr)) + payload[dptr:]
    return out + b"\0" * (upper_align - size)


def test_whole_file_matches_dmlc_writer_on_random_payloads(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tokens = [MAGIC, b"\x0a\x23", b"\xd7\xce", b"\x00", b"\xff"]  # magic halves make near misses
    images = [(int(rng.integers(0, 5)), b"".join(tokens[t] for t in rng.integers(0, 5, rng.integers(0, 40))))
              for _ in range(300)]
    rec, _ = _pack(tmp_path, images, header=False)
    expected = b"".join(_dmlc_write_record(struct.pack("<IfQQ", 0, float(label), key, 0) + image)
                        for key, (label, image) in enumerate(images))
    assert rec.read_bytes() == expected
    with RecordIOReader(rec) as reader:
        assert [(r.label, r.image) for r in reader] == images


# -- malformed packs -----------------------------------------------------------------------------------------


@pytest.fixture
def small_pack(tmp_path: Path) -> tuple[Path, Path]:
    return _pack(tmp_path, [(0, b"a" * 10), (0, MAGIC + b"b" * 10), (1, b"c" * 30)], header=False)


def _set_offset(idx: Path, key: int, offset: int) -> None:
    offsets = _idx_offsets(idx)
    offsets[key] = offset
    idx.write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))


def test_idx_offset_inside_a_record(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    _set_offset(idx, 1, _idx_offsets(idx)[1] + 8)  # onto the IRHeader, not a part header
    with RecordIOReader(rec, idx) as reader:
        reader.read_image(0)
        with pytest.raises(RecordIOError, match=r"key 1 offset \d+ has no record magic.*rebuild the \.idx"):
            reader.read_image(1)


def test_idx_offset_at_the_end_part_of_a_split_record(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    end_part = [pos for pos, cflag, _ in _scan_parts(rec) if cflag == 3]
    _set_offset(idx, 1, end_part[0])
    with RecordIOReader(rec, idx) as reader, pytest.raises(RecordIOError, match="key 1 .* end part of a split"):
        reader.read_payload(1)


def test_truncated_rec(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    data = rec.read_bytes()
    rec.write_bytes(data[:-10])  # cuts into the last record's payload
    with RecordIOReader(rec, idx) as reader:
        assert reader.read_image(0).image == b"a" * 10
        with pytest.raises(RecordIOError, match="key 2 .*truncated record"):
            reader.read_image(2)


def test_split_record_without_end_part(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    start_pos, _, start_len = next(p for p in _scan_parts(rec) if p[1] == 1)
    rec.write_bytes(rec.read_bytes()[:start_pos + 8 + start_len])
    _set_offset(idx, 2, 0)  # keep every offset inside the shortened file
    with RecordIOReader(rec, idx) as reader, pytest.raises(RecordIOError, match="key 1 .*split record has no end"):
        reader.read_image(1)


def test_idx_offset_beyond_eof(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    _set_offset(idx, 2, rec.stat().st_size + 100)
    with pytest.raises(RecordIOError, match=r"train\.idx:3: key 2 offset \d+ is beyond the end"):
        RecordIOReader(rec, idx)


@pytest.mark.parametrize("line", ["1\tabc", "1", "1\t2\t3", "-1\t-8"])
def test_malformed_idx_line(small_pack: tuple[Path, Path], line: str) -> None:
    rec, idx = small_pack
    idx.write_text(f"0\t0\n{line}\n")
    with pytest.raises(RecordIOError, match=r"train\.idx:2: malformed index line"):
        RecordIOReader(rec, idx)


def test_missing_idx(small_pack: tuple[Path, Path]) -> None:
    rec, idx = small_pack
    idx.unlink()
    with pytest.raises(RecordIOError, match=r"train\.idx: index file not found.*pass idx_path"):
        RecordIOReader(rec)


def test_header_range_disagrees_with_idx(tmp_path: Path) -> None:
    rec, idx = _pack(tmp_path, [(0, b"a"), (1, b"b"), (1, b"c")], header=True)
    idx.write_text("".join(line for line in idx.read_text().splitlines(keepends=True) if not line.startswith("2\t")))
    with pytest.raises(RecordIOError, match=r"key 0 .*header range \[a, b\) = \[4, 6\) disagrees"):
        RecordIOReader(rec, idx)


def test_payload_shorter_than_irheader(tmp_path: Path) -> None:
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    rec.write_bytes(_hand_record(b"\1" * 10))
    idx.write_text("0\t0\n")
    with RecordIOReader(rec, idx) as reader:
        with pytest.raises(RecordIOError, match="key 0 offset 0: payload is 10 bytes, shorter than"):
            reader.read_image(0)
        with pytest.raises(RecordIOError, match="key 0 offset 0: payload is 10 bytes, shorter than"):
            reader.read_label(0)
        with pytest.raises(KeyError, match="key 5 is not in"):
            reader.read_image(5)
