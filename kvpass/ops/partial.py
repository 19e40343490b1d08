"""Attention over a KV store split into parts: each part's partial output and log-sum-exp, merged exactly.

One primitive serves every feature that keeps a layer's KV in more than one place:

* a tiered store whose lower tier computes its share of attention where its KV lives (InstInfer: Pan et al.,
  arXiv:2409.04992) and hands back only a partial output and its log-sum-exp;
* KV spread over ``torch.distributed`` ranks, each attending to its own slots, the partial results gathered and
  merged (Infinite-LLM's DistAttention: Lin et al., arXiv:2401.02669);
* a prefix store shared by many rows next to each row's own store.

:func:`attend_part_reference` (``kvpass::attend_part``) attends the queries to *one* part and returns its output,
normalized within the part, with the log of the part's softmax denominator; :func:`merge_parts_reference`
(``kvpass::merge_parts``) combines any number of them. The merge is the log-sum-exp rescaling FlashAttention
applies between key blocks (Dao et al., arXiv:2205.14135; its split-K decode, "Flash-Decoding", merges the same
way): with ``L = logsumexp_p(lse_p)``, ``out = sum_p exp(lse_p - L) * out_p`` is exactly the softmax over the union
of the parts' slots, in any order and any grouping (so ring passes may merge two at a time: :func:`merge_two`).

Layout as in :mod:`kvpass.ops.kv`: keys/values ``[B, H_kv, N, D]``, ``k_pos [B, H_kv, N]`` int64 logical positions
(-1: empty or padding slot), query heads ``H_q = group * H_kv`` (query head ``j`` reads kv head ``j // group``).
Visibility is by position only, not by slot index, so a part may hold any subset of the store's slots in any
order: a query at position ``p`` sees slots with ``0 <= k_pos <= p`` (and ``p - k_pos < window`` with a sliding
window). A query that sees no slot of a part gets ``lse = -inf`` and a zero output from it, which the merge weighs
by zero; no NaN is ever produced (unlike :func:`kvpass.ops.kv.attention_mask`, no query attends to itself by
default: a padding query, ``q_pos = -1``, sees nothing and keeps a zero output).

Both ops are functional, so graphs that use them stay compilable and exportable. Triton kernels:
``kvpass.kernels.merge_parts`` and ``kvpass.kernels.attend_part``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpass.ops.kv import _CHUNK_ELEMENTS, _QUERY_CHUNK, soft_capped
from kvpass.policies import policy_from_spec

_NEG_INF = float("-inf")


def part_mask(k_pos: Tensor, q_pos: Tensor, window: int = 0) -> Tensor:
    """``[B, H_kv, T, N]`` bool: query ``i`` (at position ``q_pos[b, i]``) sees slot ``n`` of kv head ``h``:
    ``0 <= k_pos <= q_pos`` and, with a sliding ``window > 0``, ``q_pos - k_pos < window``."""
    kp = k_pos[:, :, None, :]
    qp = q_pos[:, None, :, None]
    visible = (kp >= 0) & (kp <= qp)
    if window > 0:
        visible = visible & (qp - kp < window)
    return visible


def attend_part_reference(
    q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor, scale: float, window: int = 0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention of ``T`` queries over one part of a store: its normalized output and log-sum-exp.

    q: ``[B, H_q, T, D]``; k: ``[B, H_kv, N, D]``; v: ``[B, H_kv, N, D_v]``; k_pos: ``[B, H_kv, N]`` int64 (-1:
    empty); q_pos: ``[B, T]`` int64 each query's position (-1: a padding query, which sees nothing); scale: the
    logits' factor; window: sliding-window length, 0 for none; softcap: logits become
    ``softcap * tanh(logits / softcap)`` after scaling (Gemma-2), 0 for none.

    Returns ``(out [B, H_q, T, D_v] in q's dtype, lse [B, H_q, T] float32)``: ``out`` is the softmax-weighted sum
    of the visible values of this part, ``lse`` the natural log of its softmax denominator (the sum over visible
    slots of ``exp(logit)``). A row that sees no slot gets ``out = 0``, ``lse = -inf``. Computed in float32; the
    queries go in chunks so the ``[rows, N]`` temporaries stay bounded for long ``T``.
    """
    out, lse, _ = _attend_part(q, k, v, k_pos, q_pos, scale, window, softcap, 0)
    return out, lse


def _rows_per_chunk(group: int, n) -> int:
    """Queries attended at a time over ``n`` slots with ``group`` query heads per kv head: the ``[rows, N]``
    temporaries stay near ``_CHUNK_ELEMENTS`` (a symbolic ``n``, while tracing: ``_QUERY_CHUNK``)."""
    return max(16, min(_QUERY_CHUNK, _CHUNK_ELEMENTS // max(1, group * n))) if isinstance(n, int) else _QUERY_CHUNK


def attend_part_flash(
    q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor, scale: float, window: int = 0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`attend_part_reference`'s result from PyTorch's fused flash attention for CPU
    (``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp): for eager code that
    attends where a lower tier lives (:mod:`kvpass.ops.tier`), where the reference's separate logits, masking,
    ``logsumexp``, ``exp`` and product each cost a pass over memory. Equal to the reference within float32
    summation order (``tests/test_ops_partial.py``). The same chunks of queries as the reference bound the mask;
    a logit soft cap, a part with no slot, or tensors off the CPU, take the reference."""
    if softcap or q.device.type != "cpu" or k.device.type != "cpu" or k.shape[2] == 0:
        return attend_part_reference(q, k, v, k_pos, q_pos, scale, window, softcap)
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    group = hq // hkv
    qg = q.view(b, hkv, group, t, d)
    kf, vf = k.float(), v.float()
    rows = _rows_per_chunk(group, n)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        r = stop - start
        visible = part_mask(k_pos, q_pos[:, start:stop], window)  # [B, H_kv, r, N]
        # the query heads of a kv head folded into the query axis (no K/V copy), the mask repeated to match
        mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, _NEG_INF)
        mask = mask[:, :, None].expand(b, hkv, group, r, n).reshape(b, hkv, group * r, n)
        qc = qg[:, :, :, start:stop].reshape(b, hkv, group * r, d).float()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, kf, vf, 0.0, False,
                                                                              attn_mask=mask, scale=scale)
        # the kernel gives a row that sees nothing lse 0; the reference's contract is lse -inf and a zero output
        seen = visible.any(dim=-1)[:, :, None].expand(b, hkv, group, r).reshape(b, hkv, group * r)
        outs.append(torch.where(seen[..., None], out, 0.0).view(b, hkv, group, r, dv))
        lses.append(torch.where(seen, lse, _NEG_INF).view(b, hkv, group, r))
    if not outs:  # no queries
        return q.new_zeros(b, hq, 0, dv), q.new_zeros(b, hq, 0, dtype=torch.float32)
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=3) if len(lses) > 1 else lses[0]
    return out.reshape(b, hq, t, dv).to(q.dtype), lse.reshape(b, hq, t).contiguous()


def attend_part_observed_reference(
    q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor, scale: float, policy: str, window: int = 0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`attend_part_reference` plus the part's softmax weights of the last ``policy.n_obs(T)`` queries,
    ``[B, H_q, n_obs, N]`` float32 (``n_obs = 0`` for a policy that reads none), normalized within the part: what a
    policy scoring a split store needs, once :func:`merged_observation` rescales them by the merged log-sum-exp."""
    rule = policy_from_spec(policy)
    return _attend_part(q, k, v, k_pos, q_pos, scale, window, softcap, rule.n_obs(q.shape[2]) if rule.needs_obs else 0)


def _attend_part(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor, scale: float, window: int,
                 softcap: float, n_obs: int) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    group = hq // hkv
    # GQA without copying K/V: fold each group of query heads into the query axis (as kv.attend_reference does)
    qg = q.view(b, hkv, group, t, d)
    kf, vf = k.float(), v.float()
    rows = _rows_per_chunk(group, n)
    first_obs = t - n_obs
    # chunks never straddle first_obs, so the observed rows are whole chunks
    bounds = [*range(0, first_obs, rows), *range(first_obs, t, rows), t] if t else []
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    observed: list[Tensor] = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        r = stop - start
        qc = qg[:, :, :, start:stop].reshape(b, hkv, group * r, d).float()
        logits = soft_capped((qc @ kf.transpose(-1, -2)) * scale, softcap).view(b, hkv, group, r, n)
        visible = part_mask(k_pos, q_pos[:, start:stop], window)[:, :, None]  # [B, H_kv, 1, r, N]
        logits = logits.masked_fill(~visible, _NEG_INF)
        lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is visible
        # exp(-inf - 0) = 0: a row with nothing visible gets zero weights, so a zero output, never NaN
        weights = torch.exp(logits - torch.where(lse == _NEG_INF, 0.0, lse)[..., None])
        outs.append((weights.view(b, hkv, group * r, n) @ vf).view(b, hkv, group, r, dv))
        lses.append(lse)
        if start >= first_obs:
            observed.append(weights)
    if not outs:  # no queries
        return (q.new_zeros(b, hq, 0, dv), q.new_zeros(b, hq, 0, dtype=torch.float32),
                q.new_zeros(b, hq, 0, n, dtype=torch.float32))
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=3) if len(lses) > 1 else lses[0]
    if observed:
        obs = (torch.cat(observed, dim=3) if len(observed) > 1 else observed[0]).reshape(b, hq, n_obs, n)
    else:
        obs = q.new_zeros(b, hq, 0, n, dtype=torch.float32)
    return out.reshape(b, hq, t, dv).to(q.dtype), lse.reshape(b, hq, t).contiguous(), obs.contiguous()


def merged_observation(observed: Tensor, lse_part: Tensor, lse: Tensor, reduce: str) -> Tensor:
    """A part's observed weights (``[B, H_q, n_obs, N]``, :func:`attend_part_observed_reference`) as the unsplit
    softmax weighs them, ``exp(logit - lse)``: rescaled by ``exp(lse_part - lse)`` of their queries (``lse_part``,
    ``lse``: ``[B, H_q, T]``, this part's and the merged log-sum-exp), then summed (``reduce="sum"``) or maximized
    (``"max"``) over the queries: ``[B, H_q, N]``, what :func:`kvpass.ops.kv.attend_reference` returns as ``obs``
    over the whole store. Plain tensor code (traced into the graph). Needs ``n_obs >= 1``."""
    n_obs = observed.shape[2]
    tail = slice(lse.shape[2] - n_obs, None)
    scale = torch.exp(lse_part[:, :, tail] - torch.where(lse[:, :, tail] == _NEG_INF, 0.0, lse[:, :, tail]))
    weighed = observed * torch.where(lse_part[:, :, tail] == _NEG_INF, 0.0, scale)[..., None]
    return weighed.amax(dim=2) if reduce == "max" else weighed.sum(dim=2)


attend_part = torch.library.custom_op("kvpass::attend_part", mutates_args=())(attend_part_reference)


@attend_part.register_fake
def _(q, k, v, k_pos, q_pos, scale, window=0, softcap=0.0):
    b, hq, t = q.shape[:3]
    return q.new_empty(b, hq, t, v.shape[-1]), q.new_empty(b, hq, t, dtype=torch.float32)


attend_part_observed = torch.library.custom_op("kvpass::attend_part_observed", mutates_args=())(
    attend_part_observed_reference)


@attend_part_observed.register_fake
def _(q, k, v, k_pos, q_pos, scale, policy, window=0, softcap=0.0):
    b, hq, t = q.shape[:3]
    rule = policy_from_spec(policy)
    n_obs = rule.n_obs(t) if rule.needs_obs else 0
    return (q.new_empty(b, hq, t, v.shape[-1]), q.new_empty(b, hq, t, dtype=torch.float32),
            q.new_empty(b, hq, n_obs, k.shape[2], dtype=torch.float32))


def sink_lse(sinks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Learned sink logits as a part's ``lse`` of ``shape`` ``[B, H, T]``, float32: ``[H]`` (one per head,
    GPT-OSS) or anything broadcastable to ``[B, H, T]``."""
    sinks = sinks.float()
    if sinks.dim() == 1:
        sinks = sinks.view(1, -1, 1)
    return sinks.expand(shape)


def merge_parts_reference(outs: Tensor, lses: Tensor, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact merge of ``P`` partial attentions over disjoint parts of one store.

    outs: ``[P, B, H, T, D_v]`` each part's normalized output; lses: ``[P, B, H, T]`` float32 their log-sum-exps;
    sinks: ``None`` or learned attention-sink logits, ``[H]`` (or broadcastable to ``[B, H, T]``), float: each is
    one more part with that ``lse`` and a zero output, i.e. ``exp(sink)`` joins the softmax denominator (GPT-OSS).

    Returns ``(out [B, H, T, D_v] in outs' dtype, lse [B, H, T] float32)``: ``lse = logsumexp_p(lse_p)`` (sinks
    included) and ``out = sum_p exp(lse_p - lse) * out_p``. Parts with ``lse_p = -inf`` contribute nothing (their
    outputs are not read, so even a NaN there is ignored); a row whose parts are all ``-inf`` gets ``out = 0``
    and ``lse = -inf`` (``lse = sink`` with sinks: the sink is a part), never NaN.
    """
    lse_all = lses.float()
    if sinks is not None:
        lse_all = torch.cat([lse_all, sink_lse(sinks, lses.shape[1:])[None]], dim=0)
    lse = torch.logsumexp(lse_all, dim=0)
    weights = torch.exp(lses.float() - torch.where(lse == _NEG_INF, 0.0, lse))[..., None]  # [P, B, H, T, 1]
    terms = torch.where(weights > 0, weights * outs.float(), 0.0)
    return terms.sum(dim=0).to(outs.dtype), lse


merge_parts = torch.library.custom_op("kvpass::merge_parts", mutates_args=())(merge_parts_reference)


@merge_parts.register_fake
def _(outs, lses, sinks=None):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:], dtype=torch.float32)


def merge_two(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attentions (``[..., D_v]`` outputs, ``[...]`` log-sum-exps), as :func:`merge_parts` does
    for ``P = 2``: the step of a ring pass that folds in one more part at a time. Returns ``(out in out_a's dtype,
    lse float32)``."""
    return merge_parts(torch.stack([out_a, out_b.to(out_a.dtype)]), torch.stack([lse_a.float(), lse_b.float()]))


# op overload → its pure-torch reference (the eviction passes insert them for a store split over ranks; the
# lowerings inline them where kvpass.ops.REFERENCES are inlined)
PARTIAL_REFERENCES = {
    torch.ops.kvpass.attend_part.default: attend_part_reference,
    torch.ops.kvpass.merge_parts.default: merge_parts_reference,
    torch.ops.kvpass.attend_part_observed.default: attend_part_observed_reference,
}

__all__ = ["PARTIAL_REFERENCES", "attend_part", "attend_part_flash", "attend_part_observed",
           "attend_part_observed_reference", "attend_part_reference", "merge_parts", "merge_parts_reference",
           "merge_two", "merged_observation", "part_mask", "sink_lse"]
