"""Question-agnostic compression (compress once, answer later) and EpiCache's episodic caches."""

import copy
import re

import numpy as np
import pytest
import torch
from conftest import tiny_model

from kvpass.apps.episodic import (
    PATCHED_INSTRUCTION,
    EpisodicCache,
    answer,
    compress_context,
    episode_batches,
    patched_prompt_prefix,
    unit_rows,
)
from kvpass.ops import slot_heads
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
    assert all(state.packed for state in states)  # EpiCache's default: the reference's "pair" heads (one top-k)
    assert all(int(slot_heads(state.pos, True)[0].max()) < 100 and int(state.seen[0]) == 100 for state in states)
    first = answer(forward, model, ctx, [5, 6, 7], 4)
    assert answer(forward, model, ctx, [5, 6, 7], 4) == first
    with pytest.raises(ValueError, match="'repeat' or None, got 'again'"):
        compress_context(forward, model, options, context, observe="again")


def test_episodic_cache_builds_one_cache_per_episode_and_routes_questions():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=8, episodes=2,
                                reserve=8)
    context, segments = two_topic_context(8, seed=5)
    epi = EpisodicCache(forward, model, options, medoids=3, prefix_ids=[3, 4], separator_ids=[2])
    epi.build(context, segments)
    # the prefix, then each episode's 3 windows nearest its centroid in conversation order, each with the separator
    assert len(epi.contexts) == 2 and all(len(p) == 2 + 3 * 13 for p in epi.patched_prompts)
    assert all(c.cache.layers[0].keys.shape[2] == 24 + 8 for c in epi.contexts)  # budget + reserve
    assert not torch.equal(*(store_state(c.cache.layers[0].keys).pos for c in epi.contexts[:2]))
    low_topic, high_topic = epi.route(list(range(2, 20))), epi.route(list(range(70, 90)))
    assert low_topic != high_topic
    tokens, episode = epi.answer(list(range(70, 75)), 3)
    assert episode == high_topic and len(tokens) == 3
    # routed by the question alone when given (the prompt's answer prefix may be of the other topic)
    assert epi.answer(list(range(2, 7)), 3, query_ids=list(range(70, 90)))[1] == high_topic
    with pytest.raises(ValueError, match="need 23 slots past the budget and option 'reserve' is 8"):
        epi.answer(list(range(70, 90)), 3)


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
    with pytest.raises(ValueError, match=r"shape \(3,\) for 3 token lists; it must return one row per list"):
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
    # unit vectors at angles: three segments at 0 deg and an outlier at 60 form episode A; B is 120 and 130 deg. A
    # question at 85 deg has the larger dot product with B's centroid, but with the outlier, whose episode is A.
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, window=8, episodes=2)
    context = list(range(1, 61))
    segments = [(10 * i, 10 * i + 10) for i in range(6)]
    angles = {1: 0, 11: 0, 21: 0, 31: 60, 41: 120, 51: 130, 99: 85}

    def embed(batch):  # keyed by each span's first token id; scaled, to show the rows are normalized
        return np.array([[3 * np.cos(np.radians(angles[ids[0]])), 3 * np.sin(np.radians(angles[ids[0]]))]
                         for ids in batch])

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


def reference_patched_prompt(vectors, labels, centroid, episode, windows, medoids):
    """apple/ml-epicache's make_cluster_prompt, transcribed: the cluster's windows by cosine similarity to the
    centroid, the top ``medoids``, then in window order."""
    members = [i for i in range(len(windows)) if labels[i] == episode]
    sims = {i: float(vectors[i] @ centroid / (np.linalg.norm(vectors[i]) * np.linalg.norm(centroid))) for i in members}
    top = sorted(members, key=lambda i: sims[i], reverse=True)[:medoids]
    return [tok for i in sorted(top) for tok in windows[i]]


def test_episodes_patched_prompts_and_routing_follow_the_reference():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, episodes=2, reserve=12)
    context, segments = two_topic_context(10, seed=11)
    epi = EpisodicCache(forward, model, options, medoids=2, prefix_ids=[7, 8, 9])
    epi.build(context, segments)
    windows = [context[s:t] for s, t in segments]
    unit = unit_rows(epi.embed_input_mean(windows).astype(np.float64))
    np.testing.assert_allclose(epi.vectors, unit)
    for e in range(2):
        expected = reference_patched_prompt(unit, epi.labels, epi.centroids[e], e, windows, 2)
        assert epi.patched_prompts[e] == [7, 8, 9, *expected]
    for question in ([5, 6, 7, 8], [100, 101, 102], [60, 3, 90]):
        q = unit_rows(epi.embed_input_mean([question]).astype(np.float64))[0]
        assert epi.route(question) == int(np.argmax([float(np.dot(q, c)) for c in epi.centroids]))
        assert epi.route(question, rule="segment") == int(epi.labels[int(np.argmax(epi.vectors @ q))])
    with pytest.raises(ValueError, match="route must be one of .* got 'nearest'"):
        epi.route([5, 6, 7], rule="nearest")


def test_batched_episode_build_equals_one_prefill_per_episode():
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, episodes=3, reserve=10)
    g = torch.Generator().manual_seed(12)
    context, segments = [], []
    for i in range(9):  # segments of 9-16 tokens: patched prompts of different lengths
        seg = torch.randint(1 if i % 2 == 0 else 64, 64 if i % 2 == 0 else 127, (9 + i % 8,), generator=g).tolist()
        segments.append((len(context), len(context) + len(seg)))
        context += seg
    batched = EpisodicCache(forward, model, options, medoids=2, batched=True, batch_padding=float("inf"))
    batched.build(context, segments)
    sequential = EpisodicCache(forward, model, options, medoids=2, batched=False)
    sequential.build(context, segments)
    assert len({len(p) for p in batched.patched_prompts}) > 1  # prompts of different lengths share the batch
    for one, other in zip(batched.contexts, sequential.contexts, strict=True):
        for a, b in zip(one.cache.layers, other.cache.layers, strict=True):
            assert a.keys.shape[0] == 1
            assert torch.equal(store_state(a.keys).pos, store_state(b.keys).pos)
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
    for question in ([5, 6, 7], [90, 91, 92, 93]):
        assert batched.answer(question, 4) == sequential.answer(question, 4)


def test_episode_batches_group_by_length_under_the_padding_allowed():
    # Gemma-3's measured prompts (161, 759, 261, 371 tokens) beside a 256-token block: token rows per block
    rows = [417, 1015, 517, 627]
    assert episode_batches(rows, float("inf")) == [[0, 2, 3, 1]]
    assert episode_batches(rows, 0.25) == [[0, 2, 3], [1]]  # 3 x 627 = 1881 <= 1.25 x 1561; adding 1015 is not
    assert episode_batches(rows, 0.1) == [[0], [2, 3], [1]]  # 2 x 517 > 1.1 x 934; 2 x 627 <= 1.1 x 1144
    assert episode_batches(rows, 0.05) == [[0], [2], [3], [1]]
    assert episode_batches([300, 300, 300], 0.0) == [[0, 1, 2]]  # equal rows pad nothing


@pytest.mark.parametrize("bad", [-0.5, "0.1", True, float("nan")])
def test_batch_padding_must_be_a_number_at_least_zero(bad):
    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, episodes=3, reserve=10)
    with pytest.raises(ValueError, match=f"batch_padding .* got {re.escape(repr(bad))}"):
        EpisodicCache(forward, model, options, batched=True, batch_padding=bad)


def real_positions(keys) -> set[tuple[int, int]]:
    state = store_state(keys)
    pos, head = slot_heads(state.pos, state.packed)
    return {(int(h), int(p)) for p, h in zip(pos.flatten(), head.flatten(), strict=True) if p >= 0}


@pytest.mark.parametrize("head_budgets", ["adaptive", "uniform"])
def test_a_question_fills_the_reserve_and_evicts_nothing(head_budgets):
    model = tiny_model()
    context = torch.randint(1, 128, (70,), generator=torch.Generator().manual_seed(13)).tolist()
    forward, options = compiled(model, policy="epicache", budget=32, prefill_block=16, reserve=6,
                                head_budgets=head_budgets)
    ctx = compress_context(forward, model, options, context, observe=torch.tensor([9, 10, 11]))
    before = [real_positions(layer.keys) for layer in ctx.cache.layers]
    n_kv = model.config.num_key_value_heads
    assert all(len(kept) == 32 * n_kv for kept in before)
    cache = copy.copy(ctx.cache)
    cache.layers = [copy.copy(layer) for layer in ctx.cache.layers]
    question = torch.tensor([[5, 6, 7, 8, 9]])
    out = forward(input_ids=question, position_ids=torch.arange(70, 75)[None], cache=cache, use_cache=True)
    new = {(h, p) for h in range(n_kv) for p in range(70, 75)}
    for kept, layer in zip(before, out.cache.layers, strict=True):
        assert real_positions(layer.keys) == kept | new  # the question evicted nothing
    assert [real_positions(layer.keys) for layer in ctx.cache.layers] == before  # the context stays as it was
    out = forward(input_ids=torch.tensor([[3, 4]]), position_ids=torch.arange(75, 77)[None], cache=out.cache,
                  use_cache=True)
    assert all(len(real_positions(layer.keys)) == 38 * n_kv for layer in out.cache.layers)  # past the reserve: evicts


def test_episode_and_observation_settings_reject_nonsense_quoting_it():
    import kvpass

    model = tiny_model()
    forward, options = compiled(model, policy="epicache", budget=24, prefill_block=16, episodes=2)
    with pytest.raises(ValueError, match="medoids .* must be an int >= 1; got 0"):
        EpisodicCache(forward, model, options, medoids=0)
    with pytest.raises(ValueError, match=r"entries \[1\] of 2 are not"):
        with kvpass.observing([torch.tensor([1, 2]), torch.tensor([])]):
            pass
    with pytest.raises(ValueError, match="a list of one per row.*got 3"):
        with kvpass.observing(3):
            pass


def test_the_patched_prompt_prefix_ends_the_user_turn_by_the_template_or_is_the_instruction_alone():
    """The reference's postfix from a chat template (SmolLM2's ChatML); a base model's tokenizer with no template
    (such as Gemma-3-270M's) gets the instruction with no turn markers."""
    from kvpass.models import load_tokenizer

    chat = load_tokenizer("smollm2-135m")
    assert chat.decode(patched_prompt_prefix(chat)) == PATCHED_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    base = copy.deepcopy(chat)
    base.chat_template = None
    assert base.decode(patched_prompt_prefix(base)) == PATCHED_INSTRUCTION
