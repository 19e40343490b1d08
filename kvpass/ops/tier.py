"""Ops of a tiered KV store: what a compaction evicts, and attention computed where the lower tier lives.

A tiered store (option ``offload``) keeps each layer's fixed-capacity store on the device, as every kvpass store, and
moves what the policy evicts to a lower tier (host memory or memory-mapped files, :mod:`kvpass.runtime.tier`)
instead of dropping it:

* :func:`evicted_reference` (``kvpass::evicted``) returns exactly the candidates :func:`kvpass.ops.kv.compact_reference`
  leaves out (same ranking, same ties), so the device store and the lower tier partition the sequence;
* :func:`tier_attend_reference` (``kvpass::tier_attend``) is InstInfer's in-storage attention (Pan et al.,
  "InstInfer: In-Storage Attention Offloading for Cost-Effective Long-Context LLM Inference", arXiv:2409.04992):
  the lower tier's share of attention computed on the tier's side, over the KV in place, returning only a partial
  output and its log-sum-exp (:func:`kvpass.ops.partial.attend_part_reference`), which ``kvpass::merge_parts``
  merges exactly with the device store's part. A decode step moves the queries to the tier and
  ``O(heads x head_dim)`` back per layer, never the tier's KV.

The lower tier is ``[B, H_kv, L, D]`` with ``L`` its allocated slots, of which the first ``used`` are written (the
rest never read). ``tier_attend`` is never inlined into a compiled graph: it runs where the tier's tensors live (CPU
threads over host memory or the mapped files), whatever device the model runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpass.ops.kv import compact_ranks, evicted_indices, gather_slots
from kvpass.ops.partial import attend_part_reference


def evicted_reference(k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, budget: int,
                      window: int) -> tuple[Tensor, Tensor, Tensor]:
    """The candidates that ``kvpass::compact`` with the same arguments does not keep, in ascending slot order.

    k, v ``[B, H_kv, N, D]``, pos ``[B, H_kv, N]``, keep ``[B, H_kv, N]`` as ``compact`` takes them; returns
    ``(k, v, pos)`` of the ``N - min(budget, N)`` evicted slots per (batch, kv head). A slot that is empty, padding,
    or (with a sliding ``window``) out of every future query's reach gets ``pos = -1``: the lower tier keeps it as
    an empty slot, never attended.
    """
    dead, rank = compact_ranks(pos, keep, window)
    idx = evicted_indices(rank, min(budget, k.shape[2]))
    ev_pos = pos.gather(2, idx).masked_fill(dead.gather(2, idx), -1)
    return gather_slots(k, idx), gather_slots(v, idx), ev_pos


evicted = torch.library.custom_op("kvpass::evicted", mutates_args=())(evicted_reference)


@evicted.register_fake
def _(k, v, pos, keep, budget, window):
    b, h, n, d = k.shape
    out = torch.sym_max(n - budget, 0)
    return k.new_empty(b, h, out, d), v.new_empty(b, h, out, v.shape[-1]), pos.new_empty(b, h, out)


def tier_attend_reference(q: Tensor, tier_k: Tensor, tier_v: Tensor, tier_pos: Tensor, used: Tensor, q_pos: Tensor,
                          scale: float, window: int = 0, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Attention of the queries over the lower tier's first ``used`` slots, computed on the tier's device.

    q ``[B, H_q, T, D]`` (any device); tier_k/tier_v ``[B, H_kv, L, D]``, tier_pos ``[B, H_kv, L]`` (-1: empty),
    on the tier's device; used: 0-d int64, slots written; q_pos ``[B, T]`` the queries' positions. Returns
    ``(out [B, H_q, T, D_v] in q's dtype, lse [B, H_q, T] float32)`` on q's device, as
    :func:`kvpass.ops.partial.attend_part_reference` over those slots.
    """
    n = int(used)
    where = tier_k.device
    out, lse = attend_part_reference(q.to(where), tier_k[:, :, :n], tier_v[:, :, :n], tier_pos[:, :, :n],
                                     q_pos.to(where), scale, window, softcap)
    return out.to(q.device), lse.to(q.device)


tier_attend = torch.library.custom_op("kvpass::tier_attend", mutates_args=())(tier_attend_reference)


@tier_attend.register_fake
def _(q, tier_k, tier_v, tier_pos, used, q_pos, scale, window=0, softcap=0.0):
    b, hq, t = q.shape[:3]
    return q.new_empty(b, hq, t, tier_v.shape[-1]), q.new_empty(b, hq, t, dtype=torch.float32)


# inlined into compiled graphs with the other store ops; tier_attend is not (it runs where the tier lives)
TIER_REFERENCES = {torch.ops.kvpass.evicted.default: evicted_reference}

__all__ = ["TIER_REFERENCES", "evicted", "evicted_reference", "tier_attend", "tier_attend_reference"]
