"""Export a kvpass-compressed model so it runs where Python hooks cannot follow.

``kvpass.export(model, out, format=..., policy=..., budget=...)`` torch.exports the model's prefill (or,
with ``prefill_block=C``, the block-wise prefill's block program) and decode step, rewrites both with
kvpass's attention analysis and passes (the same rewrite the ``kvpass`` backend applies), and packages
them in one of :data:`FORMATS`.
``kvpass.load(out)`` runs a complete greedy generation from the artifact, without the model's code.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from kvpass.lowering.export.base import MANIFEST, ExportedModel, ExportFormat, Progress, read_manifest

_MODULES = {"pt2": "pt2", "aoti": "aoti", "jax": "to_jax", "tvm": "to_tvm", "mlir": "to_mlir"}
FORMATS = tuple(_MODULES)


def get_format(name: str) -> ExportFormat:
    """The declaration of format ``name`` (what it needs and supports)."""
    if name not in _MODULES:
        raise ValueError(f"kvpass export: unknown format {name!r}; valid formats are {list(FORMATS)}")
    return importlib.import_module(f"kvpass.lowering.export.{_MODULES[name]}").FORMAT


def resolve_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    """A model object as-is; a local Hugging Face model directory; or the name of a model kvpass ships."""
    if isinstance(model, torch.nn.Module):
        return model.eval()
    from kvpass.models import MODELS
    from kvpass.models import load as load_shipped

    if isinstance(model, str | Path) and Path(model).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32).eval()
    if isinstance(model, str) and model in MODELS:
        return load_shipped(model)[0]
    raise ValueError(f"kvpass export: model {model!r} is neither a local Hugging Face model directory nor a model "
                     f"kvpass ships ({sorted(MODELS)})")


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"kvpass export: {name} must be a positive integer, got {value!r}")
    return value


def export(
    model: torch.nn.Module | str | Path,
    out: str | Path,
    *,
    format: str = "pt2",
    policy: str = "snapkv",
    budget: int | None = None,
    layer_budgets: list[int] | None = None,
    prompt_len: int | None = None,
    max_prompt: int | None = None,
    prefill_block: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **policy_params: Any,
) -> Path:
    """Export ``model`` with KV compression compiled in; returns the artifact directory ``out``.

    ``format``: one of :data:`FORMATS` (``get_format(name)`` says what each supports).
    ``policy``/``budget``/``layer_budgets``/``policy_params``: as the backend's options (a ratio is not
    accepted: the exported decode step has a fixed store size). ``prompt_len``: export the prefill for
    exactly that many tokens (required by formats without dynamic shapes); otherwise prompts of
    2..``max_prompt`` tokens (default: the model's ``max_position_embeddings``).
    ``prefill_block``: export the block-wise prefill's block program (``prefill_block`` tokens, static
    shapes) instead; the loader runs it once per block, so every format then takes prompts of any length
    (1..``max_prompt``) and the KV held never exceeds budget + one block.
    Everything is checked before anything is written; the artifact appears only once complete.
    """
    from kvpass.lowering.export.core import export_programs

    from kvpass.config import parse_options

    fmt = get_format(format)
    missing = fmt.missing()
    if missing:
        raise ValueError(f"kvpass export: format {format!r} needs the Python package(s) {missing}, which are not "
                         f"installed; install them with: {fmt.install}")
    refused = {k: policy_params[k] for k in ("ratio", "compiler", "fallback") if k in policy_params}
    if refused:
        raise ValueError(f"kvpass export: options {refused} do not apply to an export (the decode step and the "
                         "prefill block have a fixed store size, the format picks the compiler); give budget= or "
                         "layer_budgets=")
    prefill_block = _positive("prefill_block", prefill_block)
    options = parse_options({"policy": policy, "budget": budget, "layer_budgets": layer_budgets,
                             "prefill_block": prefill_block, **policy_params})
    if options.episodes is not None:
        raise ValueError(f"kvpass export: option 'episodes' ({options.episodes}) keeps one cache per episode and "
                         "picks one per question at run time (kvpass.apps.episodic); the exported programs hold a "
                         "single store: export without it")
    prompt_len, max_prompt = _positive("prompt_len", prompt_len), _positive("max_prompt", max_prompt)
    if prompt_len is not None and prompt_len < 2:
        raise ValueError(f"kvpass export: prompt_len must be at least 2, got {prompt_len}")
    if prefill_block is not None:
        if not fmt.prefill_block:
            raise ValueError(f"kvpass export: format {format!r} cannot export --prefill-block {prefill_block}; "
                             f"formats that can: {[f for f in FORMATS if get_format(f).prefill_block]}")
        if prefill_block < 2:
            raise ValueError(f"kvpass export: --prefill-block must be at least 2 tokens, got {prefill_block}")
        if prompt_len is not None:
            raise ValueError(f"kvpass export: --prompt-len {prompt_len} does not apply with --prefill-block "
                             f"{prefill_block}: the block program takes prompts of any length; give one of them")
    elif not fmt.dynamic_prompt and prompt_len is None:
        raise ValueError(f"kvpass export: format {format!r} has static shapes only: give the prompt length the "
                         "prefill is exported for (--prompt-len N / prompt_len=N)")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"kvpass export: output {str(out)!r} exists and is not an empty directory; "
                         "choose another path or pass overwrite=True (--overwrite)")

    bar = Progress(total=3, enabled=progress)
    staging = Path(tempfile.mkdtemp(prefix=".kvpass-export-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's private mode would stick to the published artifact
    try:
        start = time.perf_counter()
        bar.start("loading model")
        module = resolve_model(model)
        bar.done()
        bar.start("torch.export + kvpass rewrite (prefill, decode)")
        programs = export_programs(module, options, prompt_len=prompt_len, max_prompt=max_prompt,
                                   prefill_block=prefill_block)
        bar.done()
        files = fmt.write(programs, staging, bar)
        manifest = {**programs.manifest, "format": format, "files": files,
                    "export_seconds": round(time.perf_counter() - start, 2)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        bar.done()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out


def load(path: str | Path) -> ExportedModel:
    """Load an artifact written by :func:`export`; ``.generate(ids, max_new_tokens)`` runs it."""
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


__all__ = ["FORMATS", "ExportFormat", "ExportedModel", "export", "get_format", "load", "resolve_model"]
