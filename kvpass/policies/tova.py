"""TOVA: evict the slot the current query attends to least, averaged over heads.

Oren et al., "Transformers are Multi-State RNNs", 2024 (arXiv:2401.06104). The score of each slot is
the last query's softmax weight averaged over all attention heads, so every kv-head keeps the same
token set; at prefill the last prompt token is the query, and every decode step evicts again.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from kvpass.policies.base import Policy


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    name = "tova"

    def n_obs(self, n_new: int) -> int:
        return 1

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        keep = obs.mean(dim=1, keepdim=True).expand(-1, keys.shape[1], -1).contiguous()
        return keep, keep
