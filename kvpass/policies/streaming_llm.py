"""StreamingLLM: attention sinks plus a window of the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). The first ``sinks`` tokens are never evicted; the rest of the budget holds the
most recent tokens, so each decode step evicts the oldest non-sink token. A budget below ``sinks`` keeps
the first ``budget`` sinks (never more protected slots than the store holds).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from kvpass.policies.base import Policy, protect, zeros_like_scores


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    sinks: int = 4
    name = "streaming_llm"
    needs_obs = False

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        keep = protect(pos.float(), (pos >= 0) & (pos < min(self.sinks, budget)))
        return keep, zeros_like_scores(pos)
