"""kvpass vs NVIDIA kvpress on SmolLM2-135M (CPU): kept-token agreement and end-to-end time.

kvpress (https://github.com/NVIDIA/kvpress) is an optional comparison, never a kvpass dependency.
Install it beside this project without letting pip touch torch/transformers (it pins an older
transformers), plus the few modules its ``__init__`` imports::

    pip install --no-deps kvpress==0.5.5
    pip install "cachetools>=5.5.2,<6" "fire>=0.6,<0.7" datasets

Two parts (``--parts``):

agreement
    Essay NIAH prompts (``kvpass.models.data.niah``) of ``--lengths`` tokens. For each policy pair
    (kvpass ``snapkv`` ⇔ ``SnapKVPress(window_size=64, kernel_size=5)``, ``streaming_llm`` ⇔
    ``StreamingLLMPress(n_sink=4)``, ``knorm`` ⇔ ``KnormPress``, ``tova`` ⇔ ``TOVAPress``) the whole
    prompt is prefilled once by each library at the same size: kvpress ``compression_ratio`` r keeps
    ``n_kept = max(1, int(T * (1 - r)))`` pairs per (layer, kv-head) (kvpress ``compute_n_kept``,
    truncation, not rounding), so kvpass gets ``budget = n_kept``. Kept logical positions are read
    from kvpass's session (``pos`` after the prefill) and, for kvpress, from the top-k of the scores its
    press computed (recorded by wrapping the press's ``score``), checked against the compressed cache
    (the gathered keys must equal what kvpress left in the cache). Reported per policy: mean / min
    Jaccard of the two kept sets over (prompt, layer, kv-head), the exact-match rate, and, for the
    mismatches, how far from kvpress's top-k cut the disagreeing positions rank.

timing
    One ``--context``-token prompt, prefill + ``--new-tokens`` greedy decode steps (batch 1, one
    token per forward, explicit ``position_ids``), for: the uncompressed eager HF model; kvpress
    (eager, the press context around the prefill only, as its pipeline does); kvpass compiled with
    each of ``--kvpass-compilers`` (warmed up once on the same prompt length; that compile + warm-up
    time is reported separately and excluded from the steady-state figures). kvpress and kvpass use
    the same policy (SnapKV) and the same kept count. ``os.getloadavg()`` is recorded around every
    timed run; ``--max-load`` waits (up to ``--load-wait-s``) for a quiet machine first.

kvpress 0.5.5 on transformers 5.x: its forward hook reads ``kwargs["cache_position"]`` of the
attention module (``is_prefilling``), which transformers >= 5.3 no longer passes. A forward
pre-hook on every attention module supplies it, computed the way older transformers did
(``arange(past, past + q_len)`` with ``past`` the layer's cached length before this forward).
Decode steps get explicit ``position_ids``: after kvpress prunes the cache, its length is no
longer the next token's position (kvpress's own pipeline passes them for the same reason).
Importing kvpress also wraps every attention function in ``ALL_ATTENTION_FUNCTIONS`` (for its
head-wise presses); this script restores the originals and re-applies kvpress's wrappers only
around kvpress's runs, so the eager and kvpass runs see plain transformers.

    python benchmarks/vs_kvpress.py
    python benchmarks/vs_kvpress.py --parts agreement --lengths 1024,2048 --ratio 0.5
    python benchmarks/vs_kvpress.py --parts timing --context 4096 --ratio 0.75 --max-load 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpass.validate import choice, csv, fraction, positive_int

PARTS = ("agreement", "timing")
AGREEMENT_POLICIES = ("snapkv", "streaming_llm", "knorm", "tova")
KVPASS_COMPILERS = ("inductor", "aot_eager", "eager")
SNAPKV_WINDOW = 64
SNAPKV_KERNEL = 5
STREAMING_SINKS = 4


@dataclass(frozen=True)
class PolicyPair:
    """One kvpass policy and the kvpress press that applies the same rule."""

    kvpass_name: str
    kvpass_options: dict[str, Any]
    press_class: str
    press_kwargs: dict[str, Any]
    note: str


PAIRS: dict[str, PolicyPair] = {
    "snapkv": PolicyPair(
        "snapkv",
        {"window": SNAPKV_WINDOW, "kernel_size": SNAPKV_KERNEL, "pooling": "avg"},
        "SnapKVPress",
        {"window_size": SNAPKV_WINDOW, "kernel_size": SNAPKV_KERNEL},
        "last-64-query attention, avg_pool1d k=5, GQA-group mean, window kept",
    ),
    "streaming_llm": PolicyPair(
        "streaming_llm",
        {"sinks": STREAMING_SINKS},
        "StreamingLLMPress",
        {"n_sink": STREAMING_SINKS},
        "4 sinks + most recent tokens",
    ),
    "knorm": PolicyPair("knorm", {}, "KnormPress", {}, "lowest key L2 norm kept"),
    "tova": PolicyPair("tova", {}, "TOVAPress", {}, "last query's attention, mean over all heads"),
}


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=csv(choice(PARTS, "part")), default=list(PARTS),
                   help=f"comma list of {', '.join(PARTS)} (default: both)")
    p.add_argument("--model", default="smollm2-135m", help="a kvpass.models name (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="kvpress compression_ratio r in (0, 1); kvpass budget = int(T*(1-r)) (default: %(default)s)")
    p.add_argument("--policies", type=csv(choice(AGREEMENT_POLICIES, "policy", "policies")),
                   default=list(AGREEMENT_POLICIES),
                   help=f"agreement: kvpass policies to compare (default: {','.join(AGREEMENT_POLICIES)})")
    p.add_argument("--lengths", type=csv(positive_int), default=[1024, 2048],
                   help="agreement: prompt lengths in tokens (default: 1024,2048)")
    p.add_argument("--depths", type=csv(fraction()), default=[0.25, 0.75],
                   help="agreement: needle depths in [0, 1], one prompt each per length (default: 0.25,0.75)")
    p.add_argument("--agree-compiler", default="aot_eager", choices=KVPASS_COMPILERS,
                   help="kvpass 'compiler' option for the agreement runs (default: %(default)s)")
    p.add_argument("--context", type=positive_int, default=4096, help="timing: prompt length (default: %(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="timing: decode steps (default: %(default)s)")
    p.add_argument("--kvpass-compilers", type=csv(choice(KVPASS_COMPILERS, "compiler")),
                   default=["inductor"], help="timing: kvpass 'compiler' option(s), comma list (default: inductor)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="timing: timed runs per system (default: %(default)s)")
    p.add_argument("--max-load", type=float, default=None,
                   help="timing: wait until the 1-minute load average is below this before timing")
    p.add_argument("--load-wait-s", type=float, default=600.0,
                   help="timing: give up waiting for --max-load after this many seconds (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="NIAH prompt seed (default: %(default)s)")
    p.add_argument("--out", default="results/vs_kvpress.json", help="JSON output path (default: %(default)s)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.ratio < 1.0 or not math.isfinite(args.ratio):
        parser.error(f"--ratio must be in (0, 1) (kvpress compression_ratio), got {args.ratio!r}")
    for n in args.lengths:
        if n <= SNAPKV_WINDOW + SNAPKV_KERNEL:
            parser.error(f"--lengths: {n!r} is too short; SnapKV needs more than {SNAPKV_WINDOW} prompt tokens")
    if args.context <= SNAPKV_WINDOW:
        parser.error(f"--context must be > {SNAPKV_WINDOW} (the SnapKV window), got {args.context!r}")
    if args.max_load is not None and not args.max_load > 0:
        parser.error(f"--max-load must be > 0, got {args.max_load!r}")
    if not args.load_wait_s >= 0:
        parser.error(f"--load-wait-s must be >= 0, got {args.load_wait_s!r}")
    from kvpass.models import MODELS

    if args.model not in MODELS:
        parser.error(f"--model: unknown model {args.model!r}; known: {sorted(MODELS)}")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        parser.error(f"--out {args.out!r} is a directory; give a file path such as results/vs_kvpress.json")
    return args


# ----------------------------------------------------------------------------------------------
# kvpress, as an optional import


@dataclass
class KVPress:
    """The imported kvpress module and the attention functions with / without its patch."""

    module: Any
    version: str
    plain_attention: dict[str, Callable[..., Any]]
    patched_attention: dict[str, Callable[..., Any]]

    @contextlib.contextmanager
    def attention_patch(self) -> Iterator[None]:
        """kvpress's wrapped attention functions, for the duration of a kvpress run."""
        _set_attention(self.patched_attention)
        try:
            yield
        finally:
            _set_attention(self.plain_attention)


def _attention_functions() -> dict[str, Callable[..., Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}


def _set_attention(functions: dict[str, Callable[..., Any]]) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, fn in functions.items():
        ALL_ATTENTION_FUNCTIONS[name] = fn


def import_kvpress() -> KVPress:
    """Import kvpress or exit with a message saying how to get it (it is optional)."""
    plain = _attention_functions()
    try:
        import kvpress
    except Exception as err:  # any import failure means "not usable here"
        sys.exit(
            "vs_kvpress: kvpress is not importable here "
            f"({type(err).__name__}: {err}).\n"
            "It is an optional comparison, never a kvpass dependency. To run this benchmark:\n"
            "    pip install --no-deps kvpress==0.5.5\n"
            '    pip install "cachetools>=5.5.2,<6" "fire>=0.6,<0.7" datasets\n'
            "(--no-deps keeps pip from replacing torch/transformers; the second line adds what kvpress imports.)"
        )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("kvpress")
    except PackageNotFoundError:
        ver = "unknown"
    patched = _attention_functions()
    _set_attention(plain)  # plain transformers everywhere except inside KVPress.attention_patch()
    return KVPress(kvpress, ver, plain, patched)


@contextlib.contextmanager
def cache_position_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Give every attention module the ``cache_position`` kwarg kvpress's hooks read.

    transformers >= 5.3 stopped passing ``cache_position`` down to the attention modules; kvpress 0.5.5
    tests ``cache_position[-1] + 1 == q_len`` to know a forward is the prefill. The pre-hook computes
    it as older transformers did: ``arange(past, past + q_len)``, ``past`` being the tokens this layer
    held before the forward.
    """

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("cache_position") is None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
            kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in _decoder_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return list(inner.layers)


def make_press(kp: KVPress, pair: PolicyPair, ratio: float) -> Any:
    return getattr(kp.module, pair.press_class)(compression_ratio=ratio, **pair.press_kwargs)


def kvpress_n_kept(kp: KVPress, prompt_len: int, ratio: float) -> int:
    """kvpress's own count of kept pairs (``int(T * (1 - r))``, at least 1)."""
    from kvpress.utils import compute_n_kept

    return int(compute_n_kept(prompt_len, ratio))


# ----------------------------------------------------------------------------------------------
# shared helpers


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def kvpass_forward(model: torch.nn.Module, policy: str, budget: int, compiler: str) -> Callable[..., Any]:
    torch._dynamo.reset()  # a clean Dynamo cache per configuration
    options = {"policy": policy, "budget": budget, "compiler": compiler, **PAIRS[policy].kvpass_options}
    return torch.compile(model.forward, backend="kvpass", options=options)


def kvpass_kept(cache: Any) -> list[torch.Tensor]:
    """Per layer, the kept logical positions ``[B, H_kv, C]`` (-1: empty slot) from the stores' kvpass state."""
    from kvpass.runtime.state import store_state

    out = []
    for i, layer in enumerate(cache.layers):
        state = store_state(layer.keys)
        if state is None:
            raise RuntimeError(f"layer {i}: the cache's keys carry no kvpass state (did kvpass compress it?)")
        out.append(state.pos.clone())
    return out


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------
# part 1: kept-token agreement


@dataclass
class PressRecord:
    """What a kvpress press decided per layer: kept indices ``[B, H_kv, n_kept]`` and the scores."""

    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.inference_mode()
def kvpress_prefill_kept(
    kp: KVPress, model: torch.nn.Module, pair: PolicyPair, ratio: float, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Prefill ``ids`` under the press; return per-layer kept indices, scores, and whether the cache agrees.

    kvpress keeps ``scores.topk(n_kept).indices`` (``ScorerPress.compress``); the wrapper recomputes
    exactly that from the very scores tensor the press produced. The check gathers the full keys at
    those indices and compares them with the keys kvpress left in the cache.
    """
    press = make_press(kp, pair, ratio)
    record = PressRecord()
    n_kept = kvpress_n_kept(kp, ids.shape[1], ratio)
    original_score = press.score

    def score(module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, *rest: Any) -> torch.Tensor:
        s = original_score(module, hidden_states, keys, *rest)
        record.kept[module.layer_idx] = s.topk(n_kept, dim=-1).indices
        record.scores[module.layer_idx] = s.float()
        record.keys[module.layer_idx] = keys
        return s

    press.score = score
    cache = new_cache(model)
    with cache_position_hooks(model), kp.attention_patch(), press(model):
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    n_layers = len(cache.layers)
    if sorted(record.kept) != list(range(n_layers)):
        got = sorted(record.kept)
        raise RuntimeError(f"kvpress {pair.press_class} scored layers {got}, expected 0..{n_layers - 1}")
    verified = True
    for i, layer in enumerate(cache.layers):
        idx = record.kept[i]
        full = record.keys[i]
        gathered = full.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, full.shape[-1]))
        verified &= tuple(layer.keys.shape) == tuple(gathered.shape) and torch.equal(layer.keys, gathered)
    return [record.kept[i] for i in range(n_layers)], [record.scores[i] for i in range(n_layers)], verified


@torch.inference_mode()
def kvpass_prefill_kept(forward: Callable[..., Any], model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    t = ids.shape[1]
    out = forward(input_ids=ids, cache=new_cache(model), use_cache=True, logits_to_keep=1,
                  position_ids=torch.arange(t, device=ids.device)[None])
    return kvpass_kept(out.cache)


def compare_sets(
    kvpass_pos: list[torch.Tensor], press_idx: list[torch.Tensor], press_scores: list[torch.Tensor], n_kept: int
) -> list[dict[str, Any]]:
    """One row per (layer, kv-head): sizes, Jaccard, and where the disagreeing positions rank for kvpress."""
    rows = []
    for layer, (pos, idx, scores) in enumerate(zip(kvpass_pos, press_idx, press_scores, strict=True)):
        b, h, _ = pos.shape
        for bi in range(b):
            order = scores[bi].argsort(dim=-1, descending=True, stable=True)  # kvpress ranking per head
            for hi in range(h):
                a = {int(p) for p in pos[bi, hi].tolist() if p >= 0}
                k = {int(p) for p in idx[bi, hi].tolist()}
                union = a | k
                row: dict[str, Any] = {
                    "layer": layer, "batch": bi, "head": hi, "kvpass_kept": len(a), "kvpress_kept": len(k),
                    "jaccard": len(a & k) / len(union) if union else 1.0, "only_kvpass": len(a - k),
                    "only_kvpress": len(k - a),
                }  # fmt: skip
                if 0 < n_kept < order.shape[-1]:
                    # how close kvpress's own top-k boundary was to a tie (relative score gap at the cut)
                    cut = scores[bi, hi][order[hi][n_kept - 1]].item()
                    nxt = scores[bi, hi][order[hi][n_kept]].item()
                    row["cut_rel_gap"] = abs(cut - nxt) / max(abs(cut), abs(nxt), 1e-30)
                if a != k:
                    rank = torch.empty_like(order[hi])
                    rank[order[hi]] = torch.arange(order.shape[-1])
                    diff = sorted(a ^ k)
                    # distance of each disagreeing position from kvpress's top-k cut (0 = right at the cut)
                    ranks = [int(rank[p]) for p in diff]
                    dist = [r - n_kept if r >= n_kept else n_kept - 1 - r for r in ranks]
                    row["max_rank_from_cut"] = max(dist)
                    row["examples_only_kvpass"] = sorted(a - k)[:5]
                    row["examples_only_kvpress"] = sorted(k - a)[:5]
                rows.append(row)
    return rows


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    js = [r["jaccard"] for r in rows]
    mism = [r for r in rows if r["jaccard"] < 1.0]
    per_layer: dict[int, list[float]] = {}
    for r in rows:
        per_layer.setdefault(r["layer"], []).append(r["jaccard"])
    out: dict[str, Any] = {
        "cells": len(rows),
        "mean_jaccard": statistics.fmean(js) if js else float("nan"),
        "min_jaccard": min(js) if js else float("nan"),
        "exact_match_rate": sum(1 for j in js if j == 1.0) / len(js) if js else float("nan"),
        "mismatched_cells": len(mism),
        "per_layer_mean_jaccard": {str(k): statistics.fmean(v) for k, v in sorted(per_layer.items())},
    }
    gaps = [r["cut_rel_gap"] for r in rows if "cut_rel_gap" in r]
    if gaps:
        out["min_cut_rel_gap"] = min(gaps)
        out["median_cut_rel_gap"] = statistics.median(gaps)
        out["cells_with_tie_at_cut"] = sum(1 for g in gaps if g == 0.0)
    if mism:
        out["mismatch_max_rank_from_cut"] = max(r["max_rank_from_cut"] for r in mism)
        out["mismatch_median_max_rank_from_cut"] = statistics.median(r["max_rank_from_cut"] for r in mism)
        out["mismatch_positions_per_cell_mean"] = statistics.fmean(r["only_kvpass"] for r in mism)
    return out


def run_agreement(args: argparse.Namespace, kp: KVPress, model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    from kvpass.models.data.niah import niah_samples

    samples = niah_samples(tok, lengths=tuple(args.lengths), depths=tuple(args.depths), seed=args.seed)
    by_len: dict[int, list[Any]] = {}
    for s in samples:
        by_len.setdefault(len(s.prompt_ids), []).append(s)
    result: dict[str, Any] = {"prompts": [s.uid for s in samples], "policies": {}}
    for name in args.policies:
        pair = PAIRS[name]
        rows: list[dict[str, Any]] = []
        prompts: list[dict[str, Any]] = []
        t_policy = time.perf_counter()
        for length, group in sorted(by_len.items()):
            n_kept = kvpress_n_kept(kp, length, args.ratio)  # the kvpass budget: kvpress's own count
            forward = kvpass_forward(model, name, n_kept, args.agree_compiler)
            for s in group:
                ids = torch.tensor([list(s.prompt_ids)], dtype=torch.long)
                press_idx, press_scores, verified = kvpress_prefill_kept(kp, model, pair, args.ratio, ids)
                kv_pos = kvpass_prefill_kept(forward, model, ids)
                cell_rows = compare_sets(kv_pos, press_idx, press_scores, n_kept)
                for r in cell_rows:
                    r["prompt"] = s.uid
                rows += cell_rows
                summ = summarize_rows(cell_rows)
                needle = range(*s.meta["needle_spans"][0])
                prompts.append({
                    "uid": s.uid, "length": length, "n_kept": n_kept, "kvpress_cache_verified": verified,
                    "mean_jaccard": summ["mean_jaccard"], "exact_match_rate": summ["exact_match_rate"],
                    "needle_kept_frac_kvpass": _kept_frac(kv_pos, needle),
                    "needle_kept_frac_kvpress": _kept_frac(press_idx, needle),
                    "window_fully_kept_kvpass": _kept_frac(kv_pos, range(length - SNAPKV_WINDOW, length)) == 1.0,
                    "window_fully_kept_kvpress": _kept_frac(press_idx, range(length - SNAPKV_WINDOW, length)) == 1.0,
                })  # fmt: skip
                print(f"  {name:>13} {s.uid}: n_kept {n_kept}, mean Jaccard {summ['mean_jaccard']:.4f}, "
                      f"exact {summ['exact_match_rate']:.3f}, kvpress cache verified {verified}", flush=True)
        summary = summarize_rows(rows)
        summary["seconds"] = time.perf_counter() - t_policy
        summary["pair"] = {"kvpass": {"policy": name, **pair.kvpass_options},
                           "kvpress": {"press": pair.press_class, "compression_ratio": args.ratio, **pair.press_kwargs},
                           "rule": pair.note}  # fmt: skip
        summary["prompts"] = prompts
        summary["mismatches"] = [r for r in rows if r["jaccard"] < 1.0][:50]
        result["policies"][name] = summary
    return result


def _kept_frac(kept: list[torch.Tensor], positions: range) -> float:
    """Fraction of (layer, kv-head, position in ``positions``) that a kept-index list holds."""
    want = torch.tensor(list(positions))
    hits = total = 0
    for t in kept:
        flat = t.reshape(-1, t.shape[-1])
        for row in flat:
            hits += int(torch.isin(want, row).sum())
            total += len(want)
    return hits / total if total else float("nan")


# ----------------------------------------------------------------------------------------------
# part 2: end-to-end time


@dataclass
class Timed:
    system: str
    prefill_s: float
    decode_ms_per_token: float
    decode_ms_median: float
    total_s: float
    kv_mib_after_prefill: float
    kv_slots_layer0: int
    tokens: list[int]
    load_before: list[float]
    load_after: list[float]
    graphs_compiled_during: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _kv_mib(cache: Any) -> tuple[float, int]:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total / 2**20, int(cache.layers[0].keys.shape[-2])


@torch.inference_mode()
def timed_generate(
    system: str,
    forward: Callable[..., Any],
    model: torch.nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    prefill_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Timed:
    """Prefill, then ``new_tokens`` one-token greedy decode forwards, all with explicit positions."""
    t_len = ids.shape[1]
    cache = new_cache(model)
    load_before = loadavg()
    g0 = graphs_compiled()
    t0 = time.perf_counter()
    with prefill_context():
        out = forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1,
                      position_ids=torch.arange(t_len)[None])
    nxt = out.logits[:, -1].argmax(-1)
    prefill_s = time.perf_counter() - t0
    cache = out.cache if out.cache is not None else cache
    kv_mib, slots = _kv_mib(cache)
    tokens = [int(nxt)]
    steps: list[float] = []
    for i in range(new_tokens):
        ts = time.perf_counter()
        out = forward(input_ids=nxt[:, None], cache=cache, use_cache=True, logits_to_keep=1,
                      position_ids=torch.tensor([[t_len + i]]))
        cache = out.cache if out.cache is not None else cache
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt))
        steps.append(time.perf_counter() - ts)
    total = time.perf_counter() - t0
    return Timed(system, prefill_s, 1000 * statistics.fmean(steps), 1000 * statistics.median(steps), total,
                 kv_mib, slots, tokens, load_before, loadavg(), graphs_compiled() - g0)


def wait_for_low_load(max_load: float | None, wait_s: float) -> dict[str, Any]:
    info: dict[str, Any] = {"max_load": max_load, "load_at_start": loadavg()}
    if max_load is None:
        return info
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= max_load and time.perf_counter() - t0 < wait_s:
        print(f"  waiting for load < {max_load} (now {loadavg()})", flush=True)
        time.sleep(15)
    info["waited_s"] = round(time.perf_counter() - t0, 1)
    info["load_reached"] = os.getloadavg()[0] < max_load
    info["load_when_started"] = loadavg()
    if not info["load_reached"]:
        print(f"  load still {loadavg()} after {wait_s:.0f} s; timing anyway (figures are noisy)", flush=True)
    return info


def run_timing(args: argparse.Namespace, kp: KVPress, model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    from kvpass.models.data.niah import niah_samples

    sample = niah_samples(tok, lengths=(args.context,), depths=(0.5,), seed=args.seed)[0]
    ids = torch.tensor([list(sample.prompt_ids)], dtype=torch.long)
    n_kept = kvpress_n_kept(kp, args.context, args.ratio)
    pair = PAIRS["snapkv"]
    load = wait_for_low_load(args.max_load, args.load_wait_s)
    result: dict[str, Any] = {"prompt": sample.uid, "context": args.context, "new_tokens": args.new_tokens,
                              "ratio": args.ratio, "n_kept": n_kept, "load": load, "runs": []}  # fmt: skip

    # Untimed warm-ups of the eager paths (allocator, kernels, kvpress's hooks) on a short prompt.
    short = ids[:, : min(256, args.context)]
    timed_generate("warm-up", model.forward, model, short, 2)
    kvpress_ctx = _kvpress_prefill_context(kp, model, pair, args.ratio)
    timed_generate("warm-up", model.forward, model, short, 2, kvpress_ctx)

    compiled: dict[str, tuple[Callable[..., Any], float, Timed]] = {}
    runs: list[Timed] = []
    for rep in range(args.repeats):
        print(f"  repeat {rep + 1}/{args.repeats}: eager full KV ...", flush=True)
        runs.append(timed_generate("HF eager, full KV", model.forward, model, ids, args.new_tokens))
        print(f"  repeat {rep + 1}/{args.repeats}: kvpress SnapKVPress ...", flush=True)
        runs.append(timed_generate(f"kvpress {kp.version} SnapKVPress (eager hooks)", model.forward, model, ids,
                                   args.new_tokens, kvpress_ctx))
        for compiler in args.kvpass_compilers:
            if compiler not in compiled:
                print(f"  kvpass snapkv ({compiler}): compiling + warm-up ...", flush=True)
                forward = kvpass_forward(model, "snapkv", n_kept, compiler)
                t0 = time.perf_counter()
                warm = timed_generate("warm-up", forward, model, ids, 2)
                compiled[compiler] = (forward, time.perf_counter() - t0, warm)
            forward, warm_s, warm = compiled[compiler]
            print(f"  repeat {rep + 1}/{args.repeats}: kvpass snapkv ({compiler}) ...", flush=True)
            run = timed_generate(f"kvpass snapkv ({compiler})", forward, model, ids, args.new_tokens)
            # compile time ≈ warm-up wall time minus what the same work costs once compiled
            run.extra = {"compile_and_warmup_s": warm_s, "warmup_graphs_compiled": warm.graphs_compiled_during,
                         "compile_s_est": warm_s - (run.prefill_s + 2 * run.decode_ms_per_token / 1000)}
            runs.append(run)
    result["runs"] = [r.__dict__ for r in runs]
    result["load"]["load_at_end"] = loadavg()
    # greedy-token agreement of the compressed runs with the full-KV run and with each other
    first = {}
    for r in runs:
        first.setdefault(r.system, r.tokens)
    full = next(v for k, v in first.items() if k.startswith("HF eager"))
    press = next(v for k, v in first.items() if k.startswith("kvpress"))
    result["token_agreement"] = {
        k: {"same_as_full": _same_prefix(v, full), "same_as_kvpress": _same_prefix(v, press)} for k, v in first.items()
    }
    result["text"] = {k: tok.decode(v[:40], skip_special_tokens=True) for k, v in first.items()}
    return result


def _kvpress_prefill_context(
    kp: KVPress, model: torch.nn.Module, pair: PolicyPair, ratio: float
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        press = make_press(kp, pair, ratio)
        with cache_position_hooks(model), kp.attention_patch(), press(model):
            yield

    return ctx


def _same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (how long two greedy runs agree)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# report


def print_agreement(res: dict[str, Any], ratio: float) -> None:
    print(f"\nKept-token agreement after prefill (kvpress compression_ratio {ratio} ⇔ kvpass budget int(T*(1-r))):")
    print(f"  {'policy':<14}{'cells':>7}{'mean J':>9}{'min J':>9}{'exact':>8}  {'max rank from cut':>18}"
          f"{'min cut gap':>13}{'ties':>6}  needle kept (kvpass / kvpress)")
    for name, s in res["policies"].items():
        nk = statistics.fmean(p["needle_kept_frac_kvpass"] for p in s["prompts"])
        np_ = statistics.fmean(p["needle_kept_frac_kvpress"] for p in s["prompts"])
        rank = s.get("mismatch_max_rank_from_cut", "-")
        print(f"  {name:<14}{s['cells']:>7}{s['mean_jaccard']:>9.4f}{s['min_jaccard']:>9.4f}"
              f"{s['exact_match_rate']:>8.3f}  {rank!s:>18}{s.get('min_cut_rel_gap', float('nan')):>13.2e}"
              f"{s.get('cells_with_tie_at_cut', 0):>6}  {nk:.3f} / {np_:.3f}")
    print("  cells = prompts x layers x kv-heads; 'max rank from cut': how far (in kvpress's score ranking) the\n"
          "  furthest disagreeing position sits from its top-k boundary; 'min cut gap': smallest relative score gap\n"
          "  between kvpress's n_kept-th and next token (0 = a tie, where top-k order decides); 'ties': such cells")


def print_timing(res: dict[str, Any]) -> None:
    print(f"\nEnd-to-end, {res['context']}-token prompt + {res['new_tokens']} decode steps, batch 1, "
          f"SnapKV keeping {res['n_kept']} (ratio {res['ratio']}):")
    print(f"  {'system':<40}{'prefill s':>10}{'decode ms/tok':>14}{'(median)':>9}{'total s':>9}{'KV MiB':>8}"
          f"{'slots':>7}{'load 1m':>9}  same tokens as full / kvpress")
    for r in res["runs"]:
        agree = res["token_agreement"][r["system"]]
        print(f"  {r['system']:<40}{r['prefill_s']:>10.2f}{r['decode_ms_per_token']:>14.1f}"
              f"{r['decode_ms_median']:>9.1f}{r['total_s']:>9.2f}{r['kv_mib_after_prefill']:>8.1f}"
              f"{r['kv_slots_layer0']:>7}{r['load_before'][0]:>9.2f}  "
              f"{agree['same_as_full']}/{agree['same_as_kvpress']} of {res['new_tokens'] + 1}")
        if r["extra"]:
            print(f"  {'':<40}compile + warm-up {r['extra']['compile_and_warmup_s']:.1f} s "
                  f"(compile ≈ {r['extra']['compile_s_est']:.1f} s, {r['extra']['warmup_graphs_compiled']} graph(s)); "
                  f"graphs compiled while timed: {r['graphs_compiled_during']}")
    print(f"  load average: start {res['load']['load_at_start']}, end {res['load']['load_at_end']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kp = import_kvpress()
    torch.set_num_threads(args.threads)
    from kvpass.models import load

    model, tok = load(args.model)
    model.eval()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": "python benchmarks/vs_kvpress.py " + shlex.join(argv_list),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "kvpress": kp.version,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "model": args.model,
        "load_at_start": loadavg(),
    }  # fmt: skip
    print(f"kvpress {kp.version}, torch {torch.__version__}, transformers {result['versions']['transformers']}, "
          f"{torch.get_num_threads()} threads, load average {result['load_at_start']}")
    t0 = time.perf_counter()
    if "agreement" in args.parts:
        print("\n[agreement]", flush=True)
        result["agreement"] = run_agreement(args, kp, model, tok)
        print_agreement(result["agreement"], args.ratio)
    if "timing" in args.parts:
        print("\n[timing]", flush=True)
        result["timing"] = run_timing(args, kp, model, tok)
        print_timing(result["timing"])
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwall time {result['wall_s']:.0f} s; JSON written to {out}")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
