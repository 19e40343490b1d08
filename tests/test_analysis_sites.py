"""find_attention_sites: the recognizer tables run over a whole graph, the checks that need every site, and the graph
helpers the recognizers share."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

import kvpass.analysis as analysis
from kvpass.analysis import UnsupportedGraph, constant_float, find_attention_sites, trace_to_source
from kvpass.analysis.site import AttentionCall

Q, NEW, PAST = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)


def sdpa_layer(q, past_k, new_k, past_v, new_v, mask=None):
    k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), k, v


def eager_layer(q, past_k, new_k, past_v, new_v):
    k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v, k, v


def cache(n: int = 5):
    return [torch.randn(1, 2, n, 8), NEW.clone(), torch.randn(1, 2, n, 8), NEW.clone()]


def test_sites_in_layer_order_across_both_call_recognizers():
    def two_layers(q, *kv):
        out, k0, v0 = sdpa_layer(q, *kv[:4])
        out, k1, v1 = eager_layer(out, *kv[4:])
        return out, k0, v0, k1, v1

    sites = find_attention_sites(dynamo_graph(two_layers, Q, *cache(), *cache()))
    assert [(s.layer, s.kind) for s in sites] == [(0, "sdpa"), (1, "eager")]
    assert [s.past_keys.name for s in sites] == ["l_kv_0_", "l_kv_4_"]
    assert sites[1].describe() == "layer 1: eager attention at 'out_1', cache=store input"


def test_a_mask_with_a_row_per_head_is_refused_as_a_position_bias():
    graph = dynamo_graph(sdpa_layer, Q, *cache(), torch.zeros(1, 2, 3, 8))
    with pytest.raises(UnsupportedGraph, match=r"one row per head \(shape \(1, 2, 3, 8\)\).*ALiBi"):
        find_attention_sites(graph)
    (site,) = find_attention_sites(dynamo_graph(sdpa_layer, Q, *cache(), torch.zeros(1, 1, 3, 8)))
    assert site.mask.name == "l_mask_"


def test_a_cache_write_no_recognized_attention_reads_is_refused():
    def unread(q, past_k, new_k, past_v, new_v):
        k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
        out, k1, v1 = sdpa_layer(q, past_k, new_k, past_v, new_v)
        return out + torch.einsum("bhtd,bhnd->bhtn", q, k).sum(), k, v, k1, v1

    with pytest.raises(UnsupportedGraph, match=r"the KV cache writes \['k', 'v'\] feed no attention kvpass "
                                               r"recognizes \(1 site\(s\) recognized, 1 attention call\(s\) matched\)"):
        find_attention_sites(dynamo_graph(unread, Q, *cache()))


def test_static_cache_layers_of_different_sizes_are_refused():
    def static_layers(q, k0, v0, k1, v1, new_k, new_v, index):
        out = q
        for k_buf, v_buf in ((k0, v0), (k1, v1)):
            k_buf.index_copy_(2, index, new_k)
            v_buf.index_copy_(2, index, new_v)
            out = F.scaled_dot_product_attention(out, k_buf, v_buf)
        return out

    buffers = [torch.zeros(1, 2, n, 8) for n in (8, 8, 16, 16)]
    graph = dynamo_graph(static_layers, Q, *buffers, NEW, NEW.clone(), torch.arange(3))
    with pytest.raises(UnsupportedGraph, match=r"different numbers of slots \[8, 16\]"):
        find_attention_sites(graph)


def test_keys_read_straight_from_an_input_are_refused():
    def uncached(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.5), k, v

    with pytest.raises(UnsupportedGraph, match="reads keys straight from an input"):
        find_attention_sites(fx.symbolic_trace(uncached).graph)


def test_a_graph_without_attention_names_what_it_calls():
    graph = dynamo_graph(lambda x: torch.relu(x @ x) + torch.softmax(x, -1), torch.randn(3, 3))
    with pytest.raises(UnsupportedGraph, match=r"no attention site found .* 0 attention call\(s\) seen\). The graph "
                                               r"calls: \['add', 'matmul', 'relu', 'softmax'\]"):
        find_attention_sites(graph)


def test_a_new_pattern_is_a_new_table_entry(monkeypatch):
    def einsum_call(node: fx.Node) -> AttentionCall | None:  # attention spelled with einsum, a toy family
        if node.target is not torch.einsum or node.args[0] != "bhtn,bhnd->bhtd":
            return None
        weights, v = node.args[1:]
        scores = weights.args[0]
        return AttentionCall("einsum", node, scores.args[1], scores.args[2], v, None, 1.0)

    def einsum_layer(q, past_k, new_k, past_v, new_v):
        k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
        weights = torch.softmax(torch.einsum("bhtd,bhnd->bhtn", q, k), -1)
        return torch.einsum("bhtn,bhnd->bhtd", weights, v), k, v

    graph = dynamo_graph(einsum_layer, Q, *cache())
    with pytest.raises(UnsupportedGraph, match=r"the KV cache writes \['k', 'v'\] feed no attention kvpass"):
        find_attention_sites(graph)
    monkeypatch.setattr(analysis, "CALL_RECOGNIZERS", (*analysis.CALL_RECOGNIZERS, einsum_call))
    (site,) = find_attention_sites(graph)
    assert site.kind == "einsum" and site.past_keys.name == "l_past_k_"


def test_constant_float_reads_numbers_and_scalar_tensors_built_in_the_graph():
    def scalars(x):
        return x * torch.tensor(0.5), x * torch.full((), -2.0), x * x.sum()

    tensor, full, data = dynamo_graph(scalars, torch.randn(3)).output_node().args[0]
    assert constant_float(tensor.args[1]) == 0.5 and constant_float(full.args[1]) == -2.0
    assert constant_float(data.args[1]) is None  # computed from data: no constant
    assert constant_float(3) == 3.0 and constant_float(True) is None


def test_trace_to_source_follows_layout_ops_only():
    def laid_out(x):
        y = x[:, :, None].expand(1, 2, 2, 5, 8).reshape(1, 4, 5, 8).transpose(2, 3)
        return y, (x * 2).transpose(2, 3)

    graph = dynamo_graph(laid_out, torch.randn(1, 2, 5, 8))
    repeated, scaled = graph.output_node().args[0]
    assert trace_to_source(repeated).name == "l_x_"
    assert trace_to_source(scaled).target is operator.mul
