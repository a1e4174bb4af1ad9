"""InsightFace verification ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``), loaded safely.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2N`` encoded images taken pairwise ``(2i, 2i+1)`` and
``N`` bools [SRC insightface ``recognition/arcface_torch/eval/verification.py: load_bin``]. The originals were
written by Python 2 (images as py2 ``str``), hence ``encoding="bytes"``; some repacks hold 1-D uint8 arrays.

Plain ``pickle.load`` on a downloaded file runs whatever the file says, so :func:`load_verification_bin`
uses an unpickler that resolves only the few globals numpy arrays and Python-3 bytes need.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from facemae import storage


def _numpy_core(module: str) -> Any:
    """``numpy._core.<module>`` (numpy >= 2), else ``numpy.core.<module>`` (numpy 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


_multiarray = _numpy_core("multiarray")
_numeric = _numpy_core("numeric")


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` in a pickle: usable as ``_reconstruct``'s subtype, but a file cannot
    call ``ndarray(shape)`` with it to allocate arbitrary memory."""

    def __call__(self, *args: Any) -> None:
        raise UnsafePickleError("refused a direct numpy.ndarray(...) call, which numpy never writes; the file "
                                "has been tampered with")


_NDARRAY = _NdarrayType()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's protocol <= 4 ``_reconstruct``, only in the form numpy itself writes: an empty ndarray that the
    following ``BUILD`` (``ndarray.__setstate__``) fills from bytes in the file."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise UnsafePickleError(f"refused numpy _reconstruct({subtype!r}, {shape!r}): numpy writes "
                                f"_reconstruct(ndarray, (0,), ...) only; the file has been tampered with")
    return _multiarray._reconstruct(np.ndarray, shape, typecode)


# The only globals a verification .bin may name, mapped straight to objects (nothing is imported by name):
# numpy array reconstruction under numpy 1.x ``numpy.core`` and 2.x ``numpy._core`` spellings (``_frombuffer``
# is numpy's protocol-5 path; it allocates no more than the bytes in the file) and ``_codecs.encode``, which
# protocol <= 2 pickles written by Python 3 use for bytes. None of them imports a module or runs code chosen
# by the file.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class VerificationBinError(ValueError):
    """A verification ``.bin`` is unreadable or not shaped ``(2N images, N bools)``."""


class UnsafePickleError(VerificationBinError):
    """The pickle names a global outside the allow-list; nothing it names was imported or called."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; every other ``GLOBAL``/``STACK_GLOBAL``/``INST`` is refused."""

    def __init__(self, file: Any, *, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self._path}: refused to load global {module}.{name}; a verification .bin "
                                    f"holds only image bytes and bools, so this file is not a verification .bin "
                                    f"or has been tampered with. Do not open it with plain pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused a persistent id; this file is not a verification .bin "
                                f"or has been tampered with")


@dataclass(frozen=True)
class VerificationPairs:
    """Verification pairs: images ``2i`` and ``2i+1`` are pair ``i``.

    Attributes:
        images: ``2N`` encoded images (JPEG / PNG bytes), not decoded.
        issame: ``N`` flags, True when the pair shows the same identity.
    """

    images: list[bytes]
    issame: list[bool]

    def __post_init__(self) -> None:
        _check_counts(len(self.images), len(self.issame), where="VerificationPairs")

    def pairs(self) -> Iterator[tuple[bytes, bytes, bool]]:
        """Yields ``(image_a, image_b, issame)`` per pair."""
        for i, same in enumerate(self.issame):
            yield self.images[2 * i], self.images[2 * i + 1], same

    def __len__(self) -> int:
        return len(self.issame)


def _check_counts(num_images: int, num_issame: int, *, where: str) -> None:
    if num_images % 2:
        raise VerificationBinError(f"{where}: holds {num_images} images, an odd number; images come in pairs "
                                   f"(2i, 2i+1), so the file is truncated or not a verification .bin")
    if num_images != 2 * num_issame:
        raise VerificationBinError(f"{where}: holds {num_images} images ({num_images // 2} pairs) but "
                                   f"{num_issame} issame labels; it needs exactly 2 images per label")


def _as_image_bytes(item: Any, *, index: int, where: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and (item.flags.c_contiguous or item.ndim == 1):
        return item.tobytes()  # 1-D, or (n, 1) as some published files store it: the same buffer
    kind = f"ndarray of dtype {item.dtype} and shape {item.shape}" if isinstance(item, np.ndarray) \
        else type(item).__name__
    raise VerificationBinError(f"{where}: image {index} is a {kind}; expected encoded image bytes or a contiguous "
                               f"uint8 array of them, so this is not a verification .bin")


def _as_issame(items: Any, *, where: str) -> list[bool]:
    if isinstance(items, np.ndarray) and items.dtype == np.bool_ and items.ndim == 1:
        return [bool(x) for x in items]  # some repacks store issame as one bool array
    if not isinstance(items, (list, tuple)):
        raise VerificationBinError(f"{where}: issame is a {type(items).__name__}; expected a list of bools")
    out = []
    for i, x in enumerate(items):
        if not (isinstance(x, bool) or (type(x) is int and x in (0, 1))):
            raise VerificationBinError(f"{where}: issame[{i}] is {x!r}; expected a bool (or 0/1)")
        out.append(bool(x))
    return out


def _validate(obj: Any, *, where: str) -> VerificationPairs:
    """Checks the unpickled object is ``(bins, issame)`` and converts it."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        kind = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise VerificationBinError(f"{where}: holds a {kind}; expected the 2-tuple (images, issame_list) of an "
                                   f"InsightFace verification .bin")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise VerificationBinError(f"{where}: images is a {type(bins).__name__}; expected a list of encoded images")
    flags = _as_issame(issame, where=where)
    _check_counts(len(bins), len(flags), where=where)
    images = [_as_image_bytes(item, index=i, where=where) for i, item in enumerate(bins)]
    return VerificationPairs(images=images, issame=flags)


def load_verification_bin(path: str | os.PathLike) -> VerificationPairs:
    """Loads a verification ``.bin`` without executing anything it contains.

    Args:
        path: ``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin`` or a file in the same format.

    Returns:
        The pairs, images as encoded bytes.

    Raises:
        UnsafePickleError: The pickle names a global outside the allow-list (not a .bin, or tampered with).
        VerificationBinError: An unreadable pickle, or not ``(2N images, N bools)``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path=path).load()
    except UnsafePickleError as exc:
        if str(path) in str(exc):
            raise
        raise UnsafePickleError(f"{path}: {exc}") from None
    except VerificationBinError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        # Truncated or garbled pickles surface as any of these, from pickle itself or numpy's __setstate__.
        raise VerificationBinError(f"{path}: not a readable verification .bin ({type(exc).__name__}: {exc}); "
                                   f"re-download it") from exc
    return _validate(obj, where=str(path))


def save_verification_bin(path: str | os.PathLike,
                          pairs: VerificationPairs | tuple[Sequence[bytes], Sequence[bool]], *,
                          protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    """Writes ``(images, issame)`` as a verification ``.bin``, atomically (temp file + ``os.replace``).

    Args:
        path: File to write.
        pairs: The pairs, or an ``(images, issame)`` tuple.
        protocol: Pickle protocol; 2 keeps the file readable by Python 2 era tools.

    Raises:
        VerificationBinError: Counts that do not match, or images that are not bytes.
    """
    path = Path(path)
    if not isinstance(pairs, VerificationPairs):
        pairs = _validate(tuple(pairs), where=f"save_verification_bin({path})")
    images = [bytes(im) for im in pairs.images]
    issame = [bool(x) for x in pairs.issame]
    tmp = storage.sibling_temp(path)
    try:
        with open(tmp, "wb") as f:
            pickle.dump((images, issame), f, protocol=protocol)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
