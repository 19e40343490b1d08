"""Rewrite every attention site into a fixed-capacity, policy-evicted KV store."""

from __future__ import annotations

import collections
import dataclasses
import operator
import warnings

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
    static: bool = False            # the store is a StaticCache buffer, written in place


class InsertKVEviction:
    """Replace each attention site with ``kvpass::extend_meta → attend → score → compact``.

    Requires: ``sites`` from :func:`kvpass.analysis.find_attention_sites` on ``graph`` (DynamicCache
    writes: keys/values are graph outputs, the past store is a graph input or empty).

    Sliding-window sites (a DynamicCache layer that stores only its last ``window - 1`` tokens) are left to HF,
    counted as ``sliding_sites_kept``: HF's window is already a fixed-capacity store, and HF sizes those layers'
    masks from its own token counter, which a store compressed below the window could not match. A warning
    says so where that window exceeds the layer's budget. A window that only the attention's mask applies (GPT-Neo's
    local layers, whose cache keeps every token) is kvpass's to apply: ``kvpass::attend`` masks it and
    ``kvpass::compact`` drops the tokens it hides.

    Ensures: every other site's attention output comes from ``kvpass::attend`` (masking padding and empty
    slots itself, RoPE untouched since keys are cached after rotation, a logit soft cap and learned attention
    sinks applied, counted as ``sink_sites``); every cache
    write that was ``cat(past, new)`` is replaced, *as a graph output only*, by the compacted store of exactly
    ``budget`` slots; per layer the graph takes (decode) and returns the store metadata
    ``pos [B,H_kv,budget]``, ``acc [B,H_kv,budget]``, ``seen [B]`` as extra trailing inputs/outputs,
    in layer order. ``counters`` counts rewritten sites by kind.

    Latent caches (MLA: the cache holds a compressed latent and the rotary key, which the model projects to every
    head's keys and values): the cached tensors are the store, scored, kept and evicted per (batch, latent head); the
    model's own projection of the candidates is what ``kvpass::attend`` reads. Counted as ``latent_sites``.

    StaticCache sites: the cache's buffers are the store (capacity = their length, which must equal the
    largest layer budget). A first forward that allocates them gets the prefill rewrite, its store
    returned in their place; with buffers as inputs the ``index_copy_`` writes are removed, the
    candidates are ``cat(buffer, new)`` and the compacted store is copied back into the buffers in place.
    Store metadata the session does not know (``seen < 0``) or a cache holding no tokens yet (its write
    index starts at 0) is adopted in the graph: slot ``i`` holds position ``i`` for ``i`` below the
    cache's token count. Left padding of a first forward is read from ``position_ids``.

    With option ``head_budgets="adaptive"`` the store is packed (see ``kvpass.ops``): the metadata ``pos`` carries each
    slot's kv head, compaction keeps the layer's ``H_kv * budget`` best slots whatever their heads (each head keeping
    its ``head_floor`` share), and graphs with a store attend with ``kvpass::attend_packed``; counted as
    ``head_adaptive_sites``. StaticCache sites are refused (their buffers keep one row per head).

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
        return f"{type(self).__name__}:v2:{self.options.uuid()}"

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite],
                 block: BlockInputs | None = None) -> list[LayerPlan]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = graph.output_node()
        plans, above_budget = [], []
        for site in sites:
            if site.window and not site.masked_window:  # (block graphs never get here: rewrite_blocks refuses them)
                self._keep_window(graph, site)
                budget = self.budget(site, len(sites), node_value(site.q).shape[2], site.past_keys is not None)[0]
                if site.window - 1 > budget:
                    above_budget.append((site.layer, budget))
                continue
            plans.append(self._rewrite(graph, site, len(sites), placeholders, block))
        if above_budget:
            window = next(s.window for s in sites if s.layer == above_budget[0][0])
            warnings.warn(
                f"kvpass: sliding-window layers {[layer for layer, _ in above_budget]} keep HF's own "
                f"{window - 1}-token window, above their budgets {sorted({b for _, b in above_budget})}: HF sizes "
                "those layers' masks from its own token counter, so kvpass leaves them to HF (bounded by the "
                "window) and compresses the full-attention layers", stacklevel=2)
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

    def _keep_window(self, graph: fx.Graph, site: AttentionSite) -> None:
        """Leave a sliding-window site to HF, but store its window contiguously: HF's tail slice is a view of
        the whole prompt's (then the step's) keys, whose strides change after the prefill and would recompile
        the decode step once; a compact copy also frees the prompt's keys right after the prefill."""
        output = graph.output_node()
        for write in (site.key_write, site.value_write):
            with graph.inserting_before(output):
                output.replace_input_with(write, graph.call_method("contiguous", (write,)))
        self.counters["sliding_sites_kept"] += 1

    def _rewrite(self, graph: fx.Graph, site: AttentionSite, n_layers: int, placeholders,
                 block: BlockInputs | None) -> LayerPlan:
        n_new = node_value(site.q).shape[2]
        is_decode = site.past_keys is not None
        budget, capacity = self.budget(site, n_layers, n_new, is_decode and block is None)
        spec = self.options.policy.spec()
        packed = self.options.head_budgets == "adaptive"
        if packed and site.attn_keys is not None:
            raise ValueError(
                f"kvpass: head_budgets 'adaptive' shares a layer's slots among its kv heads, but layer {site.layer} "
                f"keeps a latent cache ({node_value(site.key_write).shape[1]} head(s) of compressed keys and values "
                "that every attention head reads: MLA); use head_budgets 'uniform'")
        if packed and site.static_writes:
            raise ValueError(
                f"kvpass: head_budgets 'adaptive' packs each layer's heads into one DynamicCache store; layer "
                f"{site.layer} writes a StaticCache, whose buffers keep one row per head. Use a DynamicCache "
                "(the default cache of generate) or head_budgets 'uniform'")
        keys, values = site.keys, site.values
        with graph.inserting_before(site.attn):
            g = graph.call_function
            if site.static_writes:
                new_keys, new_values = site.static_writes[0].args[3], site.static_writes[1].args[3]
                keys = g(torch.cat, ([site.keys, new_keys],), {"dim": 2}) if is_decode else new_keys
                values = g(torch.cat, ([site.values, new_values],), {"dim": 2}) if is_decode else new_values
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
                if site.static_writes:
                    pos, acc, seen, new_valid = self._adopt_static(graph, site, pos, acc, seen, new_valid,
                                                                   placeholders)
            else:
                empty = g(operator.getitem, (keys, (slice(None), slice(None), slice(0, 0), 0)))
                pos = g(torch.zeros_like, (empty,), {"dtype": torch.int64})
                acc = g(torch.zeros_like, (empty,), {"dtype": torch.float32})
                seen = g(torch.zeros_like, (g(operator.getitem, (keys, (slice(None), 0, 0, 0))),),
                         {"dtype": torch.int64})
                state_inputs = ()
                if site.static_writes:
                    new_valid = self._padding_from_positions(graph, site, placeholders)
                else:
                    new_valid = self._prefill_validity(graph, site)
            if packed:  # head-adaptive store: positions carry each slot's head (kvpass.ops, "packed")
                meta = g(torch.ops.kvpass.extend_packed_meta.default, (pos, acc, seen, new_valid))
                pos_all, head_all, acc_all, seen_all = (g(operator.getitem, (meta, i)) for i in range(4))
            else:
                meta = g(torch.ops.kvpass.extend_meta.default, (pos, acc, seen, new_valid))
                pos_all, acc_all, seen_all = (g(operator.getitem, (meta, i)) for i in range(3))
            extra = (site.softcap,) if site.softcap else ()
            if site.sinks is not None:
                sinks = site.sinks
                if len(node_value(sinks).shape) == 4:  # GPT-OSS's column [B, H_q, T, 1]
                    sinks = g(operator.getitem, (sinks, (Ellipsis, 0)))
                extra = (site.softcap, sinks)
                self.counters["sink_sites"] += 1
            attn_keys, attn_values, attn_pos = keys, values, pos_all
            if site.attn_keys is not None:  # a latent cache: attend over the keys/values the model computes from it
                attn_keys, attn_values = site.attn_keys, site.attn_values
                attn_pos = self._pos_per_head(graph, pos_all, node_value(site.key_write).shape[1],
                                              node_value(attn_keys).shape[1])
                self.counters["latent_sites"] += 1
            if packed and is_decode:
                attended = g(torch.ops.kvpass.attend_packed.default,
                             (site.q, keys, values, pos_all, head_all, site.scale, spec, *extra))
            else:  # (a prefill's candidates are its own tokens: row r is head r, packed or not)
                attended = g(torch.ops.kvpass.attend.default,
                             (site.q, attn_keys, attn_values, attn_pos, site.scale, spec, site.window, *extra))
            out, obs = (g(operator.getitem, (attended, i)) for i in range(2))
            if block is not None:  # observation tokens: scored from, never kept, not part of the sequence
                observed = g(torch.nn.functional.pad, (block.observe, (capacity, 0)), {"value": False})
                observed = g(operator.getitem, (observed, (slice(None), None)))
                pos_all = g(torch.Tensor.masked_fill, (pos_all, observed, -1))
                seen_all = g(operator.sub, (seen_all, g(torch.sum, (block.observe,), {"dim": 1})))
            n_new_arg = n_new if isinstance(n_new, int) else g(torch.ops.aten.sym_size.int, (site.q, 2))
            scored = g(torch.ops.kvpass.score.default, (spec, obs, keys, pos_all, acc_all, n_new_arg, budget))
            keep, acc_new = (g(operator.getitem, (scored, i)) for i in range(2))
            if packed:
                compacted = g(torch.ops.kvpass.compact_packed.default,
                              (keys, values, pos_all, head_all, keep, acc_new, budget, capacity,
                               self.options.head_floor))
                self.counters["head_adaptive_sites"] += 1
            else:
                compacted = g(torch.ops.kvpass.compact.default,
                              (keys, values, pos_all, keep, acc_new, budget, capacity, site.window))
            k_store, v_store, pos_store, acc_store = (g(operator.getitem, (compacted, i)) for i in range(4))
            if site.static_writes and is_decode:  # the cache keeps its buffers' addresses: write in place
                # detached: inference (the ops define no gradients), even where parameters require grad
                graph.call_method("copy_", (site.keys, graph.call_method("detach", (k_store,))))
                graph.call_method("copy_", (site.values, graph.call_method("detach", (v_store,))))
        if node_value(site.attn).dim() == 3:  # heads folded into the batch for bmm (XGLM): [B * H_q, T, D_v]
            with graph.inserting_before(site.attn):
                out = graph.call_function(torch.flatten, (out, 0, 1))
        site.attn.replace_all_uses_with(out)
        graph.erase_node(site.attn)
        for write in site.static_writes or ():  # kvpass writes the buffers itself, after compaction
            graph.erase_node(write)
        output = graph.output_node()
        if not (site.static_writes and is_decode):
            output.replace_input_with(site.key_write, k_store)
            output.replace_input_with(site.value_write, v_store)
        self.counters["block_sites" if block is not None else "decode_sites" if is_decode else "prefill_sites"] += 1
        self.counters[f"{site.kind}_sites"] += 1
        if site.static_writes:
            self.counters["static_cache_sites"] += 1
        past_index = placeholders.index(site.past_keys) if is_decode else None
        return LayerPlan(site.layer, budget, capacity, past_index, state_inputs,
                         (pos_store, acc_store, seen_all), static=bool(site.static_writes))

    @staticmethod
    def _pos_per_head(graph: fx.Graph, pos: fx.Node, store_heads: int, attn_heads: int) -> fx.Node:
        """Store metadata ``[B, H_store, N]`` for the ``H_attn`` heads a latent cache's keys are computed for (each
        store head serves ``H_attn / H_store`` of them, in order)."""
        if store_heads == attn_heads:
            return pos
        if store_heads == 1:
            return graph.call_method("expand", (pos, -1, attn_heads, -1))
        return graph.call_function(torch.repeat_interleave, (pos, attn_heads // store_heads), {"dim": 1})

    @staticmethod
    def _adopt_static(graph: fx.Graph, site: AttentionSite, pos, acc, seen, new_valid, placeholders):
        """Store metadata of a StaticCache buffer, adopted in the graph where the session has none.

        The write index of the first new token is the number of tokens the cache held before this forward
        (HF counts every token, kept or not). Zero means an empty cache (a new or reset one, whatever the
        session remembers at that address); the new tokens of such a first forward may be left padding.
        """
        g = graph.call_function
        tokens_before = g(operator.getitem, (site.static_writes[0].args[2], 0))
        fresh = g(operator.or_, (g(operator.lt, (seen, 0)), g(operator.eq, (tokens_before, 0))))  # [B]
        slot = g(torch.arange, (node_value(site.keys).shape[2],), {"device": node_value(site.keys).device})
        adopted = g(torch.where, (g(operator.lt, (slot, tokens_before)), slot, -1))
        fresh3 = g(operator.getitem, (fresh, (slice(None), None, None)))
        pos = g(torch.where, (fresh3, adopted, pos))
        acc = g(torch.where, (fresh3, 0.0, acc))
        seen = g(torch.where, (fresh, tokens_before, seen))
        if node_value(site.q).shape[2] == 1:  # a one-token step: with left padding its token is real
            return pos, acc, seen, new_valid
        first_valid = InsertKVEviction._padding_from_positions(graph, site, placeholders)
        new_valid = g(torch.where, (g(operator.eq, (tokens_before, 0)), first_valid, new_valid))
        return pos, acc, seen, new_valid

    @staticmethod
    def _padding_from_positions(graph: fx.Graph, site: AttentionSite, placeholders) -> fx.Node:
        """[B, T] bool: the real tokens of a StaticCache's first forward, from ``position_ids``.

        A StaticCache's mask spans its buffer slots, not the prompt, so padding is read off the positions
        instead: with left padding the last token is real and the real tokens count 0, 1, ..., its position.
        """
        g = graph.call_function
        positions = next((n for n in placeholders if "position_ids" in n.name), None)
        q_rows = g(operator.getitem, (site.q, (slice(None), 0, slice(None), 0)))
        if positions is None:
            if site.mask is not None and node_value(site.q).shape[2] != 1:
                raise UnsupportedGraph(
                    f"kvpass: StaticCache attention at '{site.attn.name}' has a padding mask but the forward takes "
                    "no position_ids, from which kvpass reads which tokens are padding; pass position_ids= "
                    "(generate() does)"
                )
            return g(torch.ones_like, (q_rows,), {"dtype": torch.bool})
        index = g(torch.cumsum, (g(torch.ones_like, (q_rows,), {"dtype": torch.int64}), 1))  # 1..T
        last = g(operator.getitem, (positions, (slice(None), slice(-1, None))))            # [B or 1, 1]
        n_new = g(torch.ops.aten.sym_size.int, (site.q, 2))
        return g(operator.gt, (index, g(operator.sub, (n_new, g(operator.add, (last, 1))))))

    def budget(self, site: AttentionSite, n_layers: int, n_new, is_decode: bool) -> tuple[int, int]:
        """(tokens kept, store slots) of ``site``'s layer."""
        opts = self.options
        if site.static_writes:
            return self._static_budget(site, n_layers)
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
        # With a mask over the keys (padding, eager attention), HF builds one 4D mask sized by the first layer's
        # cache for every layer, so all stores need the same capacity; without one (or with kvpass.CompressedCache's
        # one-column mask over stores of different lengths) each layer's store holds exactly its budget.
        spans_keys = site.mask is not None and node_value(site.mask).shape[-1] != 1
        capacity = max(budgets) if spans_keys else budget
        return budget, capacity

    def _static_budget(self, site: AttentionSite, n_layers: int) -> tuple[int, int]:
        """A StaticCache's buffers are the store: every layer's capacity is their length, the largest budget."""
        opts = self.options
        slots = node_value(site.keys).shape[2]
        if opts.ratio is not None:
            raise UnsupportedGraph(
                f"kvpass: option 'ratio'={opts.ratio} cannot size a StaticCache, whose buffers hold a fixed {slots} "
                f"slots per layer; give 'budget'={slots} (or 'layer_budgets' whose largest is {slots})"
            )
        budgets = [opts.budget_for(i, n_layers, 0) for i in range(n_layers)]
        if max(budgets) != slots:
            given = f"budget={opts.budget}" if opts.budget is not None else "layer_budgets"
            asked = f"at most {max(budgets)} tokens in a layer ({given})"
            raise UnsupportedGraph(
                f"kvpass: the StaticCache holds {slots} slots per layer but the options keep {asked}. kvpass uses the "
                f"StaticCache's buffers as its fixed-capacity store, so size it to the largest budget: "
                f"StaticCache(config=model.config, max_cache_len={max(budgets)}), passed as cache= (a "
                "cache that generate() sizes itself holds the whole sequence and would save nothing)"
            )
        return budgets[site.layer], slots

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
