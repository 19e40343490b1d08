"""What kvpass did: rewritten sites, per-layer budgets, and the KV bytes a cache holds now."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpass.ops import tokens_per_head
from kvpass.runtime.state import GraphRecord, store_state


@dataclasses.dataclass
class Explanation:
    policy: str
    graphs: list[dict[str, Any]]
    forwards: int
    adopted_stores: int

    def __str__(self) -> str:
        lines = [f"kvpass policy {self.policy}: {len(self.graphs)} graph(s) compiled, {self.forwards} forward(s) run"]
        for i, g in enumerate(self.graphs):
            rewritten = len(g["sites"]) - g["counters"].get("sliding_sites_kept", 0)
            lines.append(f"  graph {i} ({g['kind']}): {rewritten} of {len(g['sites'])} attention site(s) rewritten, "
                         f"counters {g['counters']}")
            lines += [f"    {line}" for line in _group_layers(g["sites"], g["budgets"])]
            if g.get("tier"):
                lines.append(f"    {g['tier']}")
        if self.adopted_stores:
            lines.append(f"  {self.adopted_stores} store(s) adopted from caches kvpass did not fill")
        return "\n".join(lines)


def _group_layers(sites: list[str], budgets: list[int]) -> list[str]:
    """One line per run of consecutive layers that differ only in their node names."""
    lines, run = [], []
    for i, (site, budget) in enumerate(zip(sites, budgets, strict=True)):
        kind = site.split(": ", 1)[1].split(" at ")[0] + site.split("'", 2)[2] + f", budget {budget}"
        if run and run[-1][1] == kind:
            run[-1] = (run[-1][0], kind, i)
        else:
            run.append((i, kind, i))
    for first, kind, last in run:
        layers = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"{layers}: {kind}")
    return lines


def explain(target: Any) -> Explanation:
    """What kvpass compiled and ran for ``target``: a compiled function or module (``torch.compile(...,
    backend="kvpass")``, or a model whose ``forward`` is one), reported from the graphs Dynamo holds for it; or a
    Hugging Face cache, reported from the graphs that produced its stores."""
    records = _cache_records(target) if hasattr(target, "layers") else _compiled_records(target)
    if records is None:
        raise TypeError(
            "kvpass.explain expects a function or module compiled with backend='kvpass' (or a model whose forward is "
            f"one), or a cache such a model filled; got {type(target).__name__}")
    if not records:
        raise ValueError(f"kvpass.explain: no graph compiled with backend='kvpass' belongs to this "
                         f"{type(target).__name__} yet (it runs kvpass's graphs from its first forward on)")
    records = sorted(records, key=lambda r: r.compiled_at)
    policies = sorted({r.policy for r in records})
    graphs = [{k: v for k, v in dataclasses.asdict(r).items()
               if k not in ("policy", "forwards", "adopted_stores", "compiled_at")} for r in records]
    return Explanation(", ".join(policies), graphs, sum(r.forwards for r in records),
                       sum(r.adopted_stores for r in records))


def _cache_records(cache: Any) -> list[GraphRecord]:
    records: list[GraphRecord] = []
    for layer in cache.layers:
        state = store_state(getattr(layer, "keys", None))
        for record in state.graphs if state else ():
            if record not in records:
                records.append(record)
    return records


def _compiled_records(target: Any) -> list[GraphRecord] | None:
    """The kvpass graphs in Dynamo's cache entries for the code ``target`` runs (None: ``target`` is not compiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    if isinstance(target, torch.nn.Module) and not hasattr(target, "_orig_mod"):
        target = target.forward  # a model whose forward was replaced by a compiled one
    if hasattr(target, "_orig_mod"):  # torch.compile(module)
        target = target._orig_mod.forward
    else:
        target = getattr(target, "_torchdynamo_orig_callable", None)
        if target is None:
            return None
    fn = getattr(target, "__func__", target)
    records: list[GraphRecord] = []
    todo, done = [fn], set()
    while todo:  # the function and the resume functions of its graph breaks
        fn = todo.pop()
        code = getattr(fn, "__code__", None)
        if code is None or code in done:
            continue
        done.add(code)
        for entry in _debug_get_cache_entry_list(code):
            for name in entry.code.co_names:
                obj = fn.__globals__.get(name)
                if name.startswith("__resume_at"):
                    todo.append(obj)
                    continue
                while obj is not None and not isinstance(getattr(obj, "record", None), GraphRecord):
                    obj = getattr(obj, "__wrapped__", None)
                if obj is not None and obj.record not in records:
                    records.append(obj.record)
    return records


@dataclasses.dataclass
class LayerStats:
    layer: int
    slots: int              # store capacity (sequence length of the cached tensors)
    real_tokens: int | None  # slots holding real tokens, summed over batch and kv-heads (None: not a kvpass store)
    kv_bytes: int            # bytes of keys + values held now
    head_tokens: list[int] | None = None  # real tokens per kv head, summed over batch (differ: head_budgets adaptive)
    tokens_seen: list[int] | None = None  # per batch row: tokens of the sequence so far, kept or evicted (real ones)
    tier: str | None = None      # option offload: the lower tier's kind ("cpu" or "disk"), None without one
    tier_tokens: int = 0         # real tokens in the lower tier, summed over batch and kv heads
    tier_bytes: int = 0          # bytes of keys + values written to the lower tier
    moved_bytes: int = 0         # bytes the last forward moved between the device and the lower tier
    sentences: int = 0           # policy sentencekv: sentences with an abstract (retrievable chunks)
    abstract_bytes: int = 0      # policy sentencekv: bytes of the abstracts and their runs, kept beside the store

    def __str__(self) -> str:
        heads = "" if self.head_tokens is None else f" (per kv head {self.head_tokens})"
        seen = "" if self.tokens_seen is None else f", tokens seen {self.tokens_seen}"
        tier = "" if self.tier is None else (f"; lower tier ({self.tier}): {self.tier_tokens} real tokens, "
                                             f"{self.tier_bytes} bytes, {self.moved_bytes} bytes moved last forward")
        if self.sentences:
            tier += f"; {self.sentences} sentences, abstracts {self.abstract_bytes} bytes"
        return (f"layer {self.layer}: {self.slots} slots, {self.kv_bytes} bytes, real tokens {self.real_tokens}{heads}"
                f"{seen}{tier}")


def kv_stats(cache: Any) -> list[LayerStats]:
    """KV bytes held now, per layer, by a Hugging Face ``Cache`` (e.g. ``generate(...).cache``); with option
    ``offload``, also what each layer's lower tier holds and what the last forward moved to and from it."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kvpass.kv_stats expects a transformers Cache with .layers, got {type(cache).__name__}")
    stats = []
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            stats.append(LayerStats(i, 0, 0, 0))
            continue
        state = store_state(keys)
        heads = tokens_per_head(state.pos, state.packed).sum(dim=0).tolist() if state else None
        seen = state.seen.tolist() if state else None
        nbytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        tier = state.tier if state else None
        sentences = state.sentences if state else None
        stats.append(LayerStats(i, keys.shape[-2], None if heads is None else sum(heads), nbytes, heads, seen,
                                *((tier.kind, tier.real_tokens, tier.nbytes, tier.moved_bytes) if tier else ()),
                                *((sentences.ended, sentences.nbytes) if tier and sentences else ())))
    return stats
