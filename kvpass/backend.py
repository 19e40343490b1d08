"""The ``kvpass`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from kvpass.analysis import find_attention_sites, node_value
from kvpass.config import KVPassOptions, parse_options
from kvpass.errors import UnsupportedGraph
from kvpass.lowering import compile_graph, triton_lowering
from kvpass.passes import InsertKVEviction, LayerPlan
from kvpass.passes.block_graph import rewrite_blocks
from kvpass.policies.sentencekv import SentenceKV
from kvpass.runtime.blockwise import BlockwiseRunner
from kvpass.runtime.sentences import advance_sentences, attends_every_token, check_batch, sentence_inputs
from kvpass.runtime.state import GraphRecord, attach_states, lower_tiers, state_inputs, store_state


def kvpass_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None) -> Callable:
    """Rewrite ``gm`` so every attention layer keeps a fixed-capacity, policy-evicted KV store.

    ``options`` are documented in the README (policy, budget/ratio/layer_budgets, compiler, fallback,
    policy parameters). A graph with no rewritable attention site raises
    :class:`kvpass.analysis.UnsupportedGraph`, or — only with ``fallback=True`` — warns and compiles
    the graph uncompressed with the chosen compiler.
    """
    opts = parse_options(options)
    gm = _copy(gm)  # Dynamo keeps using its own graph after the backend returns: rewrite a copy
    try:
        sites = find_attention_sites(gm.graph)
    except UnsupportedGraph as err:
        if not opts.fallback:
            raise
        warnings.warn(f"{err}\nkvpass: fallback=True, compiling this graph WITHOUT KV compression",
                      stacklevel=2)
        return _compile(gm, example_inputs, opts)
    # a StaticCache counts every token itself, so HF derives true positions from it; a compressed DynamicCache does not
    if any(site.past_keys is not None and not site.static_writes and not site.window for site in sites) and not any(
        n.op == "placeholder" and ("position_ids" in n.name or "cache_position" in n.name) for n in gm.graph.nodes
    ):
        raise UnsupportedGraph(
            "kvpass: this decode step takes no position_ids input, so the model derives token positions from "
            "the cache length — which kvpass keeps at the budget, giving RoPE wrong positions. Pass "
            "position_ids= with the tokens' true positions (generate() does)."
        )
    if opts.prefill_block is not None and any(site.static_writes for site in sites):
        raise UnsupportedGraph(
            f"kvpass: option 'prefill_block'={opts.prefill_block} needs the default DynamicCache; this forward writes "
            "a StaticCache, whose buffers are already the fixed-capacity store"
        )
    if _blockwise(opts, sites):
        return _compile_blockwise(gm, example_inputs, sites, opts)
    n_outputs = len(gm.graph.output_node().args[0])
    rewrite = InsertKVEviction(opts, _store_budgets(gm, sites, example_inputs))
    plans = rewrite(gm.graph, sites)
    gm.recompile()
    store_outputs = _store_outputs(gm, plans, n_outputs)
    state_examples = []
    for plan in plans:
        if plan.past_index is None:
            continue
        store = example_inputs[plan.past_index]
        b, h, c, _ = store.shape
        state_examples += [torch.zeros(b, h, c, dtype=torch.int64), torch.zeros(b, h, c),
                           torch.zeros(b, dtype=torch.int64)]
    tier_examples = _tier_examples(gm, plans) + _retrieval_examples(gm, plans)
    _detach_outputs(gm)
    decode = any(p.past_index is not None for p in plans)
    # inline the op references only where the step's query count is static (a decode step): the references
    # chunk queries with Python ranges, which a symbolic count cannot drive
    static_step = isinstance(node_value(sites[0].q).shape[2], int)
    compiled = _compile(gm, [*example_inputs, *state_examples, *tier_examples], opts, inline_ops=decode and static_step)
    record = GraphRecord.of("decode" if decode else "prefill", opts.policy.spec(), sites, plans, rewrite.counters,
                            opts.offload)
    appended = node_value(sites[0].q).shape[2]
    # a multi-token forward over stores (a chat turn) is where a caller can lose count of a compressed cache's tokens
    continues = next((i for i, n in enumerate(gm.graph.find_nodes(op="placeholder")) if "position_ids" in n.name), None)
    first_store = next((p for p in plans if p.past_index is not None), None)
    if not decode or first_store is None or first_store.static or appended == 1:
        continues = None
    sentences = opts.policy if opts.policy.name == "sentencekv" else None
    ids_index = next((i for i, n in enumerate(gm.graph.find_nodes(op="placeholder")) if "input_ids" in n.name), None)
    return StoreGraph(compiled, plans, n_outputs, store_outputs, record, opts.head_budgets == "adaptive", continues,
                      opts.offload, opts.offload_dir, sentences, ids_index, opts.offload_attention)


class StoreGraph:
    """Runs a compiled prefill or decode graph: reads each store's state off the store it receives, and attaches
    the new state to the store the cache will hold (:mod:`kvpass.runtime.state`). Holds no state of any cache."""

    def __init__(self, compiled: Callable, plans: list[LayerPlan], n_outputs: int,
                 store_outputs: dict[int, tuple[int, int]], record: GraphRecord, packed: bool,
                 continues: int | None, offload: str | None = None, offload_dir: str | None = None,
                 sentences: SentenceKV | None = None, ids_index: int | None = None,
                 offload_attention: bool = False) -> None:
        self.compiled, self.plans, self.n_outputs, self.record, self.packed = compiled, plans, n_outputs, record, packed
        self.offload, self.offload_dir = offload, offload_dir
        self.sentences, self.ids_index = sentences, ids_index  # policy "sentencekv": its rules, where the token ids are
        self.offload_attention = offload_attention  # SentenceKV: its abstracts kept beside the tier, which ranks them
        self.key_outputs = {layer: k for layer, (k, _) in store_outputs.items()}
        self.continues = continues  # index of position_ids, checked against the stores' counts (None: not checked)
        self.first_store = next((p for p in plans if p.past_index is not None), None)

    def __call__(self, *args):
        state, previous = state_inputs(self.plans, args, self.record, self.packed)
        if self.continues is not None:
            check_continuation(args[self.continues], state[2], args[self.first_store.past_index].shape[2])
        tiers = lower_tiers(self.plans, previous, args, self.offload, self.offload_dir)
        ids, attends_all = None, True
        if self.sentences is not None:
            ids = args[self.ids_index] if self.ids_index is not None else None
            check_batch(ids)
            attends_all = attends_every_token(self.plans, previous, ids)
        retrieval = sentence_inputs(self.plans, previous, attends_all)
        outs = self.compiled(*args, *state, *(x for tier in tiers.values() for x in tier.inputs(attends_all)),
                             *retrieval)
        stores = {layer: outs[k] for layer, k in self.key_outputs.items()}
        # a StaticCache's buffers were written in place: the store is the input
        stores.update({p.layer: args[p.past_index] for p in self.plans if p.layer not in stores})
        used = {layer: tier.used for layer, tier in tiers.items()}
        attach_states(self.plans, outs, self.n_outputs, stores, self.record, self.packed, previous, tiers,
                      self.offload, self.offload_dir)
        if self.sentences is not None:
            advance_sentences(self.sentences, self.plans, outs, self.n_outputs, stores, previous, used, ids,
                              retrieved=bool(retrieval) and not attends_all, with_tier=self.offload_attention)
        return outs[: self.n_outputs]


def _fresh_size(like: torch.Tensor, name: str, hint: int) -> torch.SymInt:
    """A size symbol of its own in ``like``'s shape environment (no guards tie it to anything): an input whose length
    it is may take any length without a recompile."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    shape_env = like.fake_mode.shape_env
    symbol = shape_env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    return shape_env.create_symintnode(symbol, hint=hint)


def _retrieval_examples(gm: fx.GraphModule, plans: list[LayerPlan]) -> list:
    """Examples of SentenceKV's inputs per layer continued (abstracts, runs, query sum and count, skip): fake tensors
    whose sentence count is a fresh symbol, so new sentences never recompile the graph."""
    examples = []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for plan in plans:
        if not plan.retrieval_inputs:
            continue
        k = node_value(placeholders[plan.past_index])
        n = _fresh_size(k, f"kvpass_sentences_{plan.layer}", 64)
        b, h, _, d = k.shape
        where = "cpu" if plan.retrieve_in_place else k.device  # (offload_attention: abstracts and runs beside the tier)
        with k.fake_mode:
            examples += [k.new_empty(b, h, n, d, dtype=torch.float32, device=where),
                         k.new_empty(b, h, n, dtype=torch.int64, device=where),
                         k.new_empty(b, h, n, dtype=torch.int64, device=where), k.new_empty(b, plan.query_heads, d,
                                                                              dtype=torch.float32),
                         k.new_empty(b, dtype=torch.float32), k.new_empty(b, dtype=torch.bool)]
    return examples


def _tier_examples(gm: fx.GraphModule, plans: list[LayerPlan]) -> list:
    """Examples of the lower tiers' inputs (k, v, pos, used per tiered layer continued): fake tensors whose slot count
    is a fresh symbol, so a tier's growth never recompiles the graph."""
    examples = []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for plan in plans:
        if not plan.tier_inputs:
            continue
        k = node_value(placeholders[plan.past_index])
        slots = _fresh_size(k, f"kvpass_tier_slots_{plan.layer}", 256)
        b, h, _, d = k.shape
        with k.fake_mode:
            examples += [k.new_empty(b, h, slots, d, device="cpu"),
                         k.new_empty(b, h, slots, plan.value_dim, device="cpu"),
                         k.new_empty(b, h, slots, dtype=torch.int64, device="cpu"),
                         k.new_empty((), dtype=torch.int64, device="cpu")]
    return examples


def _store_budgets(gm: fx.GraphModule, sites, example_inputs: list) -> dict[int, tuple[int, int]]:
    """(budget, slots) of each store this graph receives that kvpass produced: the tokens its state says it keeps
    (option 'ratio' sizes budgets by the prompt, so a decode step keeps what the prefill chose)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    budgets = {}
    for site in sites:
        if site.past_keys is None or site.past_keys not in placeholders:
            continue
        store = example_inputs[placeholders.index(site.past_keys)]
        state = store_state(store)
        if state is not None:
            budgets[site.layer] = (state.budget, store.shape[2])
    return budgets


def check_continuation(positions: torch.Tensor, seen: torch.Tensor, slots: int) -> None:
    """New tokens appended to kvpass stores must continue where the sequence stopped: the first new token of each row
    sits at position ``seen`` (the row's tokens so far, kept or evicted). A caller counting the cache's *slots*
    instead (HF's ``get_seq_length()``, which ``generate()`` uses to pick the tokens a cache has not seen) would
    re-feed or skip tokens and give the model a silently different sequence: refused."""
    first = positions.reshape(-1, positions.shape[-1])[:, 0].expand(seen.shape)
    if bool((seen < 0).any()) or torch.equal(first, seen):  # (seen < 0: a store the graph adopts itself)
        return
    row = int((first != seen).nonzero()[0, 0])
    raise ValueError(
        f"kvpass: this forward appends {positions.shape[-1]} tokens starting at position {int(first[row])} (batch row "
        f"{row}), but the compressed cache has seen {int(seen[row])} tokens of that row so far, in {slots} slots. "
        "Hugging Face's generate() counts a cache's tokens by its slots, so continuing a conversation from a "
        "compressed cache with the whole conversation as input_ids would re-feed or skip tokens. Use "
        "cache=kvpass.CompressedCache(config=model.config), which counts the tokens it has seen, or pass "
        "only the tokens the cache has not seen with the whole conversation's attention_mask: "
        "generate(input_ids=ids[:, seen:], attention_mask=mask, cache=cache), where seen = "
        "max(kvpass.kv_stats(cache)[0].tokens_seen); or pass position_ids that continue at each row's count"
    )


def _blockwise(opts, sites) -> bool:
    """Block-wise prefill applies to first forwards longer than one block (a shorter one is its own block)."""
    if opts.prefill_block is None or any(site.past_keys is not None for site in sites):
        return False
    seq = node_value(sites[0].q).shape[2]
    return not (isinstance(seq, int) and seq <= opts.prefill_block)


def _compile_blockwise(gm: fx.GraphModule, example_inputs: list, sites, opts: KVPassOptions) -> Callable:
    """Rewrite a dynamic prefill graph into one block graph and run it block by block."""
    rewritten = rewrite_blocks(gm.graph, sites, opts)
    block, plans, n_outputs = rewritten.block, rewritten.plans, rewritten.n_outputs
    gm.recompile()
    store_outputs = _store_outputs(gm, plans, n_outputs)
    examples = [*example_inputs]
    for plan in plans:
        examples += [node_value(n) for n in block.past[plan.layer]]
    examples += [node_value(block.valid), node_value(block.observe)]
    for plan in plans:
        k = node_value(block.past[plan.layer][0])
        b, h, c, _ = k.shape  # the batch may be symbolic (dynamic=True): make the examples in the fake mode
        with k.fake_mode:
            examples += [k.new_zeros(b, h, c, dtype=torch.int64), k.new_zeros(b, h, c, dtype=torch.float32),
                         k.new_zeros(b, dtype=torch.int64)]
    examples += _tier_examples(gm, plans)
    _detach_outputs(gm)
    compiled = _compile(gm, examples, opts)
    record = GraphRecord.of("prefill-block", opts.policy.spec(), sites, plans, rewritten.counters, opts.offload)
    return BlockwiseRunner(compiled, rewritten.layout, plans, opts.prefill_block, record,
                           opts.head_budgets == "adaptive", n_outputs, store_outputs, opts.offload, opts.offload_dir)


def _compile(gm: fx.GraphModule, example_inputs: list, opts, inline_ops: bool = False) -> Callable:
    """``compile_graph`` under the option ``reference_kernels``: references forced while compiling and running."""
    return triton_lowering.compiled_with_reference(
        opts.reference_kernels, lambda: compile_graph(gm, example_inputs, opts.compiler, inline_ops))


def _store_outputs(gm: fx.GraphModule, plans, n_outputs: int) -> dict[int, tuple[int, int]]:
    """Per layer, the graph output indices of its compacted keys and values stores."""
    outputs = list(gm.graph.output_node().args[0])[:n_outputs]
    result = {}
    for plan in plans:
        if plan.static and plan.past_index is not None:  # written into the StaticCache's buffers, not returned
            continue
        compacted = plan.state_outputs[0].args[0]  # pos_store = getitem(compacted, 2)
        k, v = (next(i for i, n in enumerate(outputs) if isinstance(n, fx.Node) and n.op == "call_function"
                     and n.args == (compacted, j)) for j in (0, 1))
        result[plan.layer] = (k, v)
    return result


def _detach_outputs(gm: fx.GraphModule) -> None:
    """KV eviction is inference: with no output requiring grad, AOTAutograd compiles an inference
    graph even when the model's parameters require grad (the kvpass ops define no gradients)."""
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        outs = [gm.graph.call_method("detach", (n,)) if _is_tensor(n) else n for n in output.args[0]]
    output.args = (tuple(outs),)
    gm.recompile()


def _is_tensor(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    value = node_value(node)
    return value is None or isinstance(value, torch.Tensor)  # nodes kvpass added carry no value


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)
