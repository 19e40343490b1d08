"""Sample types shared by the benchmark generators, and tokenizer helpers.

Generators work in token ids, so a sample's length is exact for the tokenizer it was built with and
facts/needles sit at known token positions (``meta`` records them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["QASample", "LMSample", "Tokenizer", "encode", "bos_ids", "tokenizer_key", "normalize_answer",
           "answer_matches"]


class Tokenizer(Protocol):
    """The part of an HF tokenizer the generators use."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: Any) -> str: ...


@dataclass(frozen=True)
class QASample:
    """A prompt whose greedy continuation must contain one of ``answers``.

    ``prompt_ids`` is the whole prompt (context, question and an answer prefix such as
    "Answer: The special magic number for lion is"), ready for a plain-text completion model.
    """

    benchmark: str
    uid: str
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def is_correct(self, generated_text: str) -> bool:
        return answer_matches(generated_text, self.answers)


@dataclass(frozen=True)
class LMSample:
    """A context followed by target tokens scored by perplexity (teacher-forced, token by token)."""

    benchmark: str
    uid: str
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)


def answer_matches(generated_text: str, answers: Sequence[str]) -> bool:
    """Whether a normalized answer occurs in the normalized generation as whole words, a number optionally
    with its ordinal suffix ("March 14" is in "March 14th"; "February 2" is not in "February 21", nor "238"
    in "2381")."""
    got = normalize_answer(generated_text)
    for answer in map(normalize_answer, answers):
        suffix = "(?:st|nd|rd|th)?" if answer[-1:].isdigit() else ""
        if re.search(rf"(?<!\w){re.escape(answer)}{suffix}(?!\w)", got):
            return True
    return False


def normalize_answer(text: str) -> str:
    """Lower-case, drop thousands separators and punctuation, collapse spaces."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer: Tokenizer) -> list[int]:
    """The BOS token(s) the tokenizer adds to a sequence by default (SmolLM2: none, Gemma: ``[2]``)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = encode(tokenizer, "a")
    n = len(with_special) - len(without)
    return with_special[:n] if n > 0 and with_special[n:] == without else []


def tokenizer_key(tokenizer: Tokenizer) -> str:
    """A string identifying a tokenizer's vocabulary, for memoising tokenized corpora."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    probe = encode(tokenizer, "The quick brown fox, 1234567. Über!")
    return f"{name}|{len(tokenizer) if hasattr(tokenizer, '__len__') else 0}|{probe}"
