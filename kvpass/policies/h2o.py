"""H2O: heavy hitters (accumulated attention) plus a recent window, evicting at every step.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv:2306.14048). Each slot accumulates the attention it receives from every query
(summed over queries, averaged over the GQA group); the ``recent`` newest tokens are always kept and
the rest of the budget goes to the slots with the largest accumulated attention. ``recent=None`` splits
the budget evenly between heavy hitters and recent tokens, as in the paper. A ``recent`` above the budget
protects the newest ``budget`` tokens.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from kvpass.policies.base import Policy, group_mean, protect_recent


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    recent: int | None = None
    name = "h2o"

    def n_obs(self, n_new: int) -> int:
        return n_new

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        acc = acc + group_mean(obs, keys.shape[1])
        n_recent = budget // 2 if self.recent is None else self.recent
        return protect_recent(acc, pos, n_recent, budget), acc
