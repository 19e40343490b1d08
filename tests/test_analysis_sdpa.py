"""The SDPA recognizer on small traced graphs."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import UnsupportedGraph
from kvpass.analysis.sdpa import SDPA_TARGETS, sdpa_call


def sdpa_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.target in SDPA_TARGETS)


Q, K, V, MASK = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 1, 3, 5)


def test_sdpa_with_a_mask_takes_the_default_scale():
    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    graph = dynamo_graph(attend, Q, K, V, MASK)
    call = sdpa_call(sdpa_node(graph))
    assert call.kind == "sdpa" and call.attn is sdpa_node(graph)
    assert [call.q.name, call.k.name, call.v.name, call.mask.name] == ["l_q_", "l_k_", "l_v_", "l_mask_"]
    assert call.scale == 16**-0.5
    assert (call.softcap, call.sinks, call.window) == (0.0, None, 0)


def test_sdpa_scale_argument_and_positional_mask():
    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, mask, scale=0.3)

    call = sdpa_call(sdpa_node(dynamo_graph(attend, Q, K, V, MASK)))
    assert call.scale == 0.3 and call.mask.name == "l_mask_"


def test_sdpa_scale_computed_in_the_graph_is_refused():
    def attend(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    graph = fx.symbolic_trace(attend).graph  # (an input scale: no traced value)
    with pytest.raises(UnsupportedGraph, match="scale that is not a constant"):
        sdpa_call(sdpa_node(graph))


def test_other_ops_are_no_sdpa():
    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    graph = dynamo_graph(attend, Q, K, V)
    assert all(sdpa_call(n) is None for n in graph.nodes)


def test_sdpa_in_an_export_graph():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=False)

    graph = torch.export.export(Attend(), (Q, K, V)).graph
    (call,) = [c for c in map(sdpa_call, graph.nodes) if c is not None]
    assert call.attn.target is torch.ops.aten.scaled_dot_product_attention.default
    assert call.scale == 16**-0.5 and call.mask is None
