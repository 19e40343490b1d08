"""kvpass.kernels.attend_scores against kvpass.ops.attend_reference (Triton interpreter on CPU)."""

from __future__ import annotations

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpass.kernels import attend_scores as A

from kvpass.ops import attend_reference
from kvpass.policies import make_policy

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (EpiCache's attention-op weights: its "forward" scores; its default context scores come from another op)
POLICIES = {"h2o": {}, "snapkv": {"window": 4}, "tova": {}, "streaming_llm": {},
            "epicache": {"window": 5, "scores": "forward"}}


def run_case(seed: int, b: int, hkv: int, group: int, t: int, c: int, d: int, dtype: torch.dtype, policy: str,
             window: int, config: dict | None = None, p_dead: float = 0.2, p_pad: float = 0.2,
             softcap: float = 0.0, sinks: str | None = None, dv: int | None = None) -> None:
    """``sinks``: None, ``"head"`` (one learned logit per query head, GPT-OSS) or ``"row"`` (one per query row);
    ``dv``: value width (MLA: narrower than the keys')."""
    gen = torch.Generator().manual_seed(seed)
    n = c + t
    q = torch.randn(b, hkv * group, t, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, n, dv or d, generator=gen).to(dtype)
    sink = {None: None, "head": lambda: torch.randn(1, hkv * group, 1, generator=gen) * 2,
            "row": lambda: torch.randn(b, hkv * group, t, generator=gen)}[sinks]
    sink = sink() if sink else None
    pos = kh.random_pos(gen, b, hkv, c, t, p_dead, p_pad)
    rule = make_policy(policy, **POLICIES[policy])
    n_obs = rule.n_obs(t) if rule.needs_obs else 0
    scale = d**-0.5 if not softcap else 1.0
    # poisoned outputs: an element the kernels fail to write stays NaN and fails the comparison
    out = torch.full((b, hkv * group, t, dv or d), float("nan"), dtype=dtype)
    obs = torch.full((b, hkv * group, n), float("nan")) if n_obs else None
    got_out, got_obs = A.attend_scores(q, k, v, pos, scale, n_obs, window, config=config, out=out, obs=obs,
                                       obs_reduce=getattr(rule, "obs_reduce", "sum"), softcap=softcap, sinks=sink)
    ref_out, ref_obs = attend_reference(q, k, v, pos, scale, rule.spec(), window, softcap, sink)
    assert got_out.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got_out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert got_obs.shape == ref_obs.shape and got_obs.dtype == torch.float32
    # obs is computed in float32 from the same inputs as the reference: tight for every dtype
    torch.testing.assert_close(got_obs, ref_obs, atol=1e-5, rtol=1e-5)


SPLIT = {"BLOCK_M": 16, "BLOCK_N": 16, "SPLITS": 4, "num_warps": 4, "num_stages": 2}
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "SPLITS": 1, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize(
    ("b", "hkv", "group", "t", "c", "d", "dtype", "policy", "window", "config"),
    [
        (2, 2, 2, 9, 23, 16, torch.float32, "h2o", 0, None),  # block prefill over a store, all queries observed
        (1, 2, 3, 20, 0, 32, torch.float32, "snapkv", 0, SMALL),  # first prefill, several query/key blocks
        (2, 1, 4, 1, 60, 16, torch.float16, "tova", 0, SPLIT),  # decode, split-K
        (1, 2, 2, 3, 45, 24, torch.bfloat16, "h2o", 0, SPLIT),  # few queries, split-K, D not a power of 2
        (2, 2, 1, 12, 10, 16, torch.float16, "snapkv", 7, SMALL),  # sliding window, MHA
        (1, 1, 2, 6, 8, 64, torch.bfloat16, "streaming_llm", 0, None),  # policy that reads no weights
        (2, 2, 2, 11, 9, 16, torch.float32, "epicache", 0, SMALL),  # max (not sum) over observed queries
    ],
)
def test_attend_matches_reference(b, hkv, group, t, c, d, dtype, policy, window, config):
    for seed in range(2):  # fresh random inputs per case
        run_case(seed, b, hkv, group, t, c, d, dtype, policy, window, config)


@pytest.mark.parametrize(("t", "c", "dtype", "config"), [
    (9, 23, torch.float32, SMALL),  # block over a store: the forward and the observed-weights kernel
    (1, 60, torch.float16, SPLIT),  # decode, split-K
])
def test_attend_with_a_logit_soft_cap_matches_reference(t, c, dtype, config):
    # cap 0.5 on logits of size ~4 (scale 1 with D 16): the tanh saturates, so a kernel without the cap fails
    for seed in range(2):
        run_case(seed, 2, 2, 2, t, c, 16, dtype, "h2o", 0, config, softcap=0.5)


@pytest.mark.parametrize(("t", "c", "dtype", "config", "sinks"), [
    (9, 23, torch.float32, SMALL, "head"),  # block over a store: the forward and the observed-weights kernel
    (1, 60, torch.float16, SPLIT, "head"),  # decode, split-K: the sink joins the merged rows
    (7, 5, torch.float32, None, "row"),  # one sink per query row, padding rows (no sink) included
])
def test_attend_with_attention_sinks_matches_reference(t, c, dtype, config, sinks):
    for seed in range(2):
        run_case(seed, 2, 2, 2, t, c, 16, dtype, "h2o", 0, config, p_pad=0.3, sinks=sinks)


@pytest.mark.parametrize(("t", "c", "d", "dv", "config"), [
    (6, 10, 24, 16, SMALL),  # MLA-like: keys of 24 dims, values of 16
    (1, 40, 32, 20, SPLIT),  # decode, split-K, values not a power of 2
    (3, 4, 16, 32, None),  # values wider than keys
])
def test_attend_with_values_of_another_width_matches_reference(t, c, d, dv, config):
    run_case(5, 2, 1, 4, t, c, d, torch.float32, "snapkv", 0, config, dv=dv)


def test_queries_that_see_nothing_attend_to_themselves():
    # empty store and mostly-padding new tokens: left-padding queries have no visible key at all
    run_case(3, 2, 2, 2, 8, 6, 16, torch.float32, "h2o", 0, p_dead=1.0, p_pad=0.6)
    run_case(4, 1, 2, 2, 8, 6, 16, torch.float16, "tova", 3, SPLIT, p_dead=1.0, p_pad=0.6)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), t=st.integers(1, 12),
    c=st.integers(0, 30), d=st.sampled_from([16, 20, 32]), dtype=st.sampled_from(list(TOL)),
    policy=st.sampled_from(sorted(POLICIES)), window=st.sampled_from([0, 5]), split=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attend_property(b, hkv, group, t, c, d, dtype, policy, window, split, seed):
    run_case(seed, b, hkv, group, t, c, d, dtype, policy, window, SPLIT if split else None)


def test_bad_inputs_are_rejected_with_the_values():
    q, k, pos = torch.randn(1, 3, 2, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="H_q=3 is not a multiple of H_kv=2"):
        A.attend_scores(q, k, k, pos, 0.25, 1)
    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(ValueError, match=r"n_obs must be in \[0, T=2\], got 3"):
        A.attend_scores(q, k, k, pos, 0.25, 3)
    with pytest.raises(ValueError, match="pos must be int64, got torch.int32"):
        A.attend_scores(q, k, k, pos.int(), 0.25, 1)
    with pytest.raises(ValueError, match=r"output 'out' must be .* shape \(1, 2, 2, 16\)"):
        A.attend_scores(q, k, k, pos, 0.25, 1, out=torch.empty(1, 2, 3, 16))


def test_default_configs_are_in_the_tune_space():
    for shape in [(1, 8, 4, 1, 32768, 128), (2, 2, 7, 4096, 4096, 64), (1, 1, 1, 3, 10, 16)]:
        cfg = A.default_config(*shape)
        assert all(cfg[key] in values for key, values in A.CONFIG_SPACE.items()), cfg
        assert A.configs_for(*shape)


PTRS = {"POS": "*i64", "SINKS": "*fp32", "LSE": "*fp32", "PART_O": "*fp32", "PART_M": "*fp32", "PART_L": "*fp32",
        "OBS": "*fp32", "qk_scale": "fp32"}


def test_attend_kernels_compile_to_ptx_sm90():
    jobs = []
    for dtype, splits, window, sinks in [("fp16", 1, True, False), ("bf16", 4, False, True)]:
        sig = {**{name: f"*{dtype}" for name in ("Q", "K", "V", "OUT")}, **PTRS}
        meta = dict(GROUP=4, BLOCK_N=64, BLOCK_D=128, HAS_WINDOW=window, DOT_FP32=False, PRECISION="tf32",
                    HAS_SOFTCAP=False)
        jobs.append(("attend_scores", "_attend_fwd", sig,
                     {**meta, "BLOCK_M": 64, "SPLITS": splits, "BLOCK_DV": 128 if window else 64, "HAS_SINKS": sinks}))
        jobs.append(("attend_scores", "_attend_obs", sig, {**meta, "BLOCK_M": 16, "OBS_MAX": splits > 1}))
    jobs.append(("attend_scores", "_attend_combine", sig,
                 dict(GROUP=4, BLOCK_M=16, BLOCK_DV=128, SPLITS=4, HAS_SINKS=True)))
    ptx = kh.compile_ptx_sm90(jobs)
    for (_, kernel, _, _), text in zip(jobs, ptx, strict=True):
        assert ".target sm_90" in text and f".entry {kernel}(" in text
        if kernel != "_attend_combine":
            assert "mma" in text  # the matmuls run on tensor cores
