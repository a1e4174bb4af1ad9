"""FaceMAE on Ray.

    import facemae

    job = facemae.train("jobs/configs/train_smoke.yaml", overrides=["train.max_steps=50"])
    facemae.submit(["python", "jobs/train.py"], address="http://head:8265")

The SDK (:mod:`facemae.sdk`) loads on first use, so ``import facemae`` imports neither torch nor ray.
``train``, ``tune``, ``generate``, ``experiment`` and ``frontier`` are also the names of subpackages or
modules; those are callable and run their SDK function, so ``facemae.train(...)`` and
``facemae.train.trainer`` both work (see ``help(facemae.sdk.train)`` for the arguments).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names load lazily
    from facemae.config import Config, load_config
    from facemae.sdk import (EvaluateResult, GenerateResult, JobFailedError, SubmitResult, evaluate, experiment,
                             export_onnx, frontier, generate, ingest, mask, resolve_config, submit, train, train_run, tune)

# Names that are also subpackages (or modules) of facemae; each of those modules is made callable.
_CALLABLE = ("train", "tune", "generate", "experiment", "frontier")
_EXPORTS = {
    **{name: "facemae.sdk" for name in (
        "evaluate", "export_onnx", "ingest", "mask", "submit", "train_run", "resolve_config", "EvaluateResult",
        "GenerateResult", "JobFailedError", "SubmitResult")},
    "Config": "facemae.config",
    "load_config": "facemae.config",
}
__all__ = sorted([*_EXPORTS, *_CALLABLE])


def __getattr__(name: str) -> Any:
    if name in _CALLABLE:
        return importlib.import_module(f"{__name__}.{name}")  # binding it on this package makes it callable
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _EntryModule(types.ModuleType):
    """A subpackage that is also the SDK function of its name: ``facemae.train(config, ...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("facemae.sdk"), self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The ``facemae`` package. A module ``__getattr__`` alone cannot export ``train``: importing
    ``facemae.train.trainer`` binds ``facemae.train`` to the subpackage, for good. So the subpackage
    itself is made callable when the import system binds it here; it stays a real module (imports,
    pickling and monkeypatching of ``facemae.train.*`` work as before)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE and type(value) is types.ModuleType:
            value.__class__ = _EntryModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
