"""Block-wise prefill: one block graph for every prompt length, stores bounded by budget + block."""

import pytest
import torch
from conftest import tiny_model
from test_backend import generate, padded_batch
from transformers import DynamicCache

import kvpass
from kvpass.analysis import UnsupportedGraph
from kvpass.runtime.state import store_state


def compiled(model, dynamic=True, **options):
    options.setdefault("compiler", "aot_eager")
    return torch.compile(model.forward, backend="kvpass", options=options, dynamic=dynamic)


def prefill(forward, model, ids, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                   cache=DynamicCache(config=model.config), use_cache=True, **kw)


def attend_slots(fn):
    """Run ``fn``; return its result and the candidate slots (store + new tokens) of every attention op call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        result = fn()
    names = ("kvpass::attend", "kvpass::attend_packed")
    return result, [e.input_shapes[1][2] for e in prof.events() if e.name in names and e.input_shapes[1]]


@pytest.mark.parametrize("policy, head_budgets", [("snapkv", "uniform"), ("epicache", "uniform"),
                                                  ("epicache", "adaptive")])
def test_block_prefill_with_budget_covering_the_prompt_is_exact_for_every_length(policy, head_budgets):
    model = tiny_model()
    ref_model = tiny_model()
    extra = {"scores": "forward"} if policy == "epicache" else {}  # (no observation prompt: the blocks' own queries)
    model.forward = compiled(model, policy=policy, budget=128, prefill_block=16, head_budgets=head_budgets, **extra)
    for length in (100, 77, 40):  # 7, 5 and 3 blocks; the first one left-padded
        ids = torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(length))
        ref = generate(ref_model, ids)
        out = generate(model, ids)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # one block graph and one decode graph served all three prompt lengths
    assert [g["kind"] for g in kvpass.explain(model).graphs] == ["prefill-block", "decode"]
    assert kvpass.explain(model).graphs[0]["counters"]["blocked_sites"] == 2


def test_block_prefill_with_attention_sinks_is_exact():
    # GPT-OSS's learned sinks join the softmax of every block's queries over store + block
    full = {"layer_types": ["full_attention"] * 2}
    model, ref_model = tiny_model("gpt_oss", "eager", **full), tiny_model("gpt_oss", "eager", **full)
    model.forward = compiled(model, policy="snapkv", budget=128, prefill_block=16)
    ids = torch.randint(1, 128, (1, 77), generator=torch.Generator().manual_seed(2))
    ref, out = generate(ref_model, ids), generate(model, ids)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [g["kind"] for g in kvpass.explain(model).graphs] == ["prefill-block", "decode"]


def test_block_prefill_refuses_a_latent_cache_by_name():
    model = tiny_model("deepseek_v3")
    model.forward = compiled(model, policy="snapkv", budget=16, prefill_block=16)
    with pytest.raises(Exception, match="does not support latent caches"):
        generate(model, torch.randint(1, 128, (1, 40)), steps=2)


def test_block_prefill_of_a_left_padded_batch_matches_every_real_token_logit():
    ids, mask = padded_batch(length=50, pad=13)
    ref = prefill(tiny_model().forward, tiny_model(), ids, mask)
    model = tiny_model()
    out = prefill(compiled(model, policy="h2o", budget=64, prefill_block=16), model, ids, mask)
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5, rtol=0)
    stats = kvpass.kv_stats(out.cache)
    assert [s.real_tokens for s in stats] == [2 * (50 + 37)] * 2  # kv heads x real tokens of both rows


@pytest.mark.parametrize("policy, head_budgets", [
    ("h2o", "uniform"), ("tova", "uniform"), ("pyramidkv", "uniform"), ("epicache", "uniform"),
    ("epicache", "adaptive"),
])
def test_stores_never_exceed_budget_plus_one_block(policy, head_budgets):
    model = tiny_model()
    extra = {"window": 8} if policy in ("snapkv", "pyramidkv", "epicache") else {}
    extra.update({"scores": "forward"} if policy == "epicache" else {})
    forward = compiled(model, policy=policy, budget=24, prefill_block=16, head_budgets=head_budgets, **extra)
    ids = torch.randint(1, 128, (1, 150))
    prefill(forward, model, ids[:, :40], logits_to_keep=1)  # compile outside the recording mode
    out, slots = attend_slots(lambda: prefill(forward, model, ids, logits_to_keep=1))
    budgets = kvpass.explain(forward).graphs[0]["budgets"]
    assert len(slots) >= 2 * 10  # 2 layers x ceil(150 / 16) blocks
    assert max(slots) <= max(budgets) + 16
    for layer, stats in enumerate(kvpass.kv_stats(out.cache)):
        # every layer holds exactly its budget of real tokens (2 kv heads); with an attention mask all stores
        # share the largest capacity (HF sizes one mask for all layers)
        assert stats.real_tokens == 2 * budgets[layer] and stats.slots == max(budgets)
        assert sum(stats.head_tokens) == stats.real_tokens
    assert torch.isfinite(out.logits).all()


def test_streaming_llm_blocks_keep_sinks_and_the_newest_tokens():
    model = tiny_model()
    out = prefill(compiled(model, policy="streaming_llm", budget=24, sinks=4, prefill_block=16), model,
                  torch.randint(1, 128, (1, 150)), logits_to_keep=1)
    states = [store_state(layer.keys) for layer in out.cache.layers]
    for state in states:
        assert sorted(state.pos[0, 0].tolist()) == [0, 1, 2, 3, *range(130, 150)]
    assert int(states[0].seen[0]) == 150
    assert out.cache.layers[0].keys.shape[2] == 24


def test_observation_tokens_are_scored_from_but_never_stored():
    model = tiny_model()
    forward = compiled(model, policy="epicache", budget=24, prefill_block=16, window=6, head_budgets="uniform")
    session_ids = torch.randint(1, 128, (6,))
    ids = torch.randint(1, 128, (1, 100))
    with kvpass.observing(session_ids):
        prefill(forward, model, ids[:, :20], logits_to_keep=1)  # compile
    with kvpass.observing(session_ids):
        out = prefill(forward, model, ids, logits_to_keep=1)
    state = store_state(out.cache.layers[0].keys)
    assert int(state.pos.max()) < 100 and int(state.seen[0]) == 100
    assert (state.pos >= 0).all()
    assert torch.isnan(out.logits).all()  # the last position belongs to the observation prompt
    # a different observation prompt changes what is kept
    with kvpass.observing(torch.flip(ids[0, 40:46], dims=[0])):
        other = prefill(forward, model, ids, logits_to_keep=1)
    assert not torch.equal(state.pos, store_state(other.cache.layers[0].keys).pos)
    # outside the block, prefills observe nothing again: EpiCache's blocks have nothing to be scored by
    with pytest.raises(ValueError, match="scores each block by an observation prompt's attention"):
        prefill(forward, model, ids, logits_to_keep=1)


def test_static_prompt_longer_than_a_block_asks_for_dynamic_shapes():
    model = tiny_model()
    forward = compiled(model, dynamic=None, policy="snapkv", budget=24, prefill_block=16)
    with pytest.raises(Exception, match="dynamic=True") as err:
        prefill(forward, model, torch.randint(1, 128, (1, 40)))
    assert "exactly 40 tokens" in str(err.value)
    torch._dynamo.reset()
    # a static prompt that fits one block is that block
    out = prefill(compiled(model, dynamic=None, policy="snapkv", budget=24, prefill_block=64), model,
                  torch.randint(1, 128, (1, 40)))
    assert out.cache.layers[0].keys.shape[2] == 24


def test_block_prefill_without_positions_is_refused():
    model = tiny_model()
    forward = compiled(model, policy="snapkv", budget=24, prefill_block=16)
    with pytest.raises(Exception, match="position_ids") as err:
        forward(input_ids=torch.randint(1, 128, (1, 40)), cache=DynamicCache(config=model.config))
    assert isinstance(err.value.__cause__ or err.value, UnsupportedGraph | Exception)


@pytest.mark.parametrize("options, message", [
    ({"budget": 8, "prefill_block": 0}, "'prefill_block' must be a positive integer, got 0"),
    ({"ratio": 0.5, "prefill_block": 16}, "needs a fixed 'budget'"),
    ({"budget": 8, "episodes": 4}, "'episodes' \\(4\\) is EpiCache's"),
    ({"policy": "epicache", "budget": 8, "prefill_block": 16, "episodes": 2.5}, "positive integer, got 2.5"),
    ({"policy": "epicache", "budget": 8, "window": 0}, "'window' must be >= 1, got 0"),
    ({"policy": "epicache", "budget": 8, "kernel_size": 4}, "'kernel_size' must be odd, got 4"),
    ({"policy": "epicache", "budget": 8, "accumulate": "yes"}, "must be True or False, got 'yes'"),
])
def test_bad_block_options_are_refused_quoting_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        kvpass.parse_options(options)
