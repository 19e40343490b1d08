"""kvpass::attend_part and kvpass::merge_parts: a store split into parts, attended part by part and merged, is full
attention (a plain softmax written here, and kvpass::attend where its semantics match)."""

from __future__ import annotations

import pytest
import torch

from kvpass.ops import PARTIAL_REFERENCES, REFERENCES, attend_part_reference, merge_parts_reference, merge_two
from kvpass.ops import partial as partial_ops
from kvpass.ops.partial import attend_part_observed_reference, merged_observation
from kvpass.policies import H2O, make_policy
from kvpass.policies import policy_from_spec as make_policy_from

attend_part = torch.ops.kvpass.attend_part
merge_parts = torch.ops.kvpass.merge_parts
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- helpers

def make_store(gen: torch.Generator, b: int, hkv: int, c: int, t: int, p_dead: float = 0.2,
               max_pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_pos [B,H_kv,C+T], q_pos [B,T])`` in kvpass::attend's layout: a store of ``C`` slots in position order
    with random empty ones, then the ``T`` new tokens, each row left-padded by a random count (-1)."""
    store = torch.arange(c).expand(b, hkv, c).clone()
    store[torch.rand(b, hkv, c, generator=gen) < p_dead] = -1
    max_pad = t // 2 if max_pad is None else max_pad
    pad = torch.randint(0, max_pad + 1, (b, 1), generator=gen)
    valid = torch.arange(t)[None] >= pad
    q_pos = torch.where(valid, c + valid.long().cumsum(1) - 1, -1)
    return torch.cat([store, q_pos[:, None].expand(b, hkv, t)], dim=2).contiguous(), q_pos


def make_case(seed: int, b: int = 2, hkv: int = 2, group: int = 2, t: int = 5, c: int = 17, d: int = 16,
              dv: int | None = None, dtype: torch.dtype = torch.float32, **store) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = c + t
    k_pos, q_pos = make_store(gen, b, hkv, c, t, **store)
    return dict(q=torch.randn(b, hkv * group, t, d, generator=gen).to(dtype),
                k=torch.randn(b, hkv, n, d, generator=gen).to(dtype),
                v=torch.randn(b, hkv, n, dv or d, generator=gen).to(dtype), k_pos=k_pos, q_pos=q_pos,
                scale=d**-0.5)


def full_attention(q, k, v, k_pos, q_pos, scale, window=0, softcap=0.0, sinks=None):
    """The plain softmax over every visible slot, in float64: ``(out, lse)``; rows that see nothing: 0, -inf."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    kp = k_pos.repeat_interleave(group, 1)[:, :, None, :]
    qp = q_pos[:, None, :, None]
    logits = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible &= qp - kp < window
    logits = logits.masked_fill(~visible, NEG_INF)
    columns = logits
    if sinks is not None:
        columns = torch.cat([logits, sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(columns, dim=-1)
    weights = torch.exp(logits - torch.where(lse == NEG_INF, 0.0, lse)[..., None])
    return weights @ vv, lse


def split_store(gen: torch.Generator, case: dict, parts: int, mode: str) -> list[tuple[torch.Tensor, ...]]:
    """The store's slots dealt into ``parts`` parts ``(k, v, k_pos)``:

    * ``contiguous``: slot ranges at random cuts (a part may be empty: N = 0);
    * ``interleaved``: each slot index to a random part (the same for every row and head);
    * ``masked``: each (row, head, slot) to a random part; every part keeps all N slots, others' emptied (-1);
    * ``by_position``: position ranges at random cuts (older tokens in one tier, newer in another), as in
      ``masked``: queries before a part's first position see nothing of it.
    """
    k, v, k_pos = case["k"], case["v"], case["k_pos"]
    n = k.shape[2]
    if mode == "by_position":
        top = int(k_pos.max()) + 1
        cuts = torch.tensor([0, *sorted(torch.randint(1, top + 1, (parts - 1,), generator=gen).tolist()), top + 1])
        owner = torch.bucketize(k_pos, cuts, right=True) - 1
        return [(k, v, k_pos.masked_fill(owner != p, -1)) for p in range(parts)]
    if mode == "contiguous":
        cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=gen).tolist())
        bounds = [0, *cuts, n]
        ranges = zip(bounds[:-1], bounds[1:], strict=True)
        return [(k[:, :, lo:hi], v[:, :, lo:hi], k_pos[:, :, lo:hi]) for lo, hi in ranges]
    if mode == "interleaved":
        owner = torch.randint(0, parts, (n,), generator=gen)
        idx = [torch.nonzero(owner == p).flatten() for p in range(parts)]
        return [(k[:, :, i], v[:, :, i], k_pos[:, :, i]) for i in idx]
    owner = torch.randint(0, parts, k_pos.shape, generator=gen)
    return [(k, v, k_pos.masked_fill(owner != p, -1)) for p in range(parts)]


def attend_parts(case: dict, pieces, window: int = 0, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each part's ``attend_part`` output, stacked: ``([P,B,H_q,T,D_v], [P,B,H_q,T])``."""
    results = [attend_part(case["q"], k, v, kp, case["q_pos"], case["scale"], window, softcap) for k, v, kp in pieces]
    return torch.stack([o for o, _ in results]), torch.stack([lse for _, lse in results])


def assert_same_attention(out, lse, ref_out, ref_lse, tol: float = 1e-6) -> None:
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse == NEG_INF, ref_lse == NEG_INF)  # the same rows see nothing
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------- schema

def _opcheck_cases():
    c = make_case(0, t=3, c=6)
    args = (c["q"], c["k"], c["v"], c["k_pos"], c["q_pos"], c["scale"])
    outs, lses = torch.randn(3, 2, 4, 3, 16), torch.randn(3, 2, 4, 3)
    lses[0, 0, 0] = NEG_INF
    return [
        (attend_part, args),
        (attend_part, (*args, 3, 0.5)),
        (merge_parts, (outs, lses)),
        (merge_parts, (outs.bfloat16(), lses, torch.randn(4))),
        (torch.ops.kvpass.attend_part_observed, (*args, make_policy("snapkv", window=2).spec(), 3, 0.5)),
    ]


@pytest.mark.parametrize("case", range(5), ids=["attend_part", "attend_part_window_softcap", "merge_parts",
                                                "merge_parts_sinks_bf16", "attend_part_observed"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    # every check, dynamic shapes included: both ops must trace into graphs with symbolic sizes
    assert set(torch.library.opcheck(op, args).values()) == {"SUCCESS"}


def test_references_are_inlined_with_the_other_store_ops():
    # the eviction pass inserts them for a store split over ranks: decode graphs inline them like kvpass::attend
    assert PARTIAL_REFERENCES == {torch.ops.kvpass.attend_part.default: attend_part_reference,
                                  torch.ops.kvpass.merge_parts.default: merge_parts_reference,
                                  torch.ops.kvpass.attend_part_observed.default: attend_part_observed_reference}
    assert PARTIAL_REFERENCES.items() <= REFERENCES.items()


# ----------------------------------------------------------------------------------------------- exactness

SPLIT_CASES = {  # name: (make_case kwargs, window, softcap)
    "decode_gqa": (dict(t=1, c=30), 0, 0.0),
    "block_over_store": (dict(t=6, c=17), 0, 0.0),
    "prefill_left_padding": (dict(t=12, c=0, max_pad=5), 0, 0.0),
    "window": (dict(t=7, c=20), 6, 0.0),
    "softcap": (dict(t=4, c=15), 0, 0.5),
    "mha_empty_store_slots": (dict(group=1, t=3, c=25, p_dead=0.6), 0, 0.0),
    "values_narrower": (dict(group=3, t=4, c=10, d=24, dv=8), 0, 0.0),
}


@pytest.mark.parametrize("mode", ["contiguous", "interleaved", "masked", "by_position"])
@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_split_store_merges_to_full_attention(name, mode):
    kwargs, window, softcap = SPLIT_CASES[name]
    partial_rows = 0
    for seed in range(3):
        case = make_case(seed, **kwargs)
        ref_out, ref_lse = full_attention(**case, window=window, softcap=softcap)
        gen = torch.Generator().manual_seed(100 + seed)
        for parts in range(1, 5):
            outs, lses = attend_parts(case, split_store(gen, case, parts, mode), window, softcap)
            assert outs.dtype == torch.float32 and lses.dtype == torch.float32
            out, lse = merge_parts(outs, lses)
            assert_same_attention(out, lse, ref_out, ref_lse)
            # some rows see nothing of some part while seeing other parts: those parts weigh zero
            partial_rows += int(((lses == NEG_INF) & (ref_lse != NEG_INF)).sum())
    if mode == "by_position" and kwargs["t"] > 1:
        assert partial_rows > 0


def test_each_part_is_attention_over_its_own_slots():
    case = make_case(1, t=5, c=12)
    ref_out, ref_lse = full_attention(**{**case, "k": case["k"][:, :, 3:9], "v": case["v"][:, :, 3:9],
                                         "k_pos": case["k_pos"][:, :, 3:9]})
    out, lse = attend_part(case["q"], case["k"][:, :, 3:9], case["v"][:, :, 3:9], case["k_pos"][:, :, 3:9],
                           case["q_pos"], case["scale"])
    assert_same_attention(out, lse, ref_out, ref_lse)


def test_slot_order_within_and_across_parts_does_not_matter():
    # visibility is by position, not slot index: shuffled slots, parts in any order, give the same attention
    case = make_case(2, t=6, c=20)
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(case["k"].shape[2], generator=gen)
    shuffled = {**case, "k": case["k"][:, :, perm], "v": case["v"][:, :, perm], "k_pos": case["k_pos"][:, :, perm]}
    outs, lses = attend_parts(shuffled, split_store(gen, shuffled, 4, "contiguous"))
    out, lse = merge_parts(outs, lses)
    assert_same_attention(out, lse, *full_attention(**case))
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        out_p, lse_p = merge_parts(outs[order], lses[order])
        torch.testing.assert_close(out_p, out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse_p, lse, atol=1e-6, rtol=1e-6)


def test_merging_two_at_a_time_equals_merging_all():
    # a ring pass folds one part in at a time
    case = make_case(3, t=4, c=21)
    outs, lses = attend_parts(case, split_store(torch.Generator().manual_seed(3), case, 4, "interleaved"))
    out, lse = outs[0], lses[0]
    for p in range(1, 4):
        out, lse = merge_two(out, lse, outs[p], lses[p])
    assert_same_attention(out, lse, *full_attention(**case))


def test_multi_token_queries_are_causal_by_position():
    # a prefill without a store: query i sees exactly the keys at positions <= its own
    case = make_case(4, t=9, c=0, max_pad=0)
    outs, lses = attend_parts(case, split_store(torch.Generator().manual_seed(4), case, 3, "contiguous"))
    out, lse = merge_parts(outs, lses)
    group = case["q"].shape[1] // case["k"].shape[1]
    for i in range(9):  # row i attends to keys 0..i: softmax over those only
        k = case["k"][:, :, : i + 1].repeat_interleave(group, 1)
        v = case["v"][:, :, : i + 1].repeat_interleave(group, 1)
        w = (case["q"][:, :, i : i + 1] @ k.transpose(-1, -2) * case["scale"]).softmax(-1)
        torch.testing.assert_close(out[:, :, i : i + 1], w @ v, atol=1e-6, rtol=1e-6)


def test_long_queries_are_chunked(monkeypatch):
    monkeypatch.setattr(partial_ops, "_QUERY_CHUNK", 16)  # 40 queries: 3 chunks
    case = make_case(5, group=2, t=40, c=7)
    out, lse = attend_part(case["q"], case["k"], case["v"], case["k_pos"], case["q_pos"], case["scale"])
    assert_same_attention(out, lse, *full_attention(**case))


FLASH_CASES = {  # name: (make_case kwargs, window)
    "decode": (dict(t=1, c=40), 0),
    "decode_gqa4": (dict(t=1, c=40, group=4, hkv=1), 0),
    "block_padded": (dict(t=7, c=19), 0),
    "prefill": (dict(t=10, c=0, max_pad=3), 0),
    "decode_window": (dict(t=1, c=40), 8),
    "block_window": (dict(t=6, c=30, group=3), 5),
    "empty_store": (dict(t=6, c=5, p_dead=1.0), 0),
    "bf16": (dict(t=3, c=14, dtype=torch.bfloat16), 0),
}


@pytest.mark.parametrize("name", sorted(FLASH_CASES))
def test_flash_path_equals_the_reference(name, monkeypatch):
    kwargs, window = FLASH_CASES[name]
    monkeypatch.setattr(partial_ops, "_QUERY_CHUNK", 16)  # (and one case long enough for several chunks)
    for seed in range(2):
        case = make_case(seed, **kwargs) if seed == 0 else make_case(seed, **{**kwargs, "t": 40})
        args = (case["q"], case["k"], case["v"], case["k_pos"], case["q_pos"], case["scale"], window)
        want_out, want_lse = attend_part_reference(*args)
        out, lse = partial_ops.attend_part_flash(*args)
        assert out.dtype == case["q"].dtype and lse.dtype == torch.float32
        assert torch.equal(lse == NEG_INF, want_lse == NEG_INF) and (out[lse == NEG_INF] == 0).all()
        tol = 1e-2 if case["q"].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out, want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_flash_path_takes_the_reference_for_a_soft_cap_or_no_slot():
    case = make_case(9, t=3, c=12)
    args = (case["q"], case["k"], case["v"], case["k_pos"], case["q_pos"], case["scale"])
    # a soft cap (window 0, cap 0.5): the fused kernel has none
    torch.testing.assert_close(partial_ops.attend_part_flash(*args, 0, 0.5), attend_part_reference(*args, 0, 0.5),
                               atol=0, rtol=0)
    empty = (case["q"], case["k"][:, :, :0], case["v"][:, :, :0], case["k_pos"][:, :, :0], case["q_pos"],
             case["scale"])
    out, lse = partial_ops.attend_part_flash(*empty)
    assert (out == 0).all() and (lse == NEG_INF).all()


def test_half_precision_inputs_keep_their_dtype():
    case = make_case(6, t=3, c=14, dtype=torch.bfloat16)
    outs, lses = attend_parts(case, split_store(torch.Generator().manual_seed(6), case, 3, "interleaved"))
    assert outs.dtype == torch.bfloat16 and lses.dtype == torch.float32
    out, lse = merge_parts(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = full_attention(**case)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)  # computed in float32 throughout


# ----------------------------------------------------------------------------------------------- kvpass::attend

ATTEND_CASES = {  # name: (make_case kwargs, window, softcap, sinks)
    "prefill": (dict(t=10, c=0, max_pad=3), 0, 0.0, False),
    "decode": (dict(t=1, c=40), 0, 0.0, False),
    "block": (dict(t=5, c=19), 0, 0.0, False),
    "decode_window": (dict(t=1, c=40), 8, 0.0, False),
    "block_softcap": (dict(t=5, c=19), 0, 0.5, False),
    "decode_sinks": (dict(t=1, c=30), 0, 0.0, True),
    "prefill_sinks": (dict(t=8, c=0, max_pad=2), 0, 0.0, True),
}


@pytest.mark.parametrize("name", sorted(ATTEND_CASES))
def test_merged_parts_equal_kvpass_attend(name):
    # kvpass::attend sees the store's real slots and new keys up to the query: the same set, by position, for its
    # layout; its padding queries attend to themselves (not compared here)
    kwargs, window, softcap, with_sinks = ATTEND_CASES[name]
    for seed in range(2):
        case = make_case(seed, **kwargs)
        hq = case["q"].shape[1]
        sinks = torch.randn(hq, generator=torch.Generator().manual_seed(seed)) * 2 if with_sinks else None
        policy = make_policy("streaming_llm").spec() if seed else H2O().spec()  # SDPA and explicit-weights paths
        expected, _ = torch.ops.kvpass.attend(case["q"], case["k"], case["v"], case["k_pos"], case["scale"], policy,
                                              window, softcap, None if sinks is None else sinks.view(1, hq, 1))
        pieces = split_store(torch.Generator().manual_seed(seed), case, 3, "interleaved")
        out, _ = merge_parts(*attend_parts(case, pieces, window, softcap), sinks)
        real = (case["q_pos"] >= 0)[:, None, :].expand(out.shape[:3])
        torch.testing.assert_close(out[real], expected[real], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- sinks, empty rows

def test_sinks_join_the_denominator():
    case = make_case(7, group=2, t=4, c=13)
    hq = case["q"].shape[1]
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(7)) * 2
    outs, lses = attend_parts(case, split_store(torch.Generator().manual_seed(7), case, 2, "masked"))
    plain_out, plain_lse = merge_parts(outs, lses)
    out, lse = merge_parts(outs, lses, sinks)
    # kv.sink_softmax: the output scaled by total / (total + exp(sink)); the sink is one more part (lse = sink)
    sink = sinks.view(1, hq, 1)
    torch.testing.assert_close(out, plain_out * torch.sigmoid(plain_lse - sink)[..., None], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logaddexp(plain_lse, sink.expand_as(plain_lse)), atol=1e-6, rtol=1e-6)
    assert_same_attention(out, lse, *full_attention(**case, sinks=sinks))
    # sinks broadcastable to [B, H, T] (one per row) are the same thing
    out_rows, lse_rows = merge_parts(outs, lses, sink.expand_as(plain_lse).contiguous())
    torch.testing.assert_close(out_rows, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_rows, lse, atol=0, rtol=0)


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    case = make_case(8, t=6, c=5, p_dead=1.0)  # empty store, and left-padding queries see no key at all
    case["q_pos"][:, :2] = -1
    out, lse = attend_part(case["q"], case["k"], case["v"], case["k_pos"], case["q_pos"], case["scale"])
    blind = (case["q_pos"] < 0)[:, None, :].expand(lse.shape)
    assert blind.any() and (lse[blind] == NEG_INF).all() and (out[blind] == 0).all()
    assert not out.isnan().any() and torch.isfinite(lse[~blind]).all()
    # a part with no slot at all, and no queries at all
    empty = attend_part(case["q"], case["k"][:, :, :0], case["v"][:, :, :0], case["k_pos"][:, :, :0], case["q_pos"],
                        case["scale"])
    assert (empty[0] == 0).all() and (empty[1] == NEG_INF).all()
    none = attend_part(case["q"][:, :, :0], case["k"], case["v"], case["k_pos"], case["q_pos"][:, :0], 1.0)
    assert none[0].shape == (2, 4, 0, 16) and none[1].shape == (2, 4, 0)
    # merging: all-(-inf) rows give 0 and -inf; a -inf part's output is never read (NaN there is ignored)
    outs = torch.randn(3, 2, 4, 6, 16)
    lses = torch.randn(3, 2, 4, 6)
    lses[:, 0, 1] = NEG_INF
    lses[1] = NEG_INF
    outs[1] = float("nan")
    merged, merged_lse = merge_parts(outs, lses)
    assert not merged.isnan().any()
    assert (merged[0, 1] == 0).all() and (merged_lse[0, 1] == NEG_INF).all()
    expected_out, expected_lse = merge_parts(outs[[0, 2]], lses[[0, 2]])
    torch.testing.assert_close(merged, expected_out, atol=0, rtol=0)
    torch.testing.assert_close(merged_lse, expected_lse, atol=0, rtol=0)
    # with a sink, a row that saw nothing still has a zero output; its lse is the sink's
    with_sink, sink_lse = merge_parts(outs, lses, torch.zeros(4))
    assert (with_sink[0, 1] == 0).all() and (sink_lse[0, 1] == 0).all()
    # no parts at all
    zero, zero_lse = merge_parts(outs[:0], lses[:0])
    assert (zero == 0).all() and (zero_lse == NEG_INF).all()


# ----------------------------------------------------------------------------------------------- graphs

def _two_part_attention(q, k, v, k_pos, q_pos, sinks):
    n = k.shape[2] // 2
    a = attend_part(q, k[:, :, :n], v[:, :, :n], k_pos[:, :, :n], q_pos, 0.25)
    b = attend_part(q, k[:, :, n:], v[:, :, n:], k_pos[:, :, n:], q_pos, 0.25, 6, 0.0)
    return merge_parts(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]), sinks)


def _graph_args():
    case = make_case(9, t=3, c=13)
    return case["q"], case["k"], case["v"], case["k_pos"], case["q_pos"], torch.randn(4)


def test_ops_compile_in_one_graph():
    args = _graph_args()
    expected = _two_part_attention(*args)
    compiled = torch.compile(_two_part_attention, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_ops_export():
    class TwoParts(torch.nn.Module):
        def forward(self, q, k, v, k_pos, q_pos, sinks):
            return _two_part_attention(q, k, v, k_pos, q_pos, sinks)

    args = _graph_args()
    program = torch.export.export(TwoParts(), args)
    targets = [node.target for node in program.graph.nodes]
    assert targets.count(torch.ops.kvpass.attend_part.default) == 2
    assert targets.count(torch.ops.kvpass.merge_parts.default) == 1
    for got, want in zip(program.module()(*args), _two_part_attention(*args), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- observed weights

WEIGHT_POLICIES = {"h2o": H2O().spec(), "snapkv_window_3": make_policy("snapkv", window=3).spec(),
                   "epicache_max": make_policy("epicache", scores="forward").spec(),
                   "streaming_llm_reads_none": make_policy("streaming_llm").spec()}


@pytest.mark.parametrize("policy", sorted(WEIGHT_POLICIES))
@pytest.mark.parametrize("name", ["decode", "block", "decode_window", "block_softcap", "decode_sinks"])
def test_observed_weights_rescaled_by_the_merged_lse_are_what_attend_observes(name, policy):
    """Each part's slots, weighed with the log-sum-exp merged over all parts, get the weights kvpass::attend observes
    over the unsplit store: a rank scoring its own slots sees what one process would."""
    kwargs, window, softcap, with_sinks = ATTEND_CASES[name]
    spec = WEIGHT_POLICIES[policy]
    # no padding queries: kvpass::attend lets one see the store (only a first block, which has no store, is padded)
    case = make_case(3, **{**kwargs, "max_pad": 0})
    hq = case["q"].shape[1]
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(3)) * 2 if with_sinks else None
    _, expected = torch.ops.kvpass.attend(case["q"], case["k"], case["v"], case["k_pos"], case["scale"], spec, window,
                                          softcap, None if sinks is None else sinks.view(1, hq, 1))
    owner = torch.randint(0, 3, case["k_pos"].shape, generator=torch.Generator().manual_seed(4))
    pieces = [(case["k"], case["v"], case["k_pos"].masked_fill(owner != p, -1)) for p in range(3)]
    parts = [torch.ops.kvpass.attend_part_observed(case["q"], k, v, kp, case["q_pos"], case["scale"], spec, window,
                                                   softcap) for k, v, kp in pieces]
    for (out, lse, _), piece in zip(parts, pieces, strict=True):  # the same attention as attend_part's
        expected_out, expected_lse = attend_part(case["q"], *piece, case["q_pos"], case["scale"], window, softcap)
        assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    _, lse = merge_parts(torch.stack([o for o, _, _ in parts]), torch.stack([p for _, p, _ in parts]), sinks)
    rule = make_policy_from(spec)
    if not rule.needs_obs:  # a policy that reads no weights gets none
        assert all(w.shape[2] == 0 for _, _, w in parts) and expected.shape[-1] == 0
        return
    weights = [merged_observation(w, lse_part, lse, rule.obs_reduce) for _, lse_part, w in parts]
    assert all(w.shape == expected.shape for w in weights)
    for p, w in enumerate(weights):
        mine = (owner == p).repeat_interleave(hq // owner.shape[1], dim=1)  # [B, H_q, N]
        torch.testing.assert_close(w[mine], expected[mine], atol=1e-6, rtol=1e-5)
        assert not w[~mine].any()  # another part's slots weigh nothing here
