"""Fused attention over [kept store ∪ new block] that also returns per-key softmax weights.

Implements ``kvpass::attend`` (reference: ``kvpass.ops.attend_reference``) without materializing the
query×key matrix:

1. ``_attend_fwd`` (flash-attention style online softmax): each program owns ``BLOCK_M`` query rows
   of one (batch, kv-head). GQA is folded into the rows (row ``r`` = query ``r // group`` of query
   head ``kv_head * group + r % group``), so K/V are read once per group. Besides the output it stores
   each row's log-sum-exp. For decode (few rows, long store) the key range is split over ``SPLITS``
   programs (split-K) whose partial results ``_attend_combine`` merges.
2. ``_attend_obs``: for each block of keys and query head, recomputes the logits of the observation
   queries (the last ``n_obs``) and sums ``exp(logit - lse)`` over them: the column sums of the
   softmax, i.e. exactly the ``obs`` the policies score with. Only ``n_obs`` rows are recomputed.

A logit soft cap (Gemma-2: ``softcap * tanh(logit / softcap)``) is applied to each logit block before masking,
in both kernels, so the weights are the reference's. Learned attention sinks (GPT-OSS: one extra logit per query
row in the softmax denominator) join each row's sum when it is finished, so its log-sum-exp, and with it the
observed weights, include them. Values may be narrower than keys (MLA: ``D_v < D``).

Masking is the reference's: a key is visible when its slot holds a real token (``pos >= 0``), it is in
the store or not after the query in the new block, and (sliding window) less than ``window`` positions
behind the query. A query that sees nothing (padding) attends only to itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning

KERNEL = "attend_scores"
LOG2E = 1.4426950408889634

# Config space searched by `kvpass tune` (filtered per shape by `configs_for`).
CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (32, 64, 128),
    "SPLITS": (1, 2, 4, 8, 16, 32),
    "num_warps": (4, 8),
    "num_stages": (2, 3),
}


@triton.jit
def _logits(dot, qk_scale, cap, HAS_SOFTCAP: tl.constexpr):
    """Base-2 logits of a q·k block: ``dot * scale * log2(e)``, or with a soft cap
    ``softcap * tanh(dot * scale / softcap) * log2(e)`` (then ``qk_scale = scale / softcap``,
    ``cap = softcap * log2(e)``)."""
    if HAS_SOFTCAP:
        x = dot * qk_scale
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # tanh(x), saturating without inf - inf
    return dot * qk_scale


@triton.jit
def _visible(cols, kpos, qi, q_pos, past, N, window, HAS_WINDOW: tl.constexpr):
    """[rows, cols] bool: the reference's attention mask (without the 'padding sees itself' rule)."""
    ok = (cols[None, :] < N) & (kpos[None, :] >= 0)
    ok = ok & ((cols[None, :] < past) | (cols[None, :] - past <= qi[:, None]))
    if HAS_WINDOW:
        ok = ok & (q_pos[:, None] - kpos[None, :] < window)
    return ok



@triton.jit
def _finish(acc, m_i, l_i, rows, row_ok, b, hkv, H_KV, dd, d_ok, past, T,
            V, OUT, LSE, SINKS,
            svb, svh, svn, svd, sob, soh, sot, sod, ssb, ssh, sst,
            GROUP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Normalize and store rows and their log2-sum-exp; a row that saw nothing takes its own value (and no sink)."""
    qi = rows // GROUP
    hq = hkv * GROUP + rows % GROUP
    empty = m_i == float("-inf")
    if HAS_SINKS:  # the sink's exp joins the row's denominator (base 2, like the logits)
        sink = tl.load(SINKS + b * ssb + hq * ssh + qi * sst, mask=row_ok & ~empty,
                       other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_i, sink)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.exp2(sink - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_all
    l_safe = tl.where(empty, 1.0, l_i)
    v_own = tl.load(V + b * svb + hkv * svh + (past + qi)[:, None] * svn + dd[None, :] * svd,
                    mask=(row_ok & empty)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    out = tl.where(empty[:, None], v_own, acc / l_safe[:, None])
    tl.store(OUT + b * sob + hq[:, None] * soh + qi[:, None] * sot + dd[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + (b * H_KV * GROUP + hq) * T + qi, lse, mask=row_ok)


@triton.jit
def _attend_fwd(
    # inputs
    Q, K, V, POS, SINKS,
    # outputs: final (SPLITS == 1) or per-split partial results
    OUT, LSE, PART_O, PART_M, PART_L,
    # strides
    sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, spb, sph, spn, sob, soh, sot, sod, ssb, ssh, sst,
    # sizes and scalars
    H_KV, T, N, D, DV, window, qk_scale, cap,
    # meta
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    R = T * GROUP
    past = N - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
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
    q_pos = tl.load(POS + b * spb + hkv * sph + (past + qi) * spn, mask=row_ok, other=-1)
    # causal: keys after this block's last query are invisible to every row of the block
    last_q = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, R) - 1) // GROUP
    hi = tl.minimum(N, past + last_q + 1)
    per_split = tl.cdiv(tl.cdiv(hi, SPLITS), BLOCK_N) * BLOCK_N
    lo = pid_s * per_split
    hi = tl.minimum(hi, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        kt = tl.load(K + b * skb + hkv * skh + cols[None, :] * skn + dd[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(V + b * svb + hkv * svh + cols[:, None] * svn + ddv[None, :] * svd,
                     mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        kpos = tl.load(POS + b * spb + hkv * sph + cols * spn, mask=col_ok, other=-1)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        s = _logits(tl.dot(q, kt, input_precision=PRECISION), qk_scale, cap, HAS_SOFTCAP)
        s = tl.where(_visible(cols, kpos, qi, q_pos, past, hi, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new

    if SPLITS == 1:
        _finish(acc, m_i, l_i, rows, row_ok, b, hkv, H_KV, ddv, dv_ok, past, T, V, OUT, LSE, SINKS,
                svb, svh, svn, svd, sob, soh, sot, sod, ssb, ssh, sst, GROUP, HAS_SINKS)
    else:
        part = (pid_s * tl.num_programs(1) + pid_bh) * R + rows
        tl.store(PART_M + part, m_i, mask=row_ok)
        tl.store(PART_L + part, l_i, mask=row_ok)
        tl.store(PART_O + part[:, None] * BLOCK_DV + ddv[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _attend_combine(
    PART_O, PART_M, PART_L, V, OUT, LSE, SINKS,
    svb, svh, svn, svd, sob, soh, sot, sod, ssb, ssh, sst,
    H_KV, T, N, DV,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """Merge the split-K partial (max, sum, unnormalized output) of each row, then finish it."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    R = T * GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    ddv = tl.arange(0, BLOCK_DV)
    dv_ok = ddv < DV
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in tl.static_range(SPLITS):
        part = (s * tl.num_programs(1) + pid_bh) * R + rows
        m_s = tl.load(PART_M + part, mask=row_ok, other=float("-inf"))
        l_s = tl.load(PART_L + part, mask=row_ok, other=0.0)
        o_s = tl.load(PART_O + part[:, None] * BLOCK_DV + ddv[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_i - m_safe)
        c = tl.exp2(m_s - m_safe)
        l_i = l_i * a + l_s * c
        acc = acc * a[:, None] + o_s * c[:, None]
        m_i = m_new
    _finish(acc, m_i, l_i, rows, row_ok, b, hkv, H_KV, ddv, dv_ok, N - T, T, V, OUT, LSE, SINKS,
            svb, svh, svn, svd, sob, soh, sot, sod, ssb, ssh, sst, GROUP, HAS_SINKS)


@triton.jit
def _attend_obs(
    Q, K, POS, LSE, OBS,
    sqb, sqh, sqt, sqd, skb, skh, skn, skd, spb, sph, spn,
    H_KV, T, N, D, n_obs, window, qk_scale, cap,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, OBS_MAX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """obs[b, hq, key] = sum (or max) over the last n_obs queries of the softmax weight exp2(logit - lse)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * H_q
    b = pid_bh // (H_KV * GROUP)
    hq = pid_bh % (H_KV * GROUP)
    hkv = hq // GROUP
    past = N - T
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    kt = tl.load(K + b * skb + hkv * skh + cols[None, :] * skn + dd[:, None] * skd,
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
    kpos = tl.load(POS + b * spb + hkv * sph + cols * spn, mask=col_ok, other=-1)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    # queries before the block's first new key see none of it (nor is any of it their own slot)
    first = tl.maximum(T - n_obs, pid_n * BLOCK_N - past)
    for i0 in range(first, T, BLOCK_M):
        qi = i0 + tl.arange(0, BLOCK_M)
        row_ok = qi < T
        q = tl.load(Q + b * sqb + hq * sqh + qi[:, None] * sqt + dd[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        lse = tl.load(LSE + pid_bh * T + qi, mask=row_ok, other=0.0)
        q_pos = tl.load(POS + b * spb + hkv * sph + (past + qi) * spn, mask=row_ok, other=-1)
        s = _logits(tl.dot(q, kt, input_precision=PRECISION), qk_scale, cap, HAS_SOFTCAP)
        empty = lse == float("-inf")
        ok = _visible(cols, kpos, qi, q_pos, past, N, window, HAS_WINDOW) & row_ok[:, None]
        p = tl.where(ok, tl.exp2(tl.minimum(s - tl.where(empty, 0.0, lse)[:, None], 0.0)), 0.0)
        own = (cols[None, :] == past + qi[:, None]) & (row_ok & empty)[:, None]
        p = tl.where(own, 1.0, p)
        if OBS_MAX:
            colsum = tl.maximum(colsum, tl.max(p, axis=0))
        else:
            colsum += tl.sum(p, axis=0)
    tl.store(OBS + pid_bh * N + cols, colsum, mask=col_ok)


# ----------------------------------------------------------------------------------------------- launch

def shape_bucket(q: torch.Tensor, k: torch.Tensor, n_obs: int) -> str:
    """Cache key of a call's shape: head dim, GQA group, query and key counts (powers of two), dtype."""
    _, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    return f"d{d}-g{hq // hkv}-t{tuning.bucket(t)}-n{tuning.bucket(n)}-{str(q.dtype).removeprefix('torch.')}" \
           f"-obs{int(n_obs > 0)}"


def default_config(batch: int, h_kv: int, group: int, t: int, n: int, d: int) -> dict[str, int]:
    """Heuristic launch config (used when the tune cache has no entry for the shape)."""
    rows = t * group
    block_m = min(128 if d <= 64 else 64, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if d <= 128 else 32
    programs = triton.cdiv(rows, block_m) * batch * h_kv
    splits = 1
    if not tuning.interpreting():  # few query rows over a long store: split the keys to fill the GPU
        while splits < 32 and programs * splits * 2 <= 256 and n // (splits * 2) >= 512:
            splits *= 2
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps, "num_stages": 2}


def configs_for(batch: int, h_kv: int, group: int, t: int, n: int, d: int) -> list[dict[str, int]]:
    """The configs of :data:`CONFIG_SPACE` worth timing for this shape (no oversized blocks, no empty splits)."""
    rows = t * group
    out = []
    for bm in CONFIG_SPACE["BLOCK_M"]:
        if bm > max(16, triton.next_power_of_2(rows)):
            continue
        for bn in CONFIG_SPACE["BLOCK_N"]:
            if bn > max(32, triton.next_power_of_2(n)):
                continue
            for splits in CONFIG_SPACE["SPLITS"]:
                if splits > 1 and (triton.cdiv(rows, bm) > 4 or n < splits * bn * 2):
                    continue
                for w in CONFIG_SPACE["num_warps"]:
                    for st in CONFIG_SPACE["num_stages"]:
                        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "SPLITS": splits, "num_warps": w, "num_stages": st})
    return out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, n_obs: int, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or pos.dim() != 3:
        raise ValueError(f"kvpass.kernels.attend_scores: expected q [B,H_q,T,D], k [B,H_kv,N,D], v [B,H_kv,N,D_v], "
                         f"pos [B,H_kv,N]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"pos {tuple(pos.shape)}")
    b, hq, t, d = q.shape
    _, hkv, n, _ = k.shape
    if k.shape != (b, hkv, n, d) or v.shape[:3] != k.shape[:3] or pos.shape != (b, hkv, n):
        raise ValueError(f"kvpass.kernels.attend_scores: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, pos {tuple(pos.shape)} (k must be [B,H_kv,N,D] with q's B and D, v "
                         "[B,H_kv,N,D_v])")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"kvpass.kernels.attend_scores: H_q={hq} is not a multiple of H_kv={hkv}")
    if not 1 <= t <= n:
        raise ValueError(f"kvpass.kernels.attend_scores: need 1 <= T <= N, got T={t}, N={n}")
    if not 0 <= n_obs <= t:
        raise ValueError(f"kvpass.kernels.attend_scores: n_obs must be in [0, T={t}], got {n_obs}")
    if window < 0:
        raise ValueError(f"kvpass.kernels.attend_scores: window must be >= 0, got {window}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"kvpass.kernels.attend_scores: q/k/v must share a dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if pos.dtype != torch.int64:
        raise ValueError(f"kvpass.kernels.attend_scores: pos must be int64, got {pos.dtype}")
    devices = {x.device for x in (q, k, v, pos)}
    if len(devices) != 1:
        raise ValueError(f"kvpass.kernels.attend_scores: tensors on several devices: {sorted(map(str, devices))}")
    check_device(q.device)


def check_device(device: torch.device) -> None:
    """Kernels run on CUDA, or on CPU in Triton's interpreter (``TRITON_INTERPRET=1`` set before import)."""
    if device.type != "cuda" and not isinstance(_attend_fwd, triton.runtime.interpreter.InterpretedFunction):
        raise RuntimeError(f"kvpass.kernels: got {device.type} tensors; the Triton kernels run on CUDA, or on CPU "
                           "only with TRITON_INTERPRET=1 set before kvpass.kernels is imported")


def _output(buf: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A new output, or the caller's buffer after checking it matches."""
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"kvpass.kernels: output {name!r} must be a contiguous {dtype} tensor of shape "
                         f"{tuple(shape)} on {device}; got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
                         f"{'' if buf.is_contiguous() else ' (not contiguous)'}")
    return buf


def attend_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float, n_obs: int,
    window: int = 0, *, config: dict[str, int] | None = None, wrap: Callable | None = None,
    out: torch.Tensor | None = None, obs: torch.Tensor | None = None, obs_reduce: str = "sum", softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvpass::attend`` with the policy resolved to ``n_obs`` (observed trailing queries).

    Returns ``(out [B,H_q,T,D_v] in q's dtype, obs [B,H_q,N] float32)`` (``obs`` is ``[B,H_q,0]`` when
    ``n_obs == 0``); ``obs_reduce``: ``"sum"`` or ``"max"`` of the weights over the observed queries;
    ``softcap``: logits soft-capped to ``softcap * tanh(logit / softcap)`` (0: none); ``sinks``: None, or one
    attention-sink logit per query row, broadcastable to ``[B,H_q,T]``.
    ``config``: launch config (default: the tune cache, else :func:`default_config`);
    ``wrap``: applied to each kernel before launch (``torch.library.wrap_triton`` inside a ``triton_op``);
    ``out``/``obs``: preallocated contiguous outputs to write into (e.g. static buffers of a CUDA graph).
    """
    _check(q, k, v, pos, n_obs, window)
    if obs_reduce not in ("sum", "max"):
        raise ValueError(f"kvpass.kernels.attend_scores: obs_reduce must be 'sum' or 'max', got {obs_reduce!r}")
    if not softcap >= 0:
        raise ValueError(f"kvpass.kernels.attend_scores: softcap must be >= 0 (0: none), got {softcap!r}")
    b, hq, t, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    if sinks is not None:
        if sinks.device != q.device or not sinks.is_floating_point():
            raise ValueError(f"kvpass.kernels.attend_scores: sinks must be a floating tensor on {q.device}; got "
                             f"{sinks.dtype} on {sinks.device}")
        sinks = sinks.expand(b, hq, t)
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(q, k, n_obs), q.device) or default_config(b, hkv, group, t, n, d)
    bm, bn, splits = config["BLOCK_M"], config["BLOCK_N"], config["SPLITS"]
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    interp = tuning.interpreting()
    dot_fp32 = interp or q.dtype == torch.float32
    precision = "ieee" if dot_fp32 else "tf32"
    has_softcap = softcap > 0
    qk_scale = float(scale) / softcap if has_softcap else float(scale) * LOG2E
    cap = float(softcap) * LOG2E
    has_window = window > 0
    wrap = wrap or (lambda fn: fn)

    out = _output(out, (b, hq, t, dv), q.dtype, q.device, "out")
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    rows = t * group
    m_blocks = triton.cdiv(rows, bm)
    if splits > 1:
        part_o = torch.empty(splits, b * hkv, rows, block_dv, dtype=torch.float32, device=q.device)
        part_m = torch.empty(splits, b * hkv, rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = lse  # unused
    has_sinks = sinks is not None
    sink_strides = sinks.stride() if has_sinks else (0, 0, 0)
    sinks = sinks if has_sinks else lse  # (a pointer the kernels never read)
    strides = (*q.stride(), *k.stride(), *v.stride(), *pos.stride(), *out.stride(), *sink_strides)
    wrap(_attend_fwd)[(m_blocks, b * hkv, splits)](
        q, k, v, pos, sinks, out, lse, part_o, part_m, part_l, *strides, hkv, t, n, d, dv, window, qk_scale, cap,
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv, SPLITS=splits,
        HAS_WINDOW=has_window, DOT_FP32=dot_fp32, PRECISION=precision, HAS_SOFTCAP=has_softcap,
        HAS_SINKS=has_sinks, **launch)
    if splits > 1:
        wrap(_attend_combine)[(m_blocks, b * hkv)](
            part_o, part_m, part_l, v, out, lse, sinks, *v.stride(), *out.stride(), *sink_strides, hkv, t, n, dv,
            GROUP=group, BLOCK_M=bm, BLOCK_DV=block_dv, SPLITS=splits, HAS_SINKS=has_sinks, num_warps=4)
    if n_obs == 0:
        return out, torch.empty(b, hq, 0, dtype=torch.float32, device=q.device)
    obs = _output(obs, (b, hq, n), torch.float32, q.device, "obs")
    obs_bm = min(bm, max(16, triton.next_power_of_2(n_obs)))
    wrap(_attend_obs)[(triton.cdiv(n, bn), b * hq)](
        q, k, pos, lse, obs, *q.stride(), *k.stride(), *pos.stride(), hkv, t, n, d, n_obs, window, qk_scale, cap,
        GROUP=group, BLOCK_M=obs_bm, BLOCK_N=bn, BLOCK_D=block_d, HAS_WINDOW=has_window,
        DOT_FP32=dot_fp32, PRECISION=precision, OBS_MAX=obs_reduce == "max", HAS_SOFTCAP=has_softcap, **launch)
    return out, obs


__all__ = ["CONFIG_SPACE", "KERNEL", "attend_scores", "configs_for", "default_config", "shape_bucket"]
