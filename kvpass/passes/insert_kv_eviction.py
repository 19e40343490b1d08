"""Rewrite every attention site into a fixed-capacity, policy-evicted KV store."""

from __future__ import annotations

import collections
import dataclasses
import operator

import torch
import torch.fx as fx

import kvpass.ops  # noqa: F401  (registers the kvpass::* ops used below)
from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value
from kvpass.config import KVPassOptions
from kvpass.passes.blockwise_prefill import BlockInputs


@dataclasses.dataclass
class LayerPlan:
    """What the rewritten graph does for one layer; the backend threads the state through."""

    layer: int
    budget: int                     # real tokens kept
    capacity: int                   # slots of the store (>= budget)
    past_index: int | None          # position of the past-keys input among the graph's inputs
    state_inputs: tuple[fx.Node, ...] = ()   # pos, acc, seen placeholders (decode graphs)
    state_outputs: tuple[fx.Node, ...] = ()  # pos, acc, seen after this forward


class InsertKVEviction:
    """Replace each attention site with ``kvpass::extend_meta → attend → score → compact``.

    Requires: ``sites`` from :func:`kvpass.analysis.find_attention_sites` on ``graph`` (DynamicCache
    writes: keys/values are graph outputs, the past store is a graph input or empty).

    Ensures: every site's attention output comes from ``kvpass::attend`` (masking padding and empty
    slots itself, RoPE untouched since keys are cached after rotation); every cache write that was
    ``cat(past, new)`` is replaced, *as a graph output only*, by the compacted store of exactly
    ``budget`` slots; per layer the graph takes (decode) and returns the store metadata
    ``pos [B,H_kv,budget]``, ``acc [B,H_kv,budget]``, ``seen [B]`` as extra trailing inputs/outputs,
    in layer order. ``counters`` counts rewritten sites by kind.

    With ``block`` (from :class:`~kvpass.passes.BlockwisePrefill`), sites with a store input take the
    block's ``valid`` flags for their new tokens, and its ``observe`` tokens get positions (they attend
    to each other) but are dead for scoring and compaction and are not counted in ``seen``.
    """

    def __init__(self, options: KVPassOptions, prefill_budgets: dict[int, tuple[int, int]] | None = None) -> None:
        self.options = options
        # (budget, capacity) per layer chosen by the last prefill; ratio-mode decode graphs reuse them
        self.prefill_budgets = prefill_budgets or {}
        self.counters: collections.Counter[str] = collections.Counter()

    def uuid(self) -> str:
        return f"{type(self).__name__}:v1:{self.options.uuid()}"

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite],
                 block: BlockInputs | None = None) -> list[LayerPlan]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = graph.output_node()
        plans = []
        for site in sites:
            plans.append(self._rewrite(graph, site, len(sites), placeholders, block))
        # state inputs after the original inputs, in layer order (the backend relies on this order)
        last = placeholders[-1]
        for plan in plans:
            if plan.past_index is None:
                continue
            new = []
            for name in ("pos", "acc", "seen"):
                with graph.inserting_after(last):
                    last = graph.placeholder(f"kvpass_{name}_{plan.layer}")
                new.append(last)
            for node, src in zip(new, plan.state_inputs, strict=True):
                src.replace_all_uses_with(node)
                graph.erase_node(src)
            plan.state_inputs = tuple(new)
        extra = tuple(n for plan in plans for n in plan.state_outputs)
        (outs,) = output.args
        output.args = (tuple(outs) + extra,)
        graph.lint()
        return plans

    def _rewrite(self, graph: fx.Graph, site: AttentionSite, n_layers: int, placeholders,
                 block: BlockInputs | None) -> LayerPlan:
        n_new = node_value(site.q).shape[2]
        is_decode = site.past_keys is not None
        budget, capacity = self.budget(site, n_layers, n_new, is_decode and block is None)
        spec = self.options.policy.spec()
        with graph.inserting_before(site.attn):
            g = graph.call_function
            if is_decode:
                # placeholders for the state; swapped for real graph inputs by __call__
                pos = g(torch.empty, ((0,),))
                acc = g(torch.empty, ((0,),))
                seen = g(torch.empty, ((0,),))
                state_inputs = (pos, acc, seen)
                if block is not None:
                    new_valid = g(operator.or_, (block.valid, block.observe))
                else:
                    new_valid = g(torch.ones_like, (g(operator.getitem, (site.q, (slice(None), 0, slice(None), 0))),),
                                  {"dtype": torch.bool})
            else:
                empty = g(operator.getitem, (site.keys, (slice(None), slice(None), slice(0, 0), 0)))
                pos = g(torch.zeros_like, (empty,), {"dtype": torch.int64})
                acc = g(torch.zeros_like, (empty,), {"dtype": torch.float32})
                seen = g(torch.zeros_like, (g(operator.getitem, (site.keys, (slice(None), 0, 0, 0))),),
                         {"dtype": torch.int64})
                state_inputs = ()
                new_valid = self._prefill_validity(graph, site)
            meta = g(torch.ops.kvpass.extend_meta.default, (pos, acc, seen, new_valid))
            pos_all, acc_all, seen_all = (g(operator.getitem, (meta, i)) for i in range(3))
            attended = g(torch.ops.kvpass.attend.default,
                         (site.q, site.keys, site.values, pos_all, site.scale, spec, site.window))
            out, obs = (g(operator.getitem, (attended, i)) for i in range(2))
            if block is not None:  # observation tokens: scored from, never kept, not part of the sequence
                observed = g(torch.nn.functional.pad, (block.observe, (capacity, 0)), {"value": False})
                observed = g(operator.getitem, (observed, (slice(None), None)))
                pos_all = g(torch.Tensor.masked_fill, (pos_all, observed, -1))
                seen_all = g(operator.sub, (seen_all, g(torch.sum, (block.observe,), {"dim": 1})))
            n_new_arg = n_new if isinstance(n_new, int) else g(torch.ops.aten.sym_size.int, (site.q, 2))
            scored = g(torch.ops.kvpass.score.default, (spec, obs, site.keys, pos_all, acc_all, n_new_arg, budget))
            keep, acc_new = (g(operator.getitem, (scored, i)) for i in range(2))
            compacted = g(torch.ops.kvpass.compact.default,
                          (site.keys, site.values, pos_all, keep, acc_new, budget, capacity, site.window))
            k_store, v_store, pos_store, acc_store = (g(operator.getitem, (compacted, i)) for i in range(4))
        site.attn.replace_all_uses_with(out)
        graph.erase_node(site.attn)
        output = graph.output_node()
        output.replace_input_with(site.key_write, k_store)
        output.replace_input_with(site.value_write, v_store)
        self.counters["block_sites" if block is not None else "decode_sites" if is_decode else "prefill_sites"] += 1
        self.counters[f"{site.kind}_sites"] += 1
        past_index = placeholders.index(site.past_keys) if is_decode else None
        return LayerPlan(site.layer, budget, capacity, past_index, state_inputs,
                         (pos_store, acc_store, seen_all))

    def budget(self, site: AttentionSite, n_layers: int, n_new, is_decode: bool) -> tuple[int, int]:
        """(tokens kept, store slots) of ``site``'s layer."""
        opts = self.options
        if is_decode and opts.ratio is not None:
            # a ratio is a fraction of the prompt: the decode graph keeps what the prefill chose
            store = node_value(site.past_keys).shape[2]
            return self.prefill_budgets.get(site.layer, (store, store))
        if not is_decode and opts.ratio is not None and not isinstance(n_new, int):
            raise UnsupportedGraph(
                "kvpass: option 'ratio' needs a static prompt length, but this prefill graph has a dynamic "
                f"one ({n_new}); give 'budget' instead, or compile with dynamic=False"
            )
        prompt = 0 if is_decode else n_new
        budgets = [opts.budget_for(i, n_layers, prompt) for i in range(n_layers)]
        budget = budgets[site.layer]
        # With a padding mask, HF builds one 4D mask sized by layer 0's cache for every layer, so all
        # stores need the same capacity; without one, each layer's store holds exactly its budget.
        capacity = max(budgets) if site.mask is not None else budget
        return budget, capacity

    @staticmethod
    def _prefill_validity(graph: fx.Graph, site: AttentionSite) -> fx.Node:
        """[B, T] bool: which prompt tokens are real (left padding is not), read off the model's mask.

        With left padding the last query is a real token, so the last row of the mask shows exactly
        the real keys. No mask (``is_causal``) means no padding.
        """
        g = graph.call_function
        if site.mask is None:
            return g(torch.ones_like, (g(operator.getitem, (site.q, (slice(None), 0, slice(None), 0))),),
                     {"dtype": torch.bool})
        row = g(operator.getitem, (site.mask, (slice(None), 0, -1, slice(None))))
        if node_value(site.mask).dtype == torch.bool:
            return row
        return g(operator.gt, (row, torch.finfo(node_value(site.mask).dtype).min / 2))
