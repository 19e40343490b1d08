"""kvpress-derived policies follow kvpress (NVIDIA/kvpress, ``kvpress/presses/``), pinned against small transcriptions
of its arithmetic written here; and protected slots never exceed a layer's store (issue 19).
"""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_blockwise import compiled, prefill
from transformers import DynamicCache

from kvpass.config import parse_options
from kvpass.ops import kv as ops
from kvpass.policies import H2O, TOVA, EpiCache, Knorm, PyramidKV, SnapKV, StreamingLLM
from kvpass.runtime.state import store_state

HQ, HKV, D = 4, 2, 8
SCALE = D**-0.5


def kvpress_layer_budget(q_len, kept, window, beta, n_layers, layer_idx):
    """``PyramidKVPress.get_layer_budget`` (kvpress/presses/pyramidkv_press.py), line by line, with
    ``q_len * (1 - compression_ratio)`` written ``kept`` (the mean budget per layer)."""
    max_capacity_prompt = window + kept
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (q_len >= max_num >= min_num >= window):
        return round(kept)  # "Fall back to SnapKV"
    steps = (max_num - min_num) / (n_layers - 1)
    return round(max_num - layer_idx * steps)


LONG = 10**12  # a prompt long enough that kvpress's cap never binds (kvpass's fixed `budget`)


@pytest.mark.parametrize("window", [4, 64])
@pytest.mark.parametrize("beta", [1, 2, 5, 20])
@pytest.mark.parametrize("n_layers", [2, 3, 10, 30])
def test_pyramidkv_layer_budgets_are_kvpress_s(window, beta, n_layers):
    policy = PyramidKV(window=window, beta=beta)
    for total in (16, 100, 512, 1300, 2048):
        for prompt in (None, total + window // 2, int(total * 1.1), int(total * 1.5), 2 * total, 4 * total):
            got = [policy.layer_budget(total, i, n_layers, prompt) for i in range(n_layers)]
            q_len = LONG if prompt is None else prompt
            assert got == [kvpress_layer_budget(q_len, total, window, beta, n_layers, i) for i in range(n_layers)], \
                (total, prompt)


def test_pyramidkv_falls_back_to_uniform_snapkv_below_the_window_and_caps_the_largest():
    # the issue's case: SmolLM2's 30 layers at budget 512 — the old linear rule gave 998 ... 26, below the 64-token
    # window; kvpress falls back to SnapKV's uniform 512
    assert {PyramidKV().layer_budget(512, i, 30) for i in range(30)} == {512}
    steep = [PyramidKV().layer_budget(2048, i, 30) for i in range(30)]  # 2048 / 20 >= 64: a pyramid
    assert steep[0] == round(2 * 2048 - 2048 / 20) and steep[-1] == round(2048 / 20) and steep == sorted(steep)[::-1]
    # the cap: a prompt of 800 tokens kept to 512 per layer: the first layer keeps prompt - window
    capped = [PyramidKV().layer_budget(512, i, 30, 800) for i in range(30)]
    assert capped[0] == 800 - 64 and capped[-1] == 2 * 512 - (800 - 64)
    assert PyramidKV().layer_budget(512, 0, 1) == 512  # one layer: the mean (kvpass; kvpress divides by zero)


def test_ratio_budgets_see_the_prompt_and_fixed_budgets_do_not():
    ratio = parse_options({"policy": "pyramidkv", "ratio": 0.5, "window": 8, "beta": 2})
    for prompt in (40, 100, 333):
        kept = math.ceil(0.5 * prompt)
        assert [ratio.budget_for(i, 4, prompt) for i in range(4)] == [
            kvpress_layer_budget(prompt, kept, 8, 2, 4, i) for i in range(4)]
    fixed = parse_options({"policy": "pyramidkv", "budget": 50, "window": 8, "beta": 2})
    assert {tuple(fixed.budget_for(i, 4, p) for i in range(4)) for p in (0, 60, 100, 1000)} == {
        tuple(kvpress_layer_budget(LONG, 50, 8, 2, 4, i) for i in range(4))}


# --- protected slots never exceed the store --------------------------------------------------------------------------


def prefill_kept(policy, budget, t=40, seed=7):
    """Positions each kv head keeps after a prefill of ``t`` random tokens (the ops a compiled layer runs)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, HQ, t, D, generator=g) * 2, torch.randn(1, HKV, t, D, generator=g) * 2
    pos, acc, _ = ops.extend_meta(torch.zeros(1, HKV, 0, dtype=torch.int64), torch.zeros(1, HKV, 0),
                                  torch.zeros(1, dtype=torch.int64), torch.ones(1, t, dtype=torch.bool))
    _, obs = ops.attend(q, k, k, pos, SCALE, policy.spec(), 0)
    keep, acc = ops.score(policy.spec(), obs, k, pos, acc, t, budget)
    assert int(torch.isinf(keep).sum(-1).max()) <= budget  # never more protected slots than the store holds
    _, _, kept, _ = ops.compact(k, k, pos, keep, acc, budget, budget, 0)
    return [sorted(kept[0, h].tolist()) for h in range(HKV)]


@pytest.mark.parametrize("policy", [SnapKV(window=16), PyramidKV(window=16), H2O(recent=16)], ids=str)
def test_a_window_wider_than_the_budget_keeps_the_newest_tokens(policy):
    assert prefill_kept(policy, budget=6) == [list(range(34, 40))] * HKV


def test_sinks_beyond_the_budget_keep_the_first_sinks_and_unprotected_policies_fill_the_budget():
    assert prefill_kept(StreamingLLM(sinks=8), budget=5) == [list(range(5))] * HKV
    for policy in (TOVA(), Knorm(), EpiCache(window=16)):  # EpiCache's prefill protects nothing either
        assert all(len(kept) == 3 for kept in prefill_kept(policy, budget=3))


@pytest.mark.parametrize("policy", [SnapKV(window=16), H2O(recent=16), EpiCache(window=16)], ids=str)
def test_decode_over_a_store_below_the_window_keeps_the_newest(policy):
    # a store below the window holds the newest 6 positions; 3 new tokens arrive, all 9 inside the window, the
    # carried scores favour the oldest: the 6 newest stay (protecting all 9 kept the oldest, ties going low)
    g = torch.Generator().manual_seed(3)
    budget, c, t = 6, 6, 3
    pos, acc, _ = ops.extend_meta(torch.arange(54, 60).expand(1, HKV, c).contiguous(),
                                  torch.linspace(1, 0, c).expand(1, HKV, c).contiguous(), torch.tensor([60]),
                                  torch.ones(1, t, dtype=torch.bool))
    k = torch.randn(1, HKV, c + t, D, generator=g)
    _, obs = ops.attend(torch.randn(1, HQ, t, D, generator=g), k, k, pos, SCALE, policy.spec(), 0)
    keep, acc = ops.score(policy.spec(), obs, k, pos, acc, t, budget)
    _, _, kept, _ = ops.compact(k, k, pos, keep, acc, budget, budget, 0)
    assert [sorted(kept[0, h].tolist()) for h in range(HKV)] == [list(range(57, 63))] * HKV


def store_positions(cache):
    """Sorted real positions held by each layer's store (batch row 0, every kv head)."""
    out = []
    for layer in cache.layers:
        pos = store_state(layer.keys).pos[0]
        out.append([sorted(p for p in row.tolist() if p >= 0) for row in pos])
    return out


@pytest.mark.parametrize("options", [
    {"policy": "snapkv", "window": 8, "budget": 4},    # blocks of 16 > window: BlockPress's rescoring
    {"policy": "snapkv", "window": 32, "budget": 8},   # blocks of 16 <= window: scored like decode steps
    {"policy": "h2o", "recent": 12, "budget": 5},
    {"policy": "pyramidkv", "window": 8, "layer_budgets": [12, 4]},
], ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_blockwise_prefill_with_a_window_wider_than_a_store_keeps_the_newest(options):
    model = tiny_model()
    forward = compiled(model, prefill_block=16, **options)
    ids = torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    out = prefill(forward, model, ids, logits_to_keep=1)
    budgets = options.get("layer_budgets") or [options["budget"]] * 2
    window = options.get("window") or options.get("recent")
    for layer, (heads, budget) in enumerate(zip(store_positions(out.cache), budgets, strict=True)):
        for kept in heads:
            assert len(kept) == budget
            newest = list(range(50 - min(window, budget), 50))
            assert kept[-len(newest):] == newest, (layer, kept)
            if budget <= window:
                assert kept == newest


# --- block-wise SnapKV: kvpress's BlockPress around SnapKVPress ------------------------------------------------------


def kvpress_snapkv_scores(weights, window, kernel_size):
    """``SnapKVPress.score`` with attention weights given (kvpress/presses/snapkv_press.py): ``weights`` ``[H_q, Q, N]``
    are the candidates' causal softmax weights; the last ``window`` queries' mean over the first ``N - window`` keys,
    average-pooled (zero padding counted), averaged per GQA group, the window padded with ``max + 1``."""
    scores = weights[:, -window:, :-window].mean(axis=-2)
    pad = kernel_size // 2
    padded = np.pad(scores, ((0, 0), (pad, pad)))
    scores = np.stack([padded[:, i:i + kernel_size].mean(-1) for i in range(scores.shape[-1])], axis=-1)
    scores = scores.reshape(HKV, HQ // HKV, -1).mean(1)
    return np.pad(scores, ((0, 0), (0, window)), constant_values=scores.max() + 1)


def test_snapkv_block_rescores_store_and_block_with_the_prompt_rule():
    g = torch.Generator().manual_seed(11)
    c, t, window, budget = 10, 12, 4, 10
    store_pos = torch.tensor([0, 2, 3, 7, 8, 9, 13, 14, 16, 19]).expand(1, HKV, c).contiguous()  # position order
    pos, acc, _ = ops.extend_meta(store_pos, torch.rand(1, HKV, c, generator=g), torch.tensor([20]),
                                  torch.ones(1, t, dtype=torch.bool))
    q, k = torch.randn(1, HQ, t, D, generator=g) * 2, torch.randn(1, HKV, c + t, D, generator=g) * 2
    policy = SnapKV(window=window, kernel_size=5)
    _, obs = ops.attend(q, k, k, pos, SCALE, policy.spec(), 0)
    keep, acc_out = ops.score(policy.spec(), obs, k, pos, acc, t, budget)
    # the candidates' weights (block query i sees the store and block keys j <= i), scored as kvpress scores a prompt
    logits = q[0].double().numpy() @ k[0].double().numpy().repeat(HQ // HKV, axis=0).transpose(0, 2, 1) * SCALE
    future = np.zeros((t, c + t), dtype=bool)
    future[:, c:] = np.triu(np.ones((t, t), dtype=bool), 1)
    logits[:, future] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = kvpress_snapkv_scores(weights, window, 5)
    np.testing.assert_allclose(acc_out[0, :, : c + t - window].numpy(), expected[:, :-window], rtol=1e-5, atol=1e-7)
    assert bool(torch.isinf(keep[0, :, -window:]).all()) and not bool(torch.isinf(keep[0, :, :-window]).any())
    _, _, kept, _ = ops.compact(k, k, pos, keep, acc_out, budget, budget, 0)
    all_pos = pos[0, 0].numpy()
    for h in range(HKV):  # kvpress's topk over the candidates
        top = np.argsort(-expected[h], kind="stable")[:budget]
        assert sorted(kept[0, h].tolist()) == sorted(all_pos[top].tolist())
    # a forward of at most `window` tokens over the store is a decode step: max with the carried score, no pooling
    _, obs = ops.attend(q[:, :, -3:], k[:, :, : c + 3], k[:, :, : c + 3], pos[:, :, : c + 3], SCALE, policy.spec(), 0)
    _, decode_acc = ops.score(policy.spec(), obs, k[:, :, : c + 3], pos[:, :, : c + 3], acc[:, :, : c + 3], 3, budget)
    grouped = obs.view(1, HKV, HQ // HKV, -1).mean(2) / 3
    torch.testing.assert_close(decode_acc, torch.maximum(acc[:, :, : c + 3], grouped))


def test_snapkv_block_of_dynamic_length_chooses_like_a_static_one():
    # traced with a symbolic length (as Inductor traces the score op's reference), the block/decode choice is made on
    # tensors and gives, for each length, what the Python branch gives for that static length
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(2)
    policy, c = SnapKV(window=4, kernel_size=3), 7

    def score(obs, keys, pos, acc):
        return policy.score(obs, keys, pos, acc, keys.shape[2] - c, 6)

    traced = None
    for t in (9, 3, 4, 12):
        n = c + t
        args = (torch.rand(1, HQ, n, generator=g), torch.zeros(1, HKV, n, D), torch.arange(n).expand(1, HKV, n),
                torch.rand(1, HKV, n, generator=g))
        traced = traced or make_fx(score, tracing_mode="symbolic")(*args)
        for a, b in zip(traced(*args), policy.score(*args, t, 6), strict=True):
            torch.testing.assert_close(a, b)


def test_blockwise_snapkv_pools_what_whole_prompt_snapkv_pools():
    # one block covering the prompt is a prefill: the block rule and the prompt rule keep the same set
    model = tiny_model()
    ids = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(8))
    whole = prefill(compiled(model, dynamic=False, policy="snapkv", window=8, budget=20), model, ids,
                    logits_to_keep=1)
    blocks = prefill(compiled(model, policy="snapkv", window=8, budget=20, prefill_block=48), model, ids,
                     logits_to_keep=1)
    assert store_positions(whole.cache) == store_positions(blocks.cache)
    assert isinstance(whole.cache, DynamicCache)
