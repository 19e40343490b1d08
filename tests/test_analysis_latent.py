"""The latent-cache recognizer (MLA: keys and values projected token by token from cached latents), on small
traced graphs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import dynamo_graph

from kvpass.analysis import UnsupportedGraph, find_attention_sites
from kvpass.analysis.latent import per_token

B, H, T, PAST, RANK, ROPE, NOPE, DV = 1, 4, 3, 5, 16, 8, 8, 12


def expand_kv(latent, rope, w_kv):
    """DeepSeek-V3's ``expand_kv``: every head's keys and values from one latent and one rotary key per token."""
    b, _, n, _ = latent.shape
    kv = F.linear(latent, w_kv).view(b, n, -1, NOPE + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [NOPE, DV], dim=-1)
    k = kv.new_empty(*kv.shape[:-1], NOPE + ROPE)
    k[..., :NOPE].copy_(k_nope)
    k[..., NOPE:].copy_(rope.expand(-1, k_nope.shape[1], -1, -1))
    return k, v


def mla_sdpa(q, past_latent, new_latent, past_rope, new_rope, w_kv):
    latent, rope = torch.cat([past_latent, new_latent], dim=-2), torch.cat([past_rope, new_rope], dim=-2)
    k, v = expand_kv(latent, rope, w_kv)
    return F.scaled_dot_product_attention(q, k, v, scale=0.25), latent, rope


def mla_eager(q, past_latent, new_latent, past_rope, new_rope, w_kv):
    latent, rope = torch.cat([past_latent, new_latent], dim=-2), torch.cat([past_rope, new_rope], dim=-2)
    key_states, value_states = expand_kv(latent, rope, w_kv)
    w = torch.softmax(torch.matmul(q, key_states.transpose(2, 3)) * 0.25, -1)
    return torch.matmul(w, value_states), latent, rope


def inputs():
    return (torch.randn(B, H, T, NOPE + ROPE), torch.randn(B, 1, PAST, RANK), torch.randn(B, 1, T, RANK),
            torch.randn(B, 1, PAST, ROPE), torch.randn(B, 1, T, ROPE), torch.randn(H * (NOPE + DV), RANK))


@pytest.mark.parametrize("attend", [mla_sdpa, mla_eager])
def test_mla_site_stores_the_latents_and_reads_what_is_computed_from_them(attend):
    (site,) = find_attention_sites(dynamo_graph(attend, *inputs()))
    assert (site.keys.name, site.values.name) == ("latent", "rope")
    assert (site.key_write, site.value_write) == (site.keys, site.values)
    assert (site.past_keys.name, site.past_values.name) == ("l_past_latent_", "l_past_rope_")
    assert site.attn_keys.target == "new_empty" and site.attn_values.args[0].target == torch.split
    assert site.scale == 0.25 and "latent cache" in site.describe()


def test_an_op_that_mixes_tokens_is_refused():
    def mixed(q, past_latent, new_latent, past_rope, new_rope, w_kv):
        latent, rope = torch.cat([past_latent, new_latent], dim=-2), torch.cat([past_rope, new_rope], dim=-2)
        k, v = expand_kv(latent.cumsum(dim=-2), rope, w_kv)
        return F.scaled_dot_product_attention(q, k, v), latent, rope

    with pytest.raises(UnsupportedGraph, match=r"operations on the way that mix tokens or are unknown: \['cumsum'\]"):
        find_attention_sites(dynamo_graph(mixed, *inputs()))


def test_keys_and_values_from_one_write_are_no_layer_store():
    def one_latent(q, past_latent, new_latent, past_rope, new_rope, w_kv):
        latent = torch.cat([past_latent, new_latent], dim=-2)
        k, v = expand_kv(latent, latent[..., :ROPE], w_kv)
        return F.scaled_dot_product_attention(q, k, v), latent

    with pytest.raises(UnsupportedGraph, match=r"computed from the cache writes \['latent'\], but not token by token "
                                               "from one layer's two writes"):
        find_attention_sites(dynamo_graph(one_latent, *inputs()))


def test_keys_computed_from_no_cache_are_refused():
    def uncached(q, past_latent, new_latent, past_rope, new_rope, w_kv):
        return F.scaled_dot_product_attention(q, *expand_kv(new_latent, new_rope, w_kv))

    with pytest.raises(UnsupportedGraph, match="not written to a KV cache kvpass knows"):
        find_attention_sites(dynamo_graph(uncached, *inputs()))


def test_a_latent_static_cache_is_refused():
    def static(q, latent_buf, new_latent, rope_buf, new_rope, w_kv, index):
        latent_buf.index_copy_(2, index, new_latent)
        rope_buf.index_copy_(2, index, new_rope)
        return F.scaled_dot_product_attention(q, *expand_kv(latent_buf, rope_buf, w_kv))

    q, _, new_latent, _, new_rope, w_kv = inputs()
    graph = dynamo_graph(static, q, torch.zeros(B, 1, 8, RANK), new_latent, torch.zeros(B, 1, 8, ROPE), new_rope,
                         w_kv, torch.arange(T))
    with pytest.raises(UnsupportedGraph, match="latent cache, as MLA's, in a StaticCache"):
        find_attention_sites(graph)


def test_eager_keys_read_through_anything_but_a_transpose_are_refused():
    def permuted(q, past_latent, new_latent, past_rope, new_rope, w_kv):
        latent, rope = torch.cat([past_latent, new_latent], dim=-2), torch.cat([past_rope, new_rope], dim=-2)
        k, v = expand_kv(latent, rope, w_kv)
        return torch.matmul(torch.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)), -1), v), latent, rope

    with pytest.raises(UnsupportedGraph, match="reads keys through 'permute', not a transpose"):
        find_attention_sites(dynamo_graph(permuted, *inputs()))


def test_per_token_ops():
    def ops(x, w):
        return F.linear(x, w), x.transpose(1, 2), x.sum(dim=-2), x.cumsum(dim=-2)

    graph = dynamo_graph(ops, torch.randn(B, 1, 6, RANK), torch.randn(4, RANK))
    linear, transposed, summed, cumsum = graph.output_node().args[0]
    assert per_token(linear, 6) and per_token(transposed, 6)
    assert not per_token(summed, 6)  # the sequence axis reduced away
    assert not per_token(cumsum, 6)  # an op kvpass does not know to act token by token
