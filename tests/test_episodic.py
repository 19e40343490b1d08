"""Question-agnostic compression (compress once, answer later) and EpiCache's episodic caches."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

from kvpass.apps.episodic import EpisodicCache, answer, compress_context
from kvpass.runtime.state import store_state


def compiled(model, **options):
    options.setdefault("compiler", "aot_eager")
    return torch.compile(model.forward, backend="kvpass", options=options, dynamic=True), options


def two_topic_context(n_segments: int, seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Two "topics": 12-token segments alternately drawn from the lower and upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    segments, context = [], []
    for i in range(n_segments):
        low = 1 if i % 2 == 0 else 64
        seg = torch.randint(low, low + 63, (12,), generator=g).tolist()
        segments.append((len(context), len(context) + len(seg)))
        context += seg
    return context, segments


def test_compress_then_answer_equals_full_kv_greedy_when_the_budget_covers_everything():
    ref_model, model = tiny_model(), tiny_model()
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    context, question = ids[0, :80].tolist(), ids[0, 80:].tolist()
    ref = ref_model.generate(ids, max_new_tokens=6, do_sample=False)[0, 90:].tolist()
    forward, options = compiled(model, policy="snapkv", budget=128, prefill_block=16)
    ctx = compress_context(forward, model, options, context)
    assert answer(forward, model, ctx, question, 6) == ref
    assert answer(forward, model, ctx, question, 6) == ref  # the compressed context is reusable


def test_repeat_observation_compresses_to_the_budget_and_keeps_the_context_reusable():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=16)
    context = torch.randint(1, 128, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    ctx = compress_context(forward, model, options, context, observe="repeat")
    assert ctx.cache.layers[0].keys.shape[2] == 24
    states = [store_state(layer.keys) for layer in ctx.cache.layers]
    assert all(int(state.pos.max()) < 100 and int(state.seen[0]) == 100 for state in states)
    first = answer(forward, model, ctx, [5, 6, 7], 4)
    assert answer(forward, model, ctx, [5, 6, 7], 4) == first
    with pytest.raises(ValueError, match="'repeat' or None, got 'again'"):
        compress_context(forward, model, options, context, observe="again")


def test_episodic_cache_builds_one_cache_per_episode_and_routes_questions():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=8, episodes=2)
    context, segments = two_topic_context(8, seed=5)
    epi = EpisodicCache(forward, model, options)
    epi.build(context, segments)
    assert len(epi.contexts) == 2 and all(len(p) == 8 for p in epi.patched_prompts)
    assert all(c.cache.layers[0].keys.shape[2] == 24 for c in epi.contexts)
    assert not torch.equal(*(store_state(c.cache.layers[0].keys).pos for c in epi.contexts[:2]))
    low_topic, high_topic = epi.route(list(range(2, 20))), epi.route(list(range(70, 90)))
    assert low_topic != high_topic
    tokens, episode = epi.answer(list(range(70, 90)), 3)
    assert episode == high_topic and len(tokens) == 3


def test_episodic_cache_rejects_bad_input_quoting_it():
    model = tiny_model()
    forward, options = compiled(model, policy="snapkv", budget=24, prefill_block=16)
    with pytest.raises(ValueError, match="policy 'epicache' and 'episodes'"):
        EpisodicCache(forward, model, options)
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, episodes=3)
    epi = EpisodicCache(forward, model, options)
    with pytest.raises(ValueError, match="2 segments cannot form 3 episodes"):
        epi.build(list(range(1, 40)), [(0, 10), (10, 20)])
    with pytest.raises(ValueError, match=r"segment \(30, 50\) is not a span of the 39-token context"):
        epi.build(list(range(1, 40)), [(0, 10), (10, 20), (30, 50)])
    with pytest.raises(RuntimeError, match="build\\(\\) must run"):
        epi.route([1, 2])
    with pytest.raises(TypeError, match="a callable\\); got 'minilm'"):
        EpisodicCache(forward, model, options, embed="minilm")
    flat = EpisodicCache(forward, model, options, embed=lambda batch: np.zeros(len(batch)))
    with pytest.raises(ValueError, match=r"shape \(3,\) for 3 segments; it must return one row per segment"):
        flat.build(list(range(1, 40)), [(0, 10), (10, 20), (20, 30)])


def test_answer_after_compression_to_per_layer_budgets():
    # the question is appended to stores of different lengths in one forward (kvpass.CompressedCache's masks)
    model = tiny_model()
    n_layers = model.config.num_hidden_layers
    budgets = [16 + 8 * i for i in range(n_layers)]
    forward, options = compiled(model, policy="snapkv", layer_budgets=budgets, prefill_block=16, window=8)
    context = torch.randint(1, 128, (100,), generator=torch.Generator().manual_seed(6)).tolist()
    ctx = compress_context(forward, model, options, context)
    assert [layer.keys.shape[2] for layer in ctx.cache.layers] == budgets
    tokens = answer(forward, model, ctx, [5, 6, 7, 8], 4)
    assert len(tokens) == 4
    assert [layer.keys.shape[2] for layer in ctx.cache.layers] == budgets  # the context stays reusable
    assert answer(forward, model, ctx, [5, 6, 7, 8], 4) == tokens


def test_episodic_cache_clusters_and_routes_with_a_given_embedding():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=8, episodes=2)
    context, segments = two_topic_context(6, seed=7)
    seen = []

    def embed(batch):  # one feature: is the span from the upper half of the vocabulary
        seen.append(len(batch))
        return np.array([[float(np.mean(ids) >= 64)] for ids in batch])

    epi = EpisodicCache(forward, model, options, embed=embed)
    epi.build(context, segments)
    assert seen == [6]  # every segment embedded in one batch
    assert list(epi.labels[::2]) == [epi.labels[0]] * 3 and list(epi.labels[1::2]) == [epi.labels[1]] * 3
    assert epi.route([100, 110, 120]) == epi.labels[1] and epi.route([2, 3]) == epi.labels[0]


def test_segment_routing_reaches_an_outlying_segments_episode():
    # three segments at (0, 0) and an outlier at (0, 2) form episode A (centroid (0, 0.5)); B is (2, 2.5) and
    # (2.4, 2.5). A question at (0.9, 2.2) is nearest B's centroid, but nearest the outlier, whose episode is A.
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=8, episodes=2)
    context = list(range(1, 61))
    segments = [(10 * i, 10 * i + 10) for i in range(6)]
    points = {1: (0, 0), 11: (0, 0), 21: (0, 0), 31: (0, 2), 41: (2, 2.5), 51: (2.4, 2.5), 99: (0.9, 2.2)}

    def embed(batch):  # keyed by each span's first token id
        return np.array([points[ids[0]] for ids in batch], dtype=float)

    kwargs = {"seed": 0, "embed": embed}
    by_segment = EpisodicCache(forward, model, options, route="segment", **kwargs)
    by_segment.build(context, segments)
    a, b = by_segment.labels[0], by_segment.labels[4]
    assert list(by_segment.labels) == [a, a, a, a, b, b]
    assert by_segment.route([99]) == a
    by_centroid = EpisodicCache(forward, model, options, **kwargs)
    by_centroid.build(context, segments)
    assert by_centroid.route([99]) == by_centroid.labels[4]
    with pytest.raises(ValueError, match="route must be one of \\('centroid', 'segment'\\); got 'nearest'"):
        EpisodicCache(forward, model, options, route="nearest")
