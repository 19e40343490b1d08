"""kvpass.kernels.compact against kvpass.ops.compact_reference (Triton interpreter on CPU)."""

from __future__ import annotations

from unittest import mock

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpass.kernels import compact as C

from kvpass.ops import kv as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_case(seed: int, b: int, h: int, c: int, t: int, d: int, dtype: torch.dtype, budget: int, capacity: int,
             window: int, config: dict | None = None, p_dead: float = 0.2, ties: bool = False,
             dv: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = c + t
    dv = dv or d  # (an MLA store: latent "keys" and narrower rotary-key "values")
    k = torch.randn(b, h, n, d, generator=gen).to(dtype)
    v = torch.randn(b, h, n, dv, generator=gen).to(dtype)
    pos = kh.random_pos(gen, b, h, c, t, p_dead, p_dead)
    keep = torch.randn(b, h, n, generator=gen)
    if ties:  # few distinct scores: the kept set depends on tie-breaking (lowest slot first, like a stable sort)
        keep = keep.round()
        keep[torch.rand(b, h, n, generator=gen) < 0.1] = float("inf")  # protected slots (sinks / recent)
    acc = torch.rand(b, h, n, generator=gen)
    out = (torch.full((b, h, capacity, d), float("nan"), dtype=dtype), torch.full((b, h, capacity, dv), float("nan"),
           dtype=dtype), torch.full((b, h, capacity), -7, dtype=torch.long), torch.full((b, h, capacity), float("nan")))
    got = C.compact(k, v, pos, keep, acc, budget, capacity, window, config=config, out=out)
    assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out, strict=True))
    # the reference breaks ties like a stable sort (lowest slot first) when it sorts; its few-evictions
    # path (topk) may break them otherwise: force the sort so every slot, dead or tied, must agree
    with mock.patch.object(ops, "_FEW_EVICTIONS", -1):
        ref = ops.compact_reference(k, v, pos, keep, acc, budget, capacity, window)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=0, rtol=0, equal_nan=False)
    # the default reference path agrees on what matters: the kept tokens (positions, in order) and their data
    default = ops.compact_reference(k, v, pos, keep, acc, budget, capacity, window)
    for row in range(b * h):
        live_got, live_ref = got[2].view(b * h, -1)[row] >= 0, default[2].view(b * h, -1)[row] >= 0
        if not ties:
            assert torch.equal(got[2].view(b * h, -1)[row][live_got], default[2].view(b * h, -1)[row][live_ref])
            assert torch.equal(got[0].view(b * h, capacity, d)[row][live_got],
                               default[0].view(b * h, capacity, d)[row][live_ref])


ONE = {"BLOCK_N": 64, "num_warps": 4}
MULTI = {"BLOCK_N": 16, "num_warps": 4}


@pytest.mark.parametrize(
    ("b", "h", "c", "t", "d", "dtype", "budget", "capacity", "window", "config"),
    [
        (2, 2, 0, 30, 16, torch.float32, 12, 12, 0, None),  # prefill compaction
        (1, 2, 16, 1, 24, torch.float16, 16, 16, 0, ONE),  # decode: evict one slot
        (2, 1, 20, 4, 32, torch.bfloat16, 8, 10, 0, ONE),  # capacity above budget: empty tail
        (1, 1, 10, 3, 16, torch.float32, 40, 40, 0, ONE),  # budget above the candidates: keep all, pad
        (2, 2, 18, 6, 16, torch.float16, 10, 10, 9, ONE),  # sliding window drops stale tokens
        (1, 1, 30, 8, 16, torch.float32, 11, 12, 0, MULTI),  # row spans several blocks
    ],
)
def test_compact_matches_reference(b, h, c, t, d, dtype, budget, capacity, window, config):
    for seed in range(2):
        run_case(seed, b, h, c, t, d, dtype, budget, capacity, window, config)


@pytest.mark.parametrize(("d", "dv", "config"), [(32, 8, ONE), (16, 40, MULTI)])
def test_compact_with_values_of_another_width_matches_reference(d, dv, config):
    run_case(7, 2, 1, 14, 3, d, torch.float32, 6, 8, 0, config, dv=dv)


def test_ties_break_toward_lower_slots():
    run_case(5, 2, 2, 20, 6, 16, torch.float32, 9, 9, 0, ONE, ties=True)


def test_everything_dead_keeps_empty_slots():
    run_case(6, 1, 2, 12, 4, 16, torch.float32, 5, 6, 0, ONE, p_dead=1.0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), h=st.integers(1, 2), c=st.integers(0, 40), t=st.integers(1, 10), d=st.sampled_from([16, 24]),
    dtype=st.sampled_from(DTYPES), budget=st.integers(1, 40), extra=st.integers(0, 3), window=st.sampled_from([0, 7]),
    ties=st.booleans(), seed=st.integers(0, 2**16),
)
def test_compact_property(b, h, c, t, d, dtype, budget, extra, window, ties, seed):
    run_case(seed, b, h, c, t, d, dtype, budget, budget + extra, window, ties=ties)


def test_bad_inputs_are_rejected_with_the_values():
    k, pos = torch.randn(1, 2, 5, 16), torch.zeros(1, 2, 5, dtype=torch.long)
    keep = acc = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="need 1 <= budget <= capacity, got budget=4, capacity=3"):
        C.compact(k, k, pos, keep, acc, 4, 3)
    with pytest.raises(ValueError, match=r"pos \(1, 2, 4\)"):
        C.compact(k, k, pos[..., :4], keep, acc, 2, 2)
    with pytest.raises(ValueError, match="window must be >= 0, got -1"):
        C.compact(k, k, pos, keep, acc, 2, 2, -1)


def test_compact_compiles_to_ptx_sm90():
    sig = {"K": "*bf16", "V": "*bf16", "POS": "*i64", "KEEP": "*fp32", "ACC": "*fp32", "K_OUT": "*bf16",
           "V_OUT": "*bf16", "POS_OUT": "*i64", "ACC_OUT": "*fp32"}
    jobs = [("compact", "_compact", sig, dict(BLOCK_N=bn, BLOCK_D=C._block_d(bn, 128), HAS_WINDOW=w, ONE_BLOCK=one))
            for bn, w, one in [(4096, False, True), (1024, True, False)]]
    for text in kh.compile_ptx_sm90(jobs):
        assert ".target sm_90" in text and ".entry _compact(" in text and "bar.sync" in text
