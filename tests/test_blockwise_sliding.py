"""Block-wise prefill on sliding-window hybrids (issue 19): local layers carry HF's window from block to block and hand
it back to HF's cache; global layers are evicted block by block; exact while the budget covers the prompt."""

import pytest
import torch
from conftest import tiny_model
from test_backend import generate, padded_batch
from test_blockwise import attend_slots, compiled, prefill
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import kvpass
from kvpass.apps.episodic import EpisodicCache, answer, compress_context
from kvpass.runtime.state import store_state

WINDOW = 16  # HF's sliding_window: a query sees itself and the 15 tokens before it; the cache keeps those 15
HYBRID = dict(layers=6, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention"] * 5 + ["full_attention"])


def gemma3(attn="sdpa", **overrides):
    """Gemma-3's 5:1 pattern: five local layers (window 16), then one global layer."""
    return tiny_model("gemma3", attn, **{**HYBRID, **overrides})


def assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def assert_hf_window(cache, length):
    """Every local layer is HF's sliding layer again, holding what HF holds after ``length`` tokens."""
    for layer in cache.layers[:5]:
        assert isinstance(layer, DynamicSlidingWindowLayer) and store_state(layer.keys) is None
        assert layer.keys.shape[2] == min(length, WINDOW - 1) and layer.cumulative_length == length
        assert layer.keys.is_contiguous()


@pytest.mark.parametrize("attn, batch, block, lengths", [
    ("sdpa", 1, 8, (100, 10)),  # 13 and 2 blocks; the second prompt is shorter than the window
    ("sdpa", 2, 16, (20,)),     # left-padded row 0: 7 real tokens (fewer than the window)
    ("eager", 2, 16, (50,)),    # (a prompt after generate(): the mask's length is a symbol of its own)
])
def test_hybrid_block_prefill_with_budget_covering_the_prompt_is_exact(attn, batch, block, lengths):
    ref_model, model = gemma3(attn), gemma3(attn)
    model.forward = compiled(model, policy="snapkv", budget=128, prefill_block=block)
    for length in lengths:
        ids, mask = padded_batch(length=length, pad=13, batch=batch, seed=length)
        ref, out = generate(ref_model, ids, mask, steps=12), generate(model, ids, mask, steps=12)
        assert_same_generation(out, ref)  # the 12 steps run past the window: HF's decode continues from our window
        ref_cache = prefill(ref_model.forward, ref_model, ids, mask).cache
        cache = prefill(model.forward, model, ids, mask).cache
        assert_hf_window(cache, length)
        real = mask.bool()[:, -min(length, WINDOW - 1):]  # HF's slots of padding hold padding's keys: never attended
        for ours, hf in zip(cache.layers[:5], ref_cache.layers[:5], strict=True):
            for x, y in ((ours.keys, hf.keys), (ours.values, hf.values)):
                torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=0)
    report = kvpass.explain(model)
    block_graph = next(g for g in report.graphs if g["kind"] == "prefill-block")
    assert block_graph["counters"]["sliding_sites_carried"] == 5 and block_graph["counters"]["blocked_sites"] == 6
    assert block_graph["budgets"] == [WINDOW - 1] * 5 + [128]


def test_mistral_with_a_window_on_every_layer_keeps_each_window_and_is_exact():
    # every layer is local: nothing to evict, each layer carries its window (the budget does not apply)
    ref_model, model = (tiny_model("mistral", sliding_window=WINDOW) for _ in range(2))
    model.forward = compiled(model, policy="snapkv", budget=8, prefill_block=16)
    ids, mask = padded_batch(length=77, pad=13, batch=2)
    ref, out = generate(ref_model, ids, mask, steps=12), generate(model, ids, mask, steps=12)
    assert_same_generation(out, ref)
    block_graph = kvpass.explain(model).graphs[0]
    assert block_graph["kind"] == "prefill-block" and block_graph["counters"]["sliding_sites_carried"] == 2
    assert [s.slots for s in kvpass.kv_stats(out.cache)] == [WINDOW - 1] * 2


def test_eviction_keeps_the_budget_on_global_layers_and_the_window_on_local_ones():
    ref_model, model = gemma3(), gemma3()
    forward = compiled(model, policy="h2o", budget=24, prefill_block=16)
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(7))
    prefill(forward, model, ids[:, :40], logits_to_keep=1)  # compile outside the recording mode
    out, slots = attend_slots(lambda: prefill(forward, model, ids, logits_to_keep=1))
    # per block: 5 local layers over window - 1 + block candidates, the global one over budget + block
    # (>= 10 blocks: a run may also trace the graph once more, whose fake calls the profiler records too)
    assert len(slots) % 6 == 0 and len(slots) >= 6 * 10 and set(slots) == {WINDOW - 1 + 16, 24 + 16}
    assert_hf_window(out.cache, 150)
    state = store_state(out.cache.layers[5].keys)
    assert out.cache.layers[5].keys.shape[2] == 24 and (state.pos >= 0).sum(-1).tolist() == [[24, 24]]
    assert int(state.seen[0]) == 150
    # the local layers precede the global one: their windows are HF's to the last token, eviction or not
    ref = prefill(ref_model.forward, ref_model, ids).cache
    for ours, hf in zip(out.cache.layers[:5], ref.layers[:5], strict=True):
        torch.testing.assert_close(ours.keys, hf.keys, atol=1e-5, rtol=0)
    # and decoding continues from the mixed cache (HF's windows, kvpass's store)
    step = forward(input_ids=ids[:, -1:], position_ids=torch.tensor([[150]]), cache=out.cache, use_cache=True)
    assert torch.isfinite(step.logits).all() and step.cache.layers[0].cumulative_length == 151


def test_head_adaptive_budgets_on_the_hybrid_are_exact():
    ref_model, model = gemma3(), gemma3()
    model.forward = compiled(model, policy="snapkv", budget=128, prefill_block=16, head_budgets="adaptive")
    ids, mask = padded_batch(length=60, pad=13, batch=2)
    assert_same_generation(generate(model, ids, mask), generate(ref_model, ids, mask))


def test_a_window_in_the_mask_alone_is_still_evicted_by_the_policy():
    # GPT-Neo's local layer keeps every token in its cache and applies its window (8) in the mask: kvpass's to apply
    ref_model, model = tiny_model("gpt_neo", "eager"), tiny_model("gpt_neo", "eager")
    model.forward = compiled(model, policy="snapkv", budget=128, prefill_block=16)
    ids, mask = padded_batch(length=60, pad=13, batch=2)
    assert_same_generation(generate(model, ids, mask), generate(ref_model, ids, mask))
    counters = kvpass.explain(model).graphs[0]["counters"]
    assert "sliding_sites_carried" not in counters and counters["blocked_sites"] == 2


def test_observation_prompts_on_the_hybrid_keep_the_context_exact_and_the_bounds():
    ref_model, model = gemma3(), gemma3()
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    context, question = ids[0, :80].tolist(), ids[0, 80:].tolist()
    expected = ref_model.generate(ids, max_new_tokens=6, do_sample=False)[0, 90:].tolist()
    options = {"policy": "snapkv", "budget": 128, "prefill_block": 16, "compiler": "aot_eager"}
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    # the observation tokens attend (local layers over their window) but are never stored: nothing changes
    ctx = compress_context(forward, model, options, context, observe=torch.tensor([5, 6, 7, 8]))
    assert_hf_window(ctx.cache, 80)
    assert answer(forward, model, ctx, question, 6) == expected
    assert answer(forward, model, ctx, question, 6) == expected  # reusable


def test_episodic_caches_on_the_hybrid_keep_the_bounds():
    model = gemma3()
    options = {"policy": "epicache", "budget": 24, "prefill_block": 16, "window": 8, "episodes": 2, "reserve": 8,
               "compiler": "aot_eager"}
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    g = torch.Generator().manual_seed(5)
    context, segments = [], []
    for i in range(8):  # two "topics": segments from the lower and the upper half of the vocabulary
        low = 1 if i % 2 == 0 else 64
        segments.append((len(context), len(context) + 12))
        context += torch.randint(low, low + 63, (12,), generator=g).tolist()
    epi = EpisodicCache(forward, model, options, medoids=3, prefix_ids=[3, 4], separator_ids=[2])
    epi.build(context, segments)  # the episodes' patched prompts observe every block, as rows of one batch
    assert len(epi.contexts) == 2
    for ctx in epi.contexts:
        assert_hf_window(ctx.cache, len(context))
        state = store_state(ctx.cache.layers[5].keys)
        assert ctx.cache.layers[5].keys.shape[2] == 24 + 8  # budget + reserve
        assert (state.pos >= 0).sum().item() == 24 * model.config.num_key_value_heads
    tokens, _ = epi.answer(list(range(70, 75)), 3)
    assert len(tokens) == 3


def test_prefill_counts_of_the_whole_prompt_reach_hf():
    # HF's sliding layer counts the tokens it has seen (its mask's offset): the count of the prompt, not of a block
    model = gemma3()
    forward = compiled(model, policy="snapkv", budget=32, prefill_block=8)
    out = prefill(forward, model, torch.randint(1, 128, (1, 45)), logits_to_keep=1)
    assert [layer.cumulative_length for layer in out.cache.layers[:5]] == [45] * 5
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 45
