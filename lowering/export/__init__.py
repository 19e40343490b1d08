"""Export formats: each one's writer, and the loaders that run an artifact without the model's code.

A format (:data:`FORMATS`; ``get_format(name)`` says what it needs and supports) packages the two programs of
:mod:`kvpass.lowering.export.programs` (a prefill or block program, and a decode step). :func:`kvpass.export`
(:mod:`kvpass.exporter`) makes those programs; ``kvpass.load(out)`` (:func:`load`) runs a complete greedy
generation from the artifact. Nothing here imports kvpass's analysis or passes: only :mod:`kvpass.ops`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from kvpass.lowering.export.base import ExportedModel, ExportFormat, read_manifest

_MODULES = {"pt2": "pt2", "aoti": "aoti", "jax": "to_jax", "tvm": "to_tvm", "mlir": "to_mlir"}
FORMATS = tuple(_MODULES)


def get_format(name: str) -> ExportFormat:
    """The declaration of format ``name`` (what it needs and supports)."""
    if name not in _MODULES:
        raise ValueError(f"kvpass export: unknown format {name!r}; valid formats are {list(FORMATS)}")
    return importlib.import_module(f"kvpass.lowering.export.{_MODULES[name]}").FORMAT


def load(path: str | Path) -> ExportedModel:
    """Load an artifact written by :func:`kvpass.export`; ``.generate(ids, max_new_tokens)`` runs it."""
    path = Path(path)
    manifest = read_manifest(path)
    fmt = get_format(manifest["format"])
    if not fmt.runnable or fmt.load is None:
        raise ValueError(f"kvpass: a {fmt.name!r} artifact is a module for downstream compilers; nothing here runs "
                         f"it (formats kvpass.load runs: {[f for f in FORMATS if get_format(f).runnable]})")
    missing = fmt.missing()
    if missing:
        raise ValueError(f"kvpass: loading a {fmt.name!r} artifact needs {missing}; install with: {fmt.install}")
    return ExportedModel(manifest, fmt.load(path, manifest))


__all__ = ["FORMATS", "ExportFormat", "ExportedModel", "get_format", "load"]
