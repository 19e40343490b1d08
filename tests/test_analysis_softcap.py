"""The soft-cap recognizer (Gemma-2's ``c * tanh(logits / c)``) on small traced graphs."""

import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis.chain import EagerChain
from kvpass.analysis.eager import eager_call
from kvpass.analysis.softcap import softcap_of, softcap_step


def last_op(fn) -> fx.Node:
    """The node ``fn(x)`` returns (``x``: logits)."""
    graph = dynamo_graph(fn, torch.randn(2, 5))
    return graph.output_node().args[0][0]


def test_softcap_spellings():
    for cap_logits in (lambda x: torch.tanh(x / 30.0) * 30.0,
                       lambda x: 30.0 * torch.tanh(x / 30.0),
                       lambda x: torch.tanh(x * (1 / 30.0)) * 30.0):
        cap, logits = softcap_of(last_op(cap_logits))
        assert cap == 30.0 and logits.name == "l_x_"


def test_tanh_without_a_matching_cap_is_none():
    for not_capped in (lambda x: torch.tanh(x / 30.0) * 20.0,  # caps differ
                       lambda x: torch.tanh(x) * 30.0,         # nothing divided
                       lambda x: torch.sigmoid(x / 30.0) * 30.0,
                       lambda x: x * 30.0):
        assert softcap_of(last_op(not_capped)) is None


def test_gemma2_soft_capped_attention():
    def attend(q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        w = w / 50.0
        w = torch.tanh(w)
        w = w * 50.0
        w = w + mask
        return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    graph = dynamo_graph(attend, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
                         torch.zeros(1, 1, 3, 5))
    softmax = next(n for n in graph.nodes if n.target is F.softmax)
    call = eager_call(softmax)
    assert call.softcap == 50.0 and call.scale == 0.25 and call.mask.name == "l_mask_"


def test_one_soft_cap_per_attention():
    node = last_op(lambda x: torch.tanh(x / 30.0) * 30.0)
    assert softcap_step(node, EagerChain(node)).softcap == 30.0
    assert softcap_step(node, EagerChain(node, softcap=30.0)) is None
