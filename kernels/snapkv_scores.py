"""SnapKV's prefill scores in one pass: ``kvpass::score`` for SnapKV / PyramidKV when the store was empty.

Reference: ``kvpass.policies.snapkv.SnapKV.score`` at prefill (``N == n_new``), i.e.
``protect(pooled_prompt_scores(obs), recent_mask(pos, window))``: the observation window's summed
softmax weights ``obs [B, H_q, N]`` divided by the window length, pooled along the keys (``kernel_size``
centred, average counting the zero padding, or maximum), averaged over each GQA group, zero for the
window's own slots; the newest ``window`` positions are protected (``keep = +inf``). The eager code
runs ~8 kernels over ``[B, H, N]`` tensors; here one program per (batch, kv-head) row reads ``obs``
once per pooling tap and writes ``keep`` and ``acc`` (the statistic the store carries), which the
compaction kernel then ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning
from .attend_scores import _output, check_device

KERNEL = "snapkv_scores"

CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_N": (128, 256, 512, 1024),
    "num_warps": (2, 4, 8),
}


@triton.jit
def _snapkv_scores(
    OBS, POS, KEEP, ACC,
    sob, soh, son, spb, sph, spn,
    H_KV, N, m, n_recent, inv_window,
    GROUP: tl.constexpr, KERNEL_SIZE: tl.constexpr, MAX_POOL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H_KV
    hkv = pid % H_KV
    offs = tl.arange(0, BLOCK_N)
    pos_row = POS + b * spb + hkv * sph
    newest = tl.full([], -9223372036854775807, tl.int64)
    for start in range(0, N, BLOCK_N):
        p = tl.load(pos_row + (start + offs) * spn, mask=start + offs < N, other=-1)
        newest = tl.maximum(newest, tl.max(p, axis=0))
    pad = KERNEL_SIZE // 2
    for start in range(0, N, BLOCK_N):
        i = start + offs
        ok = i < N
        pooled = tl.zeros([BLOCK_N], tl.float32)
        for g in tl.static_range(GROUP):
            row = OBS + b * sob + (hkv * GROUP + g) * soh
            if MAX_POOL:
                v = tl.full([BLOCK_N], float("-inf"), tl.float32)
            else:
                v = tl.zeros([BLOCK_N], tl.float32)
            for o in tl.static_range(KERNEL_SIZE):
                j = i + (o - pad)
                inside = ok & (j >= 0) & (j < m)
                if MAX_POOL:
                    v = tl.maximum(v, tl.load(row + j * son, mask=inside, other=float("-inf")).to(tl.float32))
                else:
                    v += tl.load(row + j * son, mask=inside, other=0.0).to(tl.float32)
            if MAX_POOL:
                pooled += v
            else:
                pooled += v / KERNEL_SIZE
        acc = tl.where(i < m, pooled * inv_window / GROUP, 0.0)
        p = tl.load(pos_row + i * spn, mask=ok, other=-1)
        recent = (p > newest - n_recent) & (p >= 0)
        out = pid * N + i
        tl.store(KEEP + out, tl.where(recent, float("inf"), acc), mask=ok)
        tl.store(ACC + out, acc, mask=ok)


def shape_bucket(obs: torch.Tensor, n_kv: int) -> str:
    """Cache key of a call's shape: GQA group and slot count (power of two)."""
    return f"g{obs.shape[1] // n_kv}-n{tuning.bucket(obs.shape[2])}"


def default_config(n: int) -> dict[str, int]:
    block_n = min(1024, max(128, triton.next_power_of_2(n)))
    return {"BLOCK_N": block_n, "num_warps": 4 if block_n <= 512 else 8}


def configs_for(n: int) -> list[dict[str, int]]:
    top = max(128, triton.next_power_of_2(n))
    return [{"BLOCK_N": bn, "num_warps": w} for bn in CONFIG_SPACE["BLOCK_N"] if bn <= top
            for w in CONFIG_SPACE["num_warps"]]


def snapkv_scores(
    obs: torch.Tensor, pos: torch.Tensor, n_window: int, window: int, kernel_size: int, pooling: str, *,
    config: dict[str, int] | None = None, wrap: Callable | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SnapKV's prefill ``(keep, acc)`` ``[B, H_kv, N]`` float32 from ``obs [B, H_q, N]`` and ``pos [B, H_kv, N]``.

    ``n_window``: observed queries this forward (``obs`` sums their weights); ``window``: the policy's window
    (the newest ``window`` positions are protected); ``kernel_size`` (odd) and ``pooling`` (``"avg"``/``"max"``).
    ``out``: preallocated contiguous ``(keep, acc)``.
    """
    name = "kvpass.kernels.snapkv_scores"
    if obs.dim() != 3 or pos.dim() != 3 or obs.shape[0] != pos.shape[0] or obs.shape[2] != pos.shape[2] \
            or pos.shape[1] == 0 or obs.shape[1] % pos.shape[1]:
        raise ValueError(f"{name}: expected obs [B,H_q,N] and pos [B,H_kv,N] with H_q a multiple of H_kv; got obs "
                         f"{tuple(obs.shape)}, pos {tuple(pos.shape)}")
    if not 1 <= n_window <= obs.shape[2] or window < 1 or kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"{name}: need 1 <= n_window <= N={obs.shape[2]}, window >= 1 and an odd kernel_size >= 1; "
                         f"got n_window={n_window}, window={window}, kernel_size={kernel_size}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"{name}: pooling must be 'avg' or 'max', got {pooling!r}")
    if pos.dtype != torch.int64 or not obs.is_floating_point() or obs.device != pos.device:
        raise ValueError(f"{name}: need floating obs and int64 pos on one device; got obs {obs.dtype} on "
                         f"{obs.device}, pos {pos.dtype} on {pos.device}")
    check_device(obs.device)
    b, hkv, n = pos.shape
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(obs, hkv), obs.device) or default_config(n)
    out = out or (None, None)
    keep = _output(out[0], (b, hkv, n), torch.float32, obs.device, "keep")
    acc = _output(out[1], (b, hkv, n), torch.float32, obs.device, "acc")
    wrap = wrap or (lambda fn: fn)
    wrap(_snapkv_scores)[(b * hkv,)](
        obs, pos, keep, acc, *obs.stride(), *pos.stride(), hkv, n, n - n_window, window, 1.0 / n_window,
        GROUP=obs.shape[1] // hkv, KERNEL_SIZE=kernel_size, MAX_POOL=pooling == "max", BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"])
    return keep, acc


__all__ = ["CONFIG_SPACE", "KERNEL", "configs_for", "default_config", "shape_bucket", "snapkv_scores"]
