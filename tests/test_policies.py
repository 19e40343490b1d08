"""Each policy keeps exactly the tokens its paper's rule says, checked against a NumPy transcription.

Inputs are hand-built or seeded; the kvpass path runs the ops a compiled layer runs
(extend_meta → attend → score → compact) and the NumPy side restates the rule from the paper.
"""

import numpy as np
import pytest
import torch

from kvpass.ops import kv as ops
from kvpass.policies import H2O, TOVA, EpiCache, Knorm, PyramidKV, SnapKV, StreamingLLM, make_policy

HQ, HKV, D = 4, 2, 8
SCALE = D**-0.5


def kept_by_kvpass(policy, q, k, budget, store=None):
    """Positions kept per kv-head after a prefill of q/k (and optionally decode steps)."""
    t = q.shape[2]
    pos, acc, seen = ops.extend_meta(torch.zeros(1, HKV, 0, dtype=torch.int64), torch.zeros(1, HKV, 0),
                                     torch.zeros(1, dtype=torch.int64), torch.ones(1, t, dtype=torch.bool))
    _, obs = ops.attend(q, k, k, pos, SCALE, policy.spec(), 0)
    keep, acc = ops.score(policy.spec(), obs, k, pos, acc, t, budget)
    _, _, kept, acc = ops.compact(k, k, pos, keep, acc, budget, budget, 0)
    return [sorted(kept[0, h].tolist()) for h in range(HKV)], acc


def softmax_np(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_weights_np(q, k):
    """[H_q, T, T] causal softmax weights, keys shared by each GQA group."""
    qn, kn = q[0].double().numpy(), k[0].double().numpy().repeat(HQ // HKV, axis=0)
    logits = qn @ kn.transpose(0, 2, 1) * SCALE
    t = logits.shape[-1]
    logits[:, np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    return softmax_np(logits)


def topk_sorted(scores, n):
    return sorted(np.argsort(-scores, kind="stable")[:n].tolist())


def assert_top(kept, scores, n):
    """``kept`` holds ``n`` indices of ``scores`` none of which scores below any index left out (ties allowed)."""
    kept = [i for i in kept if i < len(scores)]
    out = sorted(set(range(len(scores))) - set(kept))
    assert len(kept) == n
    assert min(scores[kept]) >= max(scores[out]) - 1e-9


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, HQ, 40, D, generator=g) * 2, torch.randn(1, HKV, 40, D, generator=g) * 2


def test_streaming_llm_keeps_sinks_and_most_recent(qk):
    q, k = qk
    kept, _ = kept_by_kvpass(StreamingLLM(sinks=4), q, k, budget=12)
    expected = list(range(4)) + list(range(40 - 8, 40))
    assert kept == [expected] * HKV


def test_h2o_keeps_recent_window_and_heaviest_hitters(qk):
    q, k = qk
    budget, recent = 12, 5
    kept, acc = kept_by_kvpass(H2O(recent=recent), q, k, budget)
    w = causal_weights_np(q, k)                                    # [H_q, T, T]
    accumulated = w.sum(axis=1).reshape(HKV, HQ // HKV, -1).mean(1)  # received attention, group mean
    for h in range(HKV):
        old = accumulated[h][: 40 - recent]
        expected = sorted(topk_sorted(old, budget - recent) + list(range(40 - recent, 40)))
        assert kept[h] == expected
    # the carried statistic is the accumulated attention of the kept tokens
    kept_acc = np.stack([accumulated[h][kept[h]] for h in range(HKV)])
    np.testing.assert_allclose(acc[0].numpy(), kept_acc, rtol=1e-4, atol=1e-6)


def test_h2o_evicts_during_decode(qk):
    q, k = qk
    policy = H2O(recent=2)
    pos = torch.arange(40).expand(1, HKV, 40).contiguous()
    acc = torch.rand(1, HKV, 40)
    new_pos, new_acc, _ = ops.extend_meta(pos, acc, torch.tensor([40]), torch.ones(1, 1, dtype=torch.bool))
    k_all = torch.cat([k, torch.randn(1, HKV, 1, D)], dim=2)
    _, obs = ops.attend(q[:, :, -1:], k_all, k_all, new_pos, SCALE, policy.spec(), 0)
    keep, acc_new = ops.score(policy.spec(), obs, k_all, new_pos, new_acc, 1, 40)
    _, _, kept, _ = ops.compact(k_all, k_all, new_pos, keep, acc_new, 40, 40, 0)
    # one token leaves: the non-recent one with the least accumulated attention after this step
    total = (torch.cat([acc, torch.zeros(1, HKV, 1)], 2) + obs.view(1, HKV, 2, 41).mean(2))[0]
    for h in range(HKV):
        evicted = set(range(41)) - set(kept[0, h].tolist())
        assert evicted == {int(total[h, :39].argmin())}


def snapkv_np(q, k, window, kernel, pooling="avg"):
    """kvpress/SnapKV rule: mean window attention over the prefix, 1D pooling, GQA mean."""
    w = causal_weights_np(q, k)[:, -window:, :]         # [H_q, window, T]
    t = w.shape[-1]
    scores = w[:, :, : t - window].mean(axis=1)          # [H_q, T - window]
    pad = kernel // 2
    padded = np.pad(scores, ((0, 0), (pad, pad)), constant_values=0 if pooling == "avg" else -np.inf)
    windows = np.stack([padded[:, i : i + kernel] for i in range(scores.shape[1])], axis=1)
    pooled = windows.mean(-1) if pooling == "avg" else windows.max(-1)
    return pooled.reshape(HKV, HQ // HKV, -1).mean(1)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_keeps_window_plus_top_pooled_prefix(qk, pooling):
    q, k = qk
    window, budget = 6, 14
    kept, _ = kept_by_kvpass(SnapKV(window=window, kernel_size=5, pooling=pooling), q, k, budget)
    scores = snapkv_np(q, k, window, 5, pooling)
    for h in range(HKV):
        assert kept[h][-window:] == list(range(40 - window, 40))
        assert_top(kept[h], scores[h], budget - window)


def test_epicache_keeps_what_any_observation_query_of_the_group_attends_to_most(qk):
    # EpiCache's score with the attention op's weights (scores="forward"): the max softmax weight over the last
    # `window` queries and over each GQA group; everything (those queries' own tokens included) is ranked by it, nothing
    # protected. (Its default, context scores, comes from kvpass::context_scores: tests/test_ops_observe.py.)
    q, k = qk
    window, budget = 6, 14
    kept, _ = kept_by_kvpass(EpiCache(window=window, scores="forward"), q, k, budget)
    weights = causal_weights_np(q, k)[:, -window:]  # [H_q, window, T]
    scores = weights.max(axis=1).reshape(HKV, HQ // HKV, -1).max(axis=1)
    for h in range(HKV):
        assert_top(kept[h], scores[h], budget)


def test_epicache_blocks_rescore_from_scratch_unless_accumulating():
    obs = torch.tensor([[[0.1, 0.5, 0.2, 0.2]] * HQ])  # [1, H_q, N]: what this block's observers saw
    acc = torch.tensor([[[0.9, 0.0, 0.0, 0.0]] * HKV])  # slot 0 scored high in an earlier block
    pos = torch.arange(4).expand(1, HKV, 4)
    keys = torch.zeros(1, HKV, 4, D)
    fresh, _ = EpiCache(window=2).score(obs, keys, pos, acc, 20, 2)
    kept, _ = EpiCache(window=2, accumulate=True).score(obs, keys, pos, acc, 20, 2)
    assert fresh[0, 0].tolist() == pytest.approx([0.1, 0.5, 0.2, 0.2])
    assert kept[0, 0].tolist() == pytest.approx([0.9, 0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="'accumulate' of policy 'epicache' must be True or False, got 1"):
        make_policy("epicache", accumulate=1)


def test_tova_keeps_what_the_last_query_attends_to_averaged_over_heads(qk):
    q, k = qk
    kept, _ = kept_by_kvpass(TOVA(), q, k, budget=10)
    w = causal_weights_np(q, k)[:, -1, :].mean(0)
    assert kept == [topk_sorted(w, 10)] * HKV  # one decision shared by every head


def test_knorm_keeps_lowest_key_norms(qk):
    q, k = qk
    kept, _ = kept_by_kvpass(Knorm(), q, k, budget=9)
    norms = np.linalg.norm(k[0].numpy(), axis=-1)
    assert kept == [topk_sorted(-norms[h], 9) for h in range(HKV)]


def test_pyramidkv_budgets_shrink_with_depth_and_average_to_the_request():
    policy = PyramidKV(beta=20, window=4)  # 100 / 20 >= window: a pyramid (below it kvpress falls back to uniform)
    budgets = [policy.layer_budget(100, i, 10) for i in range(10)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 100 > budgets[-1]
    assert budgets[-1] == round(100 / 20) and abs(sum(budgets) / 10 - 100) <= 1
    assert {PyramidKV(beta=20, window=6).layer_budget(100, i, 10) for i in range(10)} == {100}
    # PyramidKV uses SnapKV's scores
    assert PyramidKV(window=4).n_obs(10) == SnapKV(window=4).n_obs(10) == 4


def test_make_policy_rejects_options_it_does_not_take():
    with pytest.raises(ValueError, match="takes no option 'sinks'"):
        make_policy("h2o", sinks=4)
    with pytest.raises(ValueError, match="-2"):
        make_policy("streaming_llm", sinks=-2)


def test_sentencekv_keeps_its_first_kept_tokens_and_the_newest():
    """The device store of SentenceKV: the first ``sinks`` real slots by position (not positions 0..sinks-1: SnapKV
    may have dropped those) and then the most recent; the spec round-trips with its sentence ends."""
    from kvpass.policies import policy_from_spec
    from kvpass.policies.sentencekv import SentenceKV

    rule = SentenceKV(sinks=2, recent=3, sentence_ends=[5, 9])
    pos = torch.tensor([[[3, 7, -1, 8, 12, 15, 20, 21]]])
    keep, _ = rule.score(torch.empty(1, 1, 0), torch.zeros(1, 1, 8, 4), pos, torch.zeros(1, 1, 8), 1, 4)
    kept = pos[0, 0, keep[0, 0].topk(4).indices].sort().values.tolist()
    assert kept == [3, 7, 20, 21]
    assert rule.layer_budget(100, 0, 2) == 4 and rule.retrieval_slots(100) == 95
    assert policy_from_spec(rule.spec()) == rule
