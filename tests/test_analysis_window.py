"""The sliding-window recognizers (a cache that keeps a tail; GPT-Neo's band mask in a bool buffer) on small traced
graphs."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from kvpass.analysis import UnsupportedGraph, find_attention_sites
from kvpass.analysis.eager import eager_call
from kvpass.analysis.window import band_window, sliding_tail


def in_backend(fn, inspect, *args):
    """``inspect(graph)`` of the graph Dynamo hands a backend for ``fn(*args)``, run in the backend, as kvpass's is
    (Dynamo keeps a buffer's real tensor on its placeholder until the backend returns)."""
    results = []

    def backend(gm, _):
        results.append(inspect(gm.graph))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return results[0]


def softmax_call(graph: fx.Graph):
    return eager_call(next(n for n in graph.nodes if n.target is F.softmax))


def band(p: int, w: int) -> torch.Tensor:
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    return (causal & ~causal.tril(-w))[None, None]


class GPTNeoAttention(torch.nn.Module):
    """GPT-Neo's ``_attn``: the causal or local mask is a slice of a bool buffer, applied with ``where``."""

    def __init__(self, bias: torch.Tensor, tail: int = 0):
        super().__init__()
        self.register_buffer("bias", bias)
        self.tail = tail

    def forward(self, q, past_k, new_k, past_v, new_v, mask):
        k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
        w = torch.matmul(q, k.transpose(-1, -2))
        t, n = q.size(-2), k.size(-2)
        causal = self.bias[:, :, n - t:n, :n]
        w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        out = torch.matmul(F.softmax(w + mask, dim=-1).to(v.dtype), v)
        if self.tail:  # (a cache that keeps a window besides)
            return out, k[:, :, -self.tail:], v[:, :, -self.tail:]
        return out, k, v


def neo_inputs(t: int = 3, past: int = 5):
    kv = [torch.randn(1, 2, n, 8) for n in (past, t, past, t)]
    return torch.randn(1, 2, t, 8), *kv, torch.zeros(1, 1, t, past + t)


def test_gpt_neo_local_band_is_the_window():
    call = in_backend(GPTNeoAttention(band(16, 4)), softmax_call, *neo_inputs())
    assert call.window == 4 and call.scale == 1.0 and call.mask is not None


def test_gpt_neo_causal_triangle_is_no_window():
    assert in_backend(GPTNeoAttention(band(16, 16)), softmax_call, *neo_inputs()).window == 0


def test_a_bool_buffer_that_is_no_band_is_no_attention_kvpass_knows():
    bias = torch.ones(1, 1, 16, 16, dtype=torch.bool).triu()  # (the upper triangle: anti-causal)
    assert in_backend(GPTNeoAttention(bias), softmax_call, *neo_inputs()) is None

    def where_of(graph):
        return band_window(next(n for n in graph.nodes if n.target is torch.where).args[0])

    assert in_backend(GPTNeoAttention(band(16, 6)), where_of, *neo_inputs()) == 6


def test_a_masked_window_site_keeps_every_token():
    (site,) = in_backend(GPTNeoAttention(band(16, 4)), find_attention_sites, *neo_inputs())
    assert site.window == 4 and site.masked_window and site.key_write is site.keys
    assert site.past_keys.name == "l_past_k_"


def test_a_window_both_masked_and_kept_is_refused():
    with pytest.raises(UnsupportedGraph, match="masks a 4-token window and its cache keeps a 4-token one"):
        in_backend(GPTNeoAttention(band(16, 4), tail=3), find_attention_sites, *neo_inputs())


def sliding(q, past_k, new_k, past_v, new_v):
    k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
    return F.scaled_dot_product_attention(q, k, v), k[:, :, -3:], v[:, :, -3:]


def test_sliding_layer_keeps_its_tail():
    def tail_of_keys(graph):
        outputs = set(graph.output_node().all_input_nodes)
        keys = next(n for n in graph.nodes if n.name == "k")
        return sliding_tail(keys, outputs), sliding_tail(keys, set())

    (tail, window), unstored = in_backend(sliding, tail_of_keys, *neo_inputs()[:-1])
    assert window == 4 and tail.args[0].name == "k" and unstored is None  # keeps window - 1 tokens
    (site,) = in_backend(sliding, find_attention_sites, *neo_inputs()[:-1])
    assert site.window == 4 and not site.masked_window
    assert site.key_write.name == tail.name and site.key_write.args[0] is site.keys


def test_a_slice_that_is_no_tail_is_no_window():
    def head(q, past_k, new_k, past_v, new_v):
        k = torch.cat([past_k, new_k], dim=-2)
        return k[:, :, :3], k[:, :, -3:-1]

    def tails(graph):
        return sliding_tail(next(n for n in graph.nodes if n.name == "k"), set(graph.output_node().all_input_nodes))

    assert in_backend(head, tails, *neo_inputs()[:-1]) is None
