"""EpiCache: keep what an episode's patched prompt attends to.

Kim et al., "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering"
(arXiv:2509.17396; reference code apple/ml-epicache). The conversation is prefilled block by block; after each
block, the episode's patched prompt (an instruction and the episode's representative conversation windows) is run
over the cache, and every cached key is scored by the largest weight any patched-prompt query of its GQA group gives
it, the weights normalized by a softmax over the **context keys only** (``scores="context"``, the reference's
``_get_score_flatten``); the top ``budget`` keys stay. kvpass appends the patched prompt to each block as
observation-only tokens (``BlockwisePrefill``'s ``observe`` flags): the block's own keys are unchanged (causal
attention), the patched queries attend to store, block and the patched prompt as in the reference's forward, their
keys are never stored, and the block graph computes the scores with ``kvpass::context_scores`` — one forward instead
of the reference's two.

``scores="forward"`` (a kvpass departure, kept to measure it) scores with the forward's own softmax, which also spans
the patched prompt's keys. Each block rescores the whole store from scratch (as the reference does); with
``accumulate=True`` a slot keeps its best score over all blocks instead — KVzip's rule (Kim et al., arXiv:2505.23416:
each chunk is scored once, by its own reconstruction, then kept or evicted globally), the one to use when each block
is observed by a copy of itself. The reference never evicts while answering (question and answer are appended and
sliced off afterwards): kvpass's ``reserve`` option gives the store that room. A forward of at most ``window`` new
tokens that must evict anyway (past the reserve) keeps each slot's best score so far and protects the newest
``window`` tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpass.errors import OptionError
from kvpass.policies.base import Policy, check_window_and_kernel, protect, recent_mask


@dataclasses.dataclass(frozen=True)
class EpiCache(Policy):
    window: int = 128  # decode: the newest tokens kept (and the queries observed) when a forward must evict
    accumulate: bool = False  # blocks keep each slot's best score instead of rescoring from scratch
    kernel_size: int = 1      # max-pool scores along the keys (SnapKV's clustering; 1 = off, the paper's rule)
    scores: str = "context"   # block scores' softmax: over the context keys (the reference) or the whole "forward"
    name = "epicache"
    obs_reduce = "max"
    SCORES = ("context", "forward")

    def __post_init__(self) -> None:
        check_window_and_kernel(self.window, self.kernel_size)
        if self.scores not in self.SCORES:
            raise OptionError(f"kvpass: option 'scores' must be one of {list(self.SCORES)}, got {self.scores!r}")

    @property
    def needs_obs(self) -> bool:
        """Context scores come from ``kvpass::context_scores`` in block graphs, not from the attention op."""
        return self.scores == "forward"

    @property
    def needs_observation_prompt(self) -> bool:
        """Blocks are scored by an observation prompt's queries only (none given: nothing to score with)."""
        return self.scores == "context"

    def n_obs(self, n_new: int) -> int:
        return torch.sym_min(self.window, n_new)

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        if obs.shape[-1] == 0:  # context scores, a forward continuing the store: the build's scores, newest kept
            return protect(acc, recent_mask(pos, min(self.window, budget))), acc
        b, hq, n = obs.shape
        n_kv = keys.shape[1]
        attention = obs.view(b, n_kv, hq // n_kv, n).amax(dim=2)
        if self.kernel_size > 1:  # slots are in position order: pooling keeps a scored token's neighbours
            pad = self.kernel_size // 2
            attention = F.max_pool1d(attention.reshape(b * n_kv, 1, n), self.kernel_size, 1, pad).view(b, n_kv, n)
        # a prefill block (context scores come only in block graphs; the forward rule tells a block by its length)
        if self.scores == "context" or not isinstance(n_new, int) or n_new > self.window:
            if self.accumulate:
                attention = torch.maximum(acc, attention)
            return attention, attention
        acc = torch.maximum(acc, attention)
        return protect(acc, recent_mask(pos, min(self.window, budget))), acc
