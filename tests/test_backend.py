"""The kvpass backend on unmodified tiny HF decoders: exactness, compression, compiles, errors."""

import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import CompileConfig, DynamicCache, StaticCache

import kvpass
from kvpass.analysis import UnsupportedGraph, find_attention_sites
from kvpass.backend import kvpass_backend


def compiled(model, **options):
    options.setdefault("compiler", "aot_eager")
    return torch.compile(model.forward, backend="kvpass", options=options)


def generate(model, ids, mask=None, steps=8, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True, **kw)


def padded_batch(length=30, pad=7, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left-pad the first row
        mask[0, :pad], ids[0, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch, attn, batch", [
    ("llama", "sdpa", 2), ("llama", "eager", 2), ("qwen2", "sdpa", 2), ("qwen2", "eager", 2),
    ("mistral", "sdpa", 2), ("mistral", "eager", 2),
])
@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streaming_llm", "tova", "knorm"])
def test_budget_covering_the_sequence_is_exact(arch, attn, batch, policy):
    model = tiny_model(arch, attn, **({"sliding_window": None} if arch == "mistral" else {}))
    ids, mask = padded_batch(batch=batch)
    ref = generate(model, ids, mask)
    model.forward = compiled(model, policy=policy, budget=64)
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    report = kvpass.explain(model)
    assert [g["kind"] for g in report.graphs] == ["prefill", "decode"]
    assert report.graphs[0]["counters"]["prefill_sites"] == 2
    assert report.graphs[1]["counters"]["decode_sites"] == 2


MORE_DECODERS = ["qwen3", "phi3", "gemma", "olmo2", "gpt_neox", "phi", "stablelm", "cohere", "starcoder2", "mixtral",
                 "granite", "falcon", "gpt2", "gpt_bigcode", "smollm3",
                 "deepseek_v3", "minicpm3",  # MLA: a latent cache, keys/values projected from it
                 "falcon_h1", "qwen3_next", "lfm2"]  # hybrids: mamba, linear-attention or conv layers between


@pytest.mark.parametrize("arch, attn", [(arch, attn) for arch in MORE_DECODERS for attn in ("sdpa", "eager")]
                         + [("gpt_oss", "eager"), ("granite_swa", "eager"),  # learned attention sinks (eager only)
                            ("gpt_neo", "eager"), ("xglm", "eager")])
def test_more_hf_decoders_are_exact(arch, attn):
    """The rewrite is not tied to Llama's code: each of these decoders writes its cache and attends its own way."""
    model = tiny_model(arch, attn)
    ids, mask = padded_batch()
    ref = generate(model, ids, mask)
    model.forward = compiled(model, policy="h2o", budget=64)
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * 2
    if "sliding_attention" in layer_types:  # their 127-token windows exceed the budget: kvpass says it keeps them
        with pytest.warns(UserWarning, match="keep HF's own 127-token window, above their budgets"):
            out = generate(model, ids, mask)
    else:
        out = generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    full_layers = sum(t == "full_attention" for t in layer_types)
    if arch == "falcon_h1":  # (every layer holds attention beside its mamba mixer)
        full_layers = 2
    graphs = kvpass.explain(model).graphs
    assert [g["counters"]["decode_sites" if g["kind"] == "decode" else "prefill_sites"] for g in graphs] == (
        [full_layers] * len(graphs))
    assert [g["kind"] for g in graphs][:2] == ["prefill", "decode"]
    counters = graphs[0]["counters"]
    if arch in ("deepseek_v3", "minicpm3"):
        assert counters["latent_sites"] == 2
    if arch in ("gpt_oss", "granite_swa"):
        assert counters["sink_sites"] == 1  # (the other layer is a sliding-window layer, kept by HF)


def test_a_window_only_the_mask_applies_is_kvpass_to_apply_and_evict():
    # GPT-Neo's local layer masks an 8-token window with a bool buffer, but its cache keeps every token
    model = tiny_model("gpt_neo", "eager")
    ids, mask = padded_batch()
    model.forward = compiled(model, policy="h2o", budget=64)
    out = generate(model, ids, mask)
    global_layer, local_layer = kvpass.kv_stats(out.cache)
    assert local_layer.real_tokens == 2 * 4 * 7  # batch x kv heads x (window - 1): the tokens a next query can see
    assert global_layer.real_tokens == 4 * (23 + 30 + 2 * 7)  # every real token of both rows (nothing evicted)
    assert "sliding window 8 (in the mask)" in str(kvpass.explain(model))


def test_a_window_only_the_mask_applies_is_kept_over_a_static_cache():
    # the same local layer over StaticCache buffers: kvpass applies the window there too (it used to drop it)
    model = tiny_model("gpt_neo", "eager")
    ids = padded_batch(length=30, batch=1)[0]
    ref = generate(model, ids, steps=8)
    model.forward = compiled(model, policy="h2o", budget=48)
    out = generate(model, ids, steps=8, cache=StaticCache(config=model.config, max_cache_len=48))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gemma2_soft_capped_eager_attention_is_exact_and_compresses():
    # Gemma-2: logits soft-capped (tanh) before the mask; a cap of 1.0 on logits of size ~3 changes the result,
    # so dropping the cap fails. Layers alternate sliding-window (kept by HF) and full attention.
    overrides = dict(layers=4, head_dim=16, sliding_window=16, attn_logit_softcapping=1.0, query_pre_attn_scalar=1,
                     initializer_range=0.3)
    model = tiny_model("gemma2", "eager", **overrides)
    ids, mask = padded_batch(length=40)
    ref = generate(model, ids, mask, steps=12)
    uncapped = tiny_model("gemma2", "eager", **{**overrides, "attn_logit_softcapping": None})
    assert not torch.allclose(generate(uncapped, ids, mask, steps=1).logits[0], ref.logits[0], atol=1e-2)
    model.forward = compiled(model, policy="snapkv", budget=64, window=4)
    out = generate(model, ids, mask, steps=12)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert kvpass.explain(model).graphs[0]["counters"]["prefill_sites"] == 2
    torch._dynamo.reset()
    model.forward = compiled(model, policy="h2o", budget=24)
    out = generate(model, ids, mask, steps=20)
    assert [s.slots for s in kvpass.kv_stats(out.cache)] == [15, 24, 15, 24]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_alibi_position_bias_is_refused_by_name(attn):
    # ALiBi adds a per-head bias to the logits, through the SDPA mask or a second add; kvpass rebuilds masks from
    # slot positions, so it would drop the bias: refused, never a silently different model
    config = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, attn_implementation=attn)
    model = transformers.FalconForCausalLM(config).eval()
    forward = compiled(model, policy="h2o", budget=64)
    with pytest.raises(Exception, match="ALiBi"):
        forward(input_ids=torch.randint(1, 128, (1, 10)), use_cache=True)


def gemma3_style(attn: str):
    """Sliding-window layers (window 16) interleaved with full-attention layers, as in Gemma-3."""
    return tiny_model("gemma3", attn, layers=4, head_dim=16, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"] * 2)


@pytest.mark.parametrize("attn, batch", [("sdpa", 1), ("sdpa", 2), ("eager", 2)])
def test_sliding_window_layers_past_their_window_are_exact_and_compile_twice(attn, batch):
    # the prompt (40) and the generation run past the window (16): HF keeps those layers' window itself
    model = gemma3_style(attn)
    ids, mask = padded_batch(length=40, batch=batch)
    ref = generate(model, ids, mask, steps=12)
    model.forward = compiled(model, policy="snapkv", budget=64)
    out = generate(model, ids, mask, steps=12)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    report = kvpass.explain(model)
    assert [g["kind"] for g in report.graphs] == ["prefill", "decode"]
    counters = report.graphs[1]["counters"]
    assert counters["sliding_sites_kept"] == 2 and counters["decode_sites"] == 2
    assert "2 of 4 attention site(s) rewritten" in str(report) and "HF's window kept" in str(report)


def test_sliding_window_model_compresses_its_full_layers_with_padding_and_eager():
    model = gemma3_style("eager")
    ids, mask = padded_batch(length=40, batch=2)
    model.forward = compiled(model, policy="h2o", budget=24)
    out = generate(model, ids, mask, steps=20)
    assert out.sequences.shape == (2, 60)
    slots = [s.slots for s in kvpass.kv_stats(out.cache)]
    assert slots == [15, 24, 15, 24]  # sliding layers: HF's window - 1; full layers: the budget


def test_sliding_window_above_the_budget_is_kept_with_a_warning():
    model = gemma3_style("sdpa")
    ids, mask = padded_batch(length=40, batch=1)
    model.forward = compiled(model, policy="snapkv", budget=8)
    with pytest.warns(UserWarning, match=r"sliding-window layers \[0, 2\] keep HF's own 15-token window, above their "
                                         r"budgets \[8\]"):
        out = generate(model, ids, mask, steps=20)
    assert [s.slots for s in kvpass.kv_stats(out.cache)] == [15, 8, 15, 8]


@pytest.mark.parametrize("arch, attn, policy, compiler", [
    *((arch, attn, policy, "aot_eager") for arch, attn in [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")]
      for policy in ["snapkv", "h2o", "epicache"]),  # (PyramidKV's top layer keeps less than 64)
    ("llama", "sdpa", "snapkv", "inductor"),  # Inductor inlines the references: they must stay functional
])
def test_head_adaptive_store_covering_the_sequence_is_exact(arch, attn, policy, compiler):
    model = tiny_model(arch, attn, **({"sliding_window": None} if arch == "mistral" else {}))
    ids, mask = padded_batch(batch=2)
    ref = generate(model, ids, mask)
    extra = {"scores": "forward"} if policy == "epicache" else {}  # (a whole-prompt prefill, no observation prompt)
    model.forward = compiled(model, policy=policy, budget=64, head_budgets="adaptive", compiler=compiler, **extra)
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [g["counters"]["head_adaptive_sites"] for g in kvpass.explain(model).graphs] == [2, 2]


@pytest.mark.parametrize("policy, head_budgets", [
    *((p, "uniform") for p in ["snapkv", "h2o", "streaming_llm", "tova", "knorm", "pyramidkv"]),
    *((p, "adaptive") for p in ["snapkv", "h2o", "pyramidkv"]),
])
def test_store_stays_at_budget_and_decode_compiles_once(policy, head_budgets):
    model = tiny_model()
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 512))
    compiles = []

    def counting_backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return kvpass_backend(gm, example_inputs, **kw)

    # window 8: SnapKV's protected window stays well inside the budget, so the heads' scores decide the split
    extra = {"window": 8} if policy in ("snapkv", "pyramidkv") else {}
    extra.update({"beta": 4} if policy == "pyramidkv" else {})  # budgets 112 / 16 (kvpress's rule: beta 20 falls back)
    forward = torch.compile(model.forward, backend=counting_backend, options={
        "policy": policy, "budget": 64, "compiler": "aot_eager", "head_budgets": head_budgets, **extra})
    cache = DynamicCache(config=model.config)
    logits = forward(input_ids=ids, cache=cache, use_cache=True,
                     position_ids=torch.arange(512)[None]).logits
    budgets = [model.config.num_hidden_layers and kvpass.explain(forward).graphs[0]["budgets"]][0]
    for step in range(64):
        token = logits[:, -1:].argmax(-1)
        logits = forward(input_ids=token, cache=cache, use_cache=True,
                         position_ids=torch.tensor([[512 + step]])).logits
        stats = kvpass.kv_stats(cache)
        assert [s.slots for s in stats] == budgets
        assert [s.real_tokens for s in stats] == [b * model.config.num_key_value_heads for b in budgets]
        assert all(s.kv_bytes == 2 * 2 * b * 16 * 4 for s, b in zip(stats, budgets, strict=True))
        if head_budgets == "uniform":
            assert all(s.head_tokens == [b, b] for s, b in zip(stats, budgets, strict=True))
    # the same bytes, shared unevenly by the two kv heads of some layer (H2O's accumulated attention in this
    # random-weight model falls off with position alike in both heads, so its split stays even)
    if head_budgets == "adaptive" and policy != "h2o":
        assert any(s.head_tokens[0] != s.head_tokens[1] for s in stats), [s.head_tokens for s in stats]
    assert len(compiles) == 2  # prefill and decode, nothing more over 64 steps
    if policy != "pyramidkv":
        assert budgets == [64, 64]
    else:
        assert budgets[0] > 64 > budgets[1]


def test_generate_with_compression_and_full_module_compile_agree():
    model = tiny_model()
    ids, _ = padded_batch(length=80, batch=1)
    model.forward = compiled(model, policy="streaming_llm", budget=32)
    out = generate(model, ids, steps=10)
    assert kvpass.kv_stats(out.cache)[0].slots == 32
    # the same, compiling the whole module and driving the cache by hand
    torch._dynamo.reset()
    plain = tiny_model()
    module = torch.compile(plain, backend="kvpass", options={"policy": "streaming_llm", "budget": 32,
                                                             "compiler": "aot_eager"})
    cache, seq = DynamicCache(config=plain.config), ids
    logits = module(input_ids=ids, cache=cache, position_ids=torch.arange(80)[None]).logits
    for step in range(10):
        token = logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, token], dim=1)
        logits = module(input_ids=token, cache=cache, position_ids=torch.tensor([[80 + step]])).logits
    assert torch.equal(seq, out.sequences)


@pytest.mark.parametrize("arch, attn", [("llama", "eager"), ("deepseek_v3", "sdpa"), ("deepseek_v3", "eager"),
                                        ("gpt_oss", "eager"), ("granite_swa", "eager")])
def test_eviction_equals_masking_the_evicted_tokens(arch, attn):
    """StreamingLLM's kept set is known in closed form, so an eager full-cache forward with a custom
    mask hiding the evicted tokens must give the same logits — only if RoPE uses true positions, a latent
    cache's (MLA) kept slots project to those tokens' keys and values, and learned attention sinks are kept."""
    sinks, budget, prompt, steps = 4, 24, 60, 12
    full = {"layer_types": ["full_attention"] * 2} if arch in ("gpt_oss", "granite_swa") else {}
    model = tiny_model(arch, attn, **full)
    ids, _ = padded_batch(length=prompt, batch=1)
    ref_model = tiny_model(arch, attn, **full)
    model.forward = compiled(model, policy="streaming_llm", budget=budget, sinks=sinks)
    out = generate(model, ids, steps=steps)
    seq = out.sequences
    n = seq.shape[1]
    visible = torch.ones(n, n).tril().bool()
    for p in range(prompt, n):  # decode query p sees the sinks and the newest budget - sinks earlier tokens
        visible[p, sinks : p - (budget - sinks)] = False
    mask4d = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
    logits = ref_model(seq, attention_mask=mask4d).logits
    for i in range(1, steps):
        torch.testing.assert_close(out.logits[i][0], logits[0, prompt + i - 1], atol=1e-4, rtol=1e-4)
    assert [s.slots for s in kvpass.kv_stats(out.cache)] == [budget, budget]


def test_fullgraph_and_ratio():
    model = tiny_model()
    ids, _ = padded_batch(length=40, batch=1)
    model.forward = torch.compile(model.forward, backend="kvpass", fullgraph=True,
                                  options={"policy": "snapkv", "ratio": 0.25, "window": 4, "compiler": "aot_eager"})
    out = generate(model, ids, steps=6)
    assert [s.slots for s in kvpass.kv_stats(out.cache)] == [10, 10]


def test_decode_without_positions_is_refused():
    model = tiny_model()
    forward = compiled(model, policy="h2o", budget=8)
    cache = DynamicCache(config=model.config)
    forward(input_ids=torch.randint(0, 128, (1, 20)), cache=cache)
    with pytest.raises(Exception, match="position_ids"):
        forward(input_ids=torch.tensor([[3]]), cache=cache)


def test_graph_without_attention_is_an_error_unless_fallback_is_asked():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(Exception, match="no attention site found"):
        torch.compile(mlp, backend="kvpass", options={"policy": "h2o", "budget": 8})(torch.randn(2, 4))
    torch._dynamo.reset()
    fn = torch.compile(mlp, backend="kvpass", options={"policy": "h2o", "budget": 8, "fallback": True,
                                                      "compiler": "aot_eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(torch.randn(2, 4))
    assert any("WITHOUT KV compression" in str(w.message) for w in caught)


def test_attention_weights_read_elsewhere_are_refused_by_name():
    # output_attentions=True returns HF's own weights, which kvpass's attention over the store replaces
    model = tiny_model(attn="eager")
    forward = compiled(model, policy="h2o", budget=8)
    with pytest.raises(Exception, match="output_attentions"):
        forward(input_ids=torch.randint(0, 128, (1, 10)), use_cache=True, output_attentions=True,
                position_ids=torch.arange(10)[None])


def test_use_cache_false_is_refused_by_name():
    model = tiny_model()
    forward = compiled(model, policy="h2o", budget=8)
    with pytest.raises(Exception, match="not written to a KV cache"):
        forward(input_ids=torch.randint(0, 128, (1, 10)), use_cache=False)


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa")])
def test_static_cache_covering_the_sequence_is_exact(arch, attn):
    model = tiny_model(arch, attn, **({"sliding_window": None} if arch == "mistral" else {}))
    ids, mask = padded_batch()
    ref = generate(model, ids, mask)
    model.forward = compiled(model, policy="h2o", budget=38)
    out = generate(model, ids, mask, cache=StaticCache(config=model.config, max_cache_len=38))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert kvpass.explain(model).graphs[1]["counters"]["static_cache_sites"] == 2


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streaming_llm", "tova"])
def test_static_cache_is_the_store_and_keeps_what_a_dynamic_cache_keeps(policy):
    """A StaticCache of budget slots per layer holds kvpass's store in place: generate() gives the same
    tokens and logits as with the default DynamicCache, on a left-padded batch whose prompt is 2.5x the budget."""
    ids, mask = padded_batch(length=80)
    model = tiny_model()
    model.forward = compiled(model, policy=policy, budget=32)
    ref = generate(model, ids, mask, steps=10)
    torch._dynamo.reset()
    model = tiny_model()
    model.forward = compiled(model, policy=policy, budget=32)
    cache = StaticCache(config=model.config, max_cache_len=32)
    out = generate(model, ids, mask, steps=10, cache=cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    stats = kvpass.kv_stats(cache)
    assert [s.slots for s in stats] == [32, 32]
    assert [s.real_tokens for s in stats] == [2 * 2 * 32] * 2  # batch x kv heads x budget
    assert cache.layers[0].keys.shape == (2, 2, 32, 16)  # the buffers HF allocated keep their size


def test_static_cache_decode_compiles_once_and_a_reset_cache_starts_empty():
    model = tiny_model()
    compiles = []

    def counting_backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return kvpass_backend(gm, example_inputs, **kw)

    forward = torch.compile(model.forward, backend=counting_backend,
                            options={"policy": "h2o", "budget": 16, "compiler": "aot_eager"})
    cache = StaticCache(config=model.config, max_cache_len=16)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (1, 40))

    def greedy(steps=20):
        logits = forward(input_ids=ids, cache=cache, position_ids=torch.arange(40)[None]).logits
        tokens = []
        for step in range(steps):
            tokens.append(logits[:, -1:].argmax(-1))
            logits = forward(input_ids=tokens[-1], cache=cache,
                             position_ids=torch.tensor([[40 + step]])).logits
            assert [s.real_tokens for s in kvpass.kv_stats(cache)] == [2 * 16] * 2
        return torch.cat(tokens, dim=1)

    first = greedy()
    cache.reset()  # the same buffers, now a graph input from the first forward on: adopted as empty in the graph
    second = greedy()
    assert torch.equal(first, second)
    assert len(compiles) == 3  # prefill allocating the buffers, prefill into existing ones, decode


def test_static_cache_stays_compressed_under_generates_own_compile():
    # generate() compiles the forward of a model with a StaticCache on GPUs; forced on here (a private
    # CompileConfig flag) to check that kvpass's compiled forward still runs inside it
    model = tiny_model()
    ids, mask = padded_batch(length=80, batch=1)
    model.forward = compiled(model, policy="h2o", budget=32)
    cache = StaticCache(config=model.config, max_cache_len=32)
    outer = CompileConfig(backend="eager")
    outer._compile_all_devices = True
    generate(model, ids, mask, steps=6, cache=cache, compile_config=outer)
    assert model._compiled_call is not None
    assert kvpass.explain(model).forwards == 6
    assert [s.real_tokens for s in kvpass.kv_stats(cache)] == [2 * 32] * 2


def test_static_cache_takes_multi_token_appends_with_per_layer_budgets():
    """HF sizes every layer's mask from the StaticCache's buffer size, so unlike a DynamicCache whose
    layers hold different budgets, a follow-up of several tokens works; exact while the budgets cover it."""
    model = tiny_model()
    torch.manual_seed(2)
    prompt, follow = torch.randint(0, 128, (1, 60)), torch.randint(0, 128, (1, 5))
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, cache=full)
        ref = model(input_ids=follow, cache=full, position_ids=torch.arange(60, 65)[None]).logits
    for budgets in ((80, 70), (24, 12)):
        torch._dynamo.reset()
        forward = compiled(model, policy="h2o", layer_budgets=budgets)
        cache = StaticCache(config=model.config, max_cache_len=budgets[0])
        forward(input_ids=prompt, cache=cache, position_ids=torch.arange(60)[None])
        out = forward(input_ids=follow, cache=cache, position_ids=torch.arange(60, 65)[None]).logits
        real = [min(b, 65) * 2 for b in budgets]  # x 2 kv heads
        assert [s.real_tokens for s in kvpass.kv_stats(cache)] == real
        if budgets[1] >= 65:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_static_cache_with_head_adaptive_budgets_is_refused_by_name():
    model = tiny_model()
    model.forward = compiled(model, policy="snapkv", budget=32, head_budgets="adaptive")
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(Exception, match="head_budgets 'adaptive'.*StaticCache"):
        model.forward(input_ids=torch.randint(1, 128, (1, 10)), cache=cache, use_cache=True)


def test_static_cache_with_sliding_window_layers_is_refused():
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    forward = compiled(model, policy="h2o", budget=16)
    with pytest.raises(Exception, match="sliding-window StaticCache layer"):
        forward(input_ids=torch.randint(0, 128, (1, 40)), cache=StaticCache(config=config, max_cache_len=16),
                position_ids=torch.arange(40)[None])


def test_latent_cache_refuses_a_static_cache_and_head_adaptive_budgets_by_name():
    model = tiny_model("deepseek_v3")
    ids = torch.randint(1, 128, (1, 20))
    model.forward = compiled(model, policy="h2o", budget=16)
    with pytest.raises(Exception, match="latent cache, as MLA's, in a StaticCache"):
        generate(model, ids, steps=2, cache=StaticCache(config=model.config, max_cache_len=16))
    torch._dynamo.reset()
    model = tiny_model("deepseek_v3")
    model.forward = compiled(model, policy="h2o", budget=16, head_budgets="adaptive")
    with pytest.raises(Exception, match="keeps a latent cache"):
        generate(model, ids, steps=2)


def test_static_cache_sized_unlike_the_budget_is_refused_with_the_fix():
    model = tiny_model()
    forward = compiled(model, policy="h2o", budget=8)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(Exception, match=r"StaticCache holds 32 slots.*max_cache_len=8"):
        forward(input_ids=torch.randint(0, 128, (1, 10)), cache=cache, position_ids=torch.arange(10)[None])
    torch._dynamo.reset()
    for options, match in (({"ratio": 0.5}, "'ratio'=0.5 cannot size a StaticCache"),
                           ({"budget": 32, "prefill_block": 8}, "'prefill_block'=8 needs the default DynamicCache")):
        forward = compiled(model, policy="h2o", **options)
        with pytest.raises(Exception, match=match):
            forward(input_ids=torch.randint(0, 128, (1, 10)), cache=StaticCache(config=model.config,
                    max_cache_len=32), position_ids=torch.arange(10)[None])
        torch._dynamo.reset()


def test_bad_options_fail_at_compile_with_the_value_quoted():
    model = tiny_model()
    forward = torch.compile(model.forward, backend="kvpass", options={"policy": "snapkv", "budget": -1})
    with pytest.raises(Exception, match="-1"):
        forward(input_ids=torch.randint(0, 128, (1, 10)))


def test_explain_names_sites_and_budgets():
    model = tiny_model()
    model.forward = compiled(model, policy="pyramidkv", budget=16, window=4, beta=4)
    generate(model, torch.randint(1, 128, (1, 40)), steps=3)
    text = str(kvpass.explain(model))
    assert "layer 0: sdpa attention" in text and "layer 1: sdpa attention" in text
    assert "prefill" in text and "decode" in text and "pyramidkv" in text


def test_backend_resolves_by_name_without_importing_kvpass():
    code = ("import sys, torch\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "fn = lookup_backend('kvpass')\n"
            "assert 'kvpass' not in sys.modules or fn.__module__.startswith('kvpass')\n"
            "print(fn.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kvpass.backend"


class CachedAttention(torch.nn.Module):
    """One attention layer with a DynamicCache-style cat, as torch.export sees it (ATen ops)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, past_k, past_v):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 2, 8).transpose(1, 2)
        k = torch.cat([past_k, self.k(x).view(b, t, 2, 8).transpose(1, 2)], dim=-2)
        v = torch.cat([past_v, self.v(x).view(b, t, 2, 8).transpose(1, 2)], dim=-2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), k, v


def test_analysis_finds_sites_in_an_export_graph():
    ep = torch.export.export(CachedAttention(), (torch.randn(1, 3, 16), torch.randn(1, 2, 5, 8),
                                                 torch.randn(1, 2, 5, 8)))
    sites = find_attention_sites(ep.graph)
    assert len(sites) == 1 and sites[0].past_keys is not None and sites[0].kind == "sdpa"
    assert sites[0].past_keys.name == "past_k"


def test_analysis_error_lists_what_it_found():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    with pytest.raises(UnsupportedGraph, match="The graph calls"):
        find_attention_sites(gm.graph)


def test_new_prompt_lengths_compile_one_dynamic_prefill_then_nothing():
    model, ref_model = tiny_model(), tiny_model()
    compiles = []

    def counting_backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return kvpass_backend(gm, example_inputs, **kw)

    model.forward = torch.compile(model.forward, backend=counting_backend,
                                  options={"policy": "h2o", "budget": 128, "compiler": "aot_eager"})
    for length in (40, 57, 83, 33):
        ids = torch.randint(1, 128, (1, length))
        out = generate(model, ids, steps=5)
        assert torch.equal(out.sequences, generate(ref_model, ids, steps=5).sequences)
        assert [s.slots for s in kvpass.kv_stats(out.cache)] == [128, 128]
    assert len(compiles) == 3  # static prefill, decode, then one prefill with a dynamic prompt length


def test_kv_stats_rejects_what_is_not_a_cache_naming_its_type():
    with pytest.raises(TypeError, match="got dict"):
        kvpass.kv_stats({"keys": torch.zeros(1)})
