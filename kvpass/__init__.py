"""kvpass: KV-cache compression compiled into the model.

``torch.compile(model.forward, backend="kvpass", options={"policy": "snapkv", "budget": 1024})``
rewrites every attention layer of an unmodified Hugging Face decoder into a fixed-capacity KV store
that a policy evicts after each forward. See the README for options; :func:`explain` and
:func:`kv_stats` show what was done.
"""

import os
from pathlib import Path
from typing import Any

from kvpass.config import KVPassOptions, parse_options
from kvpass.errors import KVPassError, OptionError, UnsupportedGraph
from kvpass.policies import POLICIES, sentence_end_ids
from kvpass.runtime.blockwise import observing
from kvpass.runtime.report import explain, kv_stats

__version__ = "0.1.0"
__all__ = ["POLICIES", "CompressedCache", "KVPassError", "KVPassOptions", "OptionError", "UnsupportedGraph", "explain",
           "export", "kv_stats", "load", "observing", "parse_options", "sentence_end_ids"]


def export(model: Any, out: str | os.PathLike, **kwargs: Any) -> Path:
    """Export a compressed model (see :func:`kvpass.exporter.export`)."""
    from kvpass.exporter import export as _export

    return _export(model, out, **kwargs)


def load(path: str | os.PathLike) -> Any:
    """Load an exported artifact (see :func:`kvpass.lowering.export.load`)."""
    from kvpass.lowering.export import load as _load

    return _load(path)


def __getattr__(name: str) -> Any:
    if name == "CompressedCache":  # imported on first use: it subclasses transformers' DynamicCache
        from kvpass.runtime.cache import CompressedCache

        return CompressedCache
    raise AttributeError(f"module 'kvpass' has no attribute {name!r}")
