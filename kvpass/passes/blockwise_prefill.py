"""Turn a whole-prompt prefill graph into a block graph that appends one block to fixed-capacity stores."""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value


@dataclasses.dataclass
class BlockInputs:
    """The placeholders a block graph takes besides the model's own inputs (all appended at the end)."""

    seq: torch.SymInt            # the prompt-length symbol the graph was traced with (the block length now)
    past: dict[int, tuple[fx.Node, fx.Node]]  # layer -> (keys store, values store) placeholders
    valid: fx.Node               # [B, T] bool: real context tokens of the block (False: padding)
    observe: fx.Node             # [B, T] bool: observation-only tokens (attended and scored from, never stored)


class BlockwisePrefill:
    """Give every first-forward attention site a store input, so one graph prefills a prompt block by block.

    Requires: ``sites`` from :func:`kvpass.analysis.find_attention_sites` of a prefill graph (no site
    has a store input) traced with a *dynamic* prompt length ``s`` (the query length of every site), writing a
    DynamicCache (a StaticCache's buffers are a fixed-capacity store already). Refused otherwise, naming the fix.

    Ensures: per layer, two new placeholders hold the store kept so far (``[B, H_kv, capacity, D]``,
    the capacity :class:`~kvpass.passes.InsertKVEviction` gives that layer) and the site's candidate
    keys/values become ``cat(store, new)`` — the form of a decode graph, which ``InsertKVEviction``
    then rewrites (state inputs, attend, score, compact). Two ``[B, s]`` bool placeholders are
    appended: ``valid`` (which tokens of the block are real; ``False`` for padding, including the
    padding that fills a short first block) and ``observe`` (trailing observation-only tokens, e.g.
    EpiCache's patched prompt: they attend and are scored from, but are never stored). The graph's
    other inputs and outputs are unchanged, so calling it with ``s = block`` serves every prompt length
    without recompiling. ``counters["blocked_sites"]`` counts rewritten sites.
    """

    def __init__(self, capacities: dict[int, int]) -> None:
        self.capacities = capacities  # layer -> store slots
        self.counters: collections.Counter[str] = collections.Counter()

    def uuid(self) -> str:
        """Changes with the pass (its version) or the capacities it gives the stores."""
        return f"{type(self).__name__}:v2:{sorted(self.capacities.items())}"

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite]) -> BlockInputs:
        seq = self.prompt_symbol(sites)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        fake = node_value(sites[0].keys)
        past = {}
        for site in sites:
            k, v = node_value(site.keys), node_value(site.values)
            capacity = self.capacities[site.layer]
            stores = []
            for name, x in (("k", k), ("v", v)):
                with graph.inserting_after(last):
                    last = graph.placeholder(f"kvpass_store_{name}_{site.layer}")
                with fake.fake_mode:
                    last.meta["example_value"] = x.new_empty(x.shape[0], x.shape[1], capacity, x.shape[3])
                stores.append(last)
            past[site.layer] = (stores[0], stores[1])
            with graph.inserting_after(site.keys if site.keys.op != "placeholder" else last):
                keys = graph.call_function(torch.cat, ([stores[0], site.keys],), {"dim": 2})
            with graph.inserting_after(site.values if site.values.op != "placeholder" else last):
                values = graph.call_function(torch.cat, ([stores[1], site.values],), {"dim": 2})
            site.keys, site.values = keys, values
            site.past_keys, site.past_values = stores
            self.counters["blocked_sites"] += 1
        q = node_value(sites[0].q)
        flags = []
        for name in ("valid", "observe"):
            with graph.inserting_after(last):
                last = graph.placeholder(f"kvpass_{name}")
            with fake.fake_mode:
                last.meta["example_value"] = torch.empty(q.shape[0], seq, dtype=torch.bool, device=q.device)
            flags.append(last)
        graph.lint()
        return BlockInputs(seq, past, flags[0], flags[1])

    @staticmethod
    def prompt_symbol(sites: list[AttentionSite]) -> torch.SymInt:
        """The dynamic prompt length every site's queries have; a clear error for a static graph (or a cache the
        block graph cannot take)."""
        if not sites or any(site.past_keys is not None for site in sites):
            raise UnsupportedGraph("kvpass: block-wise prefill applies to a first forward (empty cache) only")
        static = [site.layer for site in sites if site.static_writes]
        if static:
            raise UnsupportedGraph(
                f"kvpass: block-wise prefill needs the default DynamicCache, but layers {static} write a StaticCache, "
                "whose buffers are already the fixed-capacity store; leave 'prefill_block' unset with a StaticCache"
            )
        seq = node_value(sites[0].q).shape[2]
        if isinstance(seq, int) or len(free_symbols(seq)) != 1:
            raise UnsupportedGraph(
                f"kvpass: option 'prefill_block' needs a prefill graph whose prompt length is dynamic, but this "
                f"graph was traced for a prompt of exactly {seq} tokens. Compile with torch.compile(..., "
                "dynamic=True), or call torch._dynamo.mark_dynamic(input_ids, 1) before the first call."
            )
        return seq
