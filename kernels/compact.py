"""Selection + compaction of the KV store: ``kvpass::compact`` (reference: ``kvpass.ops.compact_reference``).

One program per (batch, kv-head) row of ``N`` candidate slots:

1. rank = the policy's ``keep`` score, with dead slots (``pos < 0``, or with a sliding ``window`` too far
   behind the newest token) forced to ``-inf``; each rank is mapped to an int32 with the same order;
2. the ``budget``-th largest rank is found exactly by bisection on those ints (32 counting passes over
   the row: no sort, no ``[N, N]`` comparisons);
3. one ordered pass keeps every slot above the threshold plus the first ties (lowest slot first, like a
   stable sort), and writes each kept slot's K/V row, position and statistic to its output slot, the
   running count of kept slots before it, so the store stays in slot order;
4. slots from ``budget`` up to ``capacity`` are written empty (``pos = -1``, zero K/V and statistic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning
from .attend_scores import _output, check_device

KERNEL = "compact"

CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_N": (64, 128, 256, 512, 1024, 2048, 4096),
    "num_warps": (2, 4, 8),
}


@triton.jit
def _rank_key(keep, dead):
    """int32 with the order of the float32 rank (``-inf`` for dead slots)."""
    r = tl.where(dead, float("-inf"), tl.where(keep == 0.0, 0.0, keep))  # -0.0 ties with +0.0
    bits = r.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _dead(pos, limit, HAS_WINDOW: tl.constexpr):
    d = pos < 0
    if HAS_WINDOW:
        d = d | (pos <= limit)
    return d


@triton.jit
def _keys(pos_row, keep_row, idx, ok, spn, srn, limit, HAS_WINDOW: tl.constexpr):
    p = tl.load(pos_row + idx * spn, mask=ok, other=-1)
    r = tl.load(keep_row + idx * srn, mask=ok, other=0.0).to(tl.float32)
    return _rank_key(r, _dead(p, limit, HAS_WINDOW)).to(tl.int64)


@triton.jit
def _compact(
    # inputs
    K, V, POS, KEEP, ACC,
    # outputs (contiguous [B, H, capacity, D] (values: D_v) / [B, H, capacity])
    K_OUT, V_OUT, POS_OUT, ACC_OUT,
    # strides
    skb, skh, skn, skd, svb, svh, svn, svd, spb, sph, spn, srb, srh, srn, sab, sah, san,
    # sizes
    H, N, D, DV, n_keep, capacity, window,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    pos_row = POS + b * spb + h * sph
    keep_row = KEEP + b * srb + h * srh
    offs = tl.arange(0, BLOCK_N)

    limit = tl.full([], -1, tl.int64)
    if HAS_WINDOW:  # tokens window - 1 or more behind the newest are invisible to every future query
        newest = tl.full([], -1, tl.int64)
        for start in range(0, N, BLOCK_N):
            p = tl.load(pos_row + (start + offs) * spn, mask=start + offs < N, other=-1)
            newest = tl.maximum(newest, tl.max(p, axis=0))
        limit = newest - (window - 1)

    # largest threshold t with count(rank >= t) >= n_keep, bisected over the int32 order keys
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    if ONE_BLOCK:  # the whole row fits in one block: load it once, bisect in registers
        ok = offs < N
        key = _keys(pos_row, keep_row, offs, ok, spn, srn, limit, HAS_WINDOW)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            take = tl.sum(((key >= mid) & ok).to(tl.int32), axis=0) >= n_keep
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
        above = tl.sum(((key > lo) & ok).to(tl.int32), axis=0)
    else:
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            count = tl.zeros([], tl.int32)
            for start in range(0, N, BLOCK_N):
                idx = start + offs
                ok = idx < N
                key = _keys(pos_row, keep_row, idx, ok, spn, srn, limit, HAS_WINDOW)
                count += tl.sum(((key >= mid) & ok).to(tl.int32), axis=0)
            take = count >= n_keep
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
        above = tl.zeros([], tl.int32)
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            ok = idx < N
            key = _keys(pos_row, keep_row, idx, ok, spn, srn, limit, HAS_WINDOW)
            above += tl.sum(((key > lo) & ok).to(tl.int32), axis=0)
    thr = lo
    ties_wanted = n_keep - above

    # ordered gather: kept slot j goes to output slot (number of kept slots before j)
    kept_before = tl.zeros([], tl.int32)
    ties_before = tl.zeros([], tl.int32)
    dd = tl.arange(0, BLOCK_D)
    for start in range(0, N, BLOCK_N):
        idx = start + offs
        ok = idx < N
        p = tl.load(pos_row + idx * spn, mask=ok, other=-1)
        r = tl.load(keep_row + idx * srn, mask=ok, other=0.0).to(tl.float32)
        dead = _dead(p, limit, HAS_WINDOW)
        key = _rank_key(r, dead).to(tl.int64)
        tie = ((key == thr) & ok).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        kept = ok & ((key > thr) | ((tie == 1) & (tie_rank < ties_wanted)))
        kept_i = kept.to(tl.int32)
        slot = kept_before + tl.cumsum(kept_i, axis=0) - kept_i
        out_row = pid * capacity + slot
        a = tl.load(ACC + b * sab + h * sah + idx * san, mask=kept, other=0.0)
        # in-place use: every thread reads this block before any writes into it (slots only move down)
        tl.debug_barrier()
        tl.store(POS_OUT + out_row, tl.where(dead, -1, p), mask=kept)
        tl.store(ACC_OUT + out_row, a, mask=kept)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dd
            m = kept[:, None] & (cols < D)[None, :]
            kv = tl.load(K + b * skb + h * skh + idx[:, None] * skn + cols[None, :] * skd, mask=m)
            tl.debug_barrier()
            tl.store(K_OUT + out_row[:, None] * D + cols[None, :], kv, mask=m)
        for d0 in range(0, DV, BLOCK_D):  # (values may be narrower than keys: MLA)
            cols = d0 + dd
            m = kept[:, None] & (cols < DV)[None, :]
            vv = tl.load(V + b * svb + h * svh + idx[:, None] * svn + cols[None, :] * svd, mask=m)
            tl.debug_barrier()
            tl.store(V_OUT + out_row[:, None] * DV + cols[None, :], vv, mask=m)
        kept_before += tl.sum(kept_i, axis=0)
        ties_before += tl.sum(tie, axis=0)

    # empty slots after the kept ones
    tl.debug_barrier()
    for start in range(n_keep, capacity, BLOCK_N):
        slot = start + offs
        ok = slot < capacity
        out_row = pid * capacity + slot
        tl.store(POS_OUT + out_row, tl.full([BLOCK_N], -1, tl.int64), mask=ok)
        tl.store(ACC_OUT + out_row, tl.zeros([BLOCK_N], tl.float32), mask=ok)
        zero = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dd
            m = ok[:, None] & (cols < D)[None, :]
            tl.store(K_OUT + out_row[:, None] * D + cols[None, :], zero.to(K_OUT.dtype.element_ty), mask=m)
        for d0 in range(0, DV, BLOCK_D):
            cols = d0 + dd
            m = ok[:, None] & (cols < DV)[None, :]
            tl.store(V_OUT + out_row[:, None] * DV + cols[None, :], zero.to(V_OUT.dtype.element_ty), mask=m)


def shape_bucket(k: torch.Tensor, capacity: int) -> str:
    """Cache key of a call's shape: head dim, candidate slots and capacity (powers of two), dtype."""
    return (f"d{k.shape[-1]}-n{tuning.bucket(k.shape[2])}-c{tuning.bucket(capacity)}"
            f"-{str(k.dtype).removeprefix('torch.')}")


def default_config(n: int, d: int) -> dict[str, int]:
    # rows up to 4096 slots (decode at a 2K-4K budget) fit one block: bisection runs in registers
    block_n = max(64, triton.next_power_of_2(n)) if n <= 4096 else 1024
    return {"BLOCK_N": block_n, "num_warps": 4 if block_n <= 512 else 8}


def configs_for(n: int, d: int) -> list[dict[str, int]]:
    top = max(64, triton.next_power_of_2(n))
    return [{"BLOCK_N": bn, "num_warps": w} for bn in CONFIG_SPACE["BLOCK_N"] if bn <= top
            for w in CONFIG_SPACE["num_warps"]]


def _block_d(block_n: int, d: int) -> int:
    return max(16, min(triton.next_power_of_2(d), 8192 // block_n))


def compact(
    k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, acc: torch.Tensor,
    budget: int, capacity: int, window: int = 0, *, config: dict[str, int] | None = None, wrap: Callable | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kvpass::compact``: returns ``(k, v, pos, acc)`` of the store, ``capacity`` slots each.

    ``out``: the store's own buffers ``(k, v, pos, acc)`` to write into. They may alias the inputs (compaction
    in place): a kept slot only ever moves to a lower or equal index, and each block is read before it is written.
    """
    if k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3] or pos.shape != k.shape[:3] \
            or keep.shape != pos.shape or acc.shape != pos.shape:
        raise ValueError(f"kvpass.kernels.compact: expected k [B,H,N,D], v [B,H,N,D_v] and pos/keep/acc [B,H,N]; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}, pos {tuple(pos.shape)}, keep {tuple(keep.shape)}, "
                         f"acc {tuple(acc.shape)}")
    if budget < 1 or capacity < budget:
        raise ValueError(f"kvpass.kernels.compact: need 1 <= budget <= capacity, got budget={budget}, "
                         f"capacity={capacity}")
    if window < 0:
        raise ValueError(f"kvpass.kernels.compact: window must be >= 0, got {window}")
    if pos.dtype != torch.int64 or acc.dtype != torch.float32 or v.dtype != k.dtype:
        raise ValueError(f"kvpass.kernels.compact: need int64 pos, float32 acc and one K/V dtype; got pos {pos.dtype}, "
                         f"acc {acc.dtype}, k {k.dtype}, v {v.dtype}")
    check_device(k.device)
    b, h, n, d = k.shape
    dv = v.shape[3]
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(k, capacity), k.device) or default_config(n, d)
    keep = keep.float()
    if out is None:
        out = (None, None, None, None)
    k_out = _output(out[0], (b, h, capacity, d), k.dtype, k.device, "k")
    v_out = _output(out[1], (b, h, capacity, dv), k.dtype, k.device, "v")
    pos_out = _output(out[2], (b, h, capacity), torch.int64, k.device, "pos")
    acc_out = _output(out[3], (b, h, capacity), torch.float32, k.device, "acc")
    wrap = wrap or (lambda fn: fn)
    wrap(_compact)[(b * h,)](
        k, v, pos, keep, acc, k_out, v_out, pos_out, acc_out,
        *k.stride(), *v.stride(), *pos.stride(), *keep.stride(), *acc.stride(),
        h, n, d, dv, min(budget, n), capacity, window,
        BLOCK_N=config["BLOCK_N"], BLOCK_D=_block_d(config["BLOCK_N"], max(d, dv)), HAS_WINDOW=window > 0,
        ONE_BLOCK=n <= config["BLOCK_N"],
        num_warps=config["num_warps"])
    return k_out, v_out, pos_out, acc_out


__all__ = ["CONFIG_SPACE", "KERNEL", "compact", "configs_for", "default_config", "shape_bucket"]
