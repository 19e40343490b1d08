"""The tuned-config cache that ``kvpass tune`` writes and every kernel launch wrapper reads.

A JSON file (``$KVPASS_TUNE_CACHE``, else ``~/.cache/kvpass/tune.json``) maps
``kernel | shape bucket | device name | triton version`` to the fastest launch config measured for it.
Launch wrappers look their shape up here and fall back to their default heuristic on a miss, so a
tuned machine needs no code or option change. Shapes are bucketed (powers of two) so one entry covers
nearby lengths without re-tuning.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import triton

FORMAT_VERSION = 1
_lock = threading.Lock()
_loaded: dict[str, tuple[float, dict[str, Any]]] = {}  # path -> (mtime, entries)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_path(path: str | os.PathLike | None = None) -> Path:
    """The cache file: ``path`` if given, else ``$KVPASS_TUNE_CACHE``, else ``~/.cache/kvpass/tune.json``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("KVPASS_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvpass" / "tune.json"


def device_name(device: torch.device) -> str:
    """The name configs are keyed by: the GPU's marketing name, or the interpreter for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} (triton interpreter)"


def bucket(n: int) -> int:
    """Next power of two >= ``n`` (0 and 1 stay themselves): the shape bucket of a length."""
    return n if n <= 1 else triton.next_power_of_2(n)


def entry_key(kernel: str, shape_bucket: str, device: str, triton_version: str | None = None) -> str:
    return "|".join((kernel, shape_bucket, device, triton_version or triton.__version__))


def read_cache(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """All entries of the cache file (``{}`` if it does not exist); re-read only when the file changes."""
    p = cache_path(path)
    try:
        mtime = p.stat().st_mtime
    except FileNotFoundError:
        return {}
    with _lock:
        hit = _loaded.get(str(p))
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"kvpass: tune cache {str(p)!r} is not a readable JSON file ({e}); "
                             "delete it or re-run `kvpass tune`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(f"kvpass: tune cache {str(p)!r} has format {found!r}, "
                             f"expected {FORMAT_VERSION}; delete it or re-run `kvpass tune`")
        entries = data.get("entries", {})
        _loaded[str(p)] = (mtime, entries)
        return entries


def lookup(kernel: str, shape_bucket: str, device: torch.device) -> dict[str, int] | None:
    """The tuned launch config for this kernel, shape bucket and device, or None."""
    hit = read_cache().get(entry_key(kernel, shape_bucket, device_name(device)))
    return dict(hit["config"]) if hit else None


def write_entries(new: dict[str, dict[str, Any]], path: str | os.PathLike | None = None) -> Path:
    """Merge ``new`` entries (key → record with a ``config``) into the cache file; returns its path.

    The file is replaced atomically. An unwritable location raises ``PermissionError``/``OSError``
    naming the path.
    """
    p = cache_path(path)
    entries = dict(read_cache(p)) if p.exists() else {}
    entries.update(new)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True))
        tmp.replace(p)
    except OSError as e:
        raise OSError(f"kvpass: cannot write the tune cache {str(p)!r}: {e.strerror or e}; "
                      "pass a writable file with --cache or set $KVPASS_TUNE_CACHE") from None
    with _lock:
        _loaded.pop(str(p), None)
    return p


__all__ = ["bucket", "cache_path", "device_name", "entry_key", "interpreting", "lookup", "read_cache",
           "write_entries"]
