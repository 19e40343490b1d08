"""Exact merge of partial attentions: ``kvpass::merge_parts`` (reference: ``kvpass.ops.merge_parts_reference``).

Each of ``P`` parts of a split KV store (a storage tier, a rank's shard, a shared prefix) has attended the same
queries and returned its normalized output ``out_p [B, H, T, D_v]`` and log-sum-exp ``lse_p [B, H, T]``; the
softmax over the union of the parts is ``lse = logsumexp_p(lse_p)``, ``out = sum_p exp(lse_p - lse) * out_p``
(FlashAttention's rescaling between key blocks; Infinite-LLM's DistAttention merges ranks' partial results so).

``_merge_parts``: each program owns ``BLOCK_M`` rows (flattened ``(b, h, t)``) and ``BLOCK_DV`` output columns.
A first pass over the parts reads only their ``lse`` and keeps a running max and sum (learned sinks, one more
part with a zero output, join the sum at the end); a second pass reads each part's output block once and adds it
with weight ``exp(lse_p - lse)``. A part whose ``lse_p`` is ``-inf`` is not read (its output may be anything);
a row whose parts are all ``-inf`` gets a zero output and ``lse = -inf``. Accumulation is in float32; offsets are
int64, so long prefills over many heads do not overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import tuning
from .attend_scores import _output, check_device

KERNEL = "merge_parts"

# Config space searched by `kvpass tune` (filtered per shape by `configs_for`).
CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (4, 8, 16, 32, 64),
    "BLOCK_DV": (16, 32, 64, 128, 256),
    "num_warps": (1, 2, 4, 8),
}


@triton.jit
def _fold(m, s, x):
    """Add ``exp(x)`` to a running ``(max m, sum s)`` with ``sum = s * exp(m_old - m)``; ``-inf`` adds nothing."""
    m_new = tl.maximum(m, x)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + tl.exp(x - m_safe)


@triton.jit
def _merge_parts(
    # inputs
    OUTS, LSES, SINKS,
    # outputs (contiguous [B, H, T, D_v] and [B, H, T])
    OUT, LSE,
    # strides
    sop, sob, soh, sot, sod, slp, slb, slh, slt, ssb, ssh, sst,
    # sizes
    P, H, T, DV, R,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < R
    b = rows // (H * T)
    h = (rows // T) % H
    t = rows % T
    lse_row = LSES + b * slb + h * slh + t * slt

    # pass 1: the merged log-sum-exp, from the parts' lse alone
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for p in range(0, P):
        x = tl.load(lse_row + p * slp, mask=row_ok, other=float("-inf"))
        m, s = _fold(m, s, x)
    if HAS_SINKS:  # a part with the sink's lse and a zero output
        sink = tl.load(SINKS + b * ssb + h * ssh + t * sst, mask=row_ok, other=float("-inf")).to(tl.float32)
        m, s = _fold(m, s, sink)
    empty = m == float("-inf")
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, s)))
    lse_safe = tl.where(empty, 0.0, lse)

    # pass 2: each part's output block, weighted by its share of the merged denominator
    dd = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = dd < DV
    out_row = OUTS + b * sob + h * soh + t * sot
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for p in range(0, P):
        x = tl.load(lse_row + p * slp, mask=row_ok, other=float("-inf"))
        w = tl.exp(x - lse_safe)
        live = row_ok & (w > 0.0)
        o = tl.load(out_row[:, None] + p * sop + dd[None, :] * sod, mask=live[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.where(live[:, None], w[:, None] * o, 0.0)
    tl.store(OUT + rows[:, None] * DV + dd[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(LSE + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- launch

def shape_bucket(outs: torch.Tensor, has_sinks: bool = False) -> str:
    """Cache key of a call's shape: parts, value width, rows (a power of two), dtype, sinks."""
    p, b, h, t, dv = outs.shape
    return f"p{p}-dv{dv}-r{tuning.bucket(b * h * t)}-{str(outs.dtype).removeprefix('torch.')}-sinks{int(has_sinks)}"


def default_config(parts: int, rows: int, dv: int) -> dict[str, int]:
    """Heuristic launch config (used when the tune cache has no entry for the shape): the whole value width in one
    block up to 256 columns, and about 4096 output elements per program."""
    block_dv = min(256, max(16, triton.next_power_of_2(dv)))
    block_m = min(64, max(4, 4096 // block_dv), max(4, triton.next_power_of_2(rows)))
    return {"BLOCK_M": block_m, "BLOCK_DV": block_dv, "num_warps": 4 if block_m * block_dv >= 2048 else 2}


def configs_for(parts: int, rows: int, dv: int) -> list[dict[str, int]]:
    """The configs of :data:`CONFIG_SPACE` worth timing for this shape (no blocks far larger than the tensor)."""
    out = []
    for bm in CONFIG_SPACE["BLOCK_M"]:
        if bm > max(4, triton.next_power_of_2(rows)):
            continue
        for bd in CONFIG_SPACE["BLOCK_DV"]:
            if bd > max(16, triton.next_power_of_2(dv)):
                continue
            for w in CONFIG_SPACE["num_warps"]:
                out.append({"BLOCK_M": bm, "BLOCK_DV": bd, "num_warps": w})
    return out


def _check(outs: torch.Tensor, lses: torch.Tensor, sinks: torch.Tensor | None) -> None:
    name = "kvpass.kernels.merge_parts"
    if outs.dim() != 5 or lses.dim() != 4 or tuple(lses.shape) != tuple(outs.shape[:4]):
        raise ValueError(f"{name}: expected outs [P,B,H,T,D_v] and lses [P,B,H,T]; got outs {tuple(outs.shape)}, "
                         f"lses {tuple(lses.shape)}")
    if outs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: outs must be float16, bfloat16 or float32, got {outs.dtype}")
    if lses.dtype != torch.float32:
        raise ValueError(f"{name}: lses must be float32, got {lses.dtype}")
    tensors = [outs, lses]
    if sinks is not None:
        h = outs.shape[2]
        if not sinks.is_floating_point():
            raise ValueError(f"{name}: sinks must be a floating tensor, got {sinks.dtype}")
        ok = sinks.shape == (h,) if sinks.dim() == 1 else sinks.dim() == 3 and all(
            s in (1, full) for s, full in zip(sinks.shape, outs.shape[1:4], strict=True))
        if not ok:
            raise ValueError(f"{name}: sinks must be [H={h}] or broadcastable to [B,H,T]={tuple(outs.shape[1:4])}; "
                             f"got {tuple(sinks.shape)}")
        tensors.append(sinks)
    devices = {x.device for x in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")
    check_device(outs.device)


def merge_parts(
    outs: torch.Tensor, lses: torch.Tensor, sinks: torch.Tensor | None = None, *,
    config: dict[str, int] | None = None, wrap: Callable | None = None, out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvpass::merge_parts``: merge ``P`` partial attentions into the attention over the union of their parts.

    outs: ``[P, B, H, T, D_v]`` (float16, bfloat16 or float32, any strides); lses: ``[P, B, H, T]`` float32;
    sinks: None, or learned sink logits ``[H]`` (or broadcastable to ``[B, H, T]``), each one more part with a
    zero output. Returns ``(out [B, H, T, D_v] in outs' dtype, lse [B, H, T] float32)``, both contiguous.
    ``config``: launch config (default: the tune cache, else :func:`default_config`); ``wrap``: applied to the
    kernel before launch (``torch.library.wrap_triton`` inside a ``triton_op``); ``out``/``lse``: preallocated
    contiguous outputs to write into.
    """
    _check(outs, lses, sinks)
    p, b, h, t, dv = outs.shape
    rows = b * h * t
    out = _output(out, (b, h, t, dv), outs.dtype, outs.device, "out")
    lse = _output(lse, (b, h, t), torch.float32, outs.device, "lse")
    if rows == 0:
        return out, lse
    has_sinks = sinks is not None
    if has_sinks:
        sinks = (sinks.view(1, h, 1) if sinks.dim() == 1 else sinks).expand(b, h, t)
    if p == 0:  # nothing to read (an empty tensor may have no storage): only the sinks, with zero outputs
        out.zero_()
        lse.copy_(sinks if has_sinks else torch.full_like(lse, float("-inf")))
        return out, lse
    if has_sinks:
        sink_strides = sinks.stride()
    else:
        sinks, sink_strides = lses, (0, 0, 0)  # (a pointer the kernel never reads)
    if config is None:
        config = tuning.lookup(KERNEL, shape_bucket(outs, has_sinks), outs.device) or default_config(p, rows, dv)
    bm, bd = config["BLOCK_M"], config["BLOCK_DV"]
    grid = (triton.cdiv(rows, bm), max(1, triton.cdiv(dv, bd)))
    (wrap or (lambda fn: fn))(_merge_parts)[grid](
        outs, lses, sinks, out, lse, *outs.stride(), *lses.stride(), *sink_strides, p, h, t, dv, rows,
        BLOCK_M=bm, BLOCK_DV=bd, HAS_SINKS=has_sinks, num_warps=config["num_warps"])
    return out, lse


__all__ = ["CONFIG_SPACE", "KERNEL", "configs_for", "default_config", "merge_parts", "shape_bucket"]
