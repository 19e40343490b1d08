"""CUDA lowering of the ``kvpass::*`` ops to the fused Triton kernels of ``kvpass.kernels``.

Two routes, one graph:

* eager / ``aot_eager`` / Inductor with opaque ops: :func:`register` gives ``kvpass::attend``,
  ``kvpass::compact``, ``kvpass::elastic_attend`` and ``kvpass::score`` (SnapKV / PyramidKV at prefill;
  other policies keep their reference) a CUDA implementation that launches the kernels (CPU keeps the
  references);
* Inductor on CUDA: :func:`decompositions` maps the ops to ``triton_op`` variants
  (``kvpass_triton::attend`` / ``compact`` / ``elastic_attend`` / ``snapkv_scores``) so Inductor sees the
  kernels themselves and schedules them with the surrounding code.

The pure-torch references can be forced on every device (debugging): globally with
``KVPASS_REFERENCE=1`` in the environment, or per compiled graph with the backend option
``reference_kernels=True``, which the backend applies through :func:`compiled_with_reference` (the
choice of decompositions at compile time and the ops' CUDA implementations at run time both read
:func:`reference_forced`). :func:`forcing_reference` does the same for any block of code.
Kernels are imported only when a CUDA tensor reaches them, so CPU-only installs never load Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from kvpass.ops import REFERENCES, attend_reference, compact_reference, score_reference
from kvpass.ops.dllm import elastic_attend_reference
from kvpass.policies import policy_from_spec

ENV_REFERENCE = "KVPASS_REFERENCE"
_FORCED = contextvars.ContextVar("kvpass_reference_kernels", default=False)


def reference_forced() -> bool:
    """Whether the pure-torch references replace the kernels here: ``$KVPASS_REFERENCE`` is set, or we run
    inside :func:`forcing_reference` (e.g. a graph compiled with the option ``reference_kernels=True``)."""
    return _FORCED.get() or os.environ.get(ENV_REFERENCE, "0").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def forcing_reference(enabled: bool = True) -> Iterator[None]:
    """Inside the block the kvpass ops run their references on every device (``enabled=False``: no change;
    an enclosing forcing block or ``$KVPASS_REFERENCE`` still applies)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"kvpass: reference_kernels must be True or False, got {enabled!r}")
    token = _FORCED.set(_FORCED.get() or enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)


def compiled_with_reference(reference_kernels: bool, compile: Callable[[], Callable]) -> Callable:
    """``compile()`` and its result with the references forced when ``reference_kernels`` (the backend option).

    The compilation runs inside :func:`forcing_reference` (Inductor then gets no ``triton_op`` decompositions)
    and so does every call of the compiled function (the ops' CUDA implementations check at run time).
    """
    with forcing_reference(reference_kernels):
        fn = compile()
    if not reference_kernels:
        return fn

    def run(*args, **kwargs):
        with forcing_reference(True):
            return fn(*args, **kwargs)

    return run


def n_obs_for(policy: str, n_new: int) -> int:
    """How many trailing queries the attention kernel must report weights for (0: none)."""
    rule = policy_from_spec(policy)
    return int(rule.n_obs(n_new)) if rule.needs_obs else 0


def attend_kernel(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str, window: int,
                  softcap: float = 0.0, sinks: Tensor | None = None,
                  wrap: Callable | None = None) -> tuple[Tensor, Tensor]:
    """``kvpass::attend`` through the fused attention + scores kernel (same contract as the reference)."""
    from kvpass.kernels.attend_scores import attend_scores

    reduce = getattr(policy_from_spec(policy), "obs_reduce", "sum")
    return attend_scores(q, k, v, pos, scale, n_obs_for(policy, q.shape[2]), window, wrap=wrap, obs_reduce=reduce,
                         softcap=softcap, sinks=sinks)


def compact_kernel(k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int,
                   window: int, wrap: Callable | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kvpass::compact`` through the selection + compaction kernel (same contract as the reference)."""
    from kvpass.kernels.compact import compact

    return compact(k, v, pos, keep, acc, budget, capacity, window, wrap=wrap)


def elastic_kernel(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor, q_cache: Tensor,
                   track: Tensor, track_weight: Tensor, window: Tensor, window_weight: Tensor, excluded: Tensor,
                   wrap: Callable | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``kvpass::elastic_attend`` through the fused attention + drift-test kernels (same contract as the reference)."""
    from kvpass.kernels.elastic_drift import elastic_attend

    return elastic_attend(q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight,
                          excluded, wrap=wrap)


def snapkv_prefill(policy: str, k: Tensor, n_new: int):
    """The policy when the SnapKV scores kernel computes its ``kvpass::score``: SnapKV or PyramidKV on a
    prefill (the store was empty: ``N == n_new``); else None (the policy's reference code runs)."""
    from kvpass.policies.snapkv import SnapKV

    rule = policy_from_spec(policy)
    return rule if isinstance(rule, SnapKV) and k.shape[2] == n_new else None


def score_kernel(policy: str, obs: Tensor, k: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int,
                 wrap: Callable | None = None) -> tuple[Tensor, Tensor]:
    """``kvpass::score`` of SnapKV / PyramidKV at prefill through the pooled-scores kernel (:func:`snapkv_prefill`)."""
    from kvpass.kernels.snapkv_scores import snapkv_scores

    rule = snapkv_prefill(policy, k, n_new)
    if rule is None:
        raise ValueError(f"kvpass: the SnapKV scores kernel serves SnapKV/PyramidKV prefills only; got policy "
                         f"{policy!r} with N={k.shape[2]} slots and n_new={n_new}")
    # (the protected window never exceeds the store: the newest min(window, budget) positions)
    return snapkv_scores(obs, pos, rule.n_obs(n_new), min(rule.window, budget), rule.kernel_size, rule.pooling,
                         wrap=wrap)


def _attend_cuda(q, k, v, pos, scale, policy, window, softcap=0.0, sinks=None):
    if reference_forced():
        return attend_reference(q, k, v, pos, scale, policy, window, softcap, sinks)
    return attend_kernel(q, k, v, pos, scale, policy, window, softcap, sinks)


def _compact_cuda(k, v, pos, keep, acc, budget, capacity, window):
    if reference_forced():
        return compact_reference(k, v, pos, keep, acc, budget, capacity, window)
    return compact_kernel(k, v, pos, keep, acc, budget, capacity, window)


def _score_cuda(policy, obs, k, pos, acc, n_new, budget):
    if reference_forced() or snapkv_prefill(policy, k, n_new) is None:
        return score_reference(policy, obs, k, pos, acc, n_new, budget)
    return score_kernel(policy, obs, k, pos, acc, n_new, budget)


def _elastic_cuda(*args):
    if reference_forced():
        return elastic_attend_reference(*args)
    return elastic_kernel(*args)


@functools.cache
def register() -> None:
    """Give ``kvpass::attend`` / ``compact`` / ``elastic_attend`` / ``score`` CUDA implementations (idempotent)."""
    torch.library.register_kernel("kvpass::attend", "cuda", _attend_cuda)
    torch.library.register_kernel("kvpass::score", "cuda", _score_cuda)
    torch.library.register_kernel("kvpass::compact", "cuda", _compact_cuda)
    torch.library.register_kernel("kvpass::elastic_attend", "cuda", _elastic_cuda)


@functools.cache
def triton_ops() -> tuple[Callable, Callable, Callable, Callable]:
    """``kvpass_triton::attend``, ``compact``, ``elastic_attend`` and ``score`` (SnapKV prefill): the kernels as
    ``triton_op``s (defined once)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("kvpass_triton::attend", mutates_args=())
    def attend(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str,
               window: int, softcap: float = 0.0, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return attend_kernel(q, k, v, pos, scale, policy, window, softcap, sinks, wrap=wrap_triton)

    @triton_op("kvpass_triton::compact", mutates_args=())
    def compact(k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int,
                window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return compact_kernel(k, v, pos, keep, acc, budget, capacity, window, wrap=wrap_triton)

    @triton_op("kvpass_triton::elastic_attend", mutates_args=())
    def elastic(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor, q_cache: Tensor,
                track: Tensor, track_weight: Tensor, window: Tensor, window_weight: Tensor,
                excluded: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return elastic_kernel(q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight,
                              excluded, wrap=wrap_triton)

    @triton_op("kvpass_triton::score", mutates_args=())
    def score(policy: str, obs: Tensor, k: Tensor, pos: Tensor, acc: Tensor, n_new: int,
              budget: int) -> tuple[Tensor, Tensor]:
        return score_kernel(policy, obs, k, pos, acc, n_new, budget, wrap=wrap_triton)

    return attend, compact, elastic, score


def on_cuda(example_inputs: Sequence) -> bool:
    return any(isinstance(x, Tensor) and x.device.type == "cuda" for x in example_inputs)


def decompositions(example_inputs: Sequence, inline_ops: bool) -> dict | None:
    """AOTAutograd decompositions for Inductor: the kernels' ``triton_op``s on CUDA, else the references
    when ``inline_ops`` (``None``: keep the ops opaque)."""
    if not on_cuda(example_inputs) or reference_forced():
        return dict(REFERENCES) if inline_ops else None
    attend, compact, elastic, score = triton_ops()
    table = dict(REFERENCES) if inline_ops else {}
    table[torch.ops.kvpass.attend.default] = attend
    table[torch.ops.kvpass.compact.default] = compact
    table[torch.ops.kvpass.elastic_attend.default] = elastic

    def score_on_cuda(policy, obs, k, pos, acc, n_new, budget):
        if snapkv_prefill(policy, k, n_new) is not None:
            return score(policy, obs, k, pos, acc, n_new, budget)
        # other policies: their reference inlined, or the op kept opaque (NotImplemented: no decomposition)
        return score_reference(policy, obs, k, pos, acc, n_new, budget) if inline_ops else NotImplemented

    table[torch.ops.kvpass.score.default] = score_on_cuda
    return table


__all__ = ["ENV_REFERENCE", "attend_kernel", "compact_kernel", "compiled_with_reference", "decompositions",
           "elastic_kernel", "forcing_reference", "n_obs_for", "reference_forced", "register", "score_kernel",
           "snapkv_prefill", "triton_ops"]
