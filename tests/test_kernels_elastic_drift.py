"""kvpass.kernels.elastic_drift against kvpass.ops.dllm.elastic_attend_reference (Triton interpreter on CPU)."""

from __future__ import annotations

from unittest import mock

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpass.kernels import elastic_drift as E

from kvpass.ops.dllm import elastic_attend_reference

# output tolerance per dtype (the kernels accumulate in float32, then round once to the dtype)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# against the reference run in the low precision itself (softmax and cosine rounded at every step)
LOW = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make_args(seed: int, b: int, h: int, n: int, q_rows: int, d: int, t: int, w: int, dtype: torch.dtype,
              pad: int = 0, sharp: float = 1.0) -> tuple:
    """Op inputs as Elastic-Cache builds them: distinct canvas rows (``pad`` of them copies of the last real row,
    with identical q/k/v), tracked tokens among the rows, window slots indexing the rows, zero-weight padding.
    ``sharp`` scales the queries: sharp attention leaves keys that no head attends to (probabilities < 1e-8), where
    the reference's cosine across heads clamps its norms."""
    gen = torch.Generator().manual_seed(seed)
    real = q_rows - pad
    rows = torch.randperm(n, generator=gen)[:real]
    rows = torch.cat([rows, rows[-1:].expand(pad)])
    q, k, v = (torch.randn(b, h, q_rows, d, generator=gen) for _ in range(3))
    for x in (q, k, v):
        x[:, :, real:] = x[:, :, real - 1 : real]
    k_cache, v_cache, q_cache = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    q, q_cache = q * sharp, q_cache * sharp
    pick = lambda m: torch.randint(0, q_rows, (m,), generator=gen)  # noqa: E731
    track = rows[pick(t)]
    track_weight = (torch.rand(t, generator=gen) < 0.8).float()
    window = pick(w)
    window_weight = (torch.rand(w, generator=gen) < 0.8).float()
    excluded = torch.rand(n, generator=gen) < 0.3
    cast = lambda x: x.to(dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), rows, cast(k_cache), cast(v_cache), cast(q_cache), track, track_weight,
            window, window_weight, excluded)


def attention_before_after(args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The tracked tokens' attention probabilities ``[B, H, T, N]`` before and after, in float32."""
    q, k, _, rows, k_cache, _, q_cache, track = (x.float() if x.is_floating_point() else x for x in args[:8])
    scale = q.shape[-1] ** -0.5
    before = torch.softmax(q_cache[:, :, track] @ k_cache.transpose(-1, -2) * scale, -1)
    k_new, q_new = k_cache.index_copy(2, rows, k), q_cache.index_copy(2, rows, q)
    after = torch.softmax(q_new[:, :, track] @ k_new.transpose(-1, -2) * scale, -1)
    return before, after


def expected_cos(args: tuple) -> torch.Tensor:
    """Each (head, tracked token)'s cosine across the keys, in float32 (what ``sim[1]`` averages)."""
    return torch.nn.functional.cosine_similarity(*attention_before_after(args), dim=-1)


def expected_cos_heads(args: tuple) -> torch.Tensor:
    """Each tracked token's cosine across heads, averaged over the keys, in float32 (what ``sim[0]`` averages)."""
    return torch.nn.functional.cosine_similarity(*attention_before_after(args), dim=1).mean(-1)


def nan_scratch(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_case(args: tuple, config: dict | None = None) -> None:
    q, k_cache = args[0], args[4]
    dtype, (b, h, _, _), n, t = q.dtype, q.shape, k_cache.shape[2], args[7].shape[0]
    # poisoned outputs and scratch buffers: an element the kernels fail to write stays NaN and fails
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    score = torch.full((n,), float("nan"), dtype=dtype)
    cos = torch.full((b, h, t), float("nan"))
    cos_heads = torch.full((b, t), float("nan"))
    with mock.patch.object(E, "_scratch", nan_scratch):
        got = E.elastic_attend(*args, config=config, out=out, score=score, cos=cos if t else None,
                               cos_heads=cos_heads if t else None)
    assert got[0].data_ptr() == out.data_ptr() and got[5].data_ptr() == score.data_ptr()
    ref32 = elastic_attend_reference(*(x.float() if x.is_floating_point() else x for x in args))
    ref = elastic_attend_reference(*args)
    for g, r, r32, name in zip(got, ref, ref32, ("out", "k", "v", "q", "sim", "score"), strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if name in ("k", "v", "q"):  # the caches with the rows written: exact
            assert torch.equal(g, r), name
            continue
        torch.testing.assert_close(g.float(), r32, atol=TOL[dtype], rtol=TOL[dtype], msg=name)
        torch.testing.assert_close(g, r, atol=LOW[dtype], rtol=LOW[dtype], msg=name)
    if t:  # each tracked token's cosines, computed in float32 from the same inputs: tight for every dtype
        torch.testing.assert_close(cos, expected_cos(args), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cos_heads, expected_cos_heads(args), atol=1e-5, rtol=1e-5)


SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_GROUPS": 1, "num_warps": 4, "num_stages": 2}
GROUPS = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_GROUPS": 4, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize(
    ("b", "h", "n", "q_rows", "d", "t", "w", "dtype", "pad", "config"),
    [
        (1, 2, 40, 12, 16, 3, 5, torch.float32, 2, SMALL),  # a denoising step: key blocks, padded rows
        (2, 2, 20, 20, 16, 2, 4, torch.float32, 0, GROUPS),  # a refresh (every row), head-group partial scores
        (1, 3, 37, 18, 24, 4, 6, torch.float16, 3, SMALL),  # D not a power of two, two row blocks
        (1, 2, 24, 6, 32, 2, 3, torch.bfloat16, 0, None),  # default config
    ],
)
def test_elastic_matches_reference(b, h, n, q_rows, d, t, w, dtype, pad, config):
    for seed in range(2):  # fresh random inputs per case
        run_case(make_args(seed, b, h, n, q_rows, d, t, w, dtype, pad), config)


def test_drift_is_real_and_one_without_change():
    args = make_args(3, 1, 2, 30, 8, 16, 4, 3, torch.float32)
    cos = expected_cos(args)
    assert float(cos.min()) < 0.9 and float(expected_cos_heads(args).min()) < 0.9  # the test data drifts
    run_case(args, SMALL)
    # the rows' queries and keys equal the cached ones: nothing drifted, every cosine is 1
    q, k, v, rows, kc, vc, qc = args[:7]
    same = (qc[:, :, rows], kc[:, :, rows], vc[:, :, rows], *args[3:])
    cos, cos_heads = torch.empty(1, 2, 4), torch.empty(1, 4)
    sim = E.elastic_attend(*same, config=GROUPS, cos=cos, cos_heads=cos_heads)[4]
    torch.testing.assert_close(cos, torch.ones_like(cos))
    torch.testing.assert_close(cos_heads, torch.ones_like(cos_heads))
    torch.testing.assert_close(sim, torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharp_attention_clamps_the_heads_cosine_like_the_reference(dtype):
    """Keys no head attends to (probabilities < 1e-8 in every head): torch's cosine_similarity clamps each norm
    at 1e-8, so they count as cosine ~0 in the reference's statistic; the kernel does the same arithmetic."""
    args = make_args(7, 1, 2, 40, 8, 16, 3, 3, dtype, sharp=12.0)
    before, after = attention_before_after(args)
    assert float((before.norm(dim=1) < 1e-8).float().mean()) > 0.2    # the clamp matters on these inputs
    run_case(args, SMALL)


def test_strided_index_inputs():
    args = make_args(6, 1, 2, 20, 6, 16, 3, 4, torch.float32)
    strided = lambda x: torch.stack([x, x], dim=1)[:, 0]  # noqa: E731  (stride 2)
    run_case((*args[:7], *map(strided, args[7:])), SMALL)


def test_nothing_tracked_or_no_window():
    base = make_args(4, 1, 2, 18, 5, 16, 3, 2, torch.float32)
    untracked = (*base[:7], base[7][:0], base[8][:0], *base[9:])
    run_case(untracked, SMALL)
    assert torch.equal(E.elastic_attend(*untracked)[4], torch.ones(2))
    zero_weights = (*base[:8], torch.zeros(3), *base[9:])
    assert torch.equal(E.elastic_attend(*zero_weights)[4], torch.ones(2))
    no_window = (*base[:9], base[9][:0], base[10][:0], base[11])
    run_case(no_window, GROUPS)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), q_frac=st.floats(0.01, 1.0),
    d=st.sampled_from([8, 16, 24]), t=st.integers(0, 5), w=st.integers(0, 5), dtype=st.sampled_from(list(TOL)),
    pad=st.integers(0, 2), groups=st.sampled_from([1, 2, 4]), block_n=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_elastic_property(b, h, n, q_frac, d, t, w, dtype, pad, groups, block_n, seed):
    q_rows = max(1, min(n, 12, round(q_frac * n)))
    pad = min(pad, q_rows - 1)
    config = {"BLOCK_M": 16, "BLOCK_N": block_n, "HEAD_GROUPS": groups, "num_warps": 4, "num_stages": 2}
    run_case(make_args(seed, b, h, n, q_rows, d, t, w, dtype, pad), config)


def test_bad_inputs_are_rejected_with_the_values():
    args = list(make_args(5, 1, 2, 10, 4, 16, 2, 2, torch.float32))
    with pytest.raises(ValueError, match=r"must be equal and the caches"):
        E.elastic_attend(*args[:1], args[1][:, :1], *args[2:])
    with pytest.raises(ValueError, match=r"track must index \[0, 10\); got \[12\]"):
        E.elastic_attend(*args[:7], torch.tensor([12, 3]), *args[8:])
    with pytest.raises(ValueError, match=r"window must index \[0, 4\); got \[-1\]"):
        E.elastic_attend(*args[:9], torch.tensor([0, -1]), *args[10:])
    with pytest.raises(ValueError, match="excluded torch.int64"):
        E.elastic_attend(*args[:11], args[11].long())
    with pytest.raises(ValueError, match="share a dtype .* got \\['torch.float16', 'torch.float32'\\]"):
        E.elastic_attend(args[0].half(), *args[1:])


def test_default_configs_are_in_the_tune_space():
    for shape in [(1, 32, 64, 1024, 128), (1, 32, 1024, 1024, 128), (2, 2, 3, 10, 16), (1, 1, 1, 1, 8)]:
        cfg = E.default_config(*shape)
        assert all(cfg[key] in values for key, values in E.CONFIG_SPACE.items()), cfg
        assert cfg in E.configs_for(*shape)


def test_elastic_kernels_compile_to_ptx_sm90():
    jobs = []
    for dtype in ("fp16", "bf16", "fp32"):  # fp32: the shipped diffusion LM's dtype, exact (ieee) dots
        exact = dtype == "fp32"
        meta = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_FP32=exact, PRECISION="ieee" if exact else "tf32")
        fwd = {**{x: f"*{dtype}" for x in ("Q", "K", "V", "OUT")}, "LSE": "*fp32", "qk_scale": "fp32"}
        drift = {**{x: f"*{dtype}" for x in ("QC", "KC", "QN", "KN")}, "TRACK": "*i64", "COS": "*fp32",
                 "LSEB": "*fp32", "LSEA": "*fp32", "qk_scale": "fp32"}
        heads = {**{x: f"*{dtype}" for x in ("QC", "KC", "QN", "KN")}, "TRACK": "*i64", "LSEB": "*fp32",
                 "LSEA": "*fp32", "PART": "*fp32", "qk_scale": "fp32", "eps": "fp32"}
        groups = 4 if dtype == "bf16" else 1
        scores = {"Q": f"*{dtype}", "KN": f"*{dtype}", "LSE": "*fp32", "WIN": "*i64", "WW": "*fp32", "EXCL": "*u8",
                  "OUT": f"*{dtype}" if groups == 1 else "*fp32", "qk_scale": "fp32"}
        jobs += [("elastic_drift", "_elastic_fwd", fwd, meta),
                 ("elastic_drift", "_elastic_drift", drift, {**meta, "BLOCK_M": 16}),
                 ("elastic_drift", "_elastic_drift_heads", heads, {**meta, "BLOCK_M": 16}),
                 ("elastic_drift", "_elastic_scores", scores, {**meta, "BLOCK_M": 16, "HEAD_GROUPS": groups})]
    for (_, kernel, sig, _), text in zip(jobs, kh.compile_ptx_sm90(jobs), strict=True):
        assert ".target sm_90" in text and f".entry {kernel}(" in text
        if sig.get("Q", sig.get("QC")) != "*fp32":
            assert "mma" in text  # half-precision matmuls run on tensor cores
