"""Verification .bin (lfw.bin and kin): round trips, Python-2 layout, numpy images, and refused payloads."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemae.data.verification_bin import (
    UnsafePickleError,
    VerificationBinError,
    VerificationPairs,
    load_verification_bin,
    save_verification_bin,
)

ISSAME = [True, False, True]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Six encoded 112x112 noise images (three pairs): PNG, one JPEG."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG" if i == 1 else "PNG")
        out.append(buf.getvalue())
    return out


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "lfw.bin"
    path.write_bytes(data)
    return path


def test_round_trip(tmp_path: Path, images: list[bytes]) -> None:
    path = tmp_path / "sub" / "lfw.bin"
    save_verification_bin(path, (images, ISSAME))
    loaded = load_verification_bin(path)
    assert loaded == VerificationPairs(images=images, issame=ISSAME)
    assert len(loaded) == 3
    assert list(loaded.pairs()) == [(images[0], images[1], True), (images[2], images[3], False),
                                    (images[4], images[5], True)]
    save_verification_bin(path, loaded, protocol=2)  # overwrites in place
    assert load_verification_bin(path) == loaded
    assert sorted(p.name for p in path.parent.iterdir()) == ["lfw.bin"]  # no temp files left


def _py2_string(data: bytes) -> bytes:
    # Python 2 pickles str as SHORT_BINSTRING (len < 256) or BINSTRING (4-byte length).
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data


def test_python2_layout_of_the_real_lfw_bin(tmp_path: Path, images: list[bytes]) -> None:
    # What Python 2's pickle.dump((bins, issame_list), f, protocol=2) writes, opcode by opcode.
    bins = [*images, b"\xff\xd8 short jpeg-ish \x00\x80", b"\x89PNG tiny"]
    issame = [*ISSAME, False]
    data = b"\x80\x02"  # PROTO 2
    data += b"]q\x00(" + b"".join(_py2_string(b) for b in bins) + b"e"  # EMPTY_LIST BINPUT MARK ... APPENDS
    data += b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"  # NEWTRUE / NEWFALSE
    data += b"\x86q\x02."  # TUPLE2 BINPUT STOP
    assert pickle.loads(data, encoding="bytes") == (bins, issame)  # the hand-built pickle is well formed
    loaded = load_verification_bin(_write(tmp_path, data))
    assert loaded.images == bins
    assert loaded.issame == issame


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_uint8_images(tmp_path: Path, images: list[bytes], protocol: int) -> None:
    arrays = [np.frombuffer(im, dtype=np.uint8) for im in images]
    data = pickle.dumps((arrays, ISSAME), protocol=protocol)
    loaded = load_verification_bin(_write(tmp_path, data))
    assert loaded.images == images
    assert loaded.issame == ISSAME


def test_numpy_1x_spelling_and_bool_array_issame(tmp_path: Path, images: list[bytes]) -> None:
    arrays = [np.frombuffer(im, dtype=np.uint8) for im in images]
    data = pickle.dumps((arrays, np.array(ISSAME)), protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy 1.x writes it
    loaded = load_verification_bin(_write(tmp_path, data))
    assert loaded == VerificationPairs(images=images, issame=ISSAME)


# -- refused content -----------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", ["system", "eval"])
def test_malicious_pickle_never_runs(tmp_path: Path, images: list[bytes], protocol: int, kind: str) -> None:
    marker = tmp_path / f"PWNED_{uuid.uuid4().hex}"
    if kind == "system":
        payload, name = _Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        # Protocols < 3 spell the module Python 2's way, and the message names what the file says.
        payload, name = _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), r"(builtins|__builtin__)\.eval"
    data = pickle.dumps(([images[0], payload], [True]), protocol=protocol)
    path = _write(tmp_path, data)
    with pytest.raises(UnsafePickleError, match=rf"lfw\.bin: refused to load global {name}.*tampered with"):
        load_verification_bin(path)
    assert not marker.exists()


def test_tampered_numpy_calls_are_refused(tmp_path: Path) -> None:
    # ndarray((10**9,)) called directly would allocate a gigabyte; numpy never writes that.
    direct = b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x85R."
    with pytest.raises(UnsafePickleError, match=r"lfw\.bin: refused a direct numpy\.ndarray"):
        load_verification_bin(_write(tmp_path, direct))
    # _reconstruct(ndarray, (10**9,), b"b") instead of numpy's (0,)
    big = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85C\x01b\x87R."
    with pytest.raises(UnsafePickleError, match=r"lfw\.bin: refused numpy _reconstruct"):
        load_verification_bin(_write(tmp_path, big))


def test_numpy_n_by_1_uint8_images(tmp_path: Path, images: list[bytes]) -> None:
    """Some published files store each image as a (n, 1) uint8 array; insightface reads them."""
    arrays = [np.frombuffer(im, dtype=np.uint8).reshape(-1, 1).copy() for im in images]
    loaded = load_verification_bin(_write(tmp_path, pickle.dumps((arrays, ISSAME), protocol=2)))
    assert loaded == VerificationPairs(images=images, issame=ISSAME)


@pytest.mark.parametrize("array", [np.zeros(8, np.float32), np.array([b"a", b"b"], dtype=object),
                                   np.asfortranarray(np.arange(8, dtype=np.uint8).reshape(2, 4))],
                         ids=["float32", "object", "fortran-order"])
def test_other_arrays_are_refused(tmp_path: Path, array: np.ndarray) -> None:
    data = pickle.dumps(([array, array], [True]), protocol=2)
    with pytest.raises(VerificationBinError, match=rf"image 0 is a ndarray of dtype {array.dtype}.*contiguous uint8"):
        load_verification_bin(_write(tmp_path, data))


# -- structure and counts -------------------------------------------------------------------------------------


def test_odd_number_of_images(tmp_path: Path, images: list[bytes]) -> None:
    path = _write(tmp_path, pickle.dumps((images[:5], ISSAME[:2])))
    with pytest.raises(VerificationBinError, match=r"lfw\.bin: holds 5 images, an odd number"):
        load_verification_bin(path)


def test_count_mismatch(tmp_path: Path, images: list[bytes]) -> None:
    path = _write(tmp_path, pickle.dumps((images, ISSAME[:2])))
    with pytest.raises(VerificationBinError, match=r"holds 6 images \(3 pairs\) but 2 issame labels"):
        load_verification_bin(path)
    with pytest.raises(VerificationBinError, match=r"holds 6 images \(3 pairs\) but 4 issame labels"):
        save_verification_bin(tmp_path / "out.bin", (images, [*ISSAME, True]))
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(VerificationBinError, match="holds 2 images"):
        VerificationPairs(images=images[:2], issame=[True, False])


@pytest.mark.parametrize("obj, message", [
    ({"bins": []}, "holds a dict"),
    (([], [], []), "holds a tuple of length 3"),
    ((b"ab", [True]), "images is a bytes"),
    (([b"a", "b"], [True]), "image 1 is a str"),
    (([b"a", b"b"], [2]), r"issame\[0\] is 2"),
    (([b"a", b"b"], [None]), r"issame\[0\] is None"),
])
def test_wrong_structure(tmp_path: Path, obj: object, message: str) -> None:
    with pytest.raises(VerificationBinError, match=message):
        load_verification_bin(_write(tmp_path, pickle.dumps(obj)))


@pytest.mark.parametrize("data", [b"", b"not a pickle at all", pickle.dumps(([b"a", b"b"], [True]))[:-5]],
                         ids=["empty", "garbage", "truncated"])
def test_unreadable_file(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(VerificationBinError, match=r"lfw\.bin: not a readable verification \.bin"):
        load_verification_bin(_write(tmp_path, data))
