"""The eager recognizer (matmul → scale → mask → softmax → matmul) and its plain chain steps on small traced graphs."""

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import UnsupportedGraph
from kvpass.analysis.eager import eager_call
from kvpass.analysis.ops import SOFTMAX_TARGETS


def softmax_of(graph: fx.Graph) -> fx.Node:
    (softmax,) = [n for n in graph.nodes if n.target in SOFTMAX_TARGETS]
    return softmax


def named(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.name == name)


Q, K, V, MASK = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 1, 3, 5)


def test_llama_eager_attention():
    def attend(q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=False)
        return torch.matmul(w, v)

    graph = dynamo_graph(attend, Q, K, V, MASK)
    call = eager_call(softmax_of(graph))
    out = graph.output_node().args[0][0]
    assert call.kind == "eager" and call.attn is out
    assert [call.q.name, call.v.name, call.mask.name] == ["l_q_", "l_v_", "l_mask_"]
    assert call.k.target == "transpose" and call.k.args[0].name == "l_k_"  # (the keys as the score matmul reads them)
    assert call.scale == 0.25
    assert (call.softcap, call.sinks, call.window) == (0.0, None, 0)


def test_scale_as_a_division_and_queries_scaled_before():
    def divided(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), -1) @ v

    def prescaled(q, k, v):
        return torch.softmax((q * 0.25) @ k.transpose(-1, -2), -1) @ v

    assert eager_call(softmax_of(dynamo_graph(divided, Q, K, V))).scale == 0.25
    call = eager_call(softmax_of(dynamo_graph(prescaled, Q, K, V)))
    assert call.scale == 1.0 and call.mask is None  # kvpass scales nothing the model scaled itself


def test_falcon_view_and_in_place_scaling():
    def attend(q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).view(1, 2, 3, 5)
        scores *= 0.5
        scores /= 2.0
        return F.softmax(scores + mask, dim=-1, dtype=torch.float32) @ v

    call = eager_call(softmax_of(dynamo_graph(attend, Q, K, V, MASK)))
    assert call.scale == 0.25 and call.mask.name == "l_mask_"


def test_overflow_guard_and_lowest_float_clamp_pass():
    def shifted(q, k, v):
        w = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(w - w.max(dim=-1, keepdim=True).values, -1) @ v

    def clamped(q, k, v, mask):  # XGLM clamps masked logits at the lowest float
        w = q @ k.transpose(-1, -2) + mask
        w = torch.max(w, torch.full((), torch.finfo(w.dtype).min))
        return torch.softmax(w, -1) @ v

    assert eager_call(softmax_of(dynamo_graph(shifted, Q, K, V))).scale == 0.25
    assert eager_call(softmax_of(dynamo_graph(clamped, Q, K, V, MASK))).mask.name == "l_mask_"


def test_softmax_that_is_not_attention():
    def classifier(x, w):
        return torch.softmax(x @ w, -1)  # no value matmul

    def pooled(q, k):
        return torch.softmax(q @ k.transpose(-1, -2), -1).sum(-1)

    def gated(x, v):
        return torch.softmax(torch.sigmoid(x), -1) @ v  # no score matmul

    assert eager_call(softmax_of(dynamo_graph(classifier, torch.randn(3, 4), torch.randn(4, 5)))) is None
    assert eager_call(softmax_of(dynamo_graph(pooled, Q, K))) is None
    assert eager_call(softmax_of(dynamo_graph(gated, torch.randn(1, 2, 3, 5), V))) is None
    graph = dynamo_graph(pooled, Q, K)
    assert all(eager_call(n) is None for n in graph.nodes if n.target not in SOFTMAX_TARGETS)


def test_a_second_additive_term_is_refused_as_a_position_bias():
    def attend(q, k, v, mask, bias):
        return torch.softmax(q @ k.transpose(-1, -2) + bias + mask, -1) @ v

    graph = dynamo_graph(attend, Q, K, V, MASK, torch.randn(1, 2, 3, 5))
    with pytest.raises(UnsupportedGraph, match=r"2 additive terms before softmax \(\['l_bias_', 'l_mask_'\]\).*ALiBi"):
        eager_call(softmax_of(graph))


def test_weights_read_outside_the_attention_are_refused():
    def attend(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2), -1)
        return w @ v, w  # output_attentions=True

    with pytest.raises(UnsupportedGraph, match="intermediate 'w' also read by.*output_attentions=False"):
        eager_call(softmax_of(dynamo_graph(attend, Q, K, V)))


def test_a_scale_that_is_no_constant_is_refused():
    def attend(q, k, v, scale):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v

    with pytest.raises(UnsupportedGraph, match="scaled by 'mul', which is not a constant"):
        eager_call(softmax_of(dynamo_graph(attend, Q, K, V, torch.tensor(0.25))))


def test_eager_attention_in_an_export_graph():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
            return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    graph = torch.export.export(Attend(), (Q, K, V, MASK)).graph
    call = eager_call(softmax_of(graph))
    assert call.scale == 0.25 and call.mask.name == "mask" and call.v.name == "v"
    assert call.attn.target is torch.ops.aten.matmul.default
