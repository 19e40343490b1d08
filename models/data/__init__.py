"""Benchmarks generated from shipped corpora, deterministic by seed (labelled "-style", not the originals).

- :func:`niah_samples`: NIAH-style needle-in-a-haystack on the Paul Graham essays (single and multi-key).
- :func:`conversation_samples`: LoCoMo-style multi-session conversations with planted facts (chitchat).
- :func:`perplexity_samples`: long-text perplexity windows (essays; KJV when installed).
"""

from .conversations import conversation_samples
from .corpora import CorpusUnavailable, corpus_text
from .niah import niah_samples
from .perplexity import perplexity_samples
from .samples import LMSample, QASample

__all__ = [
    "CorpusUnavailable",
    "LMSample",
    "QASample",
    "conversation_samples",
    "corpus_text",
    "niah_samples",
    "perplexity_samples",
]
