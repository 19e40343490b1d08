"""The lower tier of a tiered KV store: what the device store evicted, kept in host memory or in memory-mapped files.

With option ``offload``, each rewritten layer's compiled forward returns, besides its compacted store, the slots the
compaction evicted (``kvpass::evicted``); the graph's runner appends them to the layer's :class:`LowerTier`, which
travels with the store it belongs to (its :class:`~kvpass.runtime.state.StoreState`), so every cache has its own.
A forward continuing the store receives the tier's tensors as inputs and attends to them where they live
(``kvpass::tier_attend``): the KV is never copied back to the device.

Layout: ``k [B, H_kv, L, D]``, ``v [B, H_kv, L, D_v]``, ``pos [B, H_kv, L]`` int64 (-1: empty), of which the first
``used`` slots are written; ``L`` grows by doubling (amortized O(1) per appended token), and the compiled graphs take
it as a symbolic size, so growth never recompiles. ``"disk"`` tiers are files in ``offload_dir``, mapped with
``torch.from_file(shared=True)`` and unlinked at once: the mapping keeps them alive exactly as long as the tier, and
the OS pages them in and out (a crashed process leaves no files behind); what a tier writes or its attention reads
is released from the process's resident memory at once (:func:`kvpass.ops.tier.release_mapped`), so a disk tier
costs the process one run of ``TIER_CHUNK`` slots, however long it grows.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor

from kvpass.ops.tier import TIER_CHUNK, release_mapped

# slots a lower tier is first allocated with (at least): a decode step then appends for a while before it grows
_FIRST_SLOTS = 256


@dataclasses.dataclass(eq=False)
class LowerTier:
    """One layer's lower tier, for one cache (one row per batch row of it)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    used: int                 # slots written (the same for every batch row and kv head)
    kind: str                 # "cpu" (host memory) or "disk" (memory-mapped files)
    directory: str | None     # "disk": where its files are made
    moved_bytes: int = 0      # bytes the last forward moved between the device and this tier (kvpass.kv_stats)

    @classmethod
    def empty(cls, kind: str, directory: str | None, like_k: Tensor, like_v: Tensor, slots: int = 0) -> LowerTier:
        """A tier with no slots written, with room for at least ``slots``, for keys/values shaped like ``like_k``,
        ``like_v`` (``[B, H_kv, *, D]``)."""
        b, h, _, d = like_k.shape
        n = max(_FIRST_SLOTS, slots)
        return cls(_allocate(kind, directory, (b, h, n, d), like_k.dtype),
                   _allocate(kind, directory, (b, h, n, like_v.shape[-1]), like_v.dtype),
                   _allocate(kind, directory, (b, h, n), torch.int64, fill=-1), 0, kind, directory)

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> int:
        """Write evicted slots (``[B, H_kv, n, *]``, any device) after the ``used`` ones, growing first if needed;
        returns the bytes written."""
        n = k.shape[2]
        if n == 0:
            return 0
        if self.used + n > self.k.shape[2]:
            self._grow(max(2 * self.k.shape[2], self.used + n))
        end = self.used + n
        self.k[:, :, self.used:end].copy_(k)
        self.v[:, :, self.used:end].copy_(v)
        self.pos[:, :, self.used:end].copy_(pos)
        for x in (self.k, self.v, self.pos):  # a disk tier: what was written goes to the file, not this process
            release_mapped(x, self.used, end)
        self.used = end
        return sum(x.numel() * x.element_size() for x in (k, v, pos))

    def inputs(self, attended: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What a compiled forward takes: the whole allocation (contiguous, as the graph was compiled for) and the
        number of slots its attention reads in place (those written; 0 where a SentenceKV step only retrieves)."""
        return self.k, self.v, self.pos, torch.tensor(self.used if attended else 0, dtype=torch.int64)

    def rows(self, select: Callable[[Tensor], Tensor]) -> LowerTier:
        """A new tier holding ``select`` of this one's batch rows (beam search's reorders, batch selections)."""
        k, v, pos = (select(x[:, :, : self.used]) for x in (self.k, self.v, self.pos))
        tier = LowerTier.empty(self.kind, self.directory, k, v, self.k.shape[2])
        tier.append(k, v, pos)
        return tier

    def __deepcopy__(self, memo: dict) -> LowerTier:
        """A copy of the same kind (a disk tier's copy gets its own files), holding the written slots."""
        copy = self.rows(lambda x: x)
        copy.moved_bytes = self.moved_bytes
        memo[id(self)] = copy
        return copy

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values written (the allocation's unwritten slots not counted)."""
        per_slot = self.k[:, :, :1].numel() * self.k.element_size() + self.v[:, :, :1].numel() * self.v.element_size()
        return per_slot * self.used

    @property
    def real_tokens(self) -> int:
        """Slots holding real tokens, summed over batch rows and kv heads."""
        return int((self.pos[:, :, : self.used] >= 0).sum())

    def _grow(self, slots: int) -> None:
        old = self.k, self.v, self.pos
        grown = LowerTier.empty(self.kind, self.directory, self.k, self.v, slots)
        for new, was in zip((grown.k, grown.v, grown.pos), old, strict=True):
            for start in range(0, self.used, TIER_CHUNK):  # a disk tier: one run of either file's pages resident
                end = min(self.used, start + TIER_CHUNK)
                new[:, :, start:end].copy_(was[:, :, start:end])
                release_mapped(new, start, end)
                release_mapped(was, start, end)
        self.k, self.v, self.pos = grown.k, grown.v, grown.pos


def _allocate(kind: str, directory: str | None, shape: tuple[int, ...], dtype: torch.dtype, fill: int = 0) -> Tensor:
    """A CPU tensor of ``shape``: in host memory, or (``"disk"``) mapped from a new file in ``directory``."""
    if kind == "cpu":
        return torch.full(shape, fill, dtype=dtype)
    numel = 1
    for size in shape:
        numel *= size
    handle, path = tempfile.mkstemp(prefix="kvpass-tier-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(handle, numel * torch.empty((), dtype=dtype).element_size())
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(handle)
        os.unlink(path)  # the mapping keeps the file's blocks until the tensor is freed
    if fill:
        tensor.fill_(fill)
        release_mapped(tensor, 0, shape[2])
    return tensor


__all__ = ["LowerTier"]
