"""Option ``offload`` with ``offload_attention``: the store evicts into a lower tier that attention reads in place.

Every token is either in the device store or in the lower tier, and attention is the exact merge of both parts, so at
any budget the outputs are the uncompressed model's: same greedy tokens, fp32 logits within 1e-5.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers
from conftest import family_model, tiny_model

import kvpass
from kvpass.errors import UnsupportedGraph

NEW_TOKENS = 10
OFFLOAD = {"offload": "cpu", "offload_attention": True}


def _prompt(batch: int, length: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; with two rows the second is left-padded by 5."""
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :5] = 0
        ids[1, :5] = 0
    return ids, mask


def _generate(model, ids, mask, new_tokens: int = NEW_TOKENS):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, pad_token_id=0)


def _compile(model, compiler: str = "aot_eager", **options):
    options = {"compiler": compiler, "policy": "h2o", "budget": 8, **OFFLOAD, **options}
    model.forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    return model


def _assert_exact(out, ref) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True)) < 1e-5


# sinks (gpt_oss), soft caps and local layers (gemma2, gemma3), a local window kvpass masks itself (gpt_neo),
# heads folded into bmm's batch (xglm), eager attention (llama eager)
@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                        ("mistral", "sdpa"), ("gemma3", "sdpa"), ("gemma2", "eager"),
                                        ("gpt_oss", "eager"), ("gpt_neo", "eager"), ("xglm", "eager")])
def test_any_budget_gives_the_uncompressed_tokens_and_logits(arch, attn):
    model = family_model(arch) if attn == "sdpa" else tiny_model(arch, attn=attn)
    ids, mask = _prompt(2 if arch == "llama" else 1)
    ref = _generate(model, ids, mask)
    out = _generate(_compile(model), ids, mask)
    _assert_exact(out, ref)
    counters = kvpass.explain(model.forward).graphs[-1]["counters"]
    assert counters["offload_sites"] == counters["decode_sites"] > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_wise_prefill_streams_the_prompt_into_the_tier_exactly(arch):
    """Each block evicts into the lower tier and attends to it: the prompt never needs more than the device store plus
    one block on the device (Gemma-3's local layers carry HF's window through the blocks, as without offload)."""
    model = family_model(arch)
    ids, mask = _prompt(2, length=70)
    ref = _generate(model, ids, mask)
    out = _generate(_compile(model, policy="snapkv", window=4, prefill_block=16), ids, mask)
    _assert_exact(out, ref)
    graphs = kvpass.explain(model.forward).graphs
    assert graphs[0]["kind"] == "prefill-block" and graphs[0]["counters"]["offload_sites"] > 0
    for stats in kvpass.kv_stats(out.past_key_values):
        if stats.tier is not None:  # (the local layers are HF's)
            assert stats.real_tokens + stats.tier_tokens == sum(stats.tokens_seen) * model.config.num_key_value_heads


def test_device_store_and_lower_tier_hold_every_token_once_and_stats_show_the_tier():
    model = _compile(tiny_model("qwen2"), policy="snapkv", window=4)
    ids, mask = _prompt(1)
    out = _generate(model, ids, mask)
    heads = model.config.num_key_value_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for stats in kvpass.kv_stats(out.past_key_values):
        seen = stats.tokens_seen[0]
        assert stats.real_tokens == 8 * heads and stats.tier == "cpu"
        assert stats.real_tokens + stats.tier_tokens == seen * heads  # nothing dropped, nothing held twice
        assert stats.tier_bytes == (seen - 8) * heads * 2 * head_dim * 4  # keys and values, fp32
        # the last step moved its query there and a partial output back, and wrote one evicted token per head
        assert 0 < stats.moved_bytes < stats.tier_bytes
    text = str(kvpass.explain(model.forward))
    assert "lower tier in host memory, attended where they live" in text


def test_the_lower_tier_grows_past_its_allocation_without_recompiling():
    model = tiny_model("llama")
    ids, mask = _prompt(1, length=300)  # the prefill evicts 292 tokens: the tier's first allocation, then it grows
    ref = _generate(model, ids, mask)
    _compile(model)
    torch._dynamo.utils.counters.clear()
    out = _generate(model, ids, mask)
    _assert_exact(out, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # prefill, decode
    tier = out.past_key_values.layers[0].keys._kvpass_store_state.tier
    assert tier.used == 300 + NEW_TOKENS - 1 - 8 and tier.k.shape[2] > 292


def test_disk_tier_is_exact_and_leaves_no_files(tmp_path):
    model = tiny_model("llama")
    ids, mask = _prompt(2)
    ref = _generate(model, ids, mask)
    out = _generate(_compile(model, offload="disk", offload_dir=str(tmp_path)), ids, mask)
    _assert_exact(out, ref)
    stats = kvpass.kv_stats(out.past_key_values)
    assert {s.tier for s in stats} == {"disk"} and all(s.tier_tokens > 0 for s in stats)
    tier = out.past_key_values.layers[0].keys._kvpass_store_state.tier
    assert os.path.dirname(tier.k.untyped_storage().filename) == str(tmp_path)
    assert os.listdir(tmp_path) == []


def _step(model, cache, ids, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1])[None]
    return model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits[:, -1]


def test_caches_interleaved_step_by_step_each_give_what_they_give_alone():
    model = tiny_model("llama")
    prompts = [_prompt(1, 30, seed=1)[0], _prompt(1, 45, seed=2)[0]]
    alone = []
    for ids in prompts:  # plain HF, one conversation at a time
        cache, logits = transformers.DynamicCache(config=model.config), []
        logits.append(_step(model, cache, ids, 0))
        for i in range(6):
            nxt = logits[-1].argmax(-1, keepdim=True)
            logits.append(_step(model, cache, nxt, ids.shape[1] + i))
        alone.append(torch.stack(logits))
    _compile(model)
    caches = [kvpass.CompressedCache(config=model.config) for _ in prompts]
    got = [[_step(model, c, ids, 0)] for c, ids in zip(caches, prompts, strict=True)]
    for i in range(6):
        for c, ids, logits in zip(caches, prompts, got, strict=True):
            logits.append(_step(model, c, logits[-1].argmax(-1, keepdim=True), ids.shape[1] + i))
    for logits, want in zip(got, alone, strict=True):
        assert float((torch.stack(logits) - want).abs().max()) < 1e-5
    tiers = [c.layers[0].keys._kvpass_store_state.tier for c in caches]
    assert tiers[0] is not tiers[1] and [t.used for t in tiers] == [30 + 6 - 8, 45 + 6 - 8]


def test_a_conversation_branches_from_a_deep_copy_of_its_cache():
    """The lower tier is appended to in place: two continuations of one compressed context each start from a copy."""
    model = tiny_model("llama")
    ids = _prompt(1, 30, seed=4)[0]
    branches = [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])]
    alone = []
    for extra in branches:  # plain HF, the whole sequence at once
        alone.append(model(input_ids=torch.cat([ids, extra], dim=1)).logits[:, -1])
    _compile(model)
    cache = kvpass.CompressedCache(config=model.config)
    _step(model, cache, ids, 0)
    copies = [copy.deepcopy(cache) for _ in branches]
    for extra, branch, want in zip(branches, copies, alone, strict=True):
        assert float((_step(model, branch, extra, ids.shape[1]) - want).abs().max()) < 1e-5
    tiers = [c.layers[0].keys._kvpass_store_state.tier for c in (cache, *copies)]
    assert [t.used for t in tiers] == [30 - 8, 30 + 3 - 8, 30 + 2 - 8]  # the original is untouched


def test_beam_search_moves_each_rows_lower_tier_with_its_row():
    model = tiny_model("llama")
    ids = _prompt(1, 30, seed=3)[0]
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    ref = model.generate(ids, **kw)
    _compile(model)
    assert torch.equal(model.generate(ids, cache=kvpass.CompressedCache(config=model.config), **kw), ref)


@pytest.mark.slow
def test_inductor_decode_is_exact_and_compiles_once():
    model = tiny_model("llama")
    ids, mask = _prompt(2, length=290)  # the tier grows during decode
    ref = _generate(model, ids, mask, new_tokens=6)
    _compile(model, compiler="inductor")
    torch._dynamo.utils.counters.clear()
    _assert_exact(_generate(model, ids, mask, new_tokens=6), ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_static_caches_and_latent_caches_are_refused_by_name():
    model = _compile(tiny_model("llama"))
    ids, mask = _prompt(1)
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    with pytest.raises(Exception, match="offload.*StaticCache") as err:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache=cache)
    assert isinstance(err.value, UnsupportedGraph) or isinstance(err.value.__cause__, UnsupportedGraph)
    model = _compile(tiny_model("deepseek_v3"))
    with pytest.raises(Exception, match="offload.*latent cache"):
        _generate(model, ids, mask)
