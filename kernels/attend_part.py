"""Attention over one part of a split KV store: ``kvpass::attend_part`` (reference:
``kvpass.ops.attend_part_reference``).

Returns each query row's output, normalized within the part, and its natural log-sum-exp, which
``kvpass.kernels.merge_parts`` (or any later merge: a ring pass, a gather across ranks) combines exactly.

``_attend_part`` is flash-attention style (online softmax, no query x key matrix in memory): each program owns
``BLOCK_M`` query rows of one (batch, kv-head), GQA folded into the rows (row ``r`` is query ``r // GROUP`` of
query head ``kv_head * GROUP + r % GROUP``), so K/V are read once per group. It walks the part's ``N`` slots in
blocks of ``BLOCK_N`` with a running max, sum and unnormalized output. Visibility is by position, not slot index
(a part may hold any subset of a store, in any order): a query at ``q_pos`` sees slots with
``0 <= k_pos <= q_pos`` (and ``q_pos - k_pos < window`` with a sliding window). Logits are scaled, then
soft-capped (Gemma-2: ``softcap * tanh(logit / softcap)``) when asked. A row that sees nothing gets a zero output
and ``lse = -inf``. Values may be narrower or wider than keys (MLA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning
from .attend_scores import _output, check_device

KERNEL = "attend_part"

# Config space searched by `kvpass tune` (filtered per shape by `configs_for`).
CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (16, 32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3),
}


@triton.jit
def _part_logits(dot, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Natural-log logits of a q.k block: ``dot * scale``, soft-capped to ``softcap * tanh(dot * scale / softcap)``."""
    x = dot * scale
    if HAS_SOFTCAP:
        y = x / softcap
        return softcap * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))  # tanh(y), saturating without inf - inf
    return x


@triton.jit
def _attend_part(
    # inputs
    Q, K, V, KPOS, QPOS,
    # outputs
    OUT, LSE,
    # strides
    sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, spb, sph, spn, sxb, sxt, sob, soh, sot, sod,
    # sizes and scalars
    H_KV, T, N, D, DV, window, scale, softcap,
    # meta
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * GROUP
    qi = rows // GROUP
    hq = hkv * GROUP + rows % GROUP
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    ddv = tl.arange(0, BLOCK_DV)
    dv_ok = ddv < DV
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + qi[:, None] * sqt + dd[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = tl.load(QPOS + b * sxb + qi * sxt, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kt = tl.load(K + b * skb + hkv * skh + cols[None, :] * skn + dd[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(V + b * svb + hkv * svh + cols[:, None] * svn + ddv[None, :] * svd,
                     mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        kpos = tl.load(KPOS + b * spb + hkv * sph + cols * spn, mask=col_ok, other=-1)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        s = _part_logits(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        ok = (kpos[None, :] >= 0) & (kpos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            ok = ok & (q_pos[:, None] - kpos[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new

    empty = m_i == float("-inf")
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    tl.store(OUT + b * sob + hq[:, None] * soh + qi[:, None] * sot + ddv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(LSE + (b * H_KV * GROUP + hq) * T + qi, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- launch

def shape_bucket(q: torch.Tensor, k: torch.Tensor) -> str:
    """Cache key of a call's shape: head dim, GQA group, query and key counts (powers of two), dtype."""
    _, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    return f"d{d}-g{hq // hkv}-t{tuning.bucket(t)}-n{tuning.bucket(n)}-{str(q.dtype).removeprefix('torch.')}"


def default_config(batch: int, h_kv: int, group: int, t: int, n: int, d: int) -> dict[str, int]:
    """Heuristic launch config (used when the tune cache has no entry for the shape)."""
    rows = t * group
    block_m = min(128 if d <= 64 else 64, max(16, triton.next_power_of_2(rows)))
    block_n = min(64 if d <= 128 else 32, max(16, triton.next_power_of_2(n)))
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 2}


def configs_for(batch: int, h_kv: int, group: int, t: int, n: int, d: int) -> list[dict[str, int]]:
    """The configs of :data:`CONFIG_SPACE` worth timing for this shape (no oversized blocks)."""
    rows = t * group
    out = []
    for bm in CONFIG_SPACE["BLOCK_M"]:
        if bm > max(16, triton.next_power_of_2(rows)):
            continue
        for bn in CONFIG_SPACE["BLOCK_N"]:
            if bn > max(16, triton.next_power_of_2(n)):
                continue
            for w in CONFIG_SPACE["num_warps"]:
                for st in CONFIG_SPACE["num_stages"]:
                    out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st})
    return out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, q_pos: torch.Tensor,
           window: int, softcap: float) -> None:
    name = "kvpass.kernels.attend_part"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k_pos.dim() != 3 or q_pos.dim() != 2:
        raise ValueError(f"{name}: expected q [B,H_q,T,D], k [B,H_kv,N,D], v [B,H_kv,N,D_v], k_pos [B,H_kv,N], "
                         f"q_pos [B,T]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_pos {tuple(k_pos.shape)}, q_pos {tuple(q_pos.shape)}")
    b, hq, t, d = q.shape
    _, hkv, n, _ = k.shape
    if (k.shape != (b, hkv, n, d) or v.shape[:3] != k.shape[:3] or k_pos.shape != (b, hkv, n)
            or q_pos.shape != (b, t)):
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_pos {tuple(k_pos.shape)}, q_pos {tuple(q_pos.shape)} (k must be [B,H_kv,N,D] with q's "
                         "B and D, v [B,H_kv,N,D_v], k_pos [B,H_kv,N], q_pos [B,T])")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{name}: H_q={hq} is not a multiple of H_kv={hkv}")
    if window < 0:
        raise ValueError(f"{name}: window must be >= 0, got {window}")
    if not softcap >= 0:
        raise ValueError(f"{name}: softcap must be >= 0 (0: none), got {softcap!r}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q/k/v must share a dtype among float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k_pos.dtype != torch.int64 or q_pos.dtype != torch.int64:
        raise ValueError(f"{name}: k_pos and q_pos must be int64, got {k_pos.dtype} and {q_pos.dtype}")
    devices = {x.device for x in (q, k, v, k_pos, q_pos)}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")
    check_device(q.device)


def attend_part(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, q_pos: torch.Tensor, scale: float,
    window: int = 0, softcap: float = 0.0, *, config: dict[str, int] | None = None, wrap: Callable | None = None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvpass::attend_part``: ``(out [B,H_q,T,D_v] in q's dtype, lse [B,H_q,T] float32)`` of the queries over
    one part of a store (see the module doc).

    ``config``: launch config (default: the tune cache, else :func:`default_config`); ``wrap``: applied to the
    kernel before launch (``torch.library.wrap_triton`` inside a ``triton_op``); ``out``/``lse``: preallocated
    contiguous outputs to write into.
    """
    _check(q, k, v, k_pos, q_pos, window, softcap)
    b, hq, t, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    out = _output(out, (b, hq, t, dv), q.dtype, q.device, "out")
    lse = _output(lse, (b, hq, t), torch.float32, q.device, "lse")
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if n == 0:  # an empty part: nothing to read (an empty tensor may have no storage)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(q, k), q.device) or default_config(b, hkv, group, t, n, d)
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    dot_fp32 = tuning.interpreting() or q.dtype == torch.float32
    strides = (*q.stride(), *k.stride(), *v.stride(), *k_pos.stride(), *q_pos.stride(), *out.stride())
    (wrap or (lambda fn: fn))(_attend_part)[(triton.cdiv(t * group, bm), b * hkv)](
        q, k, v, k_pos, q_pos, out, lse, *strides, hkv, t, n, d, dv, window, float(scale), float(softcap),
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), HAS_WINDOW=window > 0, DOT_FP32=dot_fp32,
        PRECISION="ieee" if dot_fp32 else "tf32", HAS_SOFTCAP=softcap > 0, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return out, lse


__all__ = ["CONFIG_SPACE", "KERNEL", "attend_part", "configs_for", "default_config", "shape_bucket"]
