"""kvpass::evicted and kvpass::tier_attend: the device store and the lower tier partition a layer's candidates, and
attention over the device part merged with the lower tier's (computed where it lives) is full attention."""

from __future__ import annotations

import os

import pytest
import torch
from test_ops_partial import full_attention, make_case

import kvpass.ops.tier as tier_ops
from kvpass.apps.eval.runner import resident_bytes
from kvpass.ops import REFERENCES
from kvpass.ops.kv import compact_reference
from kvpass.ops.partial import attend_part_reference, merge_parts_reference
from kvpass.ops.tier import (
    TIER_REFERENCES,
    evicted_reference,
    release_free_heap,
    retrieval_index,
    tier_attend_reference,
    tier_attend_retrieved_reference,
    tier_gather_reference,
)


def candidates(seed: int, n: int, window_dead: bool = False) -> dict:
    """A compaction's inputs over ``n`` candidates: some empty slots, random scores with ties."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 4
    pos = torch.arange(n).expand(b, h, n).clone()
    pos[torch.rand(b, h, n, generator=gen) < 0.2] = -1
    keep = torch.randint(0, 4, (b, h, n), generator=gen).float()  # ties on purpose
    return dict(k=torch.randn(b, h, n, d, generator=gen), v=torch.randn(b, h, n, d + 2, generator=gen), pos=pos,
                keep=keep)


@pytest.mark.parametrize("n, budget", [(12, 12), (12, 11), (12, 9), (40, 8), (40, 39), (5, 8)])
@pytest.mark.parametrize("window", [0, 6])
def test_evicted_and_kept_partition_the_real_candidates(n, budget, window):
    case = candidates(n + budget + window, n)
    kept_k, kept_v, kept_pos, _ = compact_reference(case["k"], case["v"], case["pos"], case["keep"],
                                                    torch.zeros_like(case["keep"]), budget, max(budget, n), window)
    ev_k, ev_v, ev_pos = evicted_reference(case["k"], case["v"], case["pos"], case["keep"], budget, window)
    assert ev_k.shape[2] == max(n - budget, 0)
    newest = case["pos"].amax(dim=-1, keepdim=True)
    for b in range(2):
        for h in range(3):
            real = case["pos"][b, h]
            real = real[real >= 0]
            if window:  # tokens no future query can see are dropped from both
                real = real[real > newest[b, h, 0] - (window - 1)]
            kept = kept_pos[b, h][kept_pos[b, h] >= 0].tolist()
            gone = ev_pos[b, h][ev_pos[b, h] >= 0].tolist()
            assert not set(kept) & set(gone)
            assert sorted(kept + gone) == sorted(real.tolist())
            for p in gone:  # each evicted slot carries its own key and value
                slot = int((case["pos"][b, h] == p).nonzero()[0, 0])
                i = gone.index(p)
                assert torch.equal(ev_k[b, h][ev_pos[b, h] >= 0][i], case["k"][b, h, slot])
                assert torch.equal(ev_v[b, h][ev_pos[b, h] >= 0][i], case["v"][b, h, slot])


def test_device_part_merged_with_the_tier_part_is_full_attention():
    case = make_case(3, c=30, t=4)
    n = case["k"].shape[2]
    on_tier = torch.zeros(n, dtype=torch.bool)
    on_tier[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20]] = True
    on_tier[-4:] = False  # the new tokens are on the device
    # the lower tier: its slots, then unwritten ones (garbage that must never be read)
    tier_k = torch.cat([case["k"][:, :, on_tier], torch.full_like(case["k"][:, :, :7], float("nan"))], dim=2)
    tier_v = torch.cat([case["v"][:, :, on_tier], torch.full_like(case["v"][:, :, :7], float("nan"))], dim=2)
    tier_pos = torch.cat([case["k_pos"][:, :, on_tier], torch.full_like(case["k_pos"][:, :, :7], 5)], dim=2)
    used = torch.tensor(int(on_tier.sum()))
    out_t, lse_t = tier_attend_reference(case["q"], tier_k, tier_v, tier_pos, used, case["q_pos"], case["scale"])
    out_d, lse_d = attend_part_reference(case["q"], case["k"][:, :, ~on_tier], case["v"][:, :, ~on_tier],
                                         case["k_pos"][:, :, ~on_tier], case["q_pos"], case["scale"])
    out, lse = merge_parts_reference(torch.stack([out_d, out_t]), torch.stack([lse_d, lse_t]))
    want, _ = full_attention(**case)
    real = case["q_pos"] >= 0
    torch.testing.assert_close(out.double()[real[:, None].expand_as(out[..., 0])],
                               want[real[:, None].expand_as(want[..., 0])], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_a_tier_with_nothing_to_attend_is_an_empty_part():
    """``used = 0`` (nothing written, or a SentenceKV step that only retrieves) returns what attention over no slot
    returns: zero outputs, ``lse = -inf``, so the merge weighs the part zero."""
    case = make_case(4, c=6, t=3)
    empty = (case["k"][:, :, :0], case["v"][:, :, :0], case["k_pos"][:, :, :0])
    out, lse = tier_attend_reference(case["q"], case["k"], case["v"], case["k_pos"], torch.tensor(0), case["q_pos"],
                                     case["scale"])
    want_out, want_lse = attend_part_reference(case["q"], *empty, case["q_pos"], case["scale"])
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse) and lse.dtype == torch.float32


def test_tier_ops_pass_opcheck_and_only_evicted_is_inlined():
    case = candidates(1, 10)
    torch.library.opcheck(torch.ops.kvpass.evicted.default, (case["k"], case["v"], case["pos"], case["keep"], 6, 0))
    c = make_case(2)
    tier = (c["k"], c["v"], c["k_pos"], torch.tensor(c["k"].shape[2] - 3))
    torch.library.opcheck(torch.ops.kvpass.tier_attend.default, (c["q"], *tier, c["q_pos"], c["scale"]))
    assert torch.ops.kvpass.evicted.default in REFERENCES and set(TIER_REFERENCES) <= set(REFERENCES)
    assert torch.ops.kvpass.tier_attend.default not in REFERENCES  # runs where the tier lives, never inlined


def test_tier_gather_copies_the_named_slots_of_each_query_heads_kv_head():
    gen = torch.Generator().manual_seed(5)
    b, hkv, group, n, d = 2, 2, 3, 10, 4
    k, v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d + 1, generator=gen)
    pos = torch.arange(n).expand(b, hkv, n).clone()
    index = torch.randint(-1, n, (b, hkv * group, 5), generator=gen)
    gk, gv, gpos = tier_gather_reference(k, v, pos, index)
    for row in range(b):
        for head in range(hkv * group):
            for r, slot in enumerate(index[row, head].tolist()):
                if slot < 0:
                    assert gpos[row, head, r] == -1
                    continue
                assert torch.equal(gk[row, head, r], k[row, head // group, slot])
                assert torch.equal(gv[row, head, r], v[row, head // group, slot])
                assert gpos[row, head, r] == slot


def _literal_retrieval(q_mean, means, starts, lens, slots):
    """The reference's ``_batch_similarity_computation`` for one row, over token lists built from the runs."""
    group = q_mean.shape[0] // means.shape[0]
    chosen = []
    for head in range(q_mean.shape[0]):
        kv = head // group
        scores = means[kv].float() @ q_mean[head].float()
        picked = []
        for s in scores.argsort(descending=True, stable=True).tolist():
            picked += list(range(int(starts[kv, s]), int(starts[kv, s]) + int(lens[kv, s])))
        chosen.append(picked[:slots] + [-1] * (slots - len(picked[:slots])))
    return torch.tensor(chosen)


@pytest.mark.parametrize("slots", [1, 7, 40])
def test_retrieval_index_concatenates_the_best_sentences_tokens_and_cuts(slots):
    gen = torch.Generator().manual_seed(slots)
    b, hkv, group, s, d = 2, 2, 2, 6, 8
    q_mean = torch.randn(b, hkv * group, d, generator=gen)
    means = torch.randn(b, hkv, s, d, generator=gen)
    lens = torch.randint(0, 5, (b, hkv, s), generator=gen)
    starts = torch.cat([torch.zeros(b, hkv, 1, dtype=torch.int64), lens.cumsum(-1)[..., :-1]], dim=-1) + 3
    skip = torch.tensor([False, True])
    index = retrieval_index(q_mean, means, starts, lens, skip, slots)
    assert torch.equal(index[0], _literal_retrieval(q_mean[0], means[0], starts[0], lens[0], slots))
    assert (index[1] == -1).all()


def test_retrieval_ranked_and_attended_where_the_tier_lives_is_the_gathered_retrieval_attended():
    """``tier_attend_retrieved`` (offload_attention) == ``retrieval_index`` + ``tier_gather`` + ``attend_part`` on
    the device: the same tokens per query head, the same partial output and log-sum-exp."""
    gen = torch.Generator().manual_seed(9)
    b, hkv, group, s, d, slots = 1, 2, 3, 5, 8, 9
    lens = torch.randint(0, 4, (b, hkv, s), generator=gen)
    starts = torch.cat([torch.zeros(b, hkv, 1, dtype=torch.int64), lens.cumsum(-1)[..., :-1]], dim=-1)
    n = int(lens.sum(-1).max()) + 2
    tier_k, tier_v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    tier_pos = torch.arange(n).expand(b, hkv, n).clone()
    q = torch.randn(b, hkv * group, 1, d, generator=gen)
    q_mean, means = torch.randn(b, hkv * group, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    q_pos, skip = torch.tensor([[n + 5]]), torch.tensor([False])
    args = (q, q_mean, means, starts, lens, skip, tier_k, tier_v, tier_pos, q_pos, 0.3, slots)
    out, lse = tier_attend_retrieved_reference(*args)
    k, v, pos = tier_gather_reference(tier_k, tier_v, tier_pos, retrieval_index(q_mean, means, starts, lens, skip,
                                                                                slots))
    want_out, want_lse = attend_part_reference(q, k, v, pos, q_pos, 0.3)
    # (the tier's side attends with the fused kernel: equal within float32 summation order)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.kvpass.tier_attend_retrieved.default, args)
    assert torch.ops.kvpass.tier_attend_retrieved.default not in REFERENCES  # runs where the tier lives


@pytest.mark.skipif(tier_ops._MALLOC_TRIM is None or not os.path.exists("/proc/self/status"),
                    reason="glibc's malloc_trim, Linux's resident set size")
def test_free_heap_pages_leave_the_resident_set():
    """What a block-wise prefill calls between blocks: freed heap chunks between live ones (fragmentation glibc keeps
    resident) go back to the OS."""
    chunk = 96 * 1024  # below glibc's default mmap threshold: served from the heap
    tensors = [torch.ones(chunk // 4) for _ in range(1024)]  # 96 MiB, written (resident)
    del tensors[::2]  # every other one freed: holes between live chunks, never at the heap's top
    before = resident_bytes()
    release_free_heap()
    assert before - resident_bytes() > 0.5 * 512 * chunk, (before, resident_bytes())
