"""kvpass.kernels.merge_parts and kvpass.kernels.attend_part against kvpass.ops' references (Triton interpreter on
CPU): the split-store pair, each kernel alone and one after the other."""

from __future__ import annotations

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from kvpass.kernels import attend_part as AP
from kvpass.kernels import merge_parts as MP

from kvpass.ops import attend_part_reference, merge_parts_reference

NEG_INF = float("-inf")
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # outputs: one rounding to the dtype
SMALL = {"BLOCK_M": 4, "BLOCK_DV": 16, "num_warps": 2}  # several row blocks and value blocks on tiny tensors


def random_parts(seed: int, p: int, b: int, h: int, t: int, dv: int, dtype: torch.dtype, p_empty: float = 0.3):
    """``(outs [P,B,H,T,D_v], lses [P,B,H,T])`` with some parts ``-inf`` for some rows (their outputs NaN: never
    read) and one row ``-inf`` in every part."""
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(p, b, h, t, dv, generator=gen)
    lses = torch.randn(p, b, h, t, generator=gen) * 4
    empty = torch.rand(p, b, h, t, generator=gen) < p_empty
    empty[:, 0, 0, 0] = True
    lses[empty] = NEG_INF
    outs[empty] = float("nan")
    return outs.to(dtype), lses


def check_merge(outs, lses, sinks=None, config=None) -> None:
    p, b, h, t, dv = outs.shape
    out = torch.full((b, h, t, dv), float("nan"), dtype=outs.dtype)  # poisoned: an unwritten element fails
    lse = torch.full((b, h, t), float("nan"))
    got_out, got_lse = MP.merge_parts(outs, lses, sinks, config=config, out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    ref_out, ref_lse = merge_parts_reference(outs, lses, sinks)
    assert got_out.dtype == outs.dtype and got_lse.dtype == torch.float32
    assert not got_out.isnan().any() and not got_lse.isnan().any()
    tol = TOL[outs.dtype]
    torch.testing.assert_close(got_out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, ref_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(("p", "b", "h", "t", "dv", "config"), [
    (1, 2, 3, 2, 16, None),  # one part: the identity (up to its -inf rows)
    (3, 2, 2, 3, 40, SMALL),  # several row and value blocks, D_v not a power of 2
    (4, 1, 4, 1, 64, None),  # decode: one query per head
])
def test_merge_matches_reference(dtype, p, b, h, t, dv, config):
    for seed in range(2):
        check_merge(*random_parts(seed, p, b, h, t, dv, dtype), config=config)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("sinks", ["head", "row"])
def test_merge_with_sinks_matches_reference(dtype, sinks):
    outs, lses = random_parts(3, 3, 2, 4, 3, 24, dtype)
    lses[:, 1, 2] = NEG_INF  # rows that saw nothing: lse is the sink's, the output stays 0
    gen = torch.Generator().manual_seed(3)
    sink = torch.randn(4, generator=gen) * 2 if sinks == "head" else torch.randn(2, 4, 1, generator=gen)
    check_merge(outs, lses, sink.to(dtype), config=SMALL)


def test_merge_reads_any_strides_and_all_minus_inf_rows():
    outs, lses = random_parts(4, 3, 2, 2, 5, 32, torch.float32)
    # parts interleaved in one buffer ([B, H, T, P, D_v] storage), lses transposed
    check_merge(outs.permute(1, 2, 3, 0, 4).contiguous().permute(3, 0, 1, 2, 4),
                lses.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0), config=SMALL)
    lses[:] = NEG_INF
    out, lse = MP.merge_parts(outs, lses)
    assert (out == 0).all() and (lse == NEG_INF).all()
    out, lse = MP.merge_parts(outs[:0], lses[:0], torch.ones(2))  # no parts: only the sink
    assert (out == 0).all() and (lse == 1).all()


def test_merge_rejects_bad_inputs_with_the_values():
    outs, lses = torch.randn(2, 1, 3, 4, 16), torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"lses \[P,B,H,T\]; got outs \(2, 1, 3, 4, 16\), lses \(2, 1, 3, 5\)"):
        MP.merge_parts(outs, torch.randn(2, 1, 3, 5))
    with pytest.raises(ValueError, match="lses must be float32, got torch.float16"):
        MP.merge_parts(outs, lses.half())
    with pytest.raises(ValueError, match=r"sinks must be \[H=3\] or broadcastable to \[B,H,T\]=\(1, 3, 4\); got \(4,"):
        MP.merge_parts(outs, lses, torch.randn(4))
    with pytest.raises(ValueError, match=r"output 'out' must be .* shape \(1, 3, 4, 16\)"):
        MP.merge_parts(outs, lses, out=torch.empty(1, 3, 4, 8))


def test_merge_default_configs_are_in_the_tune_space():
    for shape in [(2, 8 * 32 * 1, 128), (4, 1 * 8 * 4096, 64), (1, 3, 12), (3, 1, 512)]:
        cfg = MP.default_config(*shape)
        assert all(cfg[key] in values for key, values in MP.CONFIG_SPACE.items()), cfg
        assert MP.configs_for(*shape)


# ----------------------------------------------------------------------------------------------- attend_part

ATTEND_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TINY = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}


def attend_case(seed: int, b: int, hkv: int, group: int, t: int, n: int, d: int, dv: int, dtype: torch.dtype,
                shuffle: bool = True):
    """Queries at the last ``t`` of ``n`` positions (some padding, -1), slots with random empty ones, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    k_pos = torch.arange(n).expand(b, hkv, n).clone()
    k_pos[torch.rand(b, hkv, n, generator=gen) < 0.2] = -1
    if shuffle:
        k_pos = k_pos[:, :, torch.randperm(n, generator=gen)].contiguous()
    q_pos = torch.arange(n - t, n).expand(b, t).clone()
    q_pos[torch.rand(b, t, generator=gen) < 0.2] = -1
    return (torch.randn(b, hkv * group, t, d, generator=gen).to(dtype),
            torch.randn(b, hkv, n, d, generator=gen).to(dtype),
            torch.randn(b, hkv, n, dv, generator=gen).to(dtype), k_pos, q_pos)


def check_attend(args, scale: float, window: int = 0, softcap: float = 0.0, config=None) -> None:
    q, k, v, k_pos, q_pos = args
    b, hq, t, _ = q.shape
    out = torch.full((b, hq, t, v.shape[-1]), float("nan"), dtype=q.dtype)
    lse = torch.full((b, hq, t), float("nan"))
    got_out, got_lse = AP.attend_part(q, k, v, k_pos, q_pos, scale, window, softcap, config=config, out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    ref_out, ref_lse = attend_part_reference(q, k, v, k_pos, q_pos, scale, window, softcap)
    assert not got_out.isnan().any() and not got_lse.isnan().any()
    assert torch.equal(got_lse == NEG_INF, ref_lse == NEG_INF)
    tol = ATTEND_TOL[q.dtype]
    torch.testing.assert_close(got_out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, ref_lse, atol=2e-5, rtol=2e-5)  # float32 from the same inputs


@pytest.mark.parametrize(("b", "hkv", "group", "t", "n", "d", "dv", "dtype", "window", "softcap", "config"), [
    (2, 2, 2, 5, 37, 16, 16, torch.float32, 0, 0.0, TINY),  # block over a store: several key blocks
    (1, 2, 3, 1, 50, 32, 32, torch.float16, 0, 0.0, None),  # decode, GQA group 3
    (2, 1, 2, 20, 20, 24, 16, torch.bfloat16, 0, 0.0, TINY),  # prefill, several row blocks, D not a power of 2
    (1, 2, 2, 6, 30, 16, 24, torch.float32, 7, 0.0, TINY),  # sliding window, values wider than keys
    (2, 2, 1, 4, 25, 16, 16, torch.float16, 0, 0.5, TINY),  # soft cap (saturating)
])
def test_attend_part_matches_reference(b, hkv, group, t, n, d, dv, dtype, window, softcap, config):
    for seed in range(2):
        check_attend(attend_case(seed, b, hkv, group, t, n, d, dv, dtype), d**-0.5 if not softcap else 1.0, window,
                     softcap, config)


def test_attend_part_rows_that_see_nothing_and_empty_parts():
    q, k, v, k_pos, q_pos = attend_case(5, 2, 2, 2, 4, 9, 16, 16, torch.float32)
    k_pos[1] = -1  # batch row 1: an empty part
    check_attend((q, k, v, k_pos, q_pos), 0.25, config=TINY)
    out, lse = AP.attend_part(q, k[:, :, :0], v[:, :, :0], k_pos[:, :, :0], q_pos, 0.25)
    assert (out == 0).all() and (lse == NEG_INF).all()


def test_attend_part_rejects_bad_inputs_with_the_values():
    q, k, v, k_pos, q_pos = attend_case(0, 1, 2, 2, 2, 6, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"q_pos \[B,T\]\)"):
        AP.attend_part(q, k, v, k_pos, q_pos[:, :1], 0.25)
    with pytest.raises(ValueError, match="k_pos and q_pos must be int64, got torch.int64 and torch.int32"):
        AP.attend_part(q, k, v, k_pos, q_pos.int(), 0.25)
    with pytest.raises(ValueError, match="H_q=3 is not a multiple of H_kv=2"):
        AP.attend_part(q[:, :3], k, v, k_pos, q_pos, 0.25)


def test_attend_part_default_configs_are_in_the_tune_space():
    for shape in [(1, 8, 4, 1, 32768, 128), (2, 2, 7, 4096, 4096, 64), (1, 1, 1, 3, 10, 16)]:
        cfg = AP.default_config(*shape)
        assert all(cfg[key] in values for key, values in AP.CONFIG_SPACE.items()), cfg
        assert AP.configs_for(*shape)


def test_kernels_split_and_merge_to_full_attention():
    # the whole pipeline on kernels: each part attended where it lives, the parts merged, is one part's attention
    # over the whole store (the reference); sinks ride along in the merge
    q, k, v, k_pos, q_pos = attend_case(6, 2, 2, 2, 3, 40, 16, 16, torch.float32)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(6))
    parts = [AP.attend_part(q, k[:, :, lo:hi], v[:, :, lo:hi], k_pos[:, :, lo:hi], q_pos, 0.25, config=TINY)
             for lo, hi in [(0, 13), (13, 14), (14, 40)]]
    out, lse = MP.merge_parts(torch.stack([o for o, _ in parts]), torch.stack([s for _, s in parts]), sinks)
    whole = attend_part_reference(q, k, v, k_pos, q_pos, 0.25)
    ref_out, ref_lse = merge_parts_reference(whole[0][None], whole[1][None], sinks)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


PTRS = {"LSES": "*fp32", "LSE": "*fp32", "SINKS": "*fp32", "KPOS": "*i64", "QPOS": "*i64", "scale": "fp32",
        "softcap": "fp32"}


def test_kernels_compile_to_ptx_sm90():
    jobs = [
        ("merge_parts", "_merge_parts", {"OUTS": "*bf16", "OUT": "*bf16", **PTRS},
         dict(BLOCK_M=16, BLOCK_DV=128, HAS_SINKS=True)),
        ("attend_part", "_attend_part", {**{name: "*fp16" for name in ("Q", "K", "V", "OUT")}, **PTRS},
         dict(GROUP=4, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, HAS_WINDOW=True, DOT_FP32=False,
              PRECISION="tf32", HAS_SOFTCAP=True)),
    ]
    ptx = kh.compile_ptx_sm90(jobs)
    for (_, kernel, _, _), text in zip(jobs, ptx, strict=True):
        assert ".target sm_90" in text and f".entry {kernel}(" in text
    assert "mma" in ptx[1]  # attend_part's matmuls run on tensor cores
