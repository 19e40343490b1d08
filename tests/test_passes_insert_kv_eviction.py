"""InsertKVEviction on small graphs (no HF model): a few-line attention layer captured by Dynamo, its sites found by
the analysis, rewritten by the pass, then run on real tensors against the layer itself."""

import inspect
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from kvpass.analysis import find_attention_sites, node_value
from kvpass.config import parse_options
from kvpass.passes import InsertKVEviction
from kvpass.passes.eviction_steps import SitePlan

B, HQ, HKV, D = 2, 4, 2, 8   # GQA: two query heads per kv head
SCALE, CAP = D**-0.5, 1.5    # (a soft cap of 1.5 on logits of size ~1 changes the result)
ops = torch.ops.kvpass


def capture(fn, *args) -> fx.GraphModule:
    """The graph Dynamo captures of ``fn(*args)``, its nodes carrying the fake values the analysis reads."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def rewrite(gm: fx.GraphModule, block=None, sites=None, **options):
    """Rewrite the sites of ``gm`` (found here unless given: a block's, which BlockwisePrefill changed) in place;
    (pass, plans)."""
    sites = find_attention_sites(gm.graph) if sites is None else sites
    rewriting = InsertKVEviction(parse_options({"compiler": "eager", **options}))
    plans = rewriting(gm.graph, sites, block)
    gm.recompile()
    return rewriting, plans


def call(gm: fx.GraphModule, fn, args, *state, sym: int | None = None):
    """Run ``gm``, captured from ``fn(*args)``: Dynamo names its inputs after ``fn``'s arguments (``l_<name>_``) in
    the order it first reads them; the state inputs kvpass appended take ``state`` in order, SymInt inputs ``sym``."""
    named = dict(zip(inspect.signature(fn).parameters, args, strict=True))
    state = iter(state)
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(node_value(node), torch.SymInt):
            inputs.append(sym)
        elif node.name.startswith("kvpass_"):
            inputs.append(next(state))
        else:
            inputs.append(named[node.name[2:-1]])
    assert next(state, None) is None
    return gm(*inputs)


def input_index(gm: fx.GraphModule, name: str) -> int:
    return [n.name for n in gm.graph.find_nodes(op="placeholder")].index(f"l_{name}_")


def targets(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def repeat_kv(x):  # (HF's)
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, HQ // HKV, n, d).reshape(b, HQ, n, d)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(t, seed=0):
    return randn(B, HQ, t, D, seed=seed), randn(B, HKV, t, D, seed=seed + 1), randn(B, HKV, t, D, seed=seed + 2)


# the layers (a DynamicCache writes cat(past, new); its first forward's past is an empty tensor)

def prefill_layer(q, k_new, v_new):
    k = torch.cat([k_new.new_zeros(k_new.shape[0], HKV, 0, D), k_new], dim=-2)
    v = torch.cat([v_new.new_zeros(v_new.shape[0], HKV, 0, D), v_new], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True), k, v


def masked_prefill_layer(q, k_new, v_new, mask):
    k = torch.cat([k_new.new_zeros(k_new.shape[0], HKV, 0, D), k_new], dim=-2)
    v = torch.cat([v_new.new_zeros(v_new.shape[0], HKV, 0, D), v_new], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask), k, v


def decode_layer(q, k_new, v_new, past_k, past_v):
    k, v = torch.cat([past_k, k_new], dim=-2), torch.cat([past_v, v_new], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), k, v


def two_decode_layers(q, k0, v0, past_k0, past_v0, k1, v1, past_k1, past_v1):
    out0, k0, v0 = decode_layer(q, k0, v0, past_k0, past_v0)
    out1, k1, v1 = decode_layer(torch.tanh(out0), k1, v1, past_k1, past_v1)  # (a model projects between layers)
    return out1, k0, v0, k1, v1


def padding_mask(t, pad):
    """[B, 1, T, T] additive causal mask, the first row left-padded by ``pad`` tokens (HF's form)."""
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(B, 1, t, t).clone()
    allowed[0, :, :, :pad] = False
    return torch.zeros(B, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)


def store_meta(c, real, packed=False):
    """pos, acc, seen of a store of ``c`` slots whose first ``real`` hold positions 0.. (each head its own row)."""
    pos = torch.where(torch.arange(c) < real, torch.arange(c), -1).expand(B, HKV, c).clone()
    if packed:  # pos * H_kv + head
        pos = torch.where(pos >= 0, pos * HKV + torch.arange(HKV).view(1, HKV, 1), -1)
    return pos, torch.zeros(B, HKV, c), torch.full((B,), real, dtype=torch.int64)


def test_prefill_covering_budget_is_plain_attention_and_returns_the_store():
    q, k, v = qkv(6)
    gm = capture(prefill_layer, q, k, v)
    rewriting, (plan,) = rewrite(gm, policy="snapkv", budget=16, window=2)
    assert rewriting.counters == {"prefill_sites": 1, "sdpa_sites": 1}
    assert {ops.extend_meta.default, ops.attend.default, ops.score.default, ops.compact.default} <= targets(gm)
    assert F.scaled_dot_product_attention not in targets(gm)
    assert (plan.layer, plan.budget, plan.capacity, plan.past_index, plan.static) == (0, 16, 16, None, False)
    assert plan.state_inputs == () and len(plan.state_outputs) == 3
    out, k_store, v_store, pos, acc, seen = call(gm, prefill_layer, (q, k, v))
    ref = prefill_layer(q, k, v)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert k_store.shape == (B, HKV, 16, D)
    torch.testing.assert_close(k_store[:, :, :6], k)
    torch.testing.assert_close(v_store[:, :, :6], v)
    assert torch.equal(pos[..., :6], torch.arange(6).expand(B, HKV, 6)) and bool((pos[..., 6:] == -1).all())
    assert seen.tolist() == [6, 6]


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streaming_llm", "tova", "knorm"])
def test_prefill_over_budget_keeps_exactly_budget_slots_of_the_layers_own_tokens(policy):
    q, k, v = qkv(12)
    gm = capture(prefill_layer, q, k, v)
    rewrite(gm, policy=policy, budget=5)
    out, k_store, v_store, pos, acc, seen = call(gm, prefill_layer, (q, k, v))
    torch.testing.assert_close(out, prefill_layer(q, k, v)[0], atol=1e-5, rtol=0)  # attention sees every token
    assert k_store.shape == v_store.shape == (B, HKV, 5, D) and pos.shape == acc.shape == (B, HKV, 5)
    assert bool((pos >= 0).all()) and bool((pos.diff(dim=-1) > 0).all())  # 5 real tokens, in position order
    index = pos[..., None].expand(B, HKV, 5, D)
    assert torch.equal(k_store, k.gather(2, index)) and torch.equal(v_store, v.gather(2, index))
    assert seen.tolist() == [12, 12]


def test_prefill_reads_left_padding_off_the_masks_last_row():
    q, k, v = qkv(8)
    mask = padding_mask(8, pad=3)
    gm = capture(masked_prefill_layer, q, k, v, mask)
    _, (plan,) = rewrite(gm, policy="h2o", budget=16)
    assert plan.capacity == 16
    out, k_store, _, pos, _, seen = call(gm, masked_prefill_layer, (q, k, v, mask))
    ref = masked_prefill_layer(q, k, v, mask)[0]
    torch.testing.assert_close(out[0, :, 3:], ref[0, :, 3:], atol=1e-5, rtol=0)  # (padding queries: any output)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)
    assert seen.tolist() == [5, 8]
    real = pos[0, 0] >= 0  # the padding is never stored: its slots are empty
    assert pos[0, 0][real].tolist() == [0, 1, 2, 3, 4] and int(real.sum()) == 5
    torch.testing.assert_close(k_store[0][:, real], k[0, :, 3:])


def test_decode_takes_and_returns_the_store_state_and_masks_empty_slots():
    q, k, v = qkv(1, seed=3)
    past_k, past_v = randn(B, HKV, 6, D, seed=7), randn(B, HKV, 6, D, seed=8)
    gm = capture(decode_layer, q, k, v, past_k, past_v)
    rewriting, (plan,) = rewrite(gm, policy="h2o", budget=6)
    assert rewriting.counters == {"decode_sites": 1, "sdpa_sites": 1}
    assert (plan.budget, plan.capacity, plan.past_index) == (6, 6, input_index(gm, "past_k"))
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    assert placeholders[-3:] == ["kvpass_pos_0", "kvpass_acc_0", "kvpass_seen_0"]
    assert list(plan.state_inputs) == list(gm.graph.find_nodes(op="placeholder"))[-3:]
    assert list(gm.graph.output_node().args[0][-3:]) == list(plan.state_outputs)
    # 4 real tokens in the store's 6 slots: the empty ones are never attended
    out, k_store, v_store, pos, acc, seen = call(gm, decode_layer, (q, k, v, past_k, past_v), *store_meta(6, real=4))
    ref = decode_layer(q, k, v, past_k[:, :, :4], past_v[:, :, :4])[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert seen.tolist() == [5, 5]
    assert sorted(pos[0, 0].tolist()) == [-1, 0, 1, 2, 3, 4]  # 5 real tokens, the new one at position 4
    torch.testing.assert_close(k_store[pos == 4].view(B, HKV, D), k[:, :, 0])
    # a full store: one of its 7 candidates is evicted
    out, k_store, _, pos, _, seen = call(gm, decode_layer, (q, k, v, past_k, past_v), *store_meta(6, real=6))
    torch.testing.assert_close(out, decode_layer(q, k, v, past_k, past_v)[0], atol=1e-5, rtol=0)
    assert k_store.shape == (B, HKV, 6, D) and bool((pos >= 0).all()) and seen.tolist() == [7, 7]


def test_state_inputs_and_outputs_follow_layer_order_with_per_layer_budgets():
    q, k0, v0 = qkv(1, seed=1)
    _, k1, v1 = qkv(1, seed=4)
    pasts = [randn(B, HKV, 6, D, seed=s) for s in (10, 11, 12, 13)]
    gm = capture(two_decode_layers, q, k0, v0, pasts[0], pasts[1], k1, v1, pasts[2], pasts[3])
    rewriting, plans = rewrite(gm, policy="h2o", layer_budgets=[4, 6])
    assert rewriting.counters["decode_sites"] == 2
    assert [(p.layer, p.budget, p.past_index) for p in plans] == [(0, 4, input_index(gm, "past_k0")),
                                                                 (1, 6, input_index(gm, "past_k1"))]
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")][-6:]
    assert names == [f"kvpass_{s}_{layer}" for layer in (0, 1) for s in ("pos", "acc", "seen")]
    outputs = gm.graph.output_node().args[0]
    assert list(outputs[-6:]) == [n for p in plans for n in p.state_outputs]
    state = [*store_meta(6, real=6), *store_meta(6, real=6)]
    outs = call(gm, two_decode_layers, (q, k0, v0, pasts[0], pasts[1], k1, v1, pasts[2], pasts[3]), *state)
    torch.testing.assert_close(outs[0], two_decode_layers(q, k0, v0, *pasts[:2], k1, v1, *pasts[2:])[0], atol=1e-5,
                               rtol=0)
    assert outs[1].shape[2] == 4 and outs[3].shape[2] == 6  # each layer's store holds its budget
    assert outs[5].shape[2] == 4 and outs[8].shape[2] == 6


def test_head_adaptive_budgets_pack_the_store_and_decode_attends_packed():
    q, k, v = qkv(10)
    gm = capture(prefill_layer, q, k, v)
    rewriting, _ = rewrite(gm, policy="snapkv", budget=4, head_budgets="adaptive", window=2)
    assert rewriting.counters["head_adaptive_sites"] == 1
    assert {ops.extend_packed_meta.default, ops.attend.default, ops.compact_packed.default} <= targets(gm)
    out, k_store, v_store, pos, _, seen = call(gm, prefill_layer, (q, k, v))
    torch.testing.assert_close(out, prefill_layer(q, k, v)[0], atol=1e-5, rtol=0)
    assert k_store.shape == (B, HKV, 4, D) and bool((pos >= 0).all())  # H_kv * budget slots shared by the heads
    heads = pos % HKV
    assert set(heads.flatten().tolist()) <= {0, 1}

    q1, k1, v1 = qkv(1, seed=5)
    past_k, past_v = randn(B, HKV, 4, D, seed=6), randn(B, HKV, 4, D, seed=7)
    gm = capture(decode_layer, q1, k1, v1, past_k, past_v)
    rewriting, _ = rewrite(gm, policy="h2o", budget=4, head_budgets="adaptive")
    assert {ops.extend_packed_meta.default, ops.attend_packed.default, ops.compact_packed.default} <= targets(gm)
    assert ops.attend.default not in targets(gm)
    # each row holds its own head's tokens: attention is plain attention over store + new token
    state = store_meta(4, real=4, packed=True)
    out, k_store, _, pos, _, seen = call(gm, decode_layer, (q1, k1, v1, past_k, past_v), *state)
    torch.testing.assert_close(out, decode_layer(q1, k1, v1, past_k, past_v)[0], atol=1e-5, rtol=0)
    assert k_store.shape == (B, HKV, 4, D) and bool((pos >= 0).all()) and seen.tolist() == [5, 5]


def eager_sink_layer(q, k_new, v_new, mask, sink_logits):
    """Gemma-2's soft cap and GPT-OSS's learned sinks (an extra logit column, dropped after softmax)."""
    k = torch.cat([k_new.new_zeros(k_new.shape[0], HKV, 0, D), k_new], dim=-2)
    v = torch.cat([v_new.new_zeros(v_new.shape[0], HKV, 0, D), v_new], dim=-2)
    logits = torch.matmul(q, repeat_kv(k).transpose(2, 3)) * SCALE
    logits = torch.tanh(logits / CAP) * CAP
    logits = logits + mask
    sinks = sink_logits.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)
    probs = torch.softmax(torch.cat([logits, sinks], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, repeat_kv(v)), k, v


def test_eager_site_keeps_its_soft_cap_and_sinks():
    q, k, v = qkv(7)
    mask, sinks = padding_mask(7, pad=0), randn(HQ, seed=9)
    gm = capture(eager_sink_layer, q, k, v, mask, sinks)
    (site,) = find_attention_sites(gm.graph)
    assert (site.kind, site.softcap, site.sinks is not None) == ("eager", CAP, True)
    rewriting, _ = rewrite(gm, policy="h2o", budget=16)
    assert rewriting.counters == {"sink_sites": 1, "prefill_sites": 1, "eager_sites": 1}
    attend = next(n for n in gm.graph.nodes if n.target is ops.attend.default)
    assert attend.args[7] == CAP and isinstance(attend.args[8], fx.Node)  # soft cap and sinks [B, H_q, T]
    out = call(gm, eager_sink_layer, (q, k, v, mask, sinks))[0]
    ref = eager_sink_layer(q, k, v, mask, sinks)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    plain = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)
    assert not torch.allclose(ref, plain, atol=1e-2)  # (the cap and the sinks change the result)


R, DR, DN, DV = 12, 4, 8, 6  # a latent of 12 dims and a 4-dim rotary key; per head 8 + 4 key dims, 6 value dims


def latent_layer(q, c_new, r_new, w_kv):
    """MLA: the cache holds a latent and a rotary key, projected per token to every head's keys and values."""
    b = c_new.shape[0]
    c = torch.cat([c_new.new_zeros(b, 1, 0, R), c_new], dim=-2)   # cache write 1: the latent [B, 1, N, R]
    r = torch.cat([r_new.new_zeros(b, 1, 0, DR), r_new], dim=-2)  # cache write 2: the rotary key [B, 1, N, DR]
    n = c.shape[2]
    kv = F.linear(c, w_kv).view(b, n, HQ, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat([k_nope, r.expand(b, HQ, n, DR)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), c, r


def test_latent_site_keeps_the_cached_latent_and_attends_over_its_projection():
    t = 9
    q, c, r, w = randn(B, HQ, t, DN + DR), randn(B, 1, t, R, seed=1), randn(B, 1, t, DR, seed=2), randn(
        HQ * (DN + DV), R, seed=3)
    gm = capture(latent_layer, q, c, r, w)
    (site,) = find_attention_sites(gm.graph)
    assert site.attn_keys is not None
    rewriting, (plan,) = rewrite(gm, policy="h2o", budget=16)
    assert rewriting.counters == {"latent_sites": 1, "prefill_sites": 1, "sdpa_sites": 1}
    out, c_store, r_store, pos, _, _ = call(gm, latent_layer, (q, c, r, w))
    torch.testing.assert_close(out, latent_layer(q, c, r, w)[0], atol=1e-5, rtol=0)
    assert c_store.shape == (B, 1, 16, R) and r_store.shape == (B, 1, 16, DR)
    torch.testing.assert_close(c_store[:, :, :t], c)

    gm = capture(latent_layer, q, c, r, w)
    rewrite(gm, policy="h2o", budget=4)
    out, c_store, r_store, pos, _, _ = call(gm, latent_layer, (q, c, r, w))
    torch.testing.assert_close(out, latent_layer(q, c, r, w)[0], atol=1e-5, rtol=0)
    assert c_store.shape == (B, 1, 4, R) and r_store.shape == (B, 1, 4, DR) and bool((pos >= 0).all())
    assert torch.equal(c_store, c.gather(2, pos[..., None].expand(B, 1, 4, R)))


def test_latent_site_refuses_head_adaptive_budgets_by_name():
    q, c, r, w = randn(B, HQ, 5, DN + DR), randn(B, 1, 5, R), randn(B, 1, 5, DR), randn(HQ * (DN + DV), R)
    gm = capture(latent_layer, q, c, r, w)
    with pytest.raises(ValueError, match="layer 0 keeps a latent cache .1 head.s. of compressed keys"):
        rewrite(gm, policy="h2o", budget=4, head_budgets="adaptive")


def static_layer(q, k_new, v_new, k_buf, v_buf, cache_position):
    """A StaticCache layer: new tokens written into fixed buffers in place, attention over the buffers."""
    k_buf.index_copy_(2, cache_position, k_new)
    v_buf.index_copy_(2, cache_position, v_new)
    return F.scaled_dot_product_attention(q, repeat_kv(k_buf), repeat_kv(v_buf))


def test_static_cache_decode_adopts_the_buffers_and_writes_the_store_back_in_place():
    q, k, v = qkv(1, seed=2)
    slots, held = 8, 5
    k_buf, v_buf = randn(B, HKV, slots, D, seed=4), randn(B, HKV, slots, D, seed=5)
    position = torch.tensor([held])
    gm = capture(static_layer, q, k, v, k_buf.clone(), v_buf.clone(), position)
    rewriting, (plan,) = rewrite(gm, policy="h2o", budget=slots)
    assert rewriting.counters == {"decode_sites": 1, "sdpa_sites": 1, "static_cache_sites": 1}
    assert (plan.static, plan.budget, plan.capacity, plan.past_index) == (True, slots, slots, input_index(gm, "k_buf"))
    assert not any(n.target == "index_copy_" for n in gm.graph.nodes)  # kvpass writes the buffers itself
    assert [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_"] == ["copy_"] * 2
    # no state known (seen < 0): slot i holds position i below the cache's token count
    unknown = (torch.full((B, HKV, slots), -1), torch.zeros(B, HKV, slots), torch.full((B,), -1))
    k_in, v_in = k_buf.clone(), v_buf.clone()
    out, pos, acc, seen = call(gm, static_layer, (q, k, v, k_in, v_in, position), *unknown)
    ref = F.scaled_dot_product_attention(q, repeat_kv(torch.cat([k_buf[:, :, :held], k], 2)),
                                         repeat_kv(torch.cat([v_buf[:, :, :held], v], 2)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert seen.tolist() == [held + 1] * B and sorted(pos[0, 0].tolist()) == [-1, -1, 0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(k_in[:, :, :held], k_buf[:, :, :held])  # the store, written in place
    torch.testing.assert_close(k_in[pos == held].view(B, HKV, D), k[:, :, 0])
    # a full buffer: 9 candidates, 8 kept, in the same buffers
    k_in, v_in = k_buf.clone(), v_buf.clone()
    out, pos, _, seen = call(gm, static_layer, (q, k, v, k_in, v_in, torch.tensor([slots])),
                                  *store_meta(slots, real=slots))
    assert bool((pos >= 0).all()) and seen.tolist() == [slots + 1] * B and k_in.shape == k_buf.shape


def test_static_cache_sized_unlike_the_budget_and_adaptive_budgets_are_refused():
    q, k, v = qkv(1)
    buffers = randn(B, HKV, 8, D), randn(B, HKV, 8, D)
    gm = capture(static_layer, q, k, v, *buffers, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"StaticCache holds 8 slots.*max_cache_len=4"):
        rewrite(gm, policy="h2o", budget=4)
    with pytest.raises(ValueError, match="layer 0 writes a StaticCache, whose buffers keep one row per head"):
        rewrite(gm, policy="h2o", budget=8, head_budgets="adaptive")


def sliding_layer(q, k_new, v_new, past_k, past_v):
    k, v = torch.cat([past_k, k_new], dim=-2), torch.cat([past_v, v_new], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), k[:, :, -3:], v[:, :, -3:]


def test_a_sliding_window_cache_is_left_to_hf_stored_contiguously():
    q, k, v = qkv(1)
    past = randn(B, HKV, 3, D), randn(B, HKV, 3, D)
    gm = capture(sliding_layer, q, k, v, *past)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewriting, plans = rewrite(gm, policy="h2o", budget=2)
    assert plans == [] and rewriting.counters == {"sliding_sites_kept": 1}
    assert any("sliding-window layers [0] keep HF's own 3-token window" in str(w.message) for w in caught)
    assert not {ops.attend.default, ops.compact.default} & targets(gm)
    outs = call(gm, sliding_layer, (q, k, v, *past))
    ref = sliding_layer(q, k, v, *past)
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert outs[1].is_contiguous()


@pytest.mark.parametrize("layer, args, options, variants", [
    ("prefill", (6,), {}, dict(candidates="cache", state="empty", validity="mask", extend="extend_meta",
                               attention="attend", compaction="compact", store_out="outputs", observe=False)),
    ("decode", (1,), {}, dict(candidates="cache", state="inputs", validity="all", attention="attend")),
    ("decode", (1,), {"head_budgets": "adaptive"},
     dict(extend="extend_packed_meta", attention="attend_packed", compaction="compact_packed")),
    ("prefill", (6,), {"head_budgets": "adaptive"}, dict(attention="attend", compaction="compact_packed")),
    ("static", (1,), {}, dict(candidates="buffers+new", state="inputs-or-adopted", validity="all",
                              store_out="buffers")),
    ("static", (3,), {}, dict(validity="all-or-positions")),
])
def test_each_step_variant_is_chosen_once_per_site(layer, args, options, variants):
    (t,) = args
    q, k, v = qkv(t)
    if layer == "prefill":
        gm = capture(prefill_layer, q, k, v)
    elif layer == "decode":
        gm = capture(decode_layer, q, k, v, randn(B, HKV, 4, D), randn(B, HKV, 4, D))
    else:
        gm = capture(static_layer, q, k, v, randn(B, HKV, 8, D), randn(B, HKV, 8, D), torch.arange(3, 3 + t))
    (site,) = find_attention_sites(gm.graph)
    opts = parse_options({"policy": "h2o", "budget": 8, **options})
    plan = SitePlan.of(site, opts, 8, 8, None, list(gm.graph.find_nodes(op="placeholder")))
    assert {name: getattr(plan, name) for name in variants} == variants


def test_uuid_names_the_pass_version_and_changes_with_the_options():
    a = InsertKVEviction(parse_options({"policy": "h2o", "budget": 8}))
    b = InsertKVEviction(parse_options({"policy": "h2o", "budget": 9}))
    assert a.uuid().startswith("InsertKVEviction:v5:")
    assert a.uuid() != b.uuid()
    assert a.uuid() == InsertKVEviction(parse_options({"policy": "h2o", "budget": 8})).uuid()
