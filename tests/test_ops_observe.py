"""``kvpass::context_scores`` (EpiCache's scores) against a transcription of the reference's arithmetic, and the
block-wise prefill that uses it against HF's own attention weights."""

import math

import pytest
import torch
from conftest import tiny_model

from kvpass.apps.episodic import compress_context
from kvpass.ops.observe import context_scores_reference
from kvpass.runtime.state import store_state


def reference_flatten_scores(query_states, past_keys):
    """apple/ml-epicache ``KVScore._get_score_flatten``, transcribed for one batch row: per kv head, the patched
    queries' softmax over that head's past keys, the max over the GQA group and the queries."""
    bsz, num_heads, q_len, head_dim = query_states.shape
    n_kv = past_keys.shape[1]
    query_states = query_states.view(bsz, n_kv, -1, q_len, head_dim)
    scores = []
    for h in range(n_kv):
        weights = torch.matmul(query_states[:, h], past_keys[0, h].transpose(-2, -1)) / math.sqrt(head_dim)
        scores.append(torch.softmax(weights, dim=-1).amax(dim=(0, 1, 2)))
    return torch.stack(scores)  # [H_kv, P]


def scores_per_kv_head(obs, n_kv):
    b, hq, n = obs.shape
    return obs.view(b, n_kv, hq // n_kv, n).amax(dim=2)  # EpiCache.score's reduction over the group


def test_context_scores_are_the_references_softmax_over_past_keys_only():
    g = torch.Generator().manual_seed(0)
    hq, hkv, m, past, d = 6, 2, 5, 11, 8
    q = torch.randn(1, hq, m, d, generator=g)
    k = torch.randn(1, hkv, past + m, d, generator=g)  # the store and block, then the patched prompt's own keys
    context = torch.zeros(1, hkv, past + m, dtype=torch.bool)
    context[..., :past] = True
    obs = context_scores_reference(q, k, context, torch.ones(1, m, dtype=torch.bool), d ** -0.5, "max")
    got = scores_per_kv_head(obs, hkv)[0]
    torch.testing.assert_close(got[:, :past], reference_flatten_scores(q, k[:, :, :past]))
    assert torch.equal(got[:, past:], torch.zeros(hkv, m))


def test_padded_rows_and_empty_context_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 9 + 6, 8, generator=g)  # 9 candidates, 6 observing
    context = torch.rand(1, 2, 9 + 6, generator=g) > 0.3
    rows = torch.tensor([[True, True, True, False, False, False]])  # a 3-token prompt padded to 6
    padded = context_scores_reference(q, k, context, rows, 0.3, "sum")
    short = context_scores_reference(q[:, :, :3], k[:, :, :12], context[:, :, :12], rows[:, :3], 0.3, "sum")
    assert torch.allclose(padded[..., :9], short[..., :9]) and not padded[..., 9:].any()
    none = context_scores_reference(q, k, torch.zeros_like(context), rows, 0.3, "max")
    assert torch.equal(none, torch.zeros_like(none))
    with pytest.raises(ValueError, match="reduce must be one of \\('max', 'sum'\\), got 'mean'"):
        context_scores_reference(q, k, context, rows, 0.3, "mean")


def test_packed_store_scores_each_slot_from_its_own_heads_queries():
    g = torch.Generator().manual_seed(2)
    hq, hkv, n, d = 6, 3, 7, 4
    q, k = torch.randn(1, hq, 4, d, generator=g), torch.randn(1, hkv, n, d, generator=g)
    context = torch.ones(1, hkv, n, dtype=torch.bool)
    rows = torch.ones(1, 4, dtype=torch.bool)
    uniform = context_scores_reference(q, k, context, rows, 0.5, "max")
    head = torch.arange(hkv).view(1, hkv, 1).expand(1, hkv, n)  # row r holds head r's slots: the same store, packed
    packed = context_scores_reference(q, k, context, rows, 0.5, "max", head=head)
    torch.testing.assert_close(packed, uniform)


def test_context_scores_op_passes_opcheck():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    context, rows = torch.rand(1, 2, 10, generator=g) > 0.2, torch.ones(1, 3, dtype=torch.bool)
    torch.library.opcheck(torch.ops.kvpass.context_scores.default, (q, k, context, rows, 0.25, "max"))


def test_blockwise_epicache_keeps_the_top_of_the_references_scores():
    # one block (the store starts empty): the kept tokens are the top-budget of the reference's scores, computed from
    # HF's own eager attention weights renormalized over the context keys (softmax restricted to them)
    model = tiny_model(attn="eager")
    context = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    prompt = [11, 12, 13, 14, 15, 16]
    options = {"policy": "epicache", "budget": 12, "prefill_block": 48, "head_budgets": "uniform",
               "compiler": "aot_eager"}
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    ctx = compress_context(forward, model, options, context, observe=torch.tensor(prompt))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context + prompt]), output_attentions=True)
    n_kv = model.config.num_key_value_heads
    for layer, weights in zip(ctx.cache.layers, out.attentions, strict=True):
        rows = weights[0, :, len(context):, : len(context)]                      # [H_q, prompt, context]
        rows = rows / rows.sum(-1, keepdim=True)                                  # softmax over the context only
        score = rows.reshape(n_kv, -1, len(context)).amax(dim=1)                  # max over group and queries
        expected = score.topk(12, dim=-1).indices.sort(dim=-1).values
        kept = store_state(layer.keys).pos[0]
        assert torch.equal(kept.sort(dim=-1).values, expected)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_scores_computed_a_few_query_rows_at_a_time_are_the_same(reduce, monkeypatch):
    from kvpass.ops import observe

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 6, 7, 8, generator=g), torch.randn(2, 3, 12 + 7, 8, generator=g)
    context, rows = torch.rand(2, 3, 19, generator=g) > 0.3, torch.rand(2, 7, generator=g) > 0.2
    head = torch.randint(0, 3, (2, 3, 19), generator=g)
    whole = [context_scores_reference(q, k, context, rows, 0.4, reduce, h) for h in (None, head)]
    monkeypatch.setattr(observe, "_CHUNK_ELEMENTS", 100)  # one or two query rows per chunk
    for h, expected in zip((None, head), whole, strict=True):
        torch.testing.assert_close(context_scores_reference(q, k, context, rows, 0.4, reduce, h), expected)
