"""EpiCache: keep what an episode's patched prompt attends to.

Kim et al., "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering"
(arXiv:2509.17396). The conversation is prefilled block by block; after each block, the episode's
patched prompt (representative utterances of one cluster of the conversation) is run over the cache,
and every cached key is scored by the largest softmax weight any patched-prompt query of its GQA group
gives it; the top ``budget`` keys stay. kvpass appends the patched prompt to each block as
observation-only tokens (``BlockwisePrefill``'s ``observe`` flags): the block's own keys are unchanged
(causal attention), the patched queries see store, block and the patched prompt, and their keys are never
stored — one forward instead of the paper's two.

Each block rescores the whole store from scratch (as the paper does); with ``accumulate=True`` a slot
keeps its best score over all blocks instead — KVzip's rule (Kim et al., arXiv:2505.23416: each chunk is
scored once, by its own reconstruction, then kept or evicted globally), the one to use when each block
is observed by a copy of itself. A forward of at most ``window`` new tokens (a question, a decode step)
keeps each slot's best score so far and protects the newest ``window`` tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpass.policies.base import Policy, check_window_and_kernel, protect, recent_mask


@dataclasses.dataclass(frozen=True)
class EpiCache(Policy):
    window: int = 128  # observation queries: the (padded) patched prompt's length
    accumulate: bool = False  # blocks keep each slot's best score instead of rescoring from scratch
    kernel_size: int = 1      # max-pool scores along the keys (SnapKV's clustering; 1 = off, the paper's rule)
    name = "epicache"
    obs_reduce = "max"

    def __post_init__(self) -> None:
        check_window_and_kernel(self.window, self.kernel_size)

    def n_obs(self, n_new: int) -> int:
        return torch.sym_min(self.window, n_new)

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        b, hq, n = obs.shape
        n_kv = keys.shape[1]
        attention = obs.view(b, n_kv, hq // n_kv, n).amax(dim=2)
        if self.kernel_size > 1:  # slots are in position order: pooling keeps a scored token's neighbours
            pad = self.kernel_size // 2
            attention = F.max_pool1d(attention.reshape(b * n_kv, 1, n), self.kernel_size, 1, pad).view(b, n_kv, n)
        if not isinstance(n_new, int) or n_new > self.window:  # a prefill block
            if self.accumulate:
                attention = torch.maximum(acc, attention)
            return attention, attention
        acc = torch.maximum(acc, attention)
        return protect(acc, recent_mask(pos, self.window)), acc
