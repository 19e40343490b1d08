"""The learned-sink recognizers (GPT-OSS's logit column, GraniteSWA's output scale) on small traced graphs."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import UnsupportedGraph
from kvpass.analysis.chain import EagerChain
from kvpass.analysis.eager import eager_call
from kvpass.analysis.sinks import drops_last_column, sink_column


def softmax_of(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.target in (torch.softmax, F.softmax))


Q, K, V, MASK = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 1, 3, 5)
SINKS = torch.randn(2)


def gpt_oss(q, k, v, mask, sinks):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([w, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    return torch.matmul(F.dropout(probs[..., :-1], p=0.0, training=False).to(v.dtype), v)


def granite_swa(q, k, v, mask, sinks):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    sink_scale = (torch.logsumexp(w, dim=-1) - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v)
    return out * sink_scale.unsqueeze(-1).to(out.dtype)


def test_gpt_oss_sink_column():
    graph = dynamo_graph(gpt_oss, Q, K, V, MASK, SINKS)
    call = eager_call(softmax_of(graph))
    assert call.sinks.target == "expand" and call.sinks.args[0].args[0].name == "l_sinks_"
    assert call.attn is graph.output_node().args[0][0]
    assert call.scale == 0.25 and call.mask.name == "l_mask_"


def test_sink_column_is_one_wide_on_the_last_dim():
    def joined(w, column):
        return torch.cat([w, column], dim=-1)

    wide = dynamo_graph(joined, torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 2)).output_node().args[0][0]
    one = dynamo_graph(joined, torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 1)).output_node().args[0][0]
    assert sink_column(wide, EagerChain(wide)) is None
    step = sink_column(one, EagerChain(one))
    assert (step.source.name, step.sinks.name) == ("l_w_", "l_column_")


def test_drops_last_column():
    def drop(x):
        return x[..., :-1], x[..., :1], x[:, :-1]

    dropped, first, rows = dynamo_graph(drop, torch.randn(2, 3)).output_node().args[0]
    assert drops_last_column(dropped) and not drops_last_column(first) and not drops_last_column(rows)


def test_granite_swa_sigmoid_sink_scale():
    graph = dynamo_graph(granite_swa, Q, K, V, MASK, SINKS)
    call = eager_call(softmax_of(graph))
    assert call.sinks.target == "view" and call.sinks.args[0].name == "l_sinks_"
    assert call.attn is graph.output_node().args[0][0]  # the scaled output is the attention's


def test_logsumexp_scale_without_sigmoid_is_no_sink_and_is_refused_as_a_reader_of_the_logits():
    def scaled(q, k, v, mask, sinks):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        lse_scale = torch.logsumexp(w, dim=-1) - sinks.view(1, -1, 1)
        return torch.matmul(torch.softmax(w, -1), v) * lse_scale.unsqueeze(-1)

    with pytest.raises(UnsupportedGraph, match="a statistic of the logits"):
        eager_call(softmax_of(dynamo_graph(scaled, Q, K, V, MASK, SINKS)))
