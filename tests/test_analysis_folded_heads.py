"""The folded-heads recognizers (XGLM's ``bmm`` over ``[B * H, T, D]``) on small traced graphs."""

import torch
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import find_attention_sites
from kvpass.analysis.eager import eager_call

B, H, T, N, D = 2, 4, 3, 5, 8


def xglm(q, past_k, new_k, past_v, new_v, mask):
    k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
    q3, k3, v3 = (x.reshape(B * H, -1, D) for x in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = w.view(B, H, T, N) + mask
    w = torch.max(w, torch.full((), torch.finfo(w.dtype).min))
    w = w.view(B * H, T, N)
    w = F.softmax(w, dim=-1)
    w = w.view(B, H, T, N).view(B * H, T, N)
    out = torch.bmm(F.dropout(w, p=0.0, training=False), v3)
    return out.view(B, H, T, D), k, v


def inputs():
    past_k, new_k, past_v, new_v = (torch.randn(B, H, n, D) for n in (N - T, T, N - T, T))
    return torch.randn(B, H, T, D), past_k, new_k, past_v, new_v, torch.zeros(B, 1, T, N)


def test_xglm_reads_the_four_dimensional_queries():
    graph = dynamo_graph(xglm, *inputs())
    call = eager_call(next(n for n in graph.nodes if n.target is F.softmax))
    assert call.q.name == "l_q_" and call.mask.name == "l_mask_" and call.scale == 1.0
    assert call.attn.target is torch.bmm


def test_xglm_site_reads_its_cache():
    (site,) = find_attention_sites(dynamo_graph(xglm, *inputs()))
    assert (site.keys.name, site.values.name, site.past_keys.name) == ("k", "v", "l_past_k_")


def test_queries_folded_with_another_head_count_than_the_keys_are_no_attention():
    def grouped(q, k, v):  # 4 query heads over keys of 2 heads, each read twice
        k3 = k.repeat_interleave(2, dim=1).reshape(B * H, N, D)
        w = torch.bmm(q.reshape(B * H, T, D), k3.transpose(1, 2))
        return torch.bmm(F.softmax(w, dim=-1), v.reshape(B * H, N, D))

    graph = dynamo_graph(grouped, torch.randn(B, H, T, D), torch.randn(B, 2, N, D), torch.randn(B, H, N, D))
    assert eager_call(next(n for n in graph.nodes if n.target is F.softmax)) is None
