"""The state kvpass keeps for a store between forwards, carried by the store itself.

The rewritten graphs are functional: each takes every layer's store metadata (slot positions, the policy's
statistic, tokens seen per batch row) as trailing inputs and returns the updated metadata. That metadata belongs to
the store it describes, so it travels with it: after a forward the runner attaches a :class:`StoreState` to the key
tensor the cache now holds, and the next forward reads it back from the key tensor it receives. Any number of caches
(conversations, episodes, requests; each row of a batched cache has its own entries) go through one compiled model
in any interleaving, each carrying its own state, and dropping a cache drops its state with it. Nothing is kept per
process: what was compiled is recorded by the compiled graph's own runner (:class:`GraphRecord`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from kvpass.errors import UnsupportedGraph
from kvpass.ops import pack_positions
from kvpass.passes import LayerPlan
from kvpass.runtime.tier import LowerTier

STATE_ATTR = "_kvpass_store_state"


@dataclasses.dataclass(eq=False)
class GraphRecord:
    """What one compiled graph is and did (:func:`kvpass.explain` reports it)."""

    kind: str                      # "prefill", "decode" or "prefill-block"
    policy: str                    # the policy's spec
    sites: list[str]               # every attention site, rewritten or left to HF
    budgets: list[int]             # per site: its budget, or the window HF keeps for a site left to it
    counters: dict[str, int]
    forwards: int = 0              # forwards run through this graph
    adopted_stores: int = 0        # stores it received that kvpass had not produced (adopted as-is)
    compiled_at: int = dataclasses.field(default_factory=time.monotonic_ns)  # orders a model's graphs
    tier: str | None = None        # option offload: where the evicted tokens go, and how they are read

    @classmethod
    def of(cls, kind: str, policy: str, sites: list, plans: list[LayerPlan], counters: dict[str, int],
           offload: str | None = None) -> GraphRecord:
        budgets = {plan.layer: plan.budget for plan in plans}
        tier = None
        if offload is not None:
            where = "host memory" if offload == "cpu" else "memory-mapped files (offload 'disk')"
            tier = f"evicted tokens kept in a lower tier in {where}, attended where they live (offload_attention)"
            if any(plan.retrieval_inputs for plan in plans):
                tier = (f"evicted tokens kept in a lower tier in {where}; each step gathers the best sentences' tokens "
                        "(SentenceKV), or attends to the whole tier where it lives while a sentence is short")
        return cls(kind, policy, [s.describe() + ("" if s.layer in budgets else ", HF's window kept") for s in sites],
                   [budgets.get(s.layer, s.window - 1) for s in sites], dict(counters), tier=tier)


@dataclasses.dataclass(eq=False)
class StoreState:
    """One layer's store metadata, attached to the store's key tensor (the tensor the cache holds)."""

    pos: torch.Tensor    # [B, H_kv, C] int64, -1 = empty slot (head_budgets "adaptive": pos * H_kv + head)
    acc: torch.Tensor    # [B, H_kv, C] float32: the policy's carried statistic
    seen: torch.Tensor   # [B] int64: tokens of each row's sequence so far, kept or evicted
    budget: int          # real tokens the store keeps
    packed: bool         # head_budgets "adaptive": slots belong to whichever head pos names
    graphs: tuple[GraphRecord, ...]  # the graphs that produced this store, in order (prefill, then decode)
    # option offload: what this store evicted, kept in a lower tier (appended to in place by each forward: it belongs
    # to the cache, so a branch of a conversation continues from a copy, e.g. copy.deepcopy(cache))
    tier: LowerTier | None = None
    sentences: object = None  # policy "sentencekv": the layer's SentenceLayer (kvpass.runtime.sentences)


def store_state(keys: object) -> StoreState | None:
    """The metadata kvpass attached to a store's key tensor, or None (not a store kvpass produced)."""
    return getattr(keys, STATE_ATTR, None) if isinstance(keys, torch.Tensor) else None


def state_inputs(plans: Sequence[LayerPlan], args: Sequence, record: GraphRecord,
                 packed: bool) -> tuple[list[torch.Tensor], dict[int, StoreState]]:
    """A decode graph's metadata inputs (plan order), read off the stores it receives, and those stores' states.

    A store without kvpass state (a cache filled by an uncompiled forward, say) is adopted as-is: every slot real,
    positions 0..C-1. For a StaticCache buffer the graph adopts it instead (it knows how many tokens the cache holds):
    ``seen = -1`` asks it to.
    """
    inputs: list[torch.Tensor] = []
    previous: dict[int, StoreState] = {}
    for plan in plans:
        if plan.past_index is None:
            continue
        store = args[plan.past_index]
        state = store_state(store)
        if state is None or state.pos.shape != store.shape[:3]:
            if record.counters.get("split_sites"):
                raise UnsupportedGraph(
                    f"kvpass: layer {plan.layer}'s cache holds {store.shape[2]} slots kvpass did not fill, but this "
                    "step splits each layer's KV over ranks (option 'distribute'), and a store not placed by its rule "
                    "would be attended on every rank. Fill the cache through the compiled model (its first forward "
                    "places the prompt), or start from an empty cache")
            b, h, c, _ = store.shape
            pos = torch.arange(c, device=store.device).expand(b, h, c).contiguous()
            if packed:  # row r holds head r's tokens
                pos = pack_positions(pos, torch.arange(h, device=store.device).view(1, h, 1), h)
            seen = torch.full((b,), -1 if plan.static else c, dtype=torch.int64, device=store.device)
            inputs += [pos, torch.zeros(b, h, c, device=store.device), seen]
            record.adopted_stores += 1
            continue
        if state.budget != plan.budget:
            raise UnsupportedGraph(
                f"kvpass: layer {plan.layer}'s store was compressed to keep {state.budget} tokens, but this compiled "
                f"step keeps {plan.budget} in the same {store.shape[2]} slots (option 'ratio' sizes budgets by the "
                "prompt: a decode step compiled after one prompt cannot continue a cache compressed from another of "
                "another length). Use 'budget' or 'layer_budgets' to run caches of several prompt lengths through "
                "one compiled model")
        inputs += [state.pos, state.acc, state.seen]
        previous[plan.layer] = state
    return inputs, previous


def lower_tiers(plans: Sequence[LayerPlan], previous: dict[int, StoreState], args: Sequence, kind: str | None,
                directory: str | None) -> dict[int, LowerTier]:
    """The lower tier of each tiered layer a forward continues (``plan.tier_inputs``), in plan order: the one its
    store carries, or an empty one for a store kvpass adopted."""
    tiers = {}
    for plan in plans:
        if not plan.tier_inputs:
            continue
        before = previous.get(plan.layer)
        store = args[plan.past_index]
        if before is not None and before.tier is not None:
            tiers[plan.layer] = before.tier
        else:
            values = store.new_empty(*store.shape[:3], plan.value_dim)
            tiers[plan.layer] = LowerTier.empty(kind, directory, store, values)
    return tiers


def attach_states(plans: Sequence[LayerPlan], outputs: Sequence, n_outputs: int, stores: dict[int, torch.Tensor],
                  record: GraphRecord, packed: bool, previous: dict[int, StoreState] | None = None,
                  tiers: dict[int, LowerTier] | None = None, offload: str | None = None,
                  offload_dir: str | None = None) -> None:
    """Attach each layer's new metadata (the trailing ``outputs``) to the store it describes (``stores``); append
    what a tiered layer evicted (the outputs after the metadata, if any: the block runner appends each block's
    itself) to its lower tier (from ``tiers``, or a new one of kind ``offload`` in ``offload_dir``)."""
    record.forwards += 1
    extra = outputs[n_outputs:]
    previous = previous or {}
    tiers = tiers or {}
    evicted = iter(extra[3 * len(plans):])
    appends = len(extra) > 3 * len(plans)
    for i, plan in enumerate(plans):
        pos, acc, seen = extra[3 * i : 3 * i + 3]
        before = previous.get(plan.layer)
        graphs = (record,) if before is None else before.graphs
        if record not in graphs:
            graphs = (*graphs, record)
        tier = tiers.get(plan.layer)
        if plan.evicted_outputs and appends:
            k, v, ev_pos = next(evicted), next(evicted), next(evicted)
            tier = tiers.get(plan.layer) or LowerTier.empty(offload, offload_dir, k, v, k.shape[2])
            moved = tier.append(k, v, ev_pos)
            if plan.tier_inputs:  # the queries went to the tier, a partial output and its log-sum-exp came back
                queries = int((seen - before.seen).max()) if before is not None else 1
                moved += seen.shape[0] * queries * plan.tier_query_bytes
            tier.moved_bytes = moved
        setattr(stores[plan.layer], STATE_ATTR, StoreState(pos, acc, seen, plan.budget, packed, graphs, tier))
