"""What kvpass did: rewritten sites, per-layer budgets, and the KV bytes a cache holds now."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvpass.session import Session, find_session, last_session


@dataclasses.dataclass
class Explanation:
    policy: str
    graphs: list[dict[str, Any]]
    forwards: int
    adopted_caches: int

    def __str__(self) -> str:
        lines = [f"kvpass policy {self.policy}: {len(self.graphs)} graph(s) compiled, {self.forwards} forward(s) run"]
        for i, g in enumerate(self.graphs):
            rewritten = len(g["sites"]) - g["counters"].get("sliding_sites_kept", 0)
            lines.append(f"  graph {i} ({g['kind']}): {rewritten} of {len(g['sites'])} attention site(s) rewritten, "
                         f"counters {g['counters']}")
            lines += [f"    {line}" for line in _group_layers(g["sites"], g["budgets"])]
        if self.adopted_caches:
            lines.append(f"  {self.adopted_caches} store(s) adopted from caches kvpass did not fill")
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


def explain(session: Session | None = None) -> Explanation:
    """Report of the most recently compiled kvpass session (or ``session``)."""
    session = session or last_session()
    if session is None:
        raise RuntimeError("kvpass.explain: nothing compiled with backend='kvpass' has run yet")
    graphs = [dataclasses.asdict(g) for g in session.graphs]
    return Explanation(session.options.policy.spec(), graphs, session.forwards, session.adopted_caches)


@dataclasses.dataclass
class LayerStats:
    layer: int
    slots: int              # store capacity (sequence length of the cached tensors)
    real_tokens: int | None  # slots holding real tokens, summed over batch and kv-heads (None: not a kvpass store)
    kv_bytes: int            # bytes of keys + values held now
    head_tokens: list[int] | None = None  # real tokens per kv head, summed over batch (differ: head_budgets adaptive)
    tokens_seen: list[int] | None = None  # per batch row: tokens of the sequence so far, kept or evicted (real ones)

    def __str__(self) -> str:
        heads = "" if self.head_tokens is None else f" (per kv head {self.head_tokens})"
        seen = "" if self.tokens_seen is None else f", tokens seen {self.tokens_seen}"
        return (f"layer {self.layer}: {self.slots} slots, {self.kv_bytes} bytes, real tokens {self.real_tokens}{heads}"
                f"{seen}")


def kv_stats(cache: Any) -> list[LayerStats]:
    """KV bytes held now, per layer, by a Hugging Face ``Cache`` (e.g. ``generate(...).past_key_values``)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kvpass.kv_stats expects a transformers Cache with .layers, got {type(cache).__name__}")
    stats = []
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            stats.append(LayerStats(i, 0, 0, 0))
            continue
        found = find_session(keys)
        heads = found[0].head_tokens(found[1], keys) if found else None
        seen = found[0].layers[found[1]].seen.tolist() if found else None
        nbytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        stats.append(LayerStats(i, keys.shape[-2], None if heads is None else sum(heads), nbytes, heads, seen))
    return stats
