"""SnapKV: score the prompt by the attention of an observation window, pooled along keys.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). At prefill, the last ``window`` queries' softmax weights are averaged over the
window, pooled along the key axis (``kernel_size``, average or max), averaged over each GQA group, and
the window itself is always kept — the same rule as kvpress's ``SnapKVPress`` so kept sets can be
compared. The paper compresses only the prompt; kvpass's store has a fixed capacity, so during decode
each slot's score is refreshed with the max of its old score and the attention the new query pays it,
and the newest ``window`` tokens stay protected.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpass.errors import OptionError
from kvpass.policies.base import Policy, check_window_and_kernel, group_mean, protect, recent_mask


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    window: int = 64
    kernel_size: int = 5
    pooling: str = "avg"
    name = "snapkv"

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "max"):
            raise OptionError(f"kvpass: option 'pooling' must be 'avg' or 'max', got {self.pooling!r}")
        check_window_and_kernel(self.window, self.kernel_size)

    def n_obs(self, n_new: int) -> int:
        return torch.sym_min(self.window, n_new)

    def pooled_prompt_scores(self, obs: Tensor, n_kv_heads: int, n_window: int) -> Tensor:
        """``[B, H_q, N]`` window-summed weights → ``[B, H_kv, N]`` pooled scores (window slots excluded)."""
        n = obs.shape[-1]
        scores = obs[..., : n - n_window] / n_window
        if scores.shape[-1] == 0:  # the window covers the whole prompt: everything is protected
            return obs.new_zeros(obs.shape[0], n_kv_heads, n)
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pad = self.kernel_size // 2
        b, hq, m = scores.shape
        scores = pool(scores.reshape(b * hq, 1, m), self.kernel_size, stride=1, padding=pad).view(b, hq, m)
        scores = group_mean(scores, n_kv_heads)
        return F.pad(scores, (0, n_window), value=0.0)

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        n_kv = keys.shape[1]
        n = keys.shape[2]
        n_window = self.n_obs(n_new)
        if n == n_new:  # prefill: the store was empty, every candidate is a prompt token
            acc = self.pooled_prompt_scores(obs, n_kv, n_window)
        else:
            acc = torch.maximum(acc, group_mean(obs, n_kv) / n_window)
        return protect(acc, recent_mask(pos, self.window)), acc
