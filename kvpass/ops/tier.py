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

import ctypes
import os
import sys

import torch
from torch import Tensor

from kvpass.ops.kv import compact_ranks, evicted_indices, gather_slots
from kvpass.ops.partial import attend_part_flash, merge_two

# slots of the lower tier attended at a time where it lives: a disk tier's pages are released after each run of this
# many, so the process never holds more than one run of them (and the [rows, slots] temporaries stay bounded)
TIER_CHUNK = 4096
_MADV_DONTNEED = 4  # Linux: drop a range's pages from this process; a shared file mapping keeps its data in the file
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (musl has none)


def release_mapped(x: Tensor, start: int, end: int) -> None:
    """Drop the pages of slots ``start:end`` of a lower-tier tensor (``[B, H, L, *]``) from this process's resident
    memory when the tensor is mapped from a file (a disk tier: its data stays in the file and the OS's page cache, and
    is paged back in when read again); nothing for a host-memory tensor, or off Linux."""
    storage = x.untyped_storage()
    if _LIBC is None or end <= start or storage.filename is None:
        return
    item, (b, h), stride = x.element_size(), x.shape[:2], x.stride()
    base, limit = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    offset = base + x.storage_offset() * item
    if start == 0 and end >= x.shape[2] and x.is_contiguous():  # every slot of every row: one range
        ranges = [(offset, x.numel() * item)]
    else:
        ranges = [(offset + (row * stride[0] + head * stride[1] + start * stride[2]) * item,
                   (end - start) * stride[2] * item) for row in range(b) for head in range(h)]
    for first, size in ranges:
        last = min(limit, first + size)
        first -= first % _PAGE  # (whole pages: a shared mapping loses nothing outside the range)
        if _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"kvpass: madvise on a disk tier's pages failed: "
                          f"{os.strerror(ctypes.get_errno())}")


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc serves an allocation below its mmap threshold from its heap, and that threshold rises to the largest block
    freed so far (up to 32 MiB): after a prefill block's first large temporaries are freed, the next blocks' come from
    the heap, whose freed pages stay resident and scattered, so the resident set creeps up block after block though
    what is live does not. Called between prefill blocks, this keeps the process at what one block needs."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
    :func:`kvpass.ops.partial.attend_part_reference` over those slots (computed by the fused
    :func:`kvpass.ops.partial.attend_part_flash`): attended in runs of ``TIER_CHUNK`` slots,
    merged exactly, a disk tier's pages released after each run (its resident memory stays one run).
    """
    n = int(used)
    if n == 0:  # nothing written, or a SentenceKV step that only retrieves: an empty part, weighed zero by the merge
        b, hq, t = q.shape[:3]
        return (q.new_zeros(b, hq, t, tier_v.shape[-1]),
                torch.full((b, hq, t), float("-inf"), dtype=torch.float32, device=q.device))
    where = tier_k.device
    q_there, q_pos_there = q.to(where), q_pos.to(where)
    merged = None
    for start in range(0, n, TIER_CHUNK):  # (runs of slots: a disk tier's pages released after each)
        end = min(n, start + TIER_CHUNK)
        out, lse = attend_part_flash(q_there, tier_k[:, :, start:end], tier_v[:, :, start:end],
                                     tier_pos[:, :, start:end], q_pos_there, scale, window, softcap)
        out = out.float()  # (merged in float32: one rounding to q's dtype, as a single run has)
        # each run folded into the running result at once: two partials held, however many runs the tier has
        merged = (out, lse) if merged is None else merge_two(*merged, out, lse)
        for x in (tier_k, tier_v, tier_pos):
            release_mapped(x, start, end)
    out, lse = merged
    return out.to(device=q.device, dtype=q.dtype), lse.to(q.device)


tier_attend = torch.library.custom_op("kvpass::tier_attend", mutates_args=())(tier_attend_reference)


@tier_attend.register_fake
def _(q, tier_k, tier_v, tier_pos, used, q_pos, scale, window=0, softcap=0.0):
    b, hq, t = q.shape[:3]
    return q.new_empty(b, hq, t, tier_v.shape[-1]), q.new_empty(b, hq, t, dtype=torch.float32)


def retrieval_index(q_mean: Tensor, means: Tensor, starts: Tensor, lens: Tensor, skip: Tensor, slots: int) -> Tensor:
    """SentenceKV's retrieval: which lower-tier slots each query head attends to this step (traceable: graph nodes).

    q_mean ``[B, H_q, D]`` the mean query of the sentence being generated; means ``[B, H_kv, S, D]`` each sentence's
    abstract (query head ``j`` reads kv head ``j // group``); starts/lens ``[B, H_kv, S]`` int64 the lower-tier slots
    of each sentence a step may retrieve (a run ``[start, start + len)``: the tier keeps each head's tokens in
    position order); skip ``[B]`` bool rows that retrieve nothing this step. As the reference ranks them: sentences by
    the raw dot product of their abstract with ``q_mean``, highest first, their tokens concatenated in that order
    and cut at ``slots``. Returns ``[B, H_q, slots]`` int64 tier slots, ``-1`` where fewer tokens qualify.
    """
    b, hq, d = q_mean.shape
    hkv, s = means.shape[1], means.shape[2]
    group = hq // hkv
    # each query head's scores against its kv head's abstracts (the abstracts not copied per query head)
    scores = (q_mean.float().view(b, hkv, group, d) @ means.float().transpose(-1, -2)).view(b, hq, s)
    order = scores.argsort(dim=-1, descending=True, stable=True).view(b, hkv, group, s)
    lens, starts = (x[:, :, None].expand(b, hkv, group, s).gather(3, order).view(b, hq, s) for x in (lens, starts))
    ends = lens.cumsum(dim=-1)                                               # [B, H_q, S] tokens up to each rank
    # token r's sentence rank: how many ranked sentences end at or before r (ends past the cut count nowhere)
    ended = torch.zeros(b, hq, slots + 1, dtype=ends.dtype, device=ends.device)
    which = ended.scatter_add_(2, ends.clamp(max=slots), torch.ones_like(ends))[:, :, :slots].cumsum(dim=-1)
    found = (which < s) & ~skip.view(b, 1, 1)
    first = starts - (ends - lens)                                           # token r of rank i: slot first[i] + r
    r = torch.arange(slots, device=q_mean.device)
    slot = first.gather(2, which.clamp(max=s - 1)) + r
    return torch.where(found, slot, -1)


def tier_gather_reference(tier_k: Tensor, tier_v: Tensor, tier_pos: Tensor, index: Tensor) -> tuple[Tensor, Tensor,
                                                                                                     Tensor]:
    """The tier I/O of a retrieval: copy the slots ``index`` names out of the lower tier, on the tier's device, to
    ``index``'s device.

    tier_k/tier_v ``[B, H_kv, L, D]``, tier_pos ``[B, H_kv, L]``; index ``[B, H_q, R]`` int64 (query head ``j``
    reads kv head ``j // group``; -1: nothing). Returns ``k [B, H_q, R, D]``, ``v [B, H_q, R, D_v]``,
    ``pos [B, H_q, R]`` (-1 where ``index`` is -1), on ``index``'s device.
    """
    k, v, pos = _gathered(tier_k, tier_v, tier_pos, index.to(tier_k.device))
    _release_all(tier_k, tier_v, tier_pos)
    return k.to(index.device), v.to(index.device), pos.to(index.device)


def _gathered(tier_k: Tensor, tier_v: Tensor, tier_pos: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``tier_gather`` on the tier's device (``idx`` there too)."""
    b, hkv, n, d = tier_k.shape
    hq, r = idx.shape[1:]
    where = tier_k.device
    heads = (torch.arange(b, device=where).view(b, 1, 1) * hkv
             + torch.arange(hq, device=where).view(1, hq, 1) // (hq // hkv))
    flat = (heads * n + idx.clamp(min=0)).reshape(-1)
    k = tier_k.reshape(b * hkv * n, d).index_select(0, flat).view(b, hq, r, d)
    v = tier_v.reshape(b * hkv * n, -1).index_select(0, flat).view(b, hq, r, tier_v.shape[-1])
    pos = tier_pos.reshape(-1).index_select(0, flat).view(b, hq, r).masked_fill(idx < 0, -1)
    return k, v, pos


def _release_all(*tier: Tensor) -> None:
    """A disk tier: the pages a step read go back to the file."""
    for x in tier:
        release_mapped(x, 0, x.shape[2])


tier_gather = torch.library.custom_op("kvpass::tier_gather", mutates_args=())(tier_gather_reference)


@tier_gather.register_fake
def _(tier_k, tier_v, tier_pos, index):
    b, hq, r = index.shape
    return (index.new_empty(b, hq, r, tier_k.shape[-1], dtype=tier_k.dtype),
            index.new_empty(b, hq, r, tier_v.shape[-1], dtype=tier_v.dtype), index.new_empty(b, hq, r))


def tier_attend_retrieved_reference(q: Tensor, q_mean: Tensor, means: Tensor, starts: Tensor, lens: Tensor,
                                    skip: Tensor, tier_k: Tensor, tier_v: Tensor, tier_pos: Tensor, q_pos: Tensor,
                                    scale: float, slots: int, window: int = 0,
                                    softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """SentenceKV's retrieval, selected and attended where the lower tier lives (``offload_attention``; InstInfer
    runs its sparse selection inside the storage too): the tier's side ranks its sentences by their abstracts
    (``means``, ``starts``, ``lens``, kept beside the tier) against the step's mean query ``q_mean`` as
    :func:`retrieval_index` does, attends ``q`` to the ``slots`` tokens per query head that ranking names, and
    returns only the partial output and its log-sum-exp (``[B, H_q, T, D_v]`` in q's dtype, ``[B, H_q, T]``
    float32, on q's device), as :func:`kvpass.ops.partial.attend_part_reference` over those tokens (computed by
    the fused :func:`kvpass.ops.partial.attend_part_flash`). A step moves
    the queries (``q``, ``q_mean``) there and ``O(heads x head_dim)`` back: neither the KV nor a slot index.

    Eager code even where the model is compiled by Inductor: compiling it with Inductor did not change the
    decode step's time (BENCHMARKS.md, "SentenceKV")."""
    where = tier_k.device
    index = retrieval_index(q_mean.to(where), means.to(where), starts.to(where), lens.to(where), skip.to(where),
                            slots)
    k, v, pos = _gathered(tier_k, tier_v, tier_pos, index)
    out, lse = attend_part_flash(q.to(where), k, v, pos, q_pos.to(where), scale, window, softcap)
    _release_all(tier_k, tier_v, tier_pos)
    return out.to(q.device), lse.to(q.device)


tier_attend_retrieved = torch.library.custom_op("kvpass::tier_attend_retrieved", mutates_args=())(
    tier_attend_retrieved_reference)


@tier_attend_retrieved.register_fake
def _(q, q_mean, means, starts, lens, skip, tier_k, tier_v, tier_pos, q_pos, scale, slots, window=0, softcap=0.0):
    b, hq, t = q.shape[:3]
    return q.new_empty(b, hq, t, tier_v.shape[-1]), q.new_empty(b, hq, t, dtype=torch.float32)


# inlined into compiled graphs with the other store ops; tier_attend and tier_gather are not (they run where the tier
# lives)
TIER_REFERENCES = {torch.ops.kvpass.evicted.default: evicted_reference}

__all__ = ["TIER_REFERENCES", "evicted", "evicted_reference", "release_free_heap", "retrieval_index", "tier_attend",
           "tier_attend_reference", "tier_attend_retrieved", "tier_attend_retrieved_reference", "tier_gather",
           "tier_gather_reference"]
