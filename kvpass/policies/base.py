"""The policy interface: what a KV-eviction policy sees and returns.

Each forward, every attention layer holds ``N`` candidate slots (the kept store followed by the
``n_new`` tokens of this forward). A policy turns what the attention op measured into two tensors of
shape ``[B, H_kv, N]``:

* ``keep`` ranks the slots; the store keeps the ``budget`` highest (``+inf`` protects a slot;
  padding and empty slots are forced to ``-inf`` by the compaction op, so they never displace real tokens);
* ``acc`` is the per-slot statistic carried to the next forward for the slots that survive
  (accumulated attention for H2O; zeros for policies that need no memory).

``score`` is pure tensor code with no data-dependent Python branches: it may branch on shapes
(``N == n_new`` means "this forward is the prefill"), which are static in a compiled graph.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import torch
from torch import Tensor

from kvpass.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class; subclasses are frozen dataclasses whose fields are the policy's options."""

    name: ClassVar[str] = ""
    # Whether score() reads attention weights; False lets the attention op skip computing them.
    needs_obs: ClassVar[bool] = True
    # How the attention op reduces the observed queries' weights: "sum" or "max".
    obs_reduce: ClassVar[str] = "sum"

    def n_obs(self, n_new: int) -> int:
        """How many trailing queries of this forward the attention op must report weights for.

        ``n_new`` may be a SymInt (dynamic prompt length): use ``torch.sym_min``, not ``min``.
        """
        return 0

    def layer_budget(self, total: int, layer: int, n_layers: int, prompt_len: int | None = None) -> int:
        """Budget of ``layer`` when the user asked for ``total`` per layer on average.

        ``prompt_len``: the prompt's length where the budget is a share of it (option ``ratio``); None where the
        budget is fixed before any prompt is seen (option ``budget``: one store size for every prompt length).
        """
        return total

    def score(
        self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int
    ) -> tuple[Tensor, Tensor]:
        """Return ``(keep, acc)``, both ``[B, H_kv, N]`` float32.

        obs:  ``[B, H_q, N]`` softmax weights summed (``obs_reduce``) over the last ``n_obs(n_new)`` queries
              (empty if 0)
        keys: ``[B, H_kv, N, D]`` candidate keys (after RoPE)
        pos:  ``[B, H_kv, N]`` int64 logical positions, ``-1`` for padding / empty slots
        acc:  ``[B, H_kv, N]`` float32 statistic carried from earlier forwards (0 for new tokens)
        """
        raise NotImplementedError

    def spec(self) -> str:
        """JSON that :func:`kvpass.policies.policy_from_spec` turns back into this policy."""
        return json.dumps({"name": self.name, **dataclasses.asdict(self)}, sort_keys=True)


def check_window_and_kernel(window: int, kernel_size: int) -> None:
    """Observation-window policies: ``window >= 1`` queries, an odd pooling ``kernel_size`` (centred)."""
    if window < 1:
        raise OptionError(f"kvpass: option 'window' must be >= 1, got {window!r}")
    if kernel_size % 2 != 1:
        raise OptionError(f"kvpass: option 'kernel_size' must be odd, got {kernel_size!r}")


def group_mean(obs: Tensor, n_kv_heads: int) -> Tensor:
    """Average ``[B, H_q, N]`` over each GQA group → ``[B, H_kv, N]``."""
    b, hq, n = obs.shape
    return obs.view(b, n_kv_heads, hq // n_kv_heads, n).mean(dim=2)


def recent_mask(pos: Tensor, n_recent: int) -> Tensor:
    """True for slots among the ``n_recent`` most recent logical positions of each (batch, kv-head)."""
    newest = pos.amax(dim=-1, keepdim=True)
    return (pos > newest - n_recent) & (pos >= 0)


def protect_recent(keep: Tensor, pos: Tensor, n_recent: int, budget: int) -> Tensor:
    """Protect the newest ``min(n_recent, budget)`` positions: never more slots than the store keeps.

    A window wider than the layer's budget would otherwise mark more slots ``+inf`` than fit, and the compaction
    (lowest slot first among ties) would keep the *oldest* of them, dropping the prompt's final tokens.
    """
    return protect(keep, recent_mask(pos, min(n_recent, budget)))


def protect(keep: Tensor, mask: Tensor) -> Tensor:
    return keep.masked_fill(mask, float("inf"))


def zeros_like_scores(pos: Tensor) -> Tensor:
    return torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
