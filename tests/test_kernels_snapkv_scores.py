"""kvpass.kernels.snapkv_scores against SnapKV's prefill scoring (kvpass.ops.score_reference), in the interpreter."""

from __future__ import annotations

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpass.kernels import snapkv_scores as S

from kvpass.ops import score_reference
from kvpass.policies import make_policy


def run_case(seed: int, b: int, hkv: int, group: int, n: int, policy: str, window: int, kernel_size: int,
             pooling: str, config: dict | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    rule = make_policy(policy, window=window, kernel_size=kernel_size, pooling=pooling)
    n_window = rule.n_obs(n)
    obs = torch.rand(b, hkv * group, n, generator=gen) * n_window  # window-summed softmax weights
    pos = kh.random_pos(gen, b, hkv, 0, n)  # a prefill: every slot is a new token, some are padding
    keys = torch.empty(b, hkv, n, 4)
    out = (torch.full(pos.shape, float("nan")), torch.full(pos.shape, float("nan")))
    keep, acc = S.snapkv_scores(obs, pos, n_window, window, kernel_size, pooling, config=config, out=out)
    assert keep.data_ptr() == out[0].data_ptr() and acc.data_ptr() == out[1].data_ptr()
    ref_keep, ref_acc = score_reference(rule.spec(), obs, keys, pos, torch.zeros(pos.shape), n, n)
    torch.testing.assert_close(acc, ref_acc, atol=1e-6, rtol=1e-5)
    assert torch.equal(keep == float("inf"), ref_keep == float("inf"))  # the same protected slots
    torch.testing.assert_close(keep, ref_keep, atol=1e-6, rtol=1e-5)


SMALL = {"BLOCK_N": 16, "num_warps": 4}


@pytest.mark.parametrize(
    ("b", "hkv", "group", "n", "policy", "window", "kernel_size", "pooling", "config"),
    [
        (2, 2, 3, 40, "snapkv", 6, 5, "avg", SMALL),  # GQA, several blocks per row
        (1, 2, 1, 33, "pyramidkv", 4, 7, "max", SMALL),  # max pooling, MHA
        (1, 1, 2, 5, "snapkv", 8, 3, "avg", None),  # the window covers the whole prompt: all protected
        (2, 1, 4, 70, "snapkv", 16, 1, "max", None),  # no pooling (kernel 1), default config
    ],
)
def test_snapkv_scores_match_reference(b, hkv, group, n, policy, window, kernel_size, pooling, config):
    for seed in range(2):
        run_case(seed, b, hkv, group, n, policy, window, kernel_size, pooling, config)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), n=st.integers(1, 50),
       window=st.integers(1, 12), kernel_size=st.sampled_from([1, 3, 5, 7]), pooling=st.sampled_from(["avg", "max"]),
       block=st.sampled_from([16, 64]), seed=st.integers(0, 2**16))
def test_snapkv_scores_property(b, hkv, group, n, window, kernel_size, pooling, block, seed):
    run_case(seed, b, hkv, group, n, "snapkv", window, kernel_size, pooling, {"BLOCK_N": block, "num_warps": 4})


def test_bad_inputs_are_rejected_with_the_values():
    obs, pos = torch.rand(1, 3, 8), torch.zeros(1, 2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"H_q a multiple of H_kv; got obs \(1, 3, 8\), pos \(1, 2, 8\)"):
        S.snapkv_scores(obs, pos, 2, 2, 3, "avg")
    with pytest.raises(ValueError, match="odd kernel_size >= 1; got n_window=2, window=2, kernel_size=4"):
        S.snapkv_scores(obs[:, :2], pos, 2, 2, 4, "avg")
    with pytest.raises(ValueError, match="pooling must be 'avg' or 'max', got 'mean'"):
        S.snapkv_scores(obs[:, :2], pos, 2, 2, 3, "mean")


def test_snapkv_scores_compile_to_ptx_sm90():
    sig = {"OBS": "*fp32", "POS": "*i64", "KEEP": "*fp32", "ACC": "*fp32", "inv_window": "fp32"}
    jobs = [("snapkv_scores", "_snapkv_scores", sig, dict(GROUP=g, KERNEL_SIZE=7, MAX_POOL=mx, BLOCK_N=1024))
            for g, mx in [(4, False), (1, True)]]
    for text in kh.compile_ptx_sm90(jobs):
        assert ".target sm_90" in text and ".entry _snapkv_scores(" in text
