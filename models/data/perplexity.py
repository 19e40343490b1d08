"""Long-text perplexity samples (Paul Graham essays; KJV when installed), deterministic by seed.

Each sample is a ``context_length``-token window of the corpus followed by ``target_length`` tokens
to predict. Scored token by token after the context, it measures how much a compressed KV cache of
the context hurts language modelling of what follows.
"""

from __future__ import annotations

import random

from .niah import corpus_ids
from .samples import LMSample, Tokenizer, bos_ids

__all__ = ["perplexity_samples"]


def perplexity_samples(
    tokenizer: Tokenizer,
    *,
    corpus: str = "essays",
    context_length: int = 1024,
    target_length: int = 64,
    num_samples: int = 2,
    seed: int = 0,
) -> list[LMSample]:
    """``num_samples`` windows at seeded offsets; the context includes the tokenizer's BOS, if any.

    Raises :class:`~kvpass.models.data.corpora.CorpusUnavailable` when the corpus is not installed.
    """
    if context_length < 1 or target_length < 1:
        raise ValueError(f"context_length and target_length must be positive, got {context_length}, {target_length}")
    ids = corpus_ids(tokenizer, corpus)
    bos = bos_ids(tokenizer)
    n_ctx = context_length - len(bos)
    span = n_ctx + target_length
    if span > len(ids):
        raise ValueError(f"corpus {corpus!r} has {len(ids)} tokens, fewer than the {span} a sample needs")
    rng = random.Random(f"ppl|{seed}|{corpus}|{context_length}|{target_length}")
    out = []
    for i in range(num_samples):
        start = rng.randrange(len(ids) - span + 1)
        window = ids[start : start + span]
        out.append(
            LMSample(
                benchmark=f"ppl-{corpus}",
                uid=f"ppl-{corpus}-L{context_length}-s{seed}-{i}",
                context_ids=tuple(bos + window[:n_ctx]),
                target_ids=tuple(window[n_ctx:]),
                meta={
                    "corpus": corpus,
                    "offset": start,
                    "length": context_length,
                    "target_length": target_length,
                },
            )
        )
    return out
