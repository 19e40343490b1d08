"""Rewrite every attention site into a fixed-capacity, policy-evicted KV store."""

from __future__ import annotations

import collections
import dataclasses
import warnings

import torch.fx as fx

from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value
from kvpass.config import KVPassOptions
from kvpass.passes.blockwise_prefill import BlockInputs
from kvpass.passes.context_split import ContextSplit
from kvpass.passes.eviction_steps import SitePlan, rewrite_site


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
    tier_inputs: tuple[fx.Node, ...] = ()     # a tiered store continued: the lower tier's k, v, pos, used inputs
    evicted_outputs: tuple[fx.Node, ...] = ()  # a tiered store: k, v, pos the compaction evicted (for the lower tier)
    value_dim: int = 0              # the values' head dim (a lower tier's value tensor is [B, H_kv, L, value_dim])
    # a tiered store continued: bytes per query token and batch row between the device and the lower tier's attention
    # (the query and its position there; the partial output and its log-sum-exp back)
    tier_query_bytes: int = 0
    retrieval_inputs: tuple[fx.Node, ...] = ()  # SentenceKV continued: abstracts, runs, query sum, count, skip
    sentence_outputs: tuple[fx.Node, ...] = ()  # SentenceKV continued: the new queries and keys
    retrieval_bytes: int = 0        # SentenceKV continued: bytes per batch row a step gathers from the lower tier
    retrieve_in_place: bool = False  # SentenceKV continued, offload_attention: ranked and attended beside the tier
    query_heads: int = 0            # the site's query heads


class InsertKVEviction:
    """Replace each attention site with ``kvpass::extend_meta → attend → score → compact``.

    Requires: ``sites`` from :func:`kvpass.analysis.find_attention_sites` on ``graph`` (DynamicCache
    writes: keys/values are graph outputs, the past store is a graph input or empty).

    Sliding-window sites (a DynamicCache layer that stores only its last ``window - 1`` tokens) are left to HF,
    counted as ``sliding_sites_kept``: HF's window is already a fixed-capacity store, and HF sizes those layers'
    masks from its own token counter, which a store compressed below the window could not match. A warning
    says so where that window exceeds the layer's budget. A window that only the attention's mask applies (GPT-Neo's
    local layers, whose cache keeps every token) is kvpass's to apply: ``kvpass::attend`` masks it and
    ``kvpass::compact`` drops the tokens it hides. In a block graph (``block`` given) a sliding site whose cache keeps
    HF's window gets a store of ``window - 1`` slots instead, carried from block to block by recency (StreamingLLM
    without sinks, never the options' policy), attended with the window, counted as ``sliding_sites_carried``; the
    block runner hands it back to HF's cache in HF's layout (:mod:`kvpass.runtime.blockwise`).

    Ensures: every other site's attention output comes from ``kvpass::attend`` (masking padding and empty
    slots itself, RoPE untouched since keys are cached after rotation, a logit soft cap and learned attention
    sinks applied, counted as ``sink_sites``); every cache
    write that was ``cat(past, new)`` is replaced, *as a graph output only*, by the compacted store of exactly
    ``budget`` slots; per layer the graph takes (decode) and returns the store metadata
    ``pos [B,H_kv,budget]``, ``acc [B,H_kv,budget]``, ``seen [B]`` as extra trailing inputs/outputs,
    in layer order. ``counters`` counts rewritten sites by kind: ``prefill_sites``, ``decode_sites`` or
    ``block_sites``; ``sdpa_sites`` or ``eager_sites``; ``static_cache_sites``, ``sink_sites``, ``latent_sites``,
    ``head_adaptive_sites`` where they apply; ``sliding_sites_kept`` for the sites left to HF.

    Each site's rewrite is the same sequence of steps (candidates, state in, validity, extend, attend, observe,
    score, compact, store out), each in the variant a :class:`~kvpass.passes.eviction_steps.SitePlan` chooses once
    from the site and the options (:mod:`kvpass.passes.eviction_steps`).

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

    With option ``distribute="context"`` (:mod:`~kvpass.passes.context_split`) each rewritten site keeps only the
    positions this rank owns, in a store of its share of the budget (:meth:`ContextSplit.share`), and its attention is
    the exact merge of every rank's partial attention, gathered by a functional collective in the graph; counted as
    ``split_sites``. Each store is sized and placed for its layer's budget (:meth:`ContextSplit.of_budget`: the
    ranks' shares, equal or by ``rank_budgets``); a reserve is shared likewise (:meth:`ContextSplit.reserve_share`).
    Sliding-window sites (left to HF, or carried through a block graph) keep their whole window on every rank.

    With option ``offload`` (a tiered store: :mod:`kvpass.ops.tier`) each rewritten site also returns what its
    compaction evicted (``kvpass::evicted``: keys, values, positions), after every layer's metadata outputs, for its
    lower tier; a forward continuing a store takes each layer's lower tier (``k, v, pos, used``) as inputs after the
    metadata inputs, and its attention is the exact merge of the device store's part with the lower tier's, computed
    where the tier lives (``kvpass::tier_attend``); counted as ``offload_sites``.

    With policy ``sentencekv`` (a tiered store: :mod:`kvpass.policies.sentencekv`) a first forward keeps SnapKV's
    ``semantic_factor x budget`` tokens and splits them between the device store (sinks and recent window) and the
    lower tier; a forward continuing the store also takes each layer's sentence abstracts, their lower-tier runs, the
    open sentence's query sum and length and a skip flag (after the tiers' inputs, in layer order), ranks the
    sentences and gathers their tokens (``kvpass::tier_gather``) into the merge, and returns its queries and new keys
    (after the evicted outputs) for the runner's abstracts; counted as ``retrieval_sites``.
    """

    def __init__(self, options: KVPassOptions, prefill_budgets: dict[int, tuple[int, int]] | None = None) -> None:
        self.options = options
        # (budget, capacity) per layer chosen by the last prefill; ratio-mode decode graphs reuse them
        self.prefill_budgets = prefill_budgets or {}
        self.counters: collections.Counter[str] = collections.Counter()
        # read once, when the graph is rewritten: a compiled graph belongs to the rank (and group) that compiled it
        self.split = (ContextSplit.of_default_group(options.placement_block, options.placement, options.rank_budgets)
                      if options.distribute else None)

    def uuid(self) -> str:
        """Changes with the rewrite (its version) or the options: part of the compiled graph's cache key."""
        split = "" if self.split is None else f":rank{self.split.rank}of{self.split.world}:{self.split.group_name}"
        return f"{type(self).__name__}:v5:{self.options.uuid()}{split}"

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite],
                 block: BlockInputs | None = None) -> list[LayerPlan]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = graph.output_node()
        plans, above_budget = [], []
        for site in sites:
            if site.hf_window and block is None:  # (a block graph carries it: _rewrite)
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
        # state inputs after the original inputs, in layer order, then the lower tiers' (a tiered store continued)
        # in layer order (the backend relies on this order)
        last = placeholders[-1]
        for plan in plans:
            if plan.past_index is not None:
                plan.state_inputs, last = _as_inputs(graph, last, plan.state_inputs,
                                                     [f"kvpass_{name}_{plan.layer}" for name in ("pos", "acc", "seen")])
        for plan in plans:
            if plan.tier_inputs:
                plan.tier_inputs, last = _as_inputs(graph, last, plan.tier_inputs, [
                    f"kvpass_tier_{name}_{plan.layer}" for name in ("k", "v", "pos", "used")])
        for plan in plans:  # then SentenceKV's, in layer order
            if plan.retrieval_inputs:
                plan.retrieval_inputs, last = _as_inputs(graph, last, plan.retrieval_inputs, [
                    f"kvpass_sentence_{name}_{plan.layer}"
                    for name in ("means", "starts", "lens", "q_sum", "q_count", "skip")])
        extra = tuple(n for plan in plans for n in plan.state_outputs)
        extra += tuple(n for plan in plans for n in plan.evicted_outputs)
        extra += tuple(n for plan in plans for n in plan.sentence_outputs)
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

    def _rewrite(self, graph: fx.Graph, site: AttentionSite, n_layers: int, placeholders: list[fx.Node],
                 block: BlockInputs | None) -> LayerPlan:
        """One site: its budget, the plan of its steps (:mod:`kvpass.passes.eviction_steps`), the steps, the count."""
        n_new = node_value(site.q).shape[2]
        has_store = site.past_keys is not None
        if self.split is not None and site.static_writes:
            raise UnsupportedGraph(
                f"kvpass: option 'distribute'='context' splits a DynamicCache store over ranks; layer {site.layer} "
                "writes a StaticCache, which it does not split yet. Use the default DynamicCache (generate's)")
        if block is not None:
            budget, capacity = self.block_budget(site, n_layers, n_new)
        else:
            budget, capacity = self.budget(site, n_layers, n_new, has_store)
        carried = block is not None and site.hf_window  # HF's window: whole on every rank
        split = None if self.split is None or carried else self.split.of_budget(
            self.options.budget_for(site.layer, n_layers, 0))
        plan = SitePlan.of(site, self.options, budget, capacity, block, placeholders, split)
        out = node_value(site.attn)  # (read before the rewrite replaces it)
        value_dim, tier_query_bytes = out.shape[-1], self._tier_query_bytes(plan, out.shape[-1])
        done = rewrite_site(graph, plan, block)
        self._count(plan)
        store = done.store
        past_index = placeholders.index(site.past_keys) if has_store else None
        retrieval_bytes = 0
        if plan.retrieves:
            q = node_value(site.q)
            if plan.retrieve_in_place:  # the mean query and the skip flag there; a query, a partial output, an lse
                retrieval_bytes = q.shape[1] * q.shape[-1] * 4 + 1 + tier_query_bytes
            else:  # k, v and positions of each query head's retrieval slots
                retrieval_bytes = plan.retrieval * q.shape[1] * ((q.shape[-1] + value_dim) * q.element_size() + 8)
        return LayerPlan(site.layer, budget, capacity, past_index, done.state_inputs, (store.pos, store.acc, done.seen),
                         static=bool(site.static_writes), tier_inputs=done.tier_inputs, evicted_outputs=done.evicted,
                         value_dim=value_dim, tier_query_bytes=tier_query_bytes,
                         retrieval_inputs=done.retrieval_inputs, sentence_outputs=done.sentence_outputs,
                         retrieval_bytes=retrieval_bytes, retrieve_in_place=plan.retrieve_in_place,
                         query_heads=node_value(site.q).shape[1])

    @staticmethod
    def _tier_query_bytes(plan: SitePlan, value_dim: int) -> int:
        """Bytes per query token and batch row to and from the lower tier's attention: the query and its position
        there, the partial output and its log-sum-exp back."""
        if not plan.attends_tier:
            return 0
        q = node_value(plan.site.q)
        heads, item = q.shape[1], q.element_size()
        return heads * (q.shape[-1] + value_dim) * item + heads * 4 + 8

    def _count(self, plan: SitePlan) -> None:
        """Count one rewritten site: its extras, then its forward, its attention and its cache."""
        site = plan.site
        extras = {"sink_sites": site.sinks is not None, "latent_sites": plan.attention == "latent",
                  "head_adaptive_sites": plan.compaction == "compact_packed", "sliding_sites_carried": plan.recency,
                  "split_sites": plan.split is not None, "offload_sites": plan.offload,
                  "retrieval_sites": plan.retrieves}
        forward = "block_sites" if plan.observe else "decode_sites" if site.past_keys is not None else "prefill_sites"
        static = ["static_cache_sites"] if site.static_writes else []
        for name in [*(name for name, on in extras.items() if on), forward, f"{site.kind}_sites", *static]:
            self.counters[name] += 1

    def block_budget(self, site: AttentionSite, n_layers: int, seq) -> tuple[int, int]:
        """(tokens kept, store slots) of ``site``'s store in a block graph of ``seq`` tokens: a sliding layer whose
        cache keeps HF's window carries its last ``window - 1`` tokens (all that the next block's queries can see, and
        what HF's cache holds after the prompt), every other layer its budget."""
        if site.hf_window:
            return site.window - 1, site.window - 1
        return self.budget(site, n_layers, seq, False)

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
        if self.split is not None:  # the options' budgets are the whole context's; this rank keeps its share
            budgets = [self.split.share(b) for b in budgets]
        budget = budgets[site.layer]
        # With a mask over the keys (padding, eager attention), HF builds one 4D mask sized by the first layer's
        # cache for every layer, so all stores need the same capacity; without one (or with kvpass.CompressedCache's
        # one-column mask over stores of different lengths) each layer's store holds exactly its budget.
        spans_keys = site.mask is not None and node_value(site.mask).shape[-1] != 1
        # forwards that continue a store fill the reserve before they evict (EpiCache's answers evict nothing)
        reserve = opts.reserve if self.split is None else self.split.reserve_share(opts.reserve)
        capacity = (max(budgets) if spans_keys else budget) + reserve
        return budget, capacity

    def _static_budget(self, site: AttentionSite, n_layers: int) -> tuple[int, int]:
        """A StaticCache's buffers are the store: every layer's capacity is their length, the largest budget."""
        opts = self.options
        slots = node_value(site.keys).shape[2]
        if opts.reserve:
            raise UnsupportedGraph(
                f"kvpass: option 'reserve'={opts.reserve} adds slots to a DynamicCache store; a StaticCache's {slots} "
                "buffer slots are its store. Size the StaticCache to budget + reserve and give that as 'budget', or "
                "use a DynamicCache")
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


def _as_inputs(graph: fx.Graph, last: fx.Node, stand_ins: tuple[fx.Node, ...],
               names: list[str]) -> tuple[tuple[fx.Node, ...], fx.Node]:
    """Swap ``stand_ins`` for new graph inputs named ``names``, placed after ``last``; (the inputs, the last one)."""
    new = []
    for name, src in zip(names, stand_ins, strict=True):
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        src.replace_all_uses_with(last)
        graph.erase_node(src)
        new.append(last)
    return tuple(new), last
