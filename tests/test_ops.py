"""kvpass::* ops: opcheck, and the references against plain SDPA / hand-computed results."""

import pytest
import torch

from kvpass.ops import kv as ops
from kvpass.policies import H2O, EpiCache, Knorm, SnapKV

B, HQ, HKV, D = 2, 4, 2, 8


def _prefill_meta(valid):
    b, t = valid.shape
    return ops.extend_meta(torch.zeros(b, HKV, 0, dtype=torch.int64), torch.zeros(b, HKV, 0),
                           torch.zeros(b, dtype=torch.int64), valid)


def _rand(t, n):
    return torch.randn(B, HQ, t, D), torch.randn(B, HKV, n, D), torch.randn(B, HKV, n, D)


def test_extend_meta_positions_skip_left_padding():
    valid = torch.ones(B, 6, dtype=torch.bool)
    valid[0, :2] = False
    pos, acc, seen = _prefill_meta(valid)
    assert pos[0, 0].tolist() == [-1, -1, 0, 1, 2, 3]
    assert pos[1, 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert seen.tolist() == [4, 6] and acc.shape == (B, HKV, 6)
    pos2, _, seen2 = ops.extend_meta(pos, acc, seen, torch.ones(B, 1, dtype=torch.bool))
    assert pos2[:, :, -1].tolist() == [[4, 4], [6, 6]] and seen2.tolist() == [5, 7]


@pytest.mark.parametrize("policy", [SnapKV(window=3), H2O(), Knorm()])
def test_attend_matches_causal_sdpa(policy):
    q, k, v = _rand(10, 10)
    pos, _, _ = _prefill_meta(torch.ones(B, 10, dtype=torch.bool))
    out, obs = ops.attend(q, k, v, pos, D**-0.5, policy.spec(), 0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if policy.needs_obs:
        n_obs = policy.n_obs(10)
        # each observed query's weights sum to one
        torch.testing.assert_close(obs.sum(-1), torch.full((B, HQ), float(n_obs)))
        logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * D**-0.5
        logits = logits.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(obs, logits.softmax(-1)[:, :, 10 - n_obs :].sum(2), atol=1e-5, rtol=1e-5)
    else:
        assert obs.shape == (B, HQ, 0)


def test_attend_masks_empty_slots_and_sees_store():
    # store of 5 slots (2 empty) then 3 new tokens: equal to SDPA over the 3 real store slots + new
    q, k, v = _rand(3, 8)
    pos = torch.tensor([0, 1, -1, 2, -1, 3, 4, 5]).expand(B, HKV, 8).contiguous()
    out, _ = ops.attend(q, k, v, pos, D**-0.5, Knorm().spec(), 0)
    keep = torch.tensor([0, 1, 3, 5, 6, 7])
    causal = torch.ones(3, 6, dtype=torch.bool).tril(3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep], attn_mask=causal,
                                                           enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attend_sliding_window():
    q, k, v = _rand(6, 6)
    pos, _, _ = _prefill_meta(torch.ones(B, 6, dtype=torch.bool))
    out, _ = ops.attend(q, k, v, pos, D**-0.5, Knorm().spec(), 3)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    mask = (j <= i) & (i - j < 3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [H2O(), Knorm()])  # weights read by the policy, or not (SDPA path otherwise)
def test_attend_soft_caps_logits_like_gemma2(policy):
    # store of 4 slots (one empty) + 5 new tokens; logits soft-capped at 0.7 (saturating: scale 1, D 8)
    q, k, v = _rand(5, 9)
    pos = torch.tensor([0, -1, 1, 2, 3, 4, 5, 6, 7]).expand(B, HKV, 9).contiguous()
    out, obs = ops.attend(q, k, v, pos, 1.0, policy.spec(), 0, 0.7)
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    capped = 0.7 * torch.tanh(logits / 0.7)
    visible = (pos[:, :1, None, :] >= 0) & torch.ones(5, 9, dtype=torch.bool).tril(4)
    weights = capped.masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, weights @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)
    uncapped, _ = ops.attend(q, k, v, pos, 1.0, policy.spec(), 0)
    assert not torch.allclose(out, uncapped, atol=1e-2)
    if policy.needs_obs:
        torch.testing.assert_close(obs, weights.sum(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [H2O(), Knorm()])
def test_attend_sinks_are_gpt_oss_extra_logit_column(policy):
    # GPT-OSS: one learned logit per head joins each row's softmax (a column dropped after it); store of 4 slots
    # (one empty) + 5 new tokens, the first new token of batch row 1 marked padding (it still sees the store)
    q, k, v = _rand(5, 9)
    pos = torch.tensor([0, -1, 1, 2, 3, 4, 5, 6, 7]).expand(B, HKV, 9).clone()
    pos[1, :, 4] = -1
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, obs = ops.attend(q, k, v, pos, D**-0.5, policy.spec(), 0, 0.0, sinks.view(1, HQ, 1))
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * D**-0.5
    visible = (pos.repeat_interleave(2, 1)[:, :, None, :] >= 0) & torch.ones(5, 9, dtype=torch.bool).tril(4)
    column = sinks.view(1, HQ, 1, 1).expand(B, HQ, 5, 1)
    weights = torch.cat([logits.masked_fill(~visible, float("-inf")), column], -1).softmax(-1)[..., :-1]
    torch.testing.assert_close(out, weights @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)
    if policy.needs_obs:
        torch.testing.assert_close(obs, weights.sum(2), atol=1e-5, rtol=1e-5)
    plain, _ = ops.attend(q, k, v, pos, D**-0.5, policy.spec(), 0)
    assert not torch.allclose(out, plain, atol=1e-2)


def test_attend_sinks_equal_granite_swa_lse_scaling():
    # GraniteSWA scales the plain softmax output by sigmoid(logsumexp(logits) - sink): the same attention.
    # Batch row 0 has two tokens of left padding: they see nothing, so each takes its own value (no sink)
    q, k, v = _rand(6, 6)
    valid = torch.ones(B, 6, dtype=torch.bool)
    valid[0, :2] = False
    pos, _, _ = _prefill_meta(valid)
    sinks = torch.randn(HQ)
    out, _ = ops.attend(q, k, v, pos, 0.4, Knorm().spec(), 0, 0.0, sinks.view(1, HQ, 1))
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.4
    visible = (pos.repeat_interleave(2, 1)[:, :, None, :] >= 0) & torch.ones(6, 6, dtype=torch.bool).tril()
    logits = logits.masked_fill(~visible, float("-inf"))
    scale = (logits.logsumexp(-1) - sinks.view(1, HQ, 1)).sigmoid()
    expected = (logits.softmax(-1) @ v.repeat_interleave(2, 1)) * scale[..., None]
    expected[0, :, :2] = v.repeat_interleave(2, 1)[0, :, :2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [H2O(), Knorm()])
def test_attend_values_narrower_than_keys_like_mla(policy):
    # MLA (DeepSeek-V2/V3): queries and keys of 12 dims, values of 8
    q, k, v = torch.randn(B, HQ, 4, 12), torch.randn(B, HKV, 7, 12), torch.randn(B, HKV, 7, D)
    pos = torch.arange(7).expand(B, HKV, 7).contiguous()
    out, _ = ops.attend(q, k, v, pos, 0.3, policy.spec(), 0)
    causal = torch.ones(4, 7, dtype=torch.bool).tril(3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.3, enable_gqa=True)
    assert out.shape == (B, HQ, 4, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attend_long_prompt_chunks_agree():
    # more queries than one reference chunk, with every query observed (H2O)
    t = ops._QUERY_CHUNK + 37
    q, k, v = (torch.randn(1, 2, t, 4), torch.randn(1, 1, t, 4), torch.randn(1, 1, t, 4))
    pos = torch.arange(t).expand(1, 1, t).contiguous()
    out, obs = ops.attend(q, k, v, pos, 0.5, H2O().spec(), 0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(obs.sum(-1), torch.full((1, 2), float(t)), rtol=1e-4, atol=1e-3)


def test_compact_keeps_top_budget_in_position_order_and_pads():
    k = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, 3).contiguous()
    pos = torch.tensor([[[-1, 0, 1, 2, 3, 4]]])
    keep = torch.tensor([[[9.0, 5.0, 1.0, 7.0, 3.0, 8.0]]])
    k2, v2, pos2, acc2 = ops.compact(k, k.clone(), pos, keep, keep.clone(), 3, 5, 0)
    assert pos2.tolist() == [[[0, 2, 4, -1, -1]]]  # padding slot (score 9) never kept
    assert k2[0, 0, :3, 0].tolist() == [1.0, 3.0, 5.0]
    assert acc2[0, 0, :3].tolist() == [5.0, 7.0, 8.0]
    # fewer real tokens than the budget: all real ones kept, the rest empty
    _, _, pos3, _ = ops.compact(k, k.clone(), pos, keep, keep, 8, 8, 0)
    assert sorted(p for p in pos3.flatten().tolist() if p >= 0) == [0, 1, 2, 3, 4]
    assert (pos3 == -1).sum() == 3


def test_compact_drops_tokens_outside_sliding_window():
    k = torch.randn(1, 1, 6, 2)
    pos = torch.arange(6).view(1, 1, 6)
    _, _, kept, _ = ops.compact(k, k.clone(), pos, torch.zeros(1, 1, 6), torch.zeros(1, 1, 6), 6, 6, 3)
    # HF keeps the newest window - 1 tokens; the others leave the store
    assert sorted(p for p in kept.flatten().tolist() if p >= 0) == [4, 5] and (kept == -1).sum() == 4


def _packed_candidates(c=5, t=3, seed=0):
    """A packed store of ``c`` slots per row (heads scattered over rows, two empty slots) plus ``t`` new tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, HKV, (B, HKV, c), generator=g)
    pos = torch.randperm(B * HKV * c, generator=g).view(B, HKV, c) % 7  # positions 0..6, before the new ones
    pos[0, 0, 1] = pos[1, 1, 3] = -1
    packed = ops.pack_positions(pos, head, HKV)
    pos_all, head_all, acc_all, seen = ops.extend_packed_meta(packed, torch.zeros(B, HKV, c),
                                                              torch.full((B,), 7), torch.ones(B, t, dtype=torch.bool))
    return pos_all, head_all, acc_all, seen


def test_packed_positions_round_trip_and_extend_gives_new_tokens_their_row_head():
    pos_all, head_all, acc_all, seen = _packed_candidates()
    assert torch.equal(ops.unpack_positions(ops.pack_positions(pos_all, head_all, HKV), HKV)[0], pos_all)
    real = pos_all >= 0
    assert torch.equal(ops.unpack_positions(ops.pack_positions(pos_all, head_all, HKV), HKV)[1][real], head_all[real])
    assert head_all[:, :, 5:].tolist() == [[[0] * 3, [1] * 3]] * B
    assert pos_all[:, :, 5:].tolist() == [[[7, 8, 9]] * 2] * 2
    assert seen.tolist() == [10, 10] and acc_all.shape == (B, HKV, 8)


@pytest.mark.parametrize("policy, softcap, sinks", [(SnapKV(window=2), 0.0, None), (H2O(), 0.0, None),
                                                    (EpiCache(window=2, scores="forward"), 0.0, None),
                                                    (H2O(), 0.2, None),
                                                    (H2O(), 0.0, torch.tensor([0.5, -1.0, 2.0, 0.0]))])
def test_attend_packed_is_each_heads_attention_over_its_own_slots(policy, softcap, sinks):
    pos, head, _, _ = _packed_candidates()
    q, k, v = _rand(3, 8)
    sink_rows = None if sinks is None else sinks.view(1, HQ, 1)
    out, obs = ops.attend_packed(q, k, v, pos, head, D**-0.5, policy.spec(), softcap, sink_rows)
    n_obs = policy.n_obs(3)
    group = HQ // HKV
    expected_obs = torch.zeros(B, HQ, 8)
    for b in range(B):
        for h in range(HQ):
            g = h // group
            slots = [(r, j) for r in range(HKV) for j in range(8) if head[b, r, j] == g and pos[b, r, j] >= 0]
            keys = torch.stack([k[b, r, j] for r, j in slots])
            vals = torch.stack([v[b, r, j] for r, j in slots])
            new = torch.tensor([j - 5 if j >= 5 else -1 for _, j in slots])
            for i in range(3):
                seen = new <= i  # store slots (-1) and new tokens up to query i
                logits = (keys[seen] @ q[b, h, i]) * D**-0.5
                logits = softcap * torch.tanh(logits / softcap) if softcap else logits
                if sinks is not None:  # the sink joins the softmax as an extra logit, then is dropped
                    logits = torch.cat([logits, sinks[h : h + 1]])
                w = logits.softmax(-1)[: int(seen.sum())]
                torch.testing.assert_close(out[b, h, i], w @ vals[seen], atol=1e-5, rtol=1e-5)
                if i >= 3 - n_obs:  # obs in candidate layout: entry (r * group + h % group, j) is slot (r, j)
                    for (r, j), weight in zip([s for s, x in zip(slots, seen, strict=True) if x], w, strict=True):
                        row = r * group + h % group
                        if policy.obs_reduce == "max":
                            expected_obs[b, row, j] = max(expected_obs[b, row, j], weight)
                        else:
                            expected_obs[b, row, j] += weight
    torch.testing.assert_close(obs, expected_obs if n_obs else torch.zeros(B, HQ, 0), atol=1e-5, rtol=1e-5)


def test_compact_packed_keeps_the_global_top_with_a_floor_per_head():
    g = torch.Generator().manual_seed(3)
    n, budget = 6, 3
    k = torch.randn(B, HKV, n, D, generator=g)
    pos = torch.arange(B * HKV * n).view(B, HKV, n) % 50
    pos[1, 0, 2] = -1
    head = torch.zeros(B, HKV, n, dtype=torch.int64)
    head[:, 1, 4:] = 1  # head 1 owns only two slots, both low-scored
    keep = torch.rand(B, HKV, n, generator=g) + head * -5.0
    for floor, head1_kept in ((0.0, 0), (0.5, 1), (1.0, 2)):
        k2, v2, packed, acc2 = ops.compact_packed(k, -k, pos, head, keep, keep.clone(), budget, budget + 1, floor)
        kept_pos, kept_head = ops.unpack_positions(packed, HKV)
        for b in range(B):
            # transcription: each head's best floor*budget real slots, then the best of the rest, H_kv*budget in all
            flat = [(float(keep[b, r, j]), r * n + j) for r in range(HKV) for j in range(n) if pos[b, r, j] >= 0]
            by_head = {h: sorted((s for s in flat if head.view(B, -1)[b, s[1]] == h), reverse=True) for h in range(HKV)}
            guarded = {i for h in by_head for _, i in by_head[h][: int(floor * budget)]}
            rest = sorted((s for s in flat if s[1] not in guarded), reverse=True)[: HKV * budget - len(guarded)]
            expected = sorted(guarded | {i for _, i in rest})
            got = kept_pos[b].flatten()
            assert int((kept_head[b].flatten()[got >= 0] == 1).sum()) == head1_kept
            assert (got >= 0).sum() == HKV * budget and (packed[b, :, budget:] == -1).all()
            assert got[got >= 0].tolist() == [int(pos.view(B, -1)[b, i]) for i in expected]
            kept_keys = k2[b, :, :budget].reshape(-1, D)
            assert torch.equal(kept_keys, k.view(B, -1, D)[b, expected])
            assert torch.equal(v2[b, :, :budget], -k2[b, :, :budget])
            assert acc2[b, :, :budget].flatten().tolist() == [float(keep.view(B, -1)[b, i]) for i in expected]


@pytest.mark.parametrize(
    "op, args",
    [
        (torch.ops.kvpass.extend_meta.default,
         lambda: (torch.zeros(B, HKV, 3, dtype=torch.int64), torch.zeros(B, HKV, 3),
                  torch.full((B,), 3, dtype=torch.int64), torch.ones(B, 2, dtype=torch.bool))),
        (torch.ops.kvpass.attend.default,
         lambda: (*_rand(4, 6), torch.arange(6).expand(B, HKV, 6).contiguous(), 0.3, SnapKV(window=2).spec(), 0)),
        (torch.ops.kvpass.score.default,
         lambda: (H2O(recent=2).spec(), torch.rand(B, HQ, 6), torch.randn(B, HKV, 6, D),
                  torch.arange(6).expand(B, HKV, 6).contiguous(), torch.rand(B, HKV, 6), 1, 4)),
        (torch.ops.kvpass.compact.default,
         lambda: (torch.randn(B, HKV, 6, D), torch.randn(B, HKV, 6, D), torch.arange(6).expand(B, HKV, 6).contiguous(),
                  torch.rand(B, HKV, 6), torch.rand(B, HKV, 6), 4, 5, 0)),
        (torch.ops.kvpass.extend_packed_meta.default,
         lambda: (torch.tensor([3, -1, 8]).expand(B, HKV, 3).contiguous(), torch.zeros(B, HKV, 3),
                  torch.full((B,), 5, dtype=torch.int64), torch.ones(B, 2, dtype=torch.bool))),
        (torch.ops.kvpass.attend_packed.default,
         lambda: (*_rand(3, 8), *_packed_candidates()[:2], 0.3, SnapKV(window=2).spec())),
        (torch.ops.kvpass.attend.default,
         lambda: (*_rand(4, 6), torch.arange(6).expand(B, HKV, 6).contiguous(), 0.3, H2O().spec(), 0, 2.0)),
        (torch.ops.kvpass.attend_packed.default,
         lambda: (*_rand(3, 8), *_packed_candidates()[:2], 0.3, SnapKV(window=2).spec(), 2.0)),
        (torch.ops.kvpass.compact_packed.default,
         lambda: (torch.randn(B, HKV, 8, D), torch.randn(B, HKV, 8, D), *_packed_candidates()[:2],
                  torch.rand(B, HKV, 8), torch.rand(B, HKV, 8), 4, 5, 0.25)),
        (torch.ops.kvpass.attend.default,
         lambda: (*_rand(4, 6), torch.arange(6).expand(B, HKV, 6).contiguous(), 0.3, H2O().spec(), 0, 0.0,
                  torch.randn(1, HQ, 1))),
        (torch.ops.kvpass.attend_packed.default,
         lambda: (*_rand(3, 8), *_packed_candidates()[:2], 0.3, SnapKV(window=2).spec(), 0.0, torch.randn(B, HQ, 3))),
        (torch.ops.kvpass.attend.default,
         lambda: (torch.randn(B, HQ, 4, 12), torch.randn(B, HKV, 6, 12), torch.randn(B, HKV, 6, D),
                  torch.arange(6).expand(B, HKV, 6).contiguous(), 0.3, SnapKV(window=2).spec(), 0)),
    ],
    ids=["extend_meta", "attend", "score", "compact", "extend_packed_meta", "attend_packed", "attend_softcap",
         "attend_packed_softcap", "compact_packed", "attend_sinks", "attend_packed_sinks", "attend_mla_values"],
)
def test_opcheck(op, args):
    torch.library.opcheck(op, args(), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_kept_indices_few_evictions_match_the_full_sort():
    # the decode path (a few evictions, no sort of the store) keeps slots of the same ranks as the sort path
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 40, (), generator=g))
        n_evict = int(torch.randint(0, min(n - 1, ops._FEW_EVICTIONS) + 1, (), generator=g))
        rank = torch.randint(0, 6, (2, 3, n), generator=g).float()  # many ties
        rank[rank == 0] = float("-inf")
        expected = rank.sort(dim=-1, descending=True, stable=True).indices[..., : n - n_evict].sort(dim=-1).values
        got = ops.kept_indices(rank, n - n_evict)
        assert torch.equal(rank.gather(-1, expected).sort(-1).values, rank.gather(-1, got).sort(-1).values)
        assert (got.diff(dim=-1) > 0).all()
