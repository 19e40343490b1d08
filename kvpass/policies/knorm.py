"""Knorm: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv:2406.11430). Low-norm keys draw high attention, so the score is the negated key norm.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from kvpass.policies.base import Policy, zeros_like_scores


@dataclasses.dataclass(frozen=True)
class Knorm(Policy):
    name = "knorm"
    needs_obs = False

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        return -keys.float().norm(dim=-1), zeros_like_scores(pos)
