"""Elastic-Cache layer attention with its fused drift test: ``kvpass::elastic_attend``.

Implements ``kvpass.ops.dllm.elastic_attend_reference`` (one diffusion-LM layer under Elastic-Cache,
multi-head, bidirectional: no mask, default scale ``D**-0.5``) without materializing any query×key
matrix, not even the tracked tokens' attention rows:

1. the caches with the step's rows written (``index_copy``: a required output of the op);
2. ``_elastic_fwd``: flash-attention style online softmax of the ``Q`` step rows over the updated
   keys/values; stores the output and each row's log2-sum-exp;
3. ``_elastic_drift``: for each tracked token, its attention row before (cached query over cached
   keys) and after (new query over updated keys) are streamed block by block; each row's
   log2-sum-exp is kept, and the row's cosine across the keys (``sim[1]``, ``"keys"``, kvpass's
   earlier statistic) is accumulated in the same online reduction: with running maxima ``m_b, m_a``
   and ``p = exp2(s - m)``, the sums ``S_ba = Σ p_b p_a``, ``S_bb = Σ p_b²``, ``S_aa = Σ p_a²`` are
   rescaled like the softmax denominators (by ``α_b α_a``, ``α_b²``, ``α_a²``) and
   ``cos = S_ba / sqrt(S_bb S_aa)`` (the softmax denominators cancel);
3b. ``_elastic_drift_heads``: the reference's statistic (``sim[0]``, ``"heads"``): per (batch, tracked
   token, key) the cosine across the heads of the two attention probabilities, rebuilt from the
   log2-sum-exps of step 3 one key block at a time (``Σ_h p_b p_a``, ``Σ_h p_b²``, ``Σ_h p_a²``, then
   ``torch.nn.functional.cosine_similarity``'s arithmetic: each norm clamped below at ``1e-8``),
   summed over the block's keys per program; the launcher adds the blocks and takes the weighted mean
   over batch, tracked tokens and keys;
4. ``_elastic_scores``: the attention the (weighted) window rows pay to every position, recomputed
   from the step rows' log-sum-exp one key block at a time, summed over batch, heads and window rows
   (``HEAD_GROUPS > 1`` splits the heads over programs and adds their partial sums), ``-1`` where
   ``excluded``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning
from .attend_scores import LOG2E, _output, check_device

KERNEL = "elastic_drift"
# torch.nn.functional.cosine_similarity's default eps: each norm is clamped below at it (the reference's drift test)
COS_EPS = 1e-8

# Config space searched by `kvpass tune` (filtered per shape by `configs_for`).
CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (16, 32, 64, 128),   # step rows per attention program (tracked/window rows: at most this)
    "BLOCK_N": (32, 64, 128),       # keys per inner step, all three kernels
    "HEAD_GROUPS": (1, 2, 4, 8),    # window-score programs per key block (each sums a share of the heads)
    "num_warps": (4, 8),
    "num_stages": (2, 3),
}


@triton.jit
def _elastic_fwd(
    Q, K, V, OUT, LSE,
    sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, sot, sod,
    H, R, N, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[b, h, r] = softmax(q k^T * scale) v over all N keys; LSE[b*H + h, r] in log2 units."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + dd[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dd[None, :] * svd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds at least one key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new
    tl.store(OUT + b * sob + h * soh + rows[:, None] * sot + dd[None, :] * sod,
             (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * R + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _elastic_drift(
    QC, KC, QN, KN, TRACK, COS, LSEB, LSEA,
    sqcb, sqch, sqcn, sqcd, skcb, skch, skcn, skcd, sqnb, sqnh, sqnn, sqnd, sknb, sknh, sknn, sknd,
    H, T, N, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """COS[b*H + h, t] = cosine(softmax(q_cache[track[t]] k_cache^T), softmax(q_new[track[t]] k_new^T)) over
    the keys; LSEB / LSEA[b*H + h, t]: the two rows' log2-sum-exp (for ``_elastic_drift_heads``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    ti = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = ti < T
    tok = tl.load(TRACK + ti, mask=t_ok, other=0)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    m2 = t_ok[:, None] & d_ok[None, :]
    qb = tl.load(QC + b * sqcb + h * sqch + tok[:, None] * sqcn + dd[None, :] * sqcd, mask=m2, other=0.0)
    qa = tl.load(QN + b * sqnb + h * sqnh + tok[:, None] * sqnn + dd[None, :] * sqnd, mask=m2, other=0.0)
    if DOT_FP32:
        qb = qb.to(tl.float32)
        qa = qa.to(tl.float32)
    m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_ba = tl.zeros([BLOCK_M], tl.float32)
    s_bb = tl.zeros([BLOCK_M], tl.float32)
    s_aa = tl.zeros([BLOCK_M], tl.float32)
    l_b = tl.zeros([BLOCK_M], tl.float32)
    l_a = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        km = col_ok[None, :] & d_ok[:, None]
        kb = tl.load(KC + b * skcb + h * skch + cols[None, :] * skcn + dd[:, None] * skcd, mask=km, other=0.0)
        ka = tl.load(KN + b * sknb + h * sknh + cols[None, :] * sknn + dd[:, None] * sknd, mask=km, other=0.0)
        if DOT_FP32:
            kb = kb.to(tl.float32)
            ka = ka.to(tl.float32)
        sb = tl.where(col_ok[None, :], tl.dot(qb, kb, input_precision=PRECISION) * qk_scale, float("-inf"))
        sa = tl.where(col_ok[None, :], tl.dot(qa, ka, input_precision=PRECISION) * qk_scale, float("-inf"))
        mb_new = tl.maximum(m_b, tl.max(sb, axis=1))
        ma_new = tl.maximum(m_a, tl.max(sa, axis=1))
        ab = tl.exp2(m_b - mb_new)
        aa = tl.exp2(m_a - ma_new)
        pb = tl.exp2(sb - mb_new[:, None])
        pa = tl.exp2(sa - ma_new[:, None])
        s_ba = s_ba * (ab * aa) + tl.sum(pb * pa, axis=1)
        s_bb = s_bb * (ab * ab) + tl.sum(pb * pb, axis=1)
        s_aa = s_aa * (aa * aa) + tl.sum(pa * pa, axis=1)
        l_b = l_b * ab + tl.sum(pb, axis=1)
        l_a = l_a * aa + tl.sum(pa, axis=1)
        m_b = mb_new
        m_a = ma_new
    # each row's own maximum contributes 1 to s_bb and s_aa: the root is >= 1
    tl.store(COS + pid_bh * T + ti, s_ba / tl.sqrt(s_bb * s_aa), mask=t_ok)
    tl.store(LSEB + pid_bh * T + ti, m_b + tl.log2(l_b), mask=t_ok)
    tl.store(LSEA + pid_bh * T + ti, m_a + tl.log2(l_a), mask=t_ok)


@triton.jit
def _elastic_drift_heads(
    QC, KC, QN, KN, TRACK, LSEB, LSEA, PART,
    sqcb, sqch, sqcn, sqcd, skcb, skch, skcn, skcd, sqnb, sqnh, sqnn, sqnd, sknb, sknh, sknn, sknd,
    H, T, N, D, qk_scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """PART[b, j, t] = Σ over key block j's keys n of the cosine across heads h between
    softmax(q_cache[h, track[t]] k_cache[h]^T)[n] and softmax(q_new[h, track[t]] k_new[h]^T)[n]
    (each norm over the heads clamped below at ``eps``, as ``torch.nn.functional.cosine_similarity``)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    pid_n = tl.program_id(2)
    ti = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = ti < T
    tok = tl.load(TRACK + ti, mask=t_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    m2 = t_ok[:, None] & d_ok[None, :]
    km = col_ok[None, :] & d_ok[:, None]
    s_ba = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s_bb = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s_aa = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, H):
        qb = tl.load(QC + b * sqcb + h * sqch + tok[:, None] * sqcn + dd[None, :] * sqcd, mask=m2, other=0.0)
        qa = tl.load(QN + b * sqnb + h * sqnh + tok[:, None] * sqnn + dd[None, :] * sqnd, mask=m2, other=0.0)
        kb = tl.load(KC + b * skcb + h * skch + cols[None, :] * skcn + dd[:, None] * skcd, mask=km, other=0.0)
        ka = tl.load(KN + b * sknb + h * sknh + cols[None, :] * sknn + dd[:, None] * sknd, mask=km, other=0.0)
        if DOT_FP32:
            qb = qb.to(tl.float32)
            qa = qa.to(tl.float32)
            kb = kb.to(tl.float32)
            ka = ka.to(tl.float32)
        lb = tl.load(LSEB + (b * H + h) * T + ti, mask=t_ok, other=0.0)
        la = tl.load(LSEA + (b * H + h) * T + ti, mask=t_ok, other=0.0)
        pb = tl.exp2(tl.dot(qb, kb, input_precision=PRECISION) * qk_scale - lb[:, None])
        pa = tl.exp2(tl.dot(qa, ka, input_precision=PRECISION) * qk_scale - la[:, None])
        s_ba += pb * pa
        s_bb += pb * pb
        s_aa += pa * pa
    cos = s_ba / (tl.maximum(tl.sqrt(s_bb), eps) * tl.maximum(tl.sqrt(s_aa), eps))
    cos = tl.where(t_ok[:, None] & col_ok[None, :], cos, 0.0)
    tl.store(PART + (b * tl.num_programs(2) + pid_n) * T + ti, tl.sum(cos, axis=1), mask=t_ok)


@triton.jit
def _elastic_scores(
    Q, KN, LSE, WIN, WW, EXCL, OUT,
    sqb, sqh, sqt, sqd, skb, skh, skn, skd,
    H, BH, R, N, D, W, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_GROUPS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """score[n] = sum over b, h, window slot w of WW[w] * softmax(q[WIN[w]] k_new^T)[n]; -1 where excluded.

    With HEAD_GROUPS > 1, program (block, g) writes its partial sum over heads g, g + HEAD_GROUPS, ...
    to OUT[g, n] (float32) and the launcher adds them up and applies ``excluded``.
    """
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    colsum = tl.zeros([BLOCK_N], tl.float32)
    for bh in range(g, BH, HEAD_GROUPS):
        b = bh // H
        h = bh % H
        kt = tl.load(KN + b * skb + h * skh + cols[None, :] * skn + dd[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        for w0 in range(0, W, BLOCK_M):
            wi = w0 + tl.arange(0, BLOCK_M)
            w_ok = wi < W
            r = tl.load(WIN + wi, mask=w_ok, other=0)
            wt = tl.load(WW + wi, mask=w_ok, other=0.0)
            q = tl.load(Q + b * sqb + h * sqh + r[:, None] * sqt + dd[None, :] * sqd,
                        mask=w_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
            lse = tl.load(LSE + bh * R + r, mask=w_ok, other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None]) * wt[:, None]
            colsum += tl.sum(tl.where(w_ok[:, None], p, 0.0), axis=0)
    if HEAD_GROUPS == 1:
        excl = tl.load(EXCL + cols, mask=col_ok, other=0) != 0
        tl.store(OUT + cols, tl.where(excl, -1.0, colsum).to(OUT.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OUT + g * N + cols, colsum, mask=col_ok)


# ----------------------------------------------------------------------------------------------- launch

def shape_bucket(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    """Cache key of a call's shape: head dim, step rows and canvas length (powers of two), dtype."""
    return (f"d{q.shape[-1]}-q{tuning.bucket(q.shape[2])}-n{tuning.bucket(k_cache.shape[2])}"
            f"-{str(q.dtype).removeprefix('torch.')}")


def default_config(batch: int, heads: int, q_rows: int, n: int, d: int) -> dict[str, int]:
    """Heuristic launch config (used when the tune cache has no entry for the shape)."""
    block_m = min(128 if d <= 64 else 64, max(16, triton.next_power_of_2(q_rows)))
    block_n = min(64 if d <= 128 else 32, max(32, triton.next_power_of_2(n)))
    groups = 1
    if not tuning.interpreting():  # few key blocks (short canvas): spread the heads over more programs
        blocks = triton.cdiv(n, block_n)
        while groups < 8 and blocks * groups * 2 <= 256 and groups * 2 <= batch * heads:
            groups *= 2
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_GROUPS": groups, "num_warps": warps, "num_stages": 2}


def configs_for(batch: int, heads: int, q_rows: int, n: int, d: int) -> list[dict[str, int]]:
    """The configs of :data:`CONFIG_SPACE` worth timing for this shape (no oversized blocks or head groups)."""
    out = []
    for bm in CONFIG_SPACE["BLOCK_M"]:
        if bm > max(16, triton.next_power_of_2(q_rows)):
            continue
        for bn in CONFIG_SPACE["BLOCK_N"]:
            if bn > max(32, triton.next_power_of_2(n)):
                continue
            for groups in CONFIG_SPACE["HEAD_GROUPS"]:
                if groups > max(1, batch * heads):
                    continue
                for w in CONFIG_SPACE["num_warps"]:
                    for st in CONFIG_SPACE["num_stages"]:
                        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_GROUPS": groups, "num_warps": w,
                                    "num_stages": st})
    return out


def _scratch(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Intermediate buffers (log-sum-exp, per-token cosines, partial scores); tests poison them with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight, excluded) -> None:
    name = "kvpass.kernels.elastic_drift"
    if any(x.dim() != 4 for x in (q, k, v, k_cache, v_cache, q_cache)):
        raise ValueError(f"{name}: expected q/k/v [B,H,Q,D] and k/v/q caches [B,H,N,D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}, q_cache {tuple(q_cache.shape)}")
    b, h, r, d = q.shape
    n = k_cache.shape[2]
    if k.shape != q.shape or v.shape != q.shape or k_cache.shape != (b, h, n, d) or v_cache.shape != k_cache.shape \
            or q_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         f"be equal and the caches [B,H,N,D] with their B, H, D; got k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}, q_cache {tuple(q_cache.shape)}")
    if n == 0 or r == 0:
        raise ValueError(f"{name}: need at least one step row and one canvas position, got Q={r}, N={n}")
    t, w = track.shape[0] if track.dim() == 1 else -1, window.shape[0] if window.dim() == 1 else -1
    if rows.shape != (r,) or t < 0 or w < 0 or track_weight.shape != track.shape \
            or window_weight.shape != window.shape or excluded.shape != (n,):
        raise ValueError(f"{name}: expected rows [Q={r}], track/track_weight [T], window/window_weight [W], "
                         f"excluded [N={n}]; got rows {tuple(rows.shape)}, track {tuple(track.shape)}, track_weight "
                         f"{tuple(track_weight.shape)}, window {tuple(window.shape)}, window_weight "
                         f"{tuple(window_weight.shape)}, excluded {tuple(excluded.shape)}")
    dtypes = {x.dtype for x in (q, k, v, k_cache, v_cache, q_cache)}
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: q/k/v and the caches must share a dtype among float16, bfloat16, float32; got "
                         f"{sorted(map(str, dtypes))}")
    if any(x.dtype != torch.int64 for x in (rows, track, window)) or excluded.dtype != torch.bool \
            or not track_weight.is_floating_point() or not window_weight.is_floating_point():
        raise ValueError(f"{name}: rows/track/window must be int64, excluded bool and the weights floating point; got "
                         f"rows {rows.dtype}, track {track.dtype}, window {window.dtype}, excluded {excluded.dtype}, "
                         f"track_weight {track_weight.dtype}, window_weight {window_weight.dtype}")
    tensors = (q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight, excluded)
    devices = {x.device for x in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")
    check_device(q.device)
    # index range checks: on real CPU tensors only (a GPU would sync; while tracing the values are unknown)
    if q.device.type == "cpu" and torch._guards.detect_fake_mode((rows, track, window)) is None \
            and not torch.compiler.is_compiling():
        for label, idx, size in (("rows", rows, n), ("track", track, n), ("window", window, r)):
            bad = idx[(idx < 0) | (idx >= size)]
            if bad.numel():
                raise ValueError(f"{name}: {label} must index [0, {size}); got {bad[:5].tolist()}")


def elastic_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, q_cache: torch.Tensor, track: torch.Tensor, track_weight: torch.Tensor,
    window: torch.Tensor, window_weight: torch.Tensor, excluded: torch.Tensor, *, config: dict[str, int] | None = None,
    wrap: Callable | None = None, out: torch.Tensor | None = None, score: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, cos_heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kvpass::elastic_attend`` (same contract as ``kvpass.ops.dllm.elastic_attend_reference``).

    Returns ``(out [B,H,Q,D], k_cache', v_cache', q_cache', sim [2], track_score [N])``, ``sim`` (``[0]``: the
    reference's cosine across heads, ``[1]``: the cosine across keys) and ``track_score`` in q's dtype (computed
    in float32). ``config``: launch config (default: the tune cache, else :func:`default_config`); ``wrap``:
    applied to each kernel before launch (``wrap_triton`` inside a ``triton_op``); ``out``/``score``:
    preallocated contiguous outputs; ``cos``: a float32 ``[B,H,T]`` buffer that receives each (head, tracked
    token)'s cosine across the keys, ``cos_heads``: a float32 ``[B,T]`` buffer that receives each tracked
    token's cosine across heads averaged over the keys (both for inspection and tests).
    """
    _check(q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight, excluded)
    b, h, r, d = q.shape
    n, t, w = k_cache.shape[2], track.shape[0], window.shape[0]
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(q, k_cache), q.device) or default_config(b, h, r, n, d)
    bm, bn, groups = config["BLOCK_M"], config["BLOCK_N"], config["HEAD_GROUPS"]
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    block_d = max(16, triton.next_power_of_2(d))
    dot_fp32 = tuning.interpreting() or q.dtype == torch.float32
    meta = dict(BLOCK_N=bn, BLOCK_D=block_d, DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else "tf32")
    qk_scale = d**-0.5 * LOG2E
    wrap = wrap or (lambda fn: fn)
    # the kernels index these 1-D inputs as contiguous (no-ops for the ones Elastic-Cache builds)
    track, window, excluded = track.contiguous(), window.contiguous(), excluded.contiguous()

    k_new = k_cache.index_copy(2, rows, k)
    v_new = v_cache.index_copy(2, rows, v)
    q_new = q_cache.index_copy(2, rows, q)
    out = _output(out, q.shape, q.dtype, q.device, "out")
    lse = _scratch((b * h, r), torch.float32, q.device)
    wrap(_elastic_fwd)[(triton.cdiv(r, bm), b * h)](
        q, k_new, v_new, out, lse, *q.stride(), *k_new.stride(), *v_new.stride(), *out.stride(), h, r, n, d, qk_scale,
        BLOCK_M=bm, **meta, **launch)

    if t:
        cos = _output(cos, (b, h, t), torch.float32, q.device, "cos") if cos is not None else \
            _scratch((b, h, t), torch.float32, q.device)
        lse_b, lse_a = _scratch((b * h, t), torch.float32, q.device), _scratch((b * h, t), torch.float32, q.device)
        tm = min(bm, max(16, triton.next_power_of_2(t)))
        strides = (*q_cache.stride(), *k_cache.stride(), *q_new.stride(), *k_new.stride())
        wrap(_elastic_drift)[(triton.cdiv(t, tm), b * h)](
            q_cache, k_cache, q_new, k_new, track, cos, lse_b, lse_a, *strides, h, t, n, d, qk_scale, BLOCK_M=tm,
            **meta, **launch)
        n_blocks = triton.cdiv(n, bn)
        part = _scratch((b, n_blocks, t), torch.float32, q.device)
        wrap(_elastic_drift_heads)[(triton.cdiv(t, tm), b, n_blocks)](
            q_cache, k_cache, q_new, k_new, track, lse_b, lse_a, part, *strides, h, t, n, d, qk_scale, COS_EPS,
            BLOCK_M=tm, **meta, **launch)
        per_token = part.sum(1) / n                                     # [B, T]: mean over the keys
        if cos_heads is not None:
            _output(cos_heads, (b, t), torch.float32, q.device, "cos_heads").copy_(per_token)
        tw = track_weight.float()
        sims = torch.stack([(per_token * tw).sum() / b, (cos * tw).sum() / (b * h)])
        denom = tw.sum()
        sim = torch.where(denom > 0, sims / denom.clamp_min(1e-12), torch.ones_like(sims)).to(q.dtype)
    else:
        sim = torch.ones(2, dtype=q.dtype, device=q.device)

    groups = max(1, min(groups, b * h))
    if w and groups == 1:  # one program per key block sums over every head and writes the final scores
        score = _output(score, (n,), q.dtype, q.device, "score")
        part = score
    else:
        part = _scratch((groups, n), torch.float32, q.device)
    if w:
        wrap(_elastic_scores)[(triton.cdiv(n, bn), groups)](
            q, k_new, lse, window, window_weight.float().contiguous(), excluded.view(torch.uint8), part, *q.stride(),
            *k_new.stride(), h, b * h, r, n, d, w, qk_scale,
            BLOCK_M=min(bm, max(16, triton.next_power_of_2(w))), HEAD_GROUPS=groups, **meta, **launch)
    if part is not score:  # partial sums of head groups (or no window row): add them up, mark the excluded
        total = torch.where(excluded, -1.0, part.sum(0) if w else 0.0).to(q.dtype)
        score = total if score is None else _output(score, (n,), q.dtype, q.device, "score").copy_(total)
    return out, k_new, v_new, q_new, sim, score


__all__ = ["CONFIG_SPACE", "KERNEL", "configs_for", "default_config", "elastic_attend", "shape_bucket"]
