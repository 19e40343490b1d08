"""CUDA lowering of the ``kvpass::*`` ops to the fused Triton kernels of ``kvpass.kernels``.

Two routes, one graph:

* eager / ``aot_eager`` / Inductor with opaque ops: :func:`register` gives ``kvpass::attend`` and
  ``kvpass::compact`` a CUDA implementation that launches the kernels (CPU keeps the references);
* Inductor on CUDA: :func:`decompositions` maps the ops to ``triton_op`` variants
  (``kvpass_triton::attend`` / ``kvpass_triton::compact``) so Inductor sees the kernels themselves and
  schedules them with the surrounding code.

``KVPASS_REFERENCE=1`` in the environment forces the pure-torch references everywhere (debugging).
Kernels are imported only when a CUDA tensor reaches them, so CPU-only installs never load Triton.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kvpass.ops import REFERENCES, attend_reference, compact_reference
from kvpass.policies import policy_from_spec

ENV_REFERENCE = "KVPASS_REFERENCE"


def reference_forced() -> bool:
    """Whether ``$KVPASS_REFERENCE`` asks for the pure-torch references instead of the kernels."""
    return os.environ.get(ENV_REFERENCE, "0").strip().lower() not in ("", "0", "false", "no")


def n_obs_for(policy: str, n_new: int) -> int:
    """How many trailing queries the attention kernel must report weights for (0: none)."""
    rule = policy_from_spec(policy)
    return int(rule.n_obs(n_new)) if rule.needs_obs else 0


def attend_kernel(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str, window: int,
                  wrap: Callable | None = None) -> tuple[Tensor, Tensor]:
    """``kvpass::attend`` through the fused attention + scores kernel (same contract as the reference)."""
    from kvpass.kernels.attend_scores import attend_scores

    reduce = getattr(policy_from_spec(policy), "obs_reduce", "sum")
    return attend_scores(q, k, v, pos, scale, n_obs_for(policy, q.shape[2]), window, wrap=wrap, obs_reduce=reduce)


def compact_kernel(k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int,
                   window: int, wrap: Callable | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kvpass::compact`` through the selection + compaction kernel (same contract as the reference)."""
    from kvpass.kernels.compact import compact

    return compact(k, v, pos, keep, acc, budget, capacity, window, wrap=wrap)


def _attend_cuda(q, k, v, pos, scale, policy, window):
    if reference_forced():
        return attend_reference(q, k, v, pos, scale, policy, window)
    return attend_kernel(q, k, v, pos, scale, policy, window)


def _compact_cuda(k, v, pos, keep, acc, budget, capacity, window):
    if reference_forced():
        return compact_reference(k, v, pos, keep, acc, budget, capacity, window)
    return compact_kernel(k, v, pos, keep, acc, budget, capacity, window)


@functools.cache
def register() -> None:
    """Give ``kvpass::attend`` / ``kvpass::compact`` their CUDA implementations (idempotent)."""
    torch.library.register_kernel("kvpass::attend", "cuda", _attend_cuda)
    torch.library.register_kernel("kvpass::compact", "cuda", _compact_cuda)


@functools.cache
def triton_ops() -> tuple[Callable, Callable]:
    """``kvpass_triton::attend`` and ``kvpass_triton::compact``: the kernels as ``triton_op``s (defined once)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("kvpass_triton::attend", mutates_args=())
    def attend(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str,
               window: int) -> tuple[Tensor, Tensor]:
        return attend_kernel(q, k, v, pos, scale, policy, window, wrap=wrap_triton)

    @triton_op("kvpass_triton::compact", mutates_args=())
    def compact(k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int,
                window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return compact_kernel(k, v, pos, keep, acc, budget, capacity, window, wrap=wrap_triton)

    return attend, compact


def on_cuda(example_inputs: Sequence) -> bool:
    return any(isinstance(x, Tensor) and x.device.type == "cuda" for x in example_inputs)


def decompositions(example_inputs: Sequence, inline_ops: bool) -> dict | None:
    """AOTAutograd decompositions for Inductor: the kernels' ``triton_op``s on CUDA, else the references
    when ``inline_ops`` (``None``: keep the ops opaque)."""
    if not on_cuda(example_inputs) or reference_forced():
        return dict(REFERENCES) if inline_ops else None
    attend, compact = triton_ops()
    table = dict(REFERENCES) if inline_ops else {}
    table[torch.ops.kvpass.attend.default] = attend
    table[torch.ops.kvpass.compact.default] = compact
    return table


__all__ = ["ENV_REFERENCE", "attend_kernel", "compact_kernel", "decompositions", "n_obs_for", "reference_forced",
           "register", "triton_ops"]
