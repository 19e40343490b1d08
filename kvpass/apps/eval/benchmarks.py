"""The benchmarks ``kvpass eval`` knows, built from :mod:`kvpass.models.data` generators.

Each benchmark turns a tokenizer and a :class:`BenchConfig` into samples: question-answer samples
(scored by accuracy of a greedy answer) or language-modelling samples (scored by perplexity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpass.models.data import (
    LMSample,
    QASample,
    conversation_samples,
    niah_samples,
    perplexity_samples,
)

__all__ = ["BenchConfig", "Benchmark", "BENCHMARKS", "DEFAULT_BENCHMARKS"]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the generated benchmarks (the defaults are the default ``kvpass eval`` grid)."""

    seed: int = 0
    niah_lengths: tuple[int, ...] = (1024, 2048)
    niah_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    niah_samples_per_cell: int = 1
    multikey_keys: int = 4
    conversations: int = 1
    sessions: int = 6
    session_tokens: int = 250
    questions: int = 4
    distractors: bool = False
    ppl_lengths: tuple[int, ...] = (1024,)
    ppl_target: int = 32
    ppl_samples: int = 2

    def replace(self, **changes: object) -> BenchConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


Samples = Sequence[QASample] | Sequence[LMSample]


@dataclass(frozen=True)
class Benchmark:
    """A named generator; ``metric`` is "accuracy" (QA) or "perplexity" (LM)."""

    name: str
    metric: str
    label: str
    build: Callable[[object, BenchConfig], Samples]


def _ppl(corpus: str) -> Callable[[object, BenchConfig], Samples]:
    def build(tok: object, c: BenchConfig) -> Samples:
        out: list[LMSample] = []
        for length in c.ppl_lengths:
            out += perplexity_samples(
                tok, corpus=corpus, context_length=length, target_length=c.ppl_target,
                num_samples=c.ppl_samples, seed=c.seed,
            )  # fmt: skip
        return out

    return build


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "niah", "accuracy", "NIAH-style single needle (Paul Graham essays)",
            lambda tok, c: niah_samples(
                tok, lengths=c.niah_lengths, depths=c.niah_depths,
                samples_per_cell=c.niah_samples_per_cell, seed=c.seed,
            ),
        ),
        Benchmark(
            "niah-multikey", "accuracy", "NIAH-style multi-key (one asked, the rest distractors)",
            lambda tok, c: niah_samples(
                tok, lengths=c.niah_lengths, depths=c.niah_depths, num_keys=c.multikey_keys,
                samples_per_cell=c.niah_samples_per_cell, seed=c.seed,
            ),
        ),
        Benchmark(
            "locomo", "accuracy", "LoCoMo-style multi-session conversation QA (chitchat-dataset)",
            lambda tok, c: conversation_samples(
                tok, num_conversations=c.conversations, num_sessions=c.sessions,
                session_tokens=c.session_tokens, questions_per_conversation=c.questions,
                distractors=c.distractors, seed=c.seed,
            ),
        ),
        Benchmark("ppl-essays", "perplexity", "perplexity, Paul Graham essays", _ppl("essays")),
        Benchmark("ppl-kjv", "perplexity", "perplexity, King James Bible (Debian bible-kjv)", _ppl("kjv")),
    )
}  # fmt: skip

DEFAULT_BENCHMARKS = ("niah", "locomo", "ppl-essays")
