"""kvpass.CompressedCache: conversations continued with generate() over compressed stores."""

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

import kvpass
from kvpass.runtime.state import store_state


def compiled(model, **options):
    options.setdefault("compiler", "aot_eager")
    return torch.compile(model.forward, backend="kvpass", options=options)


def chat(model, cache, turns, steps=6, pad_rows=0):
    """generate() turn after turn, each time with the whole conversation as input_ids (HF's multi-turn recipe)."""
    ids, mask, outs = None, None, []
    for turn in turns:
        new_mask = torch.ones_like(turn)
        if ids is None and pad_rows:  # left-pad the first rows of the first turn
            turn, new_mask = turn.clone(), new_mask.clone()
            turn[:pad_rows, :5], new_mask[:pad_rows, :5] = 0, 0
        ids = turn if ids is None else torch.cat([ids, turn], 1)
        mask = new_mask if mask is None else torch.cat([mask, new_mask], 1)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        outs.append(out)
        mask = torch.cat([mask, torch.ones(ids.shape[0], out.sequences.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        ids = out.sequences
    return outs


def turns(batch=1, lengths=(40, 7, 5), seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (batch, n), generator=g) for n in lengths]


@pytest.mark.parametrize("options, batch", [
    ({"policy": "h2o", "budget": 128}, 1),
    ({"policy": "h2o", "layer_budgets": (90, 80, 70)}, 1),  # stores of different lengths: one-column masks
    ({"policy": "snapkv", "budget": 128, "window": 4}, 2),  # left-padded batch
])
def test_generate_continues_a_conversation_exactly_while_the_budget_covers_it(options, batch):
    model = tiny_model(layers=3)
    conversation = turns(batch)
    ref = chat(model, DynamicCache(config=model.config), conversation, pad_rows=batch - 1)
    model.forward = compiled(model, **options)
    cache = kvpass.CompressedCache(config=model.config)
    got = chat(model, cache, conversation, pad_rows=batch - 1)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    # the whole conversation but its last generated token went through the cache
    assert cache.get_seq_length() == got[-1].sequences.shape[1] - 1
    # prefill, one-token decode step, and one graph for the follow-ups (Dynamo makes it dynamic in their length)
    assert [g["kind"] for g in kvpass.explain(model).graphs] == ["prefill", "decode", "decode"]


def test_follow_ups_over_per_layer_budgets_keep_each_layer_at_its_budget():
    model = tiny_model(layers=3)
    model.forward = compiled(model, policy="pyramidkv", budget=16, window=4, beta=4)
    cache = kvpass.CompressedCache(config=model.config)
    outs = chat(model, cache, turns())
    budgets = [28, 16, 4]  # PyramidKV's linear budgets around 16 (kvpress's rule)
    assert [layer.keys.shape[2] for layer in cache.layers] == budgets
    stats = kvpass.kv_stats(cache)
    assert [s.real_tokens for s in stats] == [2 * b for b in budgets]  # x 2 kv heads
    seen = outs[-1].sequences.shape[1] - 1
    assert cache.get_seq_length() == seen and all(s.tokens_seen == [seen] for s in stats)


def test_plain_dynamic_cache_continuation_is_refused_with_the_way_out():
    # HF's DynamicCache counts its slots as the tokens seen, so generate() would re-feed most of the conversation
    model = tiny_model()
    model.forward = compiled(model, policy="h2o", budget=16)
    cache = DynamicCache(config=model.config)
    first, follow, _ = turns()
    out = model.generate(first, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = torch.cat([out, follow], 1)
    with pytest.raises(ValueError, match=r"appends 37 tokens starting at position 16 \(batch row 0\), but the "
                                         r"compressed cache has seen 45 tokens.*kvpass.CompressedCache.*tokens_seen"):
        model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # the way out the message gives: only the tokens the cache has not seen, with the whole conversation's mask
    seen = kvpass.kv_stats(cache)[0].tokens_seen[0]
    assert seen == 45
    out = model.generate(ids[:, seen:], attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] - seen + 6)
    assert kvpass.kv_stats(cache)[0].tokens_seen == [ids.shape[1] + 5]


def test_uncompressed_forwards_see_a_plain_dynamic_cache():
    model = tiny_model()
    cache = kvpass.CompressedCache(config=model.config)
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids, cache=DynamicCache(config=model.config)).logits
        out = model(input_ids=ids, cache=cache).logits
    torch.testing.assert_close(out, ref)
    assert cache.get_seq_length() == 12 and cache.get_mask_sizes(3, 0) == (15, 0)


def test_batch_row_operations_carry_each_rows_state():
    # beam search reorders the cache's rows every step; each row's kvpass state must follow its row
    model = tiny_model()
    ids = turns()[0]
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    model.forward = compiled(model, policy="h2o", budget=64)
    cache = kvpass.CompressedCache(config=model.config)
    assert torch.equal(model.generate(ids, cache=cache, **kw), ref)
    assert cache.get_seq_length() == ids.shape[1] + 5  # the count moved with the rows
    # rows that evicted differently (left padding): their positions, statistics and counts move with them
    model.forward = compiled(model, policy="h2o", budget=16)
    cache = kvpass.CompressedCache(config=model.config)
    batch = turns(batch=2)[0]
    mask = torch.ones_like(batch)
    mask[0, :9] = 0
    model(input_ids=batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
    before = [store_state(layer.keys) for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    for layer, old in zip(cache.layers, before, strict=True):
        new = store_state(layer.keys)
        order = torch.tensor([1, 1, 0, 0])
        assert torch.equal(new.pos, old.pos[order]) and torch.equal(new.seen, old.seen[order])
        assert torch.equal(new.acc, old.acc[order]) and new.pos.shape[0] == layer.keys.shape[0]
    assert not torch.equal(before[0].pos[0], before[0].pos[1])
    cache.batch_select_indices(torch.tensor([2]))
    assert store_state(cache.layers[0].keys).seen.tolist() == [31]
    with pytest.raises(kvpass.KVPassError, match=r"crop\(10\) cannot cut a compressed cache"):
        cache.crop(10)
