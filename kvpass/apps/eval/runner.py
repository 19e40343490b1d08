"""Drive a causal LM's ``forward`` (eager, or compiled through kvpass) over benchmark samples.

Every call goes through ``forward(input_ids=..., cache=..., use_cache=True,
logits_to_keep=...)``, the signature of an HF ``*ForCausalLM.forward``: the same loop serves the
eager full-KV reference and ``torch.compile(model.forward, backend="kvpass", options=...)``.
Prefill is one call over the whole prompt; decode feeds one token per call. Every call passes
``position_ids`` with the tokens' true positions: a compressed cache is shorter than the sequence, so
positions must not be derived from its length.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Forward",
    "Generation",
    "Scored",
    "new_cache",
    "greedy_generate",
    "score_continuation",
    "cache_bytes",
    "warm_up",
    "reset_peak_rss",
    "peak_rss",
]

Forward = Callable[..., Any]


@dataclass(frozen=True)
class Generation:
    """A greedy continuation and what it cost."""

    token_ids: tuple[int, ...]
    prefill_s: float
    decode_ms_per_token: float
    kv_bytes: int


@dataclass(frozen=True)
class Scored:
    """Teacher-forced negative log-likelihood of target tokens after a context."""

    nll_sum: float
    num_tokens: int
    prefill_s: float
    decode_ms_per_token: float
    kv_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.num_tokens, 1))


def new_cache(model: torch.nn.Module) -> Any:
    """A fresh :class:`kvpass.CompressedCache` for ``model`` (a ``DynamicCache``; sliding-window layers from its
    config) — uncompressed forwards use it as HF's own."""
    from kvpass.runtime.cache import CompressedCache

    return CompressedCache(config=model.config)


def cache_bytes(cache: Any, storage: bool = False) -> int:
    """Bytes of the tensors of a KV cache object (walked a few levels deep).

    By default the logical size (elements x itemsize of each distinct tensor view): what decoding
    keeps. ``storage=True`` counts the underlying storages instead, which can be larger right after
    prefill (HF's sliding-window layers keep a view of the whole prompt's keys until the next step).
    """
    seen: set[object] = set()
    total = 0

    def walk(obj: Any, depth: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return
            if storage:
                key: object = obj.untyped_storage().data_ptr()
                size = obj.untyped_storage().nbytes()
            else:
                key = (obj.data_ptr(), tuple(obj.shape), obj.stride(), obj.dtype)
                size = obj.numel() * obj.element_size()
            if key not in seen:
                seen.add(key)
                total += size
            return
        if depth <= 0 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            return
        if isinstance(obj, dict):
            items: Sequence[Any] = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = obj
        elif hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for x in items:
            walk(x, depth - 1)

    walk(cache, 4)
    return total


def warm_up(forward: Forward, model: torch.nn.Module, ids: torch.Tensor, store: int, block: int = 512,
            steps: int = 2) -> None:
    """Compile what a run over the prompt ``ids`` (``[1, T]``) will use, on a prefix of it through a throwaway cache
    (prefill, then ``steps`` decode steps), so that run's times and memory are its own. The prefix is on the same side
    of ``store`` (the slots a store keeps, per rank when split) as the prompt: a prefill graph compiled for a prompt
    its store holds whole recompiles once for a longer one. ``block``: the prefill block (else any short length)."""
    t = ids.shape[1]
    n = min(t, 2 * block) if t <= store else min(t, store + 2 * block)
    ids = ids[:, :n].clone()  # (a slice keeps the prompt's row stride, which Dynamo guards: the run would recompile)
    with torch.inference_mode():
        cache = new_cache(model)
        forward(input_ids=ids, cache=cache, position_ids=_positions(0, n, ids.device), use_cache=True,
                logits_to_keep=1)
        for i in range(steps):
            # a step's token is a fresh [1, 1] tensor (an argmax), strides (1, 1): a clone of the slice would keep
            # the prompt's row stride, which Dynamo specializes on, and the run's first step would recompile
            token = ids[:, -1:].clone(memory_format=torch.contiguous_format)
            forward(input_ids=token, cache=cache, position_ids=_positions(n + i, 1, ids.device), use_cache=True)


def reset_peak_rss() -> int | None:
    """Reset this process's peak resident set (Linux: ``VmHWM``, by ``/proc/self/clear_refs``) and return the resident
    set now, in bytes: :func:`peak_rss` less it is then the peak *growth* of what runs next (compiled before, so not
    the compiler's). None where the OS keeps no such counter (then :func:`peak_rss` is the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return resident_bytes()
    except OSError:
        return None


def peak_rss() -> int:
    """This process's peak resident set in bytes, since the last :func:`reset_peak_rss` (Linux) or its start."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def resident_bytes() -> int:
    """This process's resident set now, in bytes (Linux: ``VmRSS``; OSError elsewhere)."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(
    forward: Forward,
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    cache: Any = None,
    start: int = 0,
) -> Generation:
    """Greedy decoding of up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1).

    ``cache``/``start``: continue a cache that already holds ``start`` tokens (positions go on from there);
    default a fresh cache.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = new_cache(model) if cache is None else cache
    _sync(device)
    t0 = time.perf_counter()
    out = forward(input_ids=ids, position_ids=_positions(start, ids.shape[1], device), cache=cache,
                  use_cache=True, logits_to_keep=1)
    cache = out.cache if out.cache is not None else cache
    nxt = out.logits[:, -1].argmax(-1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    kv_bytes = cache_bytes(cache)
    generated = [int(nxt)]
    t1 = time.perf_counter()
    steps = 0
    while len(generated) < max_new_tokens and generated[-1] not in stop_ids:
        pos = _positions(start + len(prompt_ids) + len(generated) - 1, 1, device)
        out = forward(input_ids=nxt[:, None], position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache if out.cache is not None else cache
        nxt = out.logits[:, -1].argmax(-1)
        generated.append(int(nxt))
        steps += 1
    _sync(device)
    decode_ms = 1000 * (time.perf_counter() - t1) / steps if steps else float("nan")
    return Generation(tuple(generated), prefill_s, decode_ms, kv_bytes)


@torch.inference_mode()
def score_continuation(
    forward: Forward,
    model: torch.nn.Module,
    context_ids: Sequence[int],
    target_ids: Sequence[int],
) -> Scored:
    """Prefill ``context_ids``, then feed ``target_ids`` one token at a time through the cache.

    The first target token is scored from the prefill's last logits; every later one from the
    decode step that consumed its predecessor. So a KV-compression policy that compacts after
    prefill (or during decode) is scored on exactly the cache it keeps.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids)], dtype=torch.long, device=device)
    targets = list(target_ids)
    cache = new_cache(model)
    _sync(device)
    t0 = time.perf_counter()
    out = forward(input_ids=ids, position_ids=_positions(0, ids.shape[1], device), cache=cache,
                  use_cache=True, logits_to_keep=1)  # fmt: skip
    _sync(device)
    prefill_s = time.perf_counter() - t0
    kv_bytes = cache_bytes(cache)
    nll = -torch.log_softmax(out.logits[0, -1].float(), -1)[targets[0]].item()
    t1 = time.perf_counter()
    for i, (prev, tgt) in enumerate(zip(targets[:-1], targets[1:], strict=True)):
        step = torch.tensor([[prev]], dtype=torch.long, device=device)
        pos = _positions(len(context_ids) + i, 1, device)
        out = forward(input_ids=step, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache if out.cache is not None else cache
        nll -= torch.log_softmax(out.logits[0, -1].float(), -1)[tgt].item()
    _sync(device)
    steps = len(targets) - 1
    decode_ms = 1000 * (time.perf_counter() - t1) / steps if steps else float("nan")
    return Scored(nll, len(targets), prefill_s, decode_ms, kv_bytes)
