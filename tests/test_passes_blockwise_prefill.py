"""BlockwisePrefill on small graphs (no HF model), alone and followed by InsertKVEviction: the block graph run block
by block on real tensors against the whole prompt's attention."""

import pytest
import torch
import torch.nn.functional as F
from test_passes_insert_kv_eviction import (  # the small graphs' helpers
    HKV,
    HQ,
    B,
    D,
    call,
    capture,
    randn,
    repeat_kv,
    rewrite,
    static_layer,
    targets,
)

from kvpass.analysis import find_attention_sites, node_value
from kvpass.config import parse_options
from kvpass.errors import UnsupportedGraph
from kvpass.passes import BlockwisePrefill
from kvpass.passes.eviction_steps import SitePlan

E = 16  # model width
ops = torch.ops.kvpass


def block_layer(x, wq, wk, wv):
    """A first forward's attention layer over a prompt ``x [B, T, E]`` (DynamicCache: cat with an empty past)."""
    b, t, _ = x.shape
    q = (x @ wq).view(b, t, HQ, D).transpose(1, 2)
    k_new = (x @ wk).view(b, t, HKV, D).transpose(1, 2)
    v_new = (x @ wv).view(b, t, HKV, D).transpose(1, 2)
    k = torch.cat([k_new.new_zeros(b, HKV, 0, D), k_new], dim=-2)
    v = torch.cat([v_new.new_zeros(b, HKV, 0, D), v_new], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True), k, v


def weights():
    return randn(E, HQ * D, seed=1), randn(E, HKV * D, seed=2), randn(E, HKV * D, seed=3)


def capture_dynamic(t: int):
    """The layer's graph traced for a dynamic prompt length (its example: ``t`` tokens)."""
    x = randn(B, t, E)
    torch._dynamo.mark_dynamic(x, 1)
    return capture(block_layer, x, *weights())


def test_each_layer_gets_a_store_input_and_the_block_gets_its_flags():
    gm = capture_dynamic(6)
    sites = find_attention_sites(gm.graph)
    (site,) = sites
    new_keys = site.keys
    blocks = BlockwisePrefill({0: 8})
    block = blocks(gm.graph, sites)
    assert blocks.counters == {"blocked_sites": 1}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert [n.name for n in placeholders[-4:]] == ["kvpass_store_k_0", "kvpass_store_v_0", "kvpass_valid",
                                                    "kvpass_observe"]
    assert block.past == {0: tuple(placeholders[-4:-2])} and (block.valid, block.observe) == tuple(placeholders[-2:])
    assert node_value(block.past[0][0]).shape == (B, HKV, 8, D)
    assert node_value(block.valid).shape == (B, block.seq) and node_value(block.valid).dtype == torch.bool
    # the site's candidates are now cat(store, new), its store input the placeholder: the form of a decode graph
    assert site.keys.target is torch.cat and site.keys.args[0] == [block.past[0][0], new_keys]
    assert (site.past_keys, site.past_values) == block.past[0]
    gm.recompile()  # nothing else changed: the graph still computes the layer
    x, w = randn(B, 5, E, seed=4), weights()
    flags = torch.ones(B, 5, dtype=torch.bool), torch.zeros(B, 5, dtype=torch.bool)
    outs = call(gm, block_layer, (x, *w), randn(B, HKV, 8, D), randn(B, HKV, 8, D), *flags, sym=5)
    for a, b in zip(outs, block_layer(x, *w), strict=True):
        torch.testing.assert_close(a, b)


def test_uuid_names_the_pass_version_and_changes_with_the_capacities():
    assert BlockwisePrefill({0: 8}).uuid().startswith("BlockwisePrefill:v2:")
    assert BlockwisePrefill({0: 8}).uuid() != BlockwisePrefill({0: 9}).uuid()


def test_a_static_length_a_store_input_or_a_static_cache_is_refused():
    x, w = randn(B, 6, E), weights()
    gm = capture(block_layer, x, *w)  # traced for exactly 6 tokens
    with pytest.raises(UnsupportedGraph, match="traced for a prompt of exactly 6 tokens.*dynamic=True"):
        BlockwisePrefill({0: 8})(gm.graph, find_attention_sites(gm.graph))
    q, k, v = randn(B, HQ, 1, D), randn(B, HKV, 1, D), randn(B, HKV, 1, D)
    gm = capture(static_layer, q, k, v, randn(B, HKV, 8, D), randn(B, HKV, 8, D), torch.tensor([3]))
    with pytest.raises(UnsupportedGraph, match="applies to a first forward"):
        BlockwisePrefill({0: 8})(gm.graph, find_attention_sites(gm.graph))


def static_prefill_layer(q, k_new, v_new, cache_position):
    """A StaticCache's first forward: it allocates the buffers and writes the prompt into them."""
    k_buf, v_buf = k_new.new_zeros(B, HKV, 8, D), v_new.new_zeros(B, HKV, 8, D)
    k_buf.index_copy_(2, cache_position, k_new)
    v_buf.index_copy_(2, cache_position, v_new)
    return F.scaled_dot_product_attention(q, repeat_kv(k_buf), repeat_kv(v_buf)), k_buf, v_buf


def test_a_static_cache_first_forward_is_refused_naming_the_fix():
    q, k, v = randn(B, HQ, 3, D), randn(B, HKV, 3, D), randn(B, HKV, 3, D)
    gm = capture(static_prefill_layer, q, k, v, torch.arange(3))
    sites = find_attention_sites(gm.graph)
    assert sites[0].static_writes and sites[0].past_keys is None
    with pytest.raises(UnsupportedGraph, match="layers \\[0\\] write a StaticCache.*leave 'prefill_block' unset"):
        BlockwisePrefill({0: 8})(gm.graph, sites)


def block_graph(capacity: int, **options):
    """The layer's block graph: BlockwisePrefill, then InsertKVEviction with the block inputs."""
    gm = capture_dynamic(6)
    sites = find_attention_sites(gm.graph)
    block = BlockwisePrefill({0: capacity})(gm.graph, sites)
    rewriting, plans = rewrite(gm, block, sites, **options)
    return gm, block, rewriting, plans


def empty_store(capacity: int):
    return (torch.zeros(B, HKV, capacity, D), torch.zeros(B, HKV, capacity, D),
            torch.full((B, HKV, capacity), -1), torch.zeros(B, HKV, capacity), torch.zeros(B, dtype=torch.int64))


def run_block(gm, x, store, valid, observe):
    """One block through the block graph; (attention output, the store after it)."""
    k, v, pos, acc, seen = store
    out, k, v, pos, acc, seen = call(gm, block_layer, (x, *weights()), k, v, valid, observe, pos, acc, seen,
                                     sym=x.shape[1])
    return out, (k, v, pos, acc, seen)


def test_block_graph_prefills_a_left_padded_prompt_exactly_when_the_budget_covers_it():
    gm, block, rewriting, (plan,) = block_graph(16, policy="snapkv", budget=16, window=2)
    assert rewriting.counters == {"block_sites": 1, "sdpa_sites": 1}
    assert plan.past_index == [n.name for n in gm.graph.find_nodes(op="placeholder")].index("kvpass_store_k_0")
    assert {ops.extend_meta.default, ops.attend.default, ops.score.default, ops.compact.default} <= targets(gm)
    prompt = randn(B, 9, E, seed=5)  # 9 tokens in blocks of 6: the first block starts with 3 tokens of padding
    first = torch.cat([torch.zeros(B, 3, E), prompt[:, :3]], dim=1)
    valid = torch.arange(6).expand(B, 6) >= 3
    no_observe = torch.zeros(B, 6, dtype=torch.bool)
    out1, store = run_block(gm, first, empty_store(16), valid, no_observe)
    out2, store = run_block(gm, prompt[:, 3:], store, torch.ones(B, 6, dtype=torch.bool), no_observe)
    ref = block_layer(prompt, *weights())[0]
    torch.testing.assert_close(out1[:, :, 3:], ref[:, :, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, ref[:, :, 3:], atol=1e-5, rtol=0)
    k, v, pos, acc, seen = store
    assert seen.tolist() == [9, 9] and sorted(pos[0, 0].tolist()) == [-1] * 7 + list(range(9))
    assert torch.equal(k[pos >= 0].view(B, HKV, 9, D), block_layer(prompt, *weights())[1])


def test_observation_tokens_are_attended_but_never_stored_nor_counted():
    gm, *_ = block_graph(16, policy="h2o", budget=16)
    tokens = randn(B, 6, E, seed=6)
    valid = torch.ones(B, 6, dtype=torch.bool)
    observe = torch.arange(6).expand(B, 6) >= 4  # the last two tokens observe only
    out, (k, v, pos, acc, seen) = run_block(gm, tokens, empty_store(16), valid & ~observe, observe)
    torch.testing.assert_close(out, block_layer(tokens, *weights())[0], atol=1e-5, rtol=0)  # they attend
    assert seen.tolist() == [4, 4] and sorted(pos[0, 0].tolist()) == [-1] * 12 + [0, 1, 2, 3]


def test_block_graph_over_budget_keeps_budget_slots_and_packed_stores_attend_packed():
    gm, _, rewriting, (plan,) = block_graph(4, policy="snapkv", budget=4, window=2)
    assert (plan.budget, plan.capacity) == (4, 4)
    _, (k, v, pos, acc, seen) = run_block(gm, randn(B, 6, E, seed=7), empty_store(4), torch.ones(B, 6, dtype=bool),
                                          torch.zeros(B, 6, dtype=bool))
    assert k.shape == (B, HKV, 4, D) and bool((pos >= 0).all()) and seen.tolist() == [6, 6]
    gm, _, rewriting, _ = block_graph(4, policy="snapkv", budget=4, head_budgets="adaptive")
    assert rewriting.counters["head_adaptive_sites"] == 1
    assert {ops.extend_packed_meta.default, ops.attend_packed.default, ops.compact_packed.default} <= targets(gm)


def test_block_sites_plan_the_block_variants():
    gm = capture_dynamic(6)
    sites = find_attention_sites(gm.graph)
    block = BlockwisePrefill({0: 8})(gm.graph, sites)
    opts = parse_options({"policy": "h2o", "budget": 8})
    plan = SitePlan.of(sites[0], opts, 8, 8, block, list(gm.graph.find_nodes(op="placeholder")))
    assert (plan.candidates, plan.state, plan.validity, plan.observe) == ("cache", "inputs", "block", True)
