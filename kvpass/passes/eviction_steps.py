"""The steps of :class:`~kvpass.passes.InsertKVEviction`'s rewrite of one attention site.

Every site is rewritten by the same steps, in this order; a site's cache, its attention and the options decide only
which *variant* each step takes, chosen once in a :class:`SitePlan`:

====================  ==================================================================================
(a) candidates        the keys/values the store is chosen from: the DynamicCache write (``cat(past, new)``),
                      a StaticCache's buffers followed by the new tokens, or (its first forward) the new tokens
(b) state in          the store metadata ``pos, acc, seen`` before this forward: a first forward's empty store,
                      the graph's inputs, or StaticCache inputs adopted in the graph where unknown or empty
(c) validity          which new tokens are real: the last row of a prefill's mask, ``position_ids`` (a
                      StaticCache's first forward), all of them (an append), or a block's ``valid | observe``
(d) extend            the metadata of every candidate: ``kvpass::extend_meta`` or ``extend_packed_meta``
(d') place            a context split over ranks (:mod:`~kvpass.passes.context_split`): the candidates this rank
                      does not own are made empty, so it keeps only its own (and, continuing a store, attends to
                      only its own: a first forward attends to all its tokens, which every rank computed anyway)
(e) attend            ``kvpass::attend``, ``attend_packed`` over a packed store, or ``attend`` over the keys and
                      values a model projects from its latent cache; a soft cap and sinks passed on as they are;
                      continuing a store split over ranks: ``kvpass::attend_part_observed`` over this rank's
                      slots, an all-gather of every rank's (output, log-sum-exp), ``kvpass::merge_parts``; the
                      policy's weights are the part's, rescaled by the merged log-sum-exp; continuing a tiered
                      store (option ``offload``): the same merge, of the device store's part with the lower tier's,
                      computed where the tier lives (``kvpass::tier_attend``)
(f) observe           a block's observation-only tokens made dead for scoring and compaction; for EpiCache's
                      context scores, ``kvpass::context_scores`` of the observation queries over the rest
(g) score             ``kvpass::score`` with the options' policy
(g') semantic          SentenceKV's first forward: SnapKV keeps ``semantic_factor x budget`` of the prompt (the
                      rest is dropped, as the reference drops it); the steps below choose the device store among those
(h) compact           ``kvpass::compact`` or ``compact_packed`` down to the budget (a forward continuing a store:
                      the budget plus the ``reserve``)
(h') evicted          a tiered store: ``kvpass::evicted``, the candidates the compaction left out, returned for the
                      lower tier (:mod:`kvpass.runtime.tier`)
(i) store out         the compacted store replaces the cache write among the graph's outputs, or is copied
                      into the StaticCache's buffers in place
====================  ==================================================================================

This module holds the plan and the steps, so that the pass's own file reads as what it does to a graph (which sites,
with which budget, which state inputs and outputs in which order) and this one as how one site is rewritten.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
import torch.fx as fx

import kvpass.ops  # noqa: F401  (registers the kvpass::* ops used below)
from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value
from kvpass.config import KVPassOptions
from kvpass.ops.partial import merged_observation
from kvpass.ops.tier import retrieval_index
from kvpass.passes.blockwise_prefill import BlockInputs
from kvpass.passes.context_split import ContextSplit
from kvpass.policies import StreamingLLM, policy_from_spec

ALL = slice(None)  # (in index tuples)
# the policy of a sliding layer's window carried through a block graph: the newest tokens, nothing else
RECENCY = StreamingLLM(sinks=0).spec()


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one site is rewritten: the variant of each step, chosen once from the site and the options."""

    site: AttentionSite
    budget: int                      # real tokens kept
    capacity: int                    # slots of the store
    keep: int                        # real tokens the compaction keeps: the budget, or (continuing a store) capacity
    n_new: int | torch.SymInt        # tokens this forward appends (the query length)
    policy: str                      # the policy's spec, as the ops take it
    head_floor: float
    # (a) "cache": the site's own keys/values (a DynamicCache cat; a block's cat(store, block));
    # "buffers+new": cat(StaticCache buffer, new tokens); "new": a StaticCache's first forward's new tokens
    candidates: Literal["cache", "buffers+new", "new"]
    # (b) "empty": a first forward's; "inputs": the graph's state inputs; "inputs-or-adopted": a StaticCache's state
    # inputs, adopted from the cache's token count where the session knows none or the cache is empty
    state: Literal["empty", "inputs", "inputs-or-adopted"]
    # (c) "mask": the last row of a prefill's mask (all with none); "positions": read off position_ids (a StaticCache's
    # first forward); "all": every appended token; "block": the block's valid | observe flags; "all-or-positions": all,
    # or (a multi-token append to an empty StaticCache) read off position_ids
    validity: Literal["mask", "positions", "all", "block", "all-or-positions"]
    positions: fx.Node | None        # the position_ids input, for validity "positions" / "all-or-positions"
    extend: Literal["extend_meta", "extend_packed_meta"]                # (d)
    attention: Literal["attend", "attend_packed", "latent"]             # (e)
    fold_heads: bool                 # (e) the site's output has heads folded into its batch for bmm (XGLM)
    observe: bool                    # (f) a block graph: its observation-only tokens are masked out
    block: int                       # (f) a block graph's block length (its observation tokens follow), else 0
    context_scores: bool             # (f) the policy scores from the observation queries' softmax over the context
    compaction: Literal["compact", "compact_packed"]                    # (h)
    store_out: Literal["outputs", "buffers"]                            # (i)
    # a block graph's sliding layer whose cache keeps HF's window: its store carries that window from block to block,
    # kept by recency (``policy`` is StreamingLLM without sinks), never scored by the options' policy nor packed
    recency: bool = False
    # (d'), (e) a context split over ranks: this rank keeps and attends to the positions it owns, merged over ranks
    split: ContextSplit | None = None
    store_slots: int = 0             # slots of the store this forward continues (0: a first forward)
    # (e), (h') a tiered store (option offload): what the compaction evicts is returned for the lower tier, and a
    # forward continuing the store attends to the lower tier where it lives, merged with the device store's part
    offload: bool = False
    # SentenceKV (policy "sentencekv", a tiered store): slots retrieved from the lower tier per step; the prefill's
    # SnapKV spec and the tokens it keeps (0: all)
    retrieval: int = 0
    semantic_policy: str = ""
    semantic: int = 0
    retrieve_in_place: bool = False  # option offload_attention: the retrieved tokens attended where the tier lives

    @property
    def attends_split(self) -> bool:
        """(e) attention merged over ranks: a forward continuing a split store. A first forward's candidates are its own
        tokens, which every rank computed: attending to all of them locally is exact and needs no collective
        (measured faster than gathering partials here: BENCHMARKS.md, "KV split over ranks")."""
        return self.split is not None and self.site.past_keys is not None

    @property
    def attends_tier(self) -> bool:
        """(e) attention merged with the lower tier's: a forward continuing a tiered store. A first forward's lower tier
        is empty (everything it evicts, it attended to itself)."""
        return self.offload and self.site.past_keys is not None

    @property
    def retrieves(self) -> bool:
        """(e) SentenceKV's retrieval: a forward continuing a tiered store of policy "sentencekv"."""
        return self.retrieval > 0 and self.site.past_keys is not None

    @classmethod
    def of(cls, site: AttentionSite, options: KVPassOptions, budget: int, capacity: int, block: BlockInputs | None,
           placeholders: list[fx.Node], split: ContextSplit | None = None) -> SitePlan:
        """Choose every step's variant for ``site``; refuse the combinations kvpass does not support."""
        recency = block is not None and bool(site.window) and not site.masked_window
        packed = options.head_budgets == "adaptive" and not recency
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
        n_new = node_value(site.q).shape[2]
        has_store = site.past_keys is not None
        static = bool(site.static_writes)
        if options.offload and (static or site.attn_keys is not None):
            raise UnsupportedGraph(
                f"kvpass: option 'offload'={options.offload!r} moves what a DynamicCache store evicts to a lower tier; "
                f"layer {site.layer} {'writes a StaticCache' if static else 'keeps a latent cache (MLA)'}, which it "
                "does not tier yet. Use the default DynamicCache (generate's) on a model with per-head keys and values")
        if static and block is not None:  # (BlockwisePrefill refuses these first)
            raise UnsupportedGraph("kvpass: block-wise prefill needs the default DynamicCache; layer "
                                   f"{site.layer} writes a StaticCache")
        if static:
            candidates, store_out = ("buffers+new", "buffers") if has_store else ("new", "outputs")
        else:
            candidates, store_out = "cache", "outputs"
        if not has_store:
            state, validity = "empty", "positions" if static else "mask"
        elif static:
            state, validity = "inputs-or-adopted", "all" if n_new == 1 else "all-or-positions"
        else:
            state, validity = "inputs", "block" if block is not None else "all"
        positions = next((n for n in placeholders if "position_ids" in n.name), None)
        if validity in ("positions", "all-or-positions") and positions is None and (
                site.mask is not None and n_new != 1):
            raise UnsupportedGraph(
                f"kvpass: StaticCache attention at '{site.attn.name}' has a padding mask but the forward takes "
                "no position_ids, from which kvpass reads which tokens are padding; pass position_ids= "
                "(generate() does)"
            )
        if site.attn_keys is not None:
            attention = "latent"
        else:  # (a prefill's candidates are its own tokens: row r is head r, packed or not)
            attention = "attend_packed" if packed and has_store else "attend"
        continues = has_store and not static and block is None  # a decode step, a question: fills the reserve
        scored_by_prompt = getattr(options.policy, "needs_observation_prompt", False)  # EpiCache's context scores
        context_scores = block is not None and scored_by_prompt and not recency
        policy = RECENCY if recency else options.policy.spec()
        sentences = options.policy.name == "sentencekv" and not recency
        if sentences and (site.sinks is not None or node_value(site.attn).dim() == 3):
            raise UnsupportedGraph(
                f"kvpass: policy 'sentencekv' retrieves per query head from a lower tier; layer {site.layer} "
                f"{'has learned attention sinks' if site.sinks is not None else 'folds its heads into the batch'}, "
                "which its retrieval does not handle yet")
        return cls(site, budget, capacity, capacity if continues else budget, n_new, policy,
                   options.head_floor,
                   candidates=candidates, state=state, validity=validity, positions=positions,
                   extend="extend_packed_meta" if packed else "extend_meta", attention=attention,
                   fold_heads=node_value(site.attn).dim() == 3, observe=block is not None,
                   block=options.prefill_block if block is not None else 0, context_scores=context_scores,
                   compaction="compact_packed" if packed else "compact", store_out=store_out, recency=recency,
                   split=split, store_slots=node_value(site.past_keys).shape[2] if has_store else 0,
                   offload=options.offload is not None and not recency,
                   retrieval=options.policy.retrieval_slots(options.budget) if sentences else 0,
                   semantic_policy=options.policy.prefill_policy().spec() if sentences else "",
                   semantic=options.policy.semantic_budget(options.budget) if sentences else 0,
                   retrieve_in_place=sentences and options.offload_attention)


@dataclasses.dataclass
class Meta:
    """Store metadata of the candidates (``head``: each slot's kv head, for a packed store)."""

    pos: fx.Node
    head: fx.Node | None
    acc: fx.Node
    seen: fx.Node


@dataclasses.dataclass
class Store:
    """The compacted store: keys, values and their metadata, ``capacity`` slots."""

    k: fx.Node
    v: fx.Node
    pos: fx.Node
    acc: fx.Node


@dataclasses.dataclass
class SiteRewrite:
    """What rewriting one site made: the stand-ins for its state inputs (decode; the pass swaps them for graph
    inputs), the compacted store and the tokens seen after this forward."""

    state_inputs: tuple[fx.Node, ...]
    store: Store
    seen: fx.Node
    tier_inputs: tuple[fx.Node, ...] = ()     # stand-ins for the lower tier's k, v, pos, used (a tiered store's)
    evicted: tuple[fx.Node, ...] = ()         # k, v, pos the compaction evicted, for the lower tier
    retrieval_inputs: tuple[fx.Node, ...] = ()   # SentenceKV: stand-ins for abstracts, runs, query sum, count, skip
    sentence_outputs: tuple[fx.Node, ...] = ()   # SentenceKV continued: the new queries and keys (for the abstracts)


def rewrite_site(graph: fx.Graph, plan: SitePlan, block: BlockInputs | None) -> SiteRewrite:
    """Replace ``plan.site``'s attention with the steps (a)–(i), each in the variant ``plan`` chose."""
    site = plan.site
    steps = _Steps(graph, plan, block)
    with graph.inserting_before(site.attn):
        keys, values = steps.candidates()
        state_inputs, (pos, acc, seen) = steps.state_in(keys)
        new_valid = steps.validity()
        extended = steps.extend(pos, acc, seen, new_valid)
        meta = steps.place(extended)
        out, obs = steps.attend(keys, values, meta if plan.attends_split else extended)
        meta = steps.observe(meta)
        obs = steps.context_scores(keys, meta, obs)
        keys, values, meta = steps.semantic(keys, values, meta, obs)
        keep, acc_new = steps.score(obs, keys, meta)
        store = steps.compact(keys, values, meta, keep, acc_new)
        evicted = steps.evicted(keys, values, meta, keep)
        steps.store_out(store)
        sentence_outputs = steps.sentence_outputs(keys)
    site.attn.replace_all_uses_with(out)
    graph.erase_node(site.attn)
    for write in site.static_writes or ():  # kvpass writes the buffers itself (or returns the store), after compaction
        graph.erase_node(write)
    return SiteRewrite(state_inputs, store, meta.seen, steps.tier_inputs, evicted, steps.retrieval_inputs,
                       sentence_outputs)


class _Steps:
    """The steps, each emitting its nodes at the graph's current insertion point in its plan's variant."""

    def __init__(self, graph: fx.Graph, plan: SitePlan, block: BlockInputs | None) -> None:
        self.graph, self.plan, self.site, self.block = graph, plan, plan.site, block
        self.g = graph.call_function
        self._tokens_before: fx.Node | None = None
        self._query_positions: fx.Node | None = None  # (d') the new tokens' positions, before placement
        self.tier_inputs: tuple[fx.Node, ...] = ()     # (e) stand-ins for the lower tier's inputs
        self.retrieval_inputs: tuple[fx.Node, ...] = ()  # (e) SentenceKV's stand-ins (abstracts and the query's sum)

    def candidates(self) -> tuple[fx.Node, fx.Node]:
        """(a) Keys and values ``[B, H_kv, N, D]`` the store is chosen from."""
        site, g = self.site, self.g
        match self.plan.candidates:
            case "cache":
                return site.keys, site.values
            case "new":
                return site.static_writes[0].args[3], site.static_writes[1].args[3]
            case "buffers+new":
                new_keys, new_values = site.static_writes[0].args[3], site.static_writes[1].args[3]
                return (g(torch.cat, ([site.keys, new_keys],), {"dim": 2}),
                        g(torch.cat, ([site.values, new_values],), {"dim": 2}))

    def state_in(self, keys: fx.Node) -> tuple[tuple[fx.Node, ...], tuple[fx.Node, fx.Node, fx.Node]]:
        """(b) (stand-ins for the state inputs, (pos, acc, seen) before this forward)."""
        g = self.g
        match self.plan.state:
            case "empty":
                empty = g(operator.getitem, (keys, (ALL, ALL, slice(0, 0), 0)))
                pos = g(torch.zeros_like, (empty,), {"dtype": torch.int64})
                acc = g(torch.zeros_like, (empty,), {"dtype": torch.float32})
                seen = g(torch.zeros_like, (g(operator.getitem, (keys, (ALL, 0, 0, 0))),), {"dtype": torch.int64})
                return (), (pos, acc, seen)
            case "inputs":
                stand_ins = self._stand_ins()
                return stand_ins, stand_ins
            case "inputs-or-adopted":
                stand_ins = self._stand_ins()
                return stand_ins, self._adopted(*stand_ins)

    def validity(self) -> fx.Node:
        """(c) ``[B, T]`` bool: which of the new tokens are real."""
        g = self.g
        match self.plan.validity:
            case "mask":
                return self._mask_row()
            case "positions":
                return self._from_positions()
            case "all":
                return self._all_new()
            case "block":
                return g(operator.or_, (self.block.valid, self.block.observe))
            case "all-or-positions":  # positions where the cache held nothing before (its first forward's padding)
                every = self._all_new()
                first = self._from_positions()
                return g(torch.where, (g(operator.eq, (self._tokens(), 0)), first, every))

    def extend(self, pos: fx.Node, acc: fx.Node, seen: fx.Node, new_valid: fx.Node) -> Meta:
        """(d) Metadata of the candidates (the store's slots, then the new tokens)."""
        g = self.g
        match self.plan.extend:
            case "extend_meta":
                meta = g(torch.ops.kvpass.extend_meta.default, (pos, acc, seen, new_valid))
                pos_all, acc_all, seen_all = (g(operator.getitem, (meta, i)) for i in range(3))
                return Meta(pos_all, None, acc_all, seen_all)
            case "extend_packed_meta":  # head-adaptive store: positions carry each slot's head (kvpass.ops, "packed")
                meta = g(torch.ops.kvpass.extend_packed_meta.default, (pos, acc, seen, new_valid))
                pos_all, head_all, acc_all, seen_all = (g(operator.getitem, (meta, i)) for i in range(4))
                return Meta(pos_all, head_all, acc_all, seen_all)

    def place(self, meta: Meta) -> Meta:
        """(d') A context split over ranks: the candidates another rank owns become empty slots here (``seen`` still
        counts them: they are part of the sequence)."""
        split = self.plan.split
        if split is None:
            return meta
        if self.plan.attends_split:  # the queries' positions, whoever owns them
            self._query_positions = self.g(operator.getitem, (meta.pos, (ALL, 0, slice(self.plan.store_slots, None))))
        return Meta(self._owned(meta.pos), meta.head, meta.acc, meta.seen)

    def _owned(self, pos: fx.Node) -> fx.Node:
        """``pos`` with the new tokens this rank does not own made empty; the store's slots are its own already (the
        runner refuses a store kvpass did not place). Only the new tokens: Inductor recomputes the owner (an int64
        division) inside every loop that reads the result, the compaction's copy of each key included (measured 2.8x
        slower decode on a tiny Llama when the whole store was tested)."""
        g, split, slots = self.g, self.plan.split, self.plan.store_slots
        if not slots:
            return split.owned_positions(self.graph, pos)
        store = g(operator.getitem, (pos, (ALL, ALL, slice(None, slots))))
        new = g(operator.getitem, (pos, (ALL, ALL, slice(slots, None))))
        return g(torch.cat, ([store, split.owned_positions(self.graph, new)],), {"dim": 2})

    def attend(self, keys: fx.Node, values: fx.Node, meta: Meta) -> tuple[fx.Node, fx.Node]:
        """(e) (the attention output, in the site's layout; the weights the policy observes)."""
        site, plan, g = self.site, self.plan, self.g
        extra = self._softcap_and_sinks()
        if plan.attends_split:
            return self._attend_parts(keys, values, meta, extra, self._query_positions, self._gathered)
        if plan.attends_tier:
            q_pos = g(operator.getitem, (meta.pos, (ALL, 0, slice(plan.store_slots, None))))
            other = self._with_retrieval if plan.retrieves else self._with_tier
            return self._attend_parts(keys, values, meta, extra, q_pos, other)
        match plan.attention:
            case "attend":  # (SentenceKV's prefill observes as its SnapKV stage needs)
                policy = plan.semantic_policy or plan.policy
                attended = g(torch.ops.kvpass.attend.default,
                             (site.q, keys, values, meta.pos, site.scale, policy, site.window, *extra))
            case "latent":  # a latent cache: attend over the keys/values the model computes from it
                pos = self._pos_per_head(meta.pos, node_value(site.key_write).shape[1],
                                         node_value(site.attn_keys).shape[1])
                attended = g(torch.ops.kvpass.attend.default, (site.q, site.attn_keys, site.attn_values, pos,
                                                               site.scale, plan.policy, site.window, *extra))
            case "attend_packed":
                attended = g(torch.ops.kvpass.attend_packed.default,
                             (site.q, keys, values, meta.pos, meta.head, site.scale, plan.policy, *extra))
        out, obs = (g(operator.getitem, (attended, i)) for i in range(2))
        if plan.fold_heads:  # heads folded into the batch for bmm (XGLM): [B * H_q, T, D_v]
            out = g(torch.flatten, (out, 0, 1))
        return out, obs

    def observe(self, meta: Meta) -> Meta:
        """(f) A block's observation tokens: scored from, never kept, not part of the sequence."""
        if not self.plan.observe:
            return meta
        g, observe = self.g, self.block.observe
        observed = g(torch.nn.functional.pad, (observe, (self.plan.capacity, 0)), {"value": False})
        observed = g(operator.getitem, (observed, (ALL, None)))
        pos = g(torch.Tensor.masked_fill, (meta.pos, observed, -1))
        seen = g(operator.sub, (meta.seen, g(torch.sum, (observe,), {"dim": 1})))
        return Meta(pos, meta.head, meta.acc, seen)

    def context_scores(self, keys: fx.Node, meta: Meta, obs: fx.Node) -> fx.Node:
        """(f) EpiCache's scores: the observation queries' softmax over the context slots only (``meta`` after the
        observation tokens were made dead), in place of the weights the attention op observed."""
        if not self.plan.context_scores:
            return obs
        g, site = self.g, self.site
        q_obs = g(operator.getitem, (site.q, (ALL, ALL, slice(self.plan.block, None))))
        rows = g(operator.getitem, (self.block.observe, (ALL, slice(self.plan.block, None))))
        context = g(operator.ge, (meta.pos, 0))
        reduce = policy_from_spec(self.plan.policy).obs_reduce
        return g(torch.ops.kvpass.context_scores.default,
                 (q_obs, keys, context, rows, site.scale, reduce, meta.head, site.softcap))

    def semantic(self, keys: fx.Node, values: fx.Node, meta: Meta, obs: fx.Node) -> tuple[fx.Node, fx.Node, Meta]:
        """(g') SentenceKV's first forward: the candidates SnapKV keeps (``semantic`` of them), in position order; the
        device store and the lower tier are then chosen among these. Unchanged otherwise (or with every token kept)."""
        plan, g = self.plan, self.g
        if not plan.semantic_policy or plan.site.past_keys is not None or not plan.semantic:
            return keys, values, meta
        n_new = plan.n_new if isinstance(plan.n_new, int) else g(torch.ops.aten.sym_size.int, (self.site.q, 2))
        scored = g(torch.ops.kvpass.score.default,
                   (plan.semantic_policy, obs, keys, meta.pos, meta.acc, n_new, plan.semantic))
        keep, acc = (g(operator.getitem, (scored, i)) for i in range(2))
        kept = g(torch.ops.kvpass.compact.default, (keys, values, meta.pos, keep, acc, plan.semantic, plan.semantic,
                                                    self.site.window))
        k, v, pos, acc = (g(operator.getitem, (kept, i)) for i in range(4))
        return k, v, Meta(pos, None, g(torch.zeros_like, (acc,)), meta.seen)

    def sentence_outputs(self, keys: fx.Node) -> tuple[fx.Node, ...]:
        """SentenceKV continued: this forward's queries ``[B, H_q, T, D]`` and new keys ``[B, H_kv, T, D]``, from which
        the runner keeps the current sentence's query sum and the sentences' abstracts."""
        plan, g = self.plan, self.g
        if not plan.retrieves:
            return ()
        return self.site.q, g(operator.getitem, (keys, (ALL, ALL, slice(plan.store_slots, None))))

    def score(self, obs: fx.Node, keys: fx.Node, meta: Meta) -> tuple[fx.Node, fx.Node]:
        """(g) (keep scores, the policy's new statistic) of every candidate."""
        plan, g = self.plan, self.g
        n_new = plan.n_new if isinstance(plan.n_new, int) else g(torch.ops.aten.sym_size.int, (self.site.q, 2))
        scored = g(torch.ops.kvpass.score.default, (plan.policy, obs, keys, meta.pos, meta.acc, n_new, plan.budget))
        keep, acc = (g(operator.getitem, (scored, i)) for i in range(2))
        return keep, acc

    def compact(self, keys: fx.Node, values: fx.Node, meta: Meta, keep: fx.Node, acc: fx.Node) -> Store:
        """(h) The store of ``capacity`` slots keeping the ``budget`` best candidates."""
        plan, g = self.plan, self.g
        match plan.compaction:
            case "compact":
                compacted = g(torch.ops.kvpass.compact.default, (keys, values, meta.pos, keep, acc, plan.keep,
                                                                 plan.capacity, self.site.window))
            case "compact_packed":
                compacted = g(torch.ops.kvpass.compact_packed.default,
                              (keys, values, meta.pos, meta.head, keep, acc, plan.keep, plan.capacity,
                               plan.head_floor))
        return Store(*(g(operator.getitem, (compacted, i)) for i in range(4)))

    def evicted(self, keys: fx.Node, values: fx.Node, meta: Meta, keep: fx.Node) -> tuple[fx.Node, ...]:
        """(h') A tiered store: the candidates the compaction left out (keys, values, positions), for the lower tier."""
        plan, g = self.plan, self.g
        if not plan.offload:
            return ()
        out = g(torch.ops.kvpass.evicted.default, (keys, values, meta.pos, keep, plan.keep, self.site.window))
        return tuple(g(operator.getitem, (out, i)) for i in range(3))

    def store_out(self, store: Store) -> None:
        """(i) Where the cache gets the store."""
        site, graph = self.site, self.graph
        match self.plan.store_out:
            case "outputs":  # the cache stores what the graph returns in place of cat(past, new)
                output = graph.output_node()
                output.replace_input_with(site.key_write, store.k)
                output.replace_input_with(site.value_write, store.v)
            case "buffers":  # the cache keeps its buffers' addresses: write in place
                # detached: inference (the ops define no gradients), even where parameters require grad
                graph.call_method("copy_", (site.keys, graph.call_method("detach", (store.k,))))
                graph.call_method("copy_", (site.values, graph.call_method("detach", (store.v,))))

    # helpers of the steps

    def _attend_parts(self, keys: fx.Node, values: fx.Node, meta: Meta, extra: tuple, q_pos: fx.Node,
                      other_parts) -> tuple[fx.Node, fx.Node]:
        """(e) over a store split into parts: this forward's partial attention over its own slots, merged exactly with
        the other parts' (output, log-sum-exp) that ``other_parts`` brings (every rank's, or the lower tier's); the
        policy's weights normalized by the merged log-sum-exp, so the slots here are scored as the unsplit softmax
        weighs them."""
        site, plan, g = self.site, self.plan, self.g
        pos = meta.pos
        if plan.attention == "latent":
            keys, values = site.attn_keys, site.attn_values
            pos = self._pos_per_head(pos, node_value(site.key_write).shape[1], node_value(site.attn_keys).shape[1])
        softcap = extra[0] if extra else 0.0
        sinks = extra[1] if len(extra) > 1 else None
        part = g(torch.ops.kvpass.attend_part_observed.default,
                 (site.q, keys, values, pos, q_pos, site.scale, plan.policy, site.window, softcap))
        out_part, lse_part, observed = (g(operator.getitem, (part, i)) for i in range(3))
        outs, lses = other_parts(out_part, lse_part, q_pos, softcap)
        merged = g(torch.ops.kvpass.merge_parts.default, (outs, lses, sinks))
        out = g(torch.Tensor.to, (g(operator.getitem, (merged, 0)), node_value(site.q).dtype))
        rule = policy_from_spec(plan.policy)
        if rule.needs_obs:  # the slots here weighed as the whole store's softmax weighs them
            lse = g(operator.getitem, (merged, 1))
            obs = g(merged_observation, (observed, lse_part, lse, rule.obs_reduce))
        else:
            obs = g(torch.flatten, (observed, 2, 3))  # [B, H_q, 0]: nothing observed
        if plan.fold_heads:
            out = g(torch.flatten, (out, 0, 1))
        return out, obs

    def _gathered(self, out_part: fx.Node, lse_part: fx.Node, q_pos: fx.Node, softcap) -> tuple[fx.Node, fx.Node]:
        """Every rank's (output, log-sum-exp), side by side in one float32 tensor, in one all-gather."""
        g = self.g
        packed = g(torch.cat, ([g(torch.Tensor.float, (out_part,)), g(torch.unsqueeze, (lse_part, -1))],), {"dim": -1})
        gathered = self.plan.split.all_gather(self.graph, packed)  # [ranks, B, H_q, T, D_v + 1]
        return (g(operator.getitem, (gathered, (Ellipsis, slice(None, -1)))),
                g(operator.getitem, (gathered, (Ellipsis, -1))))

    def _with_tier(self, out_part: fx.Node, lse_part: fx.Node, q_pos: fx.Node, softcap) -> tuple[fx.Node, fx.Node]:
        """This part and the lower tier's, attended where the tier lives (``kvpass::tier_attend``) over the tier's
        inputs (stand-ins here; the pass swaps them for graph inputs)."""
        g, site = self.g, self.site
        self.tier_inputs = tuple(g(torch.empty, ((0,),)) for _ in range(4))
        tier_k, tier_v, tier_pos, used = self.tier_inputs
        tier = g(torch.ops.kvpass.tier_attend.default,
                 (site.q, tier_k, tier_v, tier_pos, used, q_pos, site.scale, site.window, softcap))
        out_tier, lse_tier = (g(operator.getitem, (tier, i)) for i in range(2))
        return g(torch.stack, ([out_part, out_tier],)), g(torch.stack, ([lse_part, lse_tier],))

    def _with_retrieval(self, out_part: fx.Node, lse_part: fx.Node, q_pos: fx.Node,
                        softcap) -> tuple[fx.Node, fx.Node]:
        """SentenceKV's step: this part, the lower-tier tokens of the best-scoring sentences (``retrieval`` slots per
        query head: gathered to the device by ``kvpass::tier_gather`` and attended there, or with ``offload_attention``
        ranked and attended where the tier lives, ``kvpass::tier_attend_retrieved``) and, on the steps that attend to
        every kept token (the runner passes the tier's written slot count then, 0 otherwise, and skips retrieval), the
        whole lower tier attended where it lives."""
        g, site, plan = self.g, self.site, self.plan
        tier_out, tier_lse = self._with_tier(out_part, lse_part, q_pos, softcap)
        tier_k, tier_v, tier_pos, _ = self.tier_inputs
        self.retrieval_inputs = tuple(g(torch.empty, ((0,),)) for _ in range(6))
        means, starts, lens, q_sum, q_count, skip = self.retrieval_inputs
        n_new = plan.n_new if isinstance(plan.n_new, int) else g(torch.ops.aten.sym_size.int, (site.q, 2))
        q_all = g(torch.add, (q_sum, g(torch.sum, (g(torch.Tensor.float, (site.q,)), 2))))
        count = g(operator.getitem, (g(operator.add, (q_count, n_new)), (ALL, None, None)))
        q_mean = g(operator.truediv, (q_all, count))
        if plan.retrieve_in_place:  # ranked and attended where the tier lives: the queries go, (output, lse) return
            part = g(torch.ops.kvpass.tier_attend_retrieved.default,
                     (site.q, q_mean, means, starts, lens, skip, tier_k, tier_v, tier_pos, q_pos, site.scale,
                      plan.retrieval, site.window, softcap))
        else:  # the tier I/O: the retrieved tokens copied into the device's retrieval slots, attended there
            index = g(retrieval_index, (q_mean, means, starts, lens, skip, plan.retrieval))
            gathered = g(torch.ops.kvpass.tier_gather.default, (tier_k, tier_v, tier_pos, index))
            k_r, v_r, pos_r = (g(operator.getitem, (gathered, i)) for i in range(3))
            part = g(torch.ops.kvpass.attend_part.default, (site.q, k_r, v_r, pos_r, q_pos, site.scale, site.window,
                                                             softcap))
        out_r, lse_r = (g(operator.getitem, (part, i)) for i in range(2))
        outs = g(torch.cat, ([tier_out, g(torch.unsqueeze, (out_r, 0))],))
        lses = g(torch.cat, ([tier_lse, g(torch.unsqueeze, (lse_r, 0))],))
        return outs, lses

    def _stand_ins(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        """Placeholders for pos, acc, seen; the pass swaps them for graph inputs once every site is rewritten."""
        return tuple(self.g(torch.empty, ((0,),)) for _ in range(3))

    def _tokens(self) -> fx.Node:
        """A StaticCache's token count before this forward: the write index of its first new token (HF counts every
        token, kept or not)."""
        if self._tokens_before is None:
            self._tokens_before = self.g(operator.getitem, (self.site.static_writes[0].args[2], 0))
        return self._tokens_before

    def _adopted(self, pos: fx.Node, acc: fx.Node, seen: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
        """Store metadata of a StaticCache buffer, adopted in the graph where the session has none.

        Store metadata the session does not know (``seen < 0``), or a token count of 0 (an empty cache: a new or reset
        one, whatever the session remembers at that address), is replaced by: slot ``i`` holds position ``i`` for
        ``i`` below the cache's token count.
        """
        g, tokens = self.g, self._tokens()
        fresh = g(operator.or_, (g(operator.lt, (seen, 0)), g(operator.eq, (tokens, 0))))  # [B]
        keys = node_value(self.site.keys)
        slot = g(torch.arange, (keys.shape[2],), {"device": keys.device})
        adopted = g(torch.where, (g(operator.lt, (slot, tokens)), slot, -1))
        fresh3 = g(operator.getitem, (fresh, (ALL, None, None)))
        return (g(torch.where, (fresh3, adopted, pos)), g(torch.where, (fresh3, 0.0, acc)),
                g(torch.where, (fresh, tokens, seen)))

    def _query_rows(self) -> fx.Node:
        return self.g(operator.getitem, (self.site.q, (ALL, 0, ALL, 0)))

    def _all_new(self) -> fx.Node:
        return self.g(torch.ones_like, (self._query_rows(),), {"dtype": torch.bool})

    def _mask_row(self) -> fx.Node:
        """Which prompt tokens are real (left padding is not), read off the model's mask.

        With left padding the last query is a real token, so the last row of the mask shows exactly the real keys.
        No mask (``is_causal``) means no padding.
        """
        site, g = self.site, self.g
        if site.mask is None:
            return self._all_new()
        row = g(operator.getitem, (site.mask, (ALL, 0, -1, ALL)))
        if node_value(site.mask).dtype == torch.bool:
            return row
        return g(operator.gt, (row, torch.finfo(node_value(site.mask).dtype).min / 2))

    def _from_positions(self) -> fx.Node:
        """The real tokens of a StaticCache's first forward, from ``position_ids``.

        A StaticCache's mask spans its buffer slots, not the prompt, so padding is read off the positions instead:
        with left padding the last token is real and the real tokens count 0, 1, ..., its position. Without
        position_ids (and so, as the plan checked, without padding) every token is real.
        """
        g, positions = self.g, self.plan.positions
        q_rows = self._query_rows()
        if positions is None:
            return g(torch.ones_like, (q_rows,), {"dtype": torch.bool})
        index = g(torch.cumsum, (g(torch.ones_like, (q_rows,), {"dtype": torch.int64}), 1))  # 1..T
        last = g(operator.getitem, (positions, (ALL, slice(-1, None))))                    # [B or 1, 1]
        n_new = g(torch.ops.aten.sym_size.int, (self.site.q, 2))
        return g(operator.gt, (index, g(operator.sub, (n_new, g(operator.add, (last, 1))))))

    def _softcap_and_sinks(self) -> tuple:
        """The attention ops' optional trailing arguments: a logit soft cap, learned sinks ``[B, H_q, T]``."""
        site = self.site
        if site.sinks is None:
            return (site.softcap,) if site.softcap else ()
        sinks = site.sinks
        if len(node_value(sinks).shape) == 4:  # GPT-OSS's column [B, H_q, T, 1]
            sinks = self.g(operator.getitem, (sinks, (Ellipsis, 0)))
        return site.softcap, sinks

    def _pos_per_head(self, pos: fx.Node, store_heads: int, attn_heads: int) -> fx.Node:
        """Store metadata ``[B, H_store, N]`` for the ``H_attn`` heads a latent cache's keys are computed for (each
        store head serves ``H_attn / H_store`` of them, in order)."""
        if store_heads == attn_heads:
            return pos
        if store_heads == 1:
            return self.graph.call_method("expand", (pos, -1, attn_heads, -1))
        return self.g(torch.repeat_interleave, (pos, attn_heads // store_heads), {"dim": 1})
