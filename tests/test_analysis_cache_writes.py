"""The cache recognizers (DynamicCache ``cat``, StaticCache ``index_copy_``) on small traced graphs."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import UnsupportedGraph
from kvpass.analysis.cache_writes import cat_cache_parts, dynamic_cache_site, is_cache_write, static_cache_site
from kvpass.analysis.sdpa import SDPA_TARGETS, sdpa_call
from kvpass.analysis.site import AttentionCall


def call_and_outputs(graph: fx.Graph) -> tuple[AttentionCall, set[fx.Node]]:
    call = sdpa_call(next(n for n in graph.nodes if n.target in SDPA_TARGETS))
    return call, set(graph.output_node().all_input_nodes)


def named(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.name == name)


Q, NEW, PAST = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)


def repeat_kv(x, groups: int = 2):
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def decode(q, past_k, new_k, past_v, new_v):
    k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), k, v


def prefill(q, new_k, new_v):
    empty = torch.empty(1, 2, 0, 8)  # (DynamicCache's first update: cat onto an empty tensor)
    k, v = torch.cat([empty, new_k], dim=-2), torch.cat([empty, new_v], dim=-2)
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), k, v


def static(q, k_buf, new_k, v_buf, new_v, index):
    k_buf.index_copy_(2, index, new_k)
    v_buf.index_copy_(2, index, new_v)
    return F.scaled_dot_product_attention(q, repeat_kv(k_buf), repeat_kv(v_buf))


def test_dynamic_cache_decode_through_gqa_repeat():
    graph = dynamo_graph(decode, Q, PAST, NEW, PAST.clone(), NEW.clone())
    call, outputs = call_and_outputs(graph)
    site = dynamic_cache_site(call, outputs, [])
    assert (site.keys.name, site.values.name) == ("k", "v") and site.key_write is site.keys
    assert (site.past_keys.name, site.past_values.name) == ("l_past_k_", "l_past_v_")
    assert site.q is call.q and site.scale == 8**-0.5 and site.window == 0 and site.static_writes is None
    assert static_cache_site(call, outputs, []) is None  # (no index_copy_: not a StaticCache)


def test_dynamic_cache_first_forward_cats_onto_an_empty_tensor():
    graph = dynamo_graph(prefill, Q, NEW, NEW.clone())
    assert cat_cache_parts(named(graph, "k")) == (None, True)
    site = dynamic_cache_site(*call_and_outputs(graph), [])
    assert site.keys.name == "k" and site.past_keys is None and site.past_values is None


def test_cat_along_another_dim_or_of_three_parts_is_no_cache():
    def cats(a, b):
        return torch.cat([a, b], dim=1), torch.cat([a, b, b], dim=-2), torch.cat([a, b], dim=-2)

    heads, three, cache = dynamo_graph(cats, PAST, PAST.clone()).output_node().args[0]
    assert cat_cache_parts(heads) == (None, False) and cat_cache_parts(three) == (None, False)
    assert cat_cache_parts(cache) == (cache.args[0][0], True)
    assert is_cache_write(cache, {cache}) and not is_cache_write(cache, set())


def test_a_cat_the_graph_does_not_store_is_refused():
    def uncached(q, past_k, new_k, past_v, new_v):  # (use_cache=False: nothing stores the cat)
        return F.scaled_dot_product_attention(q, *(repeat_kv(torch.cat(p, dim=-2)) for p in ([past_k, new_k],
                                                                                             [past_v, new_v])))

    graph = dynamo_graph(uncached, Q, PAST, NEW, PAST.clone(), NEW.clone())
    with pytest.raises(UnsupportedGraph, match="not written to a KV cache kvpass knows.*use_cache=False"):
        dynamic_cache_site(*call_and_outputs(graph), [])


def test_attention_over_plain_inputs_is_no_cache_site():
    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    graph = dynamo_graph(plain, Q, torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8))
    call, outputs = call_and_outputs(graph)
    assert static_cache_site(call, outputs, []) is None and dynamic_cache_site(call, outputs, []) is None


def test_static_cache_buffers_are_the_store():
    graph = dynamo_graph(static, Q, torch.zeros(1, 2, 8, 8), NEW, torch.zeros(1, 2, 8, 8), NEW.clone(),
                         torch.arange(3))
    call, outputs = call_and_outputs(graph)
    site = static_cache_site(call, outputs, [])
    assert (site.keys.name, site.values.name) == ("l_k_buf_", "l_v_buf_")
    assert site.past_keys is site.keys and site.key_write is site.keys
    assert [w.target for w in site.static_writes] == ["index_copy_"] * 2
    assert site.static_writes[0].args[0] is site.keys
    assert is_cache_write(site.static_writes[0], outputs)


def test_static_cache_allocated_by_the_forward_has_no_past():
    def first(q, new_k, new_v, index):
        k_buf, v_buf = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
        return static(q, k_buf, new_k, v_buf, new_v, index)

    graph = dynamo_graph(first, Q, NEW, NEW.clone(), torch.arange(3))
    site = static_cache_site(*call_and_outputs(graph), [])
    assert site.past_keys is None and site.keys.target is torch.zeros
    assert "StaticCache buffer of 8 slots (allocated by this forward)" in site.describe()


def test_a_functional_index_copy_is_refused():
    def functional(q, k_buf, new_k, v_buf, new_v, index):
        k, v = k_buf.index_copy(2, index, new_k), v_buf.index_copy(2, index, new_v)
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v)), k, v

    graph = dynamo_graph(functional, Q, torch.zeros(1, 2, 8, 8), NEW, torch.zeros(1, 2, 8, 8), NEW.clone(),
                         torch.arange(3))
    with pytest.raises(UnsupportedGraph, match="an index_copy that is not a StaticCache layer's in-place write"):
        static_cache_site(*call_and_outputs(graph), [])


def test_sinks_over_a_static_cache_are_refused():
    graph = dynamo_graph(static, Q, torch.zeros(1, 2, 8, 8), NEW, torch.zeros(1, 2, 8, 8), NEW.clone(),
                         torch.arange(3))
    call, outputs = call_and_outputs(graph)
    call.sinks = call.q  # (any node: the recognizer only asks whether the call has sinks)
    with pytest.raises(UnsupportedGraph, match="learned attention sinks and writes a StaticCache"):
        static_cache_site(call, outputs, [])
