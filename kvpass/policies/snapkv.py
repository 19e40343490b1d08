"""SnapKV: score the prompt by the attention of an observation window, pooled along keys.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). At prefill, the last ``window`` queries' softmax weights are averaged over the
window, pooled along the key axis (``kernel_size``, average or max), averaged over each GQA group, and
the window itself is always kept — the same rule as kvpress's ``SnapKVPress`` (NVIDIA/kvpress,
``kvpress/presses/snapkv_press.py``) so kept sets can be compared. A layer whose budget is below the window
keeps the window's newest ``budget`` tokens (kvpress's PyramidKV falls back to uniform budgets before that
can happen; :func:`~kvpass.policies.base.protect_recent`).

Block-wise prefill (option ``prefill_block``) follows kvpress's ``BlockPress`` (``block_press.py``) around
``SnapKVPress``: each block of more than ``window`` tokens rescores every candidate — the kept store and the
block — with the prompt rule above, the window being the block's last ``window`` tokens, pooled along the
candidates in slot order (the store is kept in position order; with ``head_budgets="adaptive"`` its packed
slots are not, and the pooling then mixes neighbouring slots of other heads). Two differences forced by
kvpass's design: a kept token's own query is gone, so a block of at most ``window`` tokens is scored like a
decode step (below); and BlockPress leaves the first ``budget`` prompt tokens unscored, kvpass scores them
with the first block that overflows the store.

The paper compresses only the prompt; kvpass's store has a fixed capacity, so during decode (a forward of
at most ``window`` tokens over a store) each slot's score is refreshed with the max of its old score and
the attention the new queries pay it, and the newest ``window`` tokens stay protected.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpass.errors import OptionError
from kvpass.policies.base import Policy, check_window_and_kernel, group_mean, protect_recent


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
        elif isinstance(n_new, int) and n_new > self.window:  # a block over the store (kvpress's BlockPress)
            acc = self.pooled_prompt_scores(obs, n_kv, n_window)
        elif isinstance(n_new, int):  # a decode step
            acc = torch.maximum(acc, group_mean(obs, n_kv) / n_window)
        else:  # a forward of dynamic length over a store: the same choice, made on tensors (no shape guard)
            block = torch.full((), n_new, device=obs.device) > self.window
            acc = torch.where(block, self.pooled_prompt_scores(obs, n_kv, n_window),
                              torch.maximum(acc, group_mean(obs, n_kv) / n_window))
        return protect_recent(acc, pos, self.window, budget), acc
