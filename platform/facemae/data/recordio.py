"""InsightFace / MXNet RecordIO (``train.rec`` + ``train.idx``) read and written without mxnet.

Byte layout [SRC dmlc-core ``src/recordio.cc``, ``include/dmlc/recordio.h``; mxnet ``python/mxnet/recordio.py``]:

* A record is one or more parts. Each part is ``uint32 magic 0xced7230a`` + ``uint32 lrec`` (little endian;
  ``cflag = lrec >> 29``, ``length = lrec & (2**29 - 1)``) + ``length`` payload bytes, zero padded to 4.
* ``cflag`` 0 is a whole record. The writer splits a payload wherever the magic sits at a 4-aligned offset,
  drops those 4 bytes and marks the parts 1 (start), 2 (middle), 3 (end); the reader puts the magic back.
* ``.idx`` is text, ``f"{key}\\t{offset}\\n"`` per record, ``offset`` = position of the record's first part.
* A payload is an ``IRHeader`` (``'<IfQQ'``: flag, label, id, id2; 24 bytes), then ``flag`` float32 labels
  when ``flag > 0`` (the header's own label is then 0), then the encoded image.
* InsightFace packs (MS1M, Glint360K, WebFace, CASIA) keep a header in record 0: ``label = [a, b]``, images
  at keys ``1..a-1``, identity records at ``a..b-1`` whose ``label = [start, end)`` is that identity's image
  key range. Header and identity records carry no image bytes (``face2rec2.py``: ``pack(header, b'')``).
  ``im2rec`` packs have no header: every key is an image.

Only numpy and the standard library are imported, so data transforms and tests run anywhere.
"""

from __future__ import annotations

import functools
import numbers
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)  # b"\x0a\x23\xd7\xce"
_PART_HEAD = struct.Struct("<II")  # magic, lrec
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1
_CFLAG_WHOLE, _CFLAG_START, _CFLAG_MIDDLE, _CFLAG_END = 0, 1, 2, 3
_MAX_EXACT_LABEL = 1 << 24  # float32 holds every integer up to 2**24 exactly


class RecordIOError(ValueError):
    """The pack is malformed; the message names the file, key and offset and what to do."""


@dataclass(frozen=True)
class RecordIOImage:
    """One image record.

    Attributes:
        key: Record key in the ``.idx``.
        label: Class (identity) label: the header's label, or the first of its labels when ``flag > 0``.
        image: Encoded image bytes (JPEG / PNG), not decoded.
        offset: Byte offset of the record's first part in the ``.rec``.
    """

    key: int
    label: int
    image: bytes
    offset: int


@dataclass(frozen=True)
class _IRHeader:
    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...]  # the ``flag`` float32 labels after the struct; empty when flag == 0
    body_start: int  # offset of the image bytes in the payload


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _parse_ir_header(payload: bytes, *, where: str) -> _IRHeader:
    """Parses ``IRHeader`` + labels at the start of a payload (or of its first part)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"{where}: payload is {len(payload)} bytes, shorter than the {_IR_HEADER.size}-byte "
                            f"IRHeader; the record is not an mxnet image record, rebuild the pack")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    body_start = _IR_HEADER.size + 4 * flag
    if len(payload) < body_start:
        raise RecordIOError(f"{where}: IRHeader says {flag} float32 labels follow but the payload is only "
                            f"{len(payload)} bytes; the record is corrupt, rebuild the pack")
    labels = tuple(float(x) for x in np.frombuffer(payload, np.float32, flag, _IR_HEADER.size)) if flag else ()
    return _IRHeader(flag, label, id_, id2, labels, body_start)


def _class_label(prefix: bytes, *, where: str) -> int:
    """Class label from the first bytes of a payload: ``label`` if ``flag == 0`` else the first float32 label."""
    need = _IR_HEADER.size
    if len(prefix) >= 4 and struct.unpack_from("<I", prefix)[0] > 0:
        need += 4
    if len(prefix) < need:
        raise RecordIOError(f"{where}: payload is {len(prefix)} bytes, shorter than the IRHeader and label it "
                            f"needs ({need} bytes); the record is not an mxnet image record, rebuild the pack")
    flag, value = struct.unpack_from("<If", prefix)
    if flag:
        value = struct.unpack_from("<f", prefix, _IR_HEADER.size)[0]
    if not float(value).is_integer():
        raise RecordIOError(f"{where}: label {value} is not an integer class id; this pack does not hold "
                            f"identity-labelled faces")
    return int(value)


class RecordIOReader:
    """Random-access reader of an indexed RecordIO pack (``.rec`` + ``.idx``).

    The ``.idx`` is parsed and record 0 inspected on construction; the ``.rec`` is then read with one
    lazily opened file handle (seek + read). Picklable (the handle is dropped), so Ray tasks can carry it.

    Attributes:
        keys: All keys of the ``.idx``, in file order.
        has_header: Record 0 is an InsightFace header (``flag > 0``, no image bytes).
        image_keys: Keys of image records: ``1..a-1`` with a header, every key otherwise.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        """Opens a pack.

        Args:
            rec_path: The ``.rec`` data file.
            idx_path: Its ``.idx``; defaults to ``rec_path`` with the suffix ``.idx``.

        Raises:
            RecordIOError: A missing file, a malformed ``.idx`` or header record.
        """
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: RecordIO data file not found; pass the path of train.rec")
        self._rec_size = self.rec_path.stat().st_size
        self._file: IO[bytes] | None = None
        self._offsets = self._read_idx()
        self.keys: list[int] = list(self._offsets)
        try:
            self._header_range = self._detect_header()
        except BaseException:
            self.close()  # the caller never gets the object, so it cannot close the handle
            raise
        self.has_header = self._header_range is not None
        self.image_keys: list[int] = list(range(1, self._header_range[0])) if self._header_range else list(self.keys)

    # -- index and header ---------------------------------------------------------------------------------

    def _read_idx(self) -> dict[int, int]:
        """Parses the ``.idx`` into ``{key: offset}`` (insertion order = file order)."""
        if not self.idx_path.is_file():
            raise RecordIOError(f"{self.idx_path}: index file not found for {self.rec_path}; pass idx_path, or "
                                f"rebuild it with im2rec/facemae (one 'key<TAB>offset' line per record)")
        offsets: dict[int, int] = {}
        with open(self.idx_path, encoding="ascii", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                key, offset = self._parse_idx_line(line, lineno=lineno)
                if key in offsets:
                    raise RecordIOError(f"{self.idx_path}:{lineno}: key {key} appears twice; the index is corrupt, "
                                        f"rebuild it with im2rec/facemae")
                if offset + _PART_HEAD.size > self._rec_size:
                    raise RecordIOError(f"{self.idx_path}:{lineno}: key {key} offset {offset} is beyond the end of "
                                        f"{self.rec_path} ({self._rec_size} bytes); the .rec is truncated or the "
                                        f".idx belongs to another pack")
                offsets[key] = offset
        return offsets

    def _parse_idx_line(self, line: str, *, lineno: int) -> tuple[int, int]:
        fields = line.split()
        try:
            key, offset = int(fields[0]), int(fields[1])
            ok = len(fields) == 2 and offset >= 0
        except (IndexError, ValueError):
            ok = False
        if not ok:
            raise RecordIOError(f"{self.idx_path}:{lineno}: malformed index line {line.rstrip()!r}; expected "
                                f"'<key><TAB><byte offset>', rebuild the .idx with im2rec/facemae")
        return key, offset

    def _detect_header(self) -> tuple[int, int] | None:
        """Returns ``(a, b)`` from an InsightFace header record 0, or None for an images-only pack."""
        if 0 not in self._offsets:
            return None
        where = self._where(0)
        payload = self.read_payload(0)
        if len(payload) < _IR_HEADER.size:
            return None  # not a header; read_image(0) reports the short payload
        header = _parse_ir_header(payload, where=where)
        if header.flag == 0 or len(payload) != header.body_start:
            return None  # record 0 is an image (im2rec pack, possibly multi-label)
        if header.flag < 2 or not all(x.is_integer() for x in header.labels[:2]):
            raise RecordIOError(f"{where}: record 0 looks like an InsightFace header (labels, no image) but its "
                                f"labels {list(header.labels)} are not an integer range [a, b); rebuild the pack")
        a, b = int(header.labels[0]), int(header.labels[1])
        missing = [k for k in range(1, b) if k not in self._offsets]
        if not 1 <= a <= b or missing:
            raise RecordIOError(f"{where}: header range [a, b) = [{a}, {b}) disagrees with {self.idx_path} "
                                f"({len(missing)} keys in 1..{b - 1} missing, first {missing[:3]}); "
                                f"the .idx belongs to another pack or is incomplete, rebuild it")
        return a, b

    @functools.cached_property
    def identity_ranges(self) -> dict[int, tuple[int, int]] | None:
        """``{identity record key: (start, end)}`` image key ranges, like InsightFace's ``id2range``.

        Read on first access (one small record per identity). None for packs without a header.
        """
        if self._header_range is None:
            return None
        a, b = self._header_range
        ranges: dict[int, tuple[int, int]] = {}
        for key in range(a, b):
            header = _parse_ir_header(self.read_payload(key), where=self._where(key))
            start, end = (int(x) for x in header.labels[:2]) if header.flag >= 2 else (-1, -1)
            if not 1 <= start <= end <= a:
                raise RecordIOError(f"{self._where(key)}: identity record label {list(header.labels)} is not an "
                                    f"image key range inside [1, {a}); the pack is corrupt, rebuild it")
            ranges[key] = (start, end)
        return ranges

    # -- records ------------------------------------------------------------------------------------------

    def _where(self, key: int) -> str:
        return f"{self.rec_path} key {key} offset {self._offsets.get(key)}"

    def _handle(self) -> IO[bytes]:
        if self._file is None:
            self._file = open(self.rec_path, "rb")
        return self._file

    def _offset(self, key: int) -> int:
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"key {key} is not in {self.idx_path} ({len(self._offsets)} keys)") from None

    def _read_part(self, pos: int, *, key: int, limit: int | None = None) -> tuple[int, bytes, int]:
        """Reads the part at ``pos``: ``(cflag, data, next part position)``; ``limit`` caps the bytes read."""
        f = self._handle()
        f.seek(pos)
        head = f.read(_PART_HEAD.size)
        if len(head) < _PART_HEAD.size:
            raise RecordIOError(f"{self._where(key)}: truncated record, the file ends at {self._rec_size} inside the "
                                f"part header at {pos}; the .rec was cut short, re-download or re-pack it")
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"index disagrees with the data file: key {key} offset {self._offsets[key]} has no "
                                f"record magic (at {pos} in {self.rec_path}); rebuild the .idx with im2rec/facemae "
                                f"or pass the right .idx")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        want = length if limit is None else min(length, limit)
        data = f.read(want)
        if len(data) < want:
            raise RecordIOError(f"{self._where(key)}: truncated record, a {length}-byte part at {pos} runs past the "
                                f"end of the file ({self._rec_size} bytes); re-download or re-pack the .rec")
        return cflag, data, pos + _PART_HEAD.size + _pad4(length)

    def read_payload(self, key: int) -> bytes:
        """Returns the whole payload of record ``key``, split parts joined with the magic put back.

        Raises:
            KeyError: ``key`` is not in the index.
            RecordIOError: No magic at the offset, a truncated record, or a split record without its end.
        """
        pos = self._offset(key)
        cflag, data, pos = self._read_part(pos, key=key)
        if cflag not in (_CFLAG_WHOLE, _CFLAG_START):
            raise RecordIOError(f"index disagrees with the data file: key {key} offset {self._offsets[key]} points "
                                f"at the {'middle' if cflag == _CFLAG_MIDDLE else 'end'} part of a split record; "
                                f"rebuild the .idx with im2rec/facemae or pass the right .idx")
        parts = [data]
        while cflag in (_CFLAG_START, _CFLAG_MIDDLE):
            if pos + _PART_HEAD.size > self._rec_size:
                raise RecordIOError(f"{self._where(key)}: split record has no end part, the file ends at "
                                    f"{self._rec_size}; the .rec was cut short, re-download or re-pack it")
            cflag, data, pos = self._read_part(pos, key=key)
            if cflag not in (_CFLAG_MIDDLE, _CFLAG_END):
                raise RecordIOError(f"{self._where(key)}: split record is missing its end part (a part with "
                                    f"cflag {cflag} follows); the .rec is corrupt, re-pack it")
            parts.append(data)
        return _MAGIC_BYTES.join(parts)

    def read_image(self, key: int) -> RecordIOImage:
        """Reads record ``key`` as an image: label and encoded bytes (not decoded)."""
        where = self._where(key)
        payload = self.read_payload(key)
        header = _parse_ir_header(payload, where=where)
        return RecordIOImage(key=key, label=_class_label(payload, where=where), image=payload[header.body_start:],
                             offset=self._offsets[key])

    def read_label(self, key: int) -> int:
        """Reads only the label of record ``key`` (its first 28 bytes), for a first pass over identities."""
        need = _IR_HEADER.size + 4  # IRHeader + the first float32 label
        cflag, prefix, _ = self._read_part(self._offset(key), key=key, limit=need)
        if cflag not in (_CFLAG_WHOLE, _CFLAG_START) or (cflag == _CFLAG_START and len(prefix) < need):
            # A split inside these bytes (join the parts), or a middle/end part (read_payload says so).
            prefix = self.read_payload(key)
        return _class_label(prefix, where=self._where(key))

    def __iter__(self) -> Iterator[RecordIOImage]:
        for key in self.image_keys:
            yield self.read_image(key)

    def __len__(self) -> int:
        return len(self.image_keys)

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the ``.rec`` handle; a later read reopens it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None  # file handles do not pickle; the copy reopens lazily
        return state

    def __repr__(self) -> str:
        return (f"RecordIOReader({str(self.rec_path)!r}, images={len(self)}, "
                f"header={self.has_header})")


# -- writing ------------------------------------------------------------------------------------------------


def pack_header(*, label: float | Sequence[float], id: int = 0, id2: int = 0) -> bytes:  # noqa: A002 (mxnet name)
    """Packs an ``IRHeader`` (plus labels), like ``mx.recordio.pack(header, b"")``.

    Args:
        label: A scalar label (``flag = 0``), or a sequence of labels stored as float32 after the header
            (``flag = len(label)``, header label 0).
        id: The header's ``id`` field (im2rec stores the image index).
        id2: The header's ``id2`` field.

    Returns:
        24 bytes, plus 4 per label when ``label`` is a sequence.
    """
    if isinstance(label, numbers.Real):
        return _IR_HEADER.pack(0, float(label), id, id2)
    labels = np.asarray(label, dtype=np.float32)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"label must be a number or a non-empty 1-D sequence of numbers, got shape {labels.shape}")
    return _IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.astype("<f4").tobytes()


def _encode_record(payload: bytes) -> bytes:
    """Frames one payload into record parts exactly like dmlc ``RecordIOWriter::WriteRecord``."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"record payload is {len(payload)} bytes; RecordIO records hold at most {_LENGTH_MASK}")
    out = bytearray()
    dptr = 0
    # dmlc tests every 4-aligned i < len & ~3; bytes.find visits the same hits at C speed (the magic cannot
    # overlap itself 4 bytes apart), skipping the unaligned ones, which stay inline.
    i = payload.find(_MAGIC_BYTES)
    while 0 <= i < len(payload) & ~3:
        if i % 4 == 0:
            out += _PART_HEAD.pack(MAGIC, ((_CFLAG_START if dptr == 0 else _CFLAG_MIDDLE) << 29) | (i - dptr))
            out += payload[dptr:i]
            dptr = i + 4
        i = payload.find(_MAGIC_BYTES, i + 1)
    out += _PART_HEAD.pack(MAGIC, ((_CFLAG_END if dptr else _CFLAG_WHOLE) << 29) | (len(payload) - dptr))
    out += payload[dptr:]
    out += bytes(_pad4(len(payload)) - len(payload))
    return bytes(out)


def _exact_label(label: int, *, index: int) -> float:
    """The label as the float32-exact float the header stores."""
    is_int = isinstance(label, numbers.Integral) and not isinstance(label, bool)
    if not is_int or not -_MAX_EXACT_LABEL <= label <= _MAX_EXACT_LABEL:
        raise ValueError(f"image {index}: label {label!r} must be an int within +-2**24 (stored as float32)")
    return float(label)


class _IndexedWriter:
    """Appends records to an open ``.rec`` and their ``key\\toffset`` lines to an open ``.idx``."""

    def __init__(self, rec: IO[bytes], idx: IO[str]) -> None:
        self.rec, self.idx = rec, idx

    def write(self, key: int, payload: bytes) -> None:
        self.idx.write(f"{key}\t{self.rec.tell()}\n")
        self.rec.write(_encode_record(payload))


def _write_images(writer: _IndexedWriter, images: Iterable[tuple[int, bytes]], *, first_key: int,
                  track_runs: bool) -> tuple[int, list[tuple[int, int]]]:
    """Writes image records from ``first_key`` on; returns their count and the ``(start, end)`` key run of
    each label in order of appearance (runs checked contiguous when ``track_runs``)."""
    runs: list[tuple[int, int]] = []
    seen: dict[int, int] = {}  # label -> key of its first image
    key, prev = first_key, None
    for index, (label, image) in enumerate(images):
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise TypeError(f"image {index}: expected encoded image bytes, got {type(image).__name__}")
        value = _exact_label(label, index=index)
        if track_runs and (not runs or label != prev):
            if label in seen:
                raise ValueError(f"image {index} (key {key}): label {label} already had images at keys "
                                 f"{seen[label]}..; an InsightFace pack needs each identity's images contiguous, "
                                 f"sort the images by label or pass insightface_header=False")
            seen[label] = key
            runs.append((key, key))
        writer.write(key, pack_header(label=value, id=key) + bytes(image))
        key += 1
        if track_runs:
            runs[-1] = (runs[-1][0], key)
        prev = label
    return key - first_key, runs


def _header_payload(a: int, b: int) -> bytes:
    return pack_header(label=[float(a), float(b)], id=0)  # flag 2, no image: face2rec2's header record


def write_recordio(rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                   images: Iterable[tuple[int, bytes]], *, insightface_header: bool = True) -> int:
    """Writes an indexed RecordIO pack that mxnet and InsightFace read, atomically.

    Images are streamed (not held in memory). With ``insightface_header`` the layout is InsightFace's: the
    header record 0 (``label = [a, b]``), images at keys ``1..n``, then one identity record per label at keys
    ``a..b-1`` with ``label = [start, end)``. Without it, images go to keys ``0..n-1`` (im2rec layout).
    Every record's ``IRHeader.id`` is its key, as im2rec does; images get ``flag = 0`` and a scalar label.

    Args:
        rec_path: ``.rec`` to write; replaced only once the whole pack is written.
        idx_path: ``.idx`` to write alongside.
        images: ``(label, encoded image bytes)`` in write order; with a header each label's images must be
            contiguous.
        insightface_header: Write the InsightFace header and identity records.

    Returns:
        The number of image records written.

    Raises:
        ValueError: A label's images are not contiguous (with a header), or a label is not an int.
    """
    rec_path, idx_path = Path(rec_path), Path(idx_path)
    rec_tmp, idx_tmp = _temp_path(rec_path), _temp_path(idx_path)
    try:
        with open(rec_tmp, "wb") as rec, open(idx_tmp, "w", encoding="ascii", newline="\n") as idx:
            writer = _IndexedWriter(rec, idx)
            if insightface_header:
                header_size = len(_encode_record(_header_payload(0, 0)))
                idx.write("0\t0\n")
                rec.write(bytes(header_size))  # placeholder: [a, b) is known once the images are counted
                count, runs = _write_images(writer, images, first_key=1, track_runs=True)
                a = count + 1
                for key, (start, end) in enumerate(runs, start=a):
                    writer.write(key, pack_header(label=[float(start), float(end)], id=key))
                rec.seek(0)
                header = _encode_record(_header_payload(a, a + len(runs)))
                assert len(header) == header_size, "header record size depends on [a, b)"
                rec.write(header)
            else:
                count, _ = _write_images(writer, images, first_key=0, track_runs=False)
        os.replace(rec_tmp, rec_path)
        os.replace(idx_tmp, idx_path)
    finally:
        for tmp in (rec_tmp, idx_tmp):
            tmp.unlink(missing_ok=True)
    return count


def _temp_path(path: Path) -> Path:
    """A fresh temporary file next to ``path`` (same filesystem, so ``os.replace`` is atomic), named after this
    process so that a later one removes it if this one is killed (:func:`facemae.storage.sibling_temp`)."""
    from facemae import storage  # pyarrow's: only writers need it (module docstring)

    return storage.sibling_temp(path)
