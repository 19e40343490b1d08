"""The block graph: :class:`BlockwisePrefill` and :class:`InsertKVEviction` composed over a dynamic-length prefill
graph, and the layout of the block graph's inputs and outputs that a runner (the backend's, or an exported
artifact's loader) needs to feed it a prompt of any length block by block."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import sympy
import torch
import torch.fx as fx

from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value
from kvpass.passes.blockwise_prefill import BlockInputs, BlockwisePrefill
from kvpass.passes.insert_kv_eviction import InsertKVEviction, LayerPlan

if TYPE_CHECKING:
    from kvpass.config import KVPassOptions


def split_prompt(length: int, block: int) -> tuple[int, int]:
    """(number of blocks, left padding) of a ``length``-token prompt prefilled in blocks of ``block`` tokens:
    every block full, the padding in front of the first one, the last block ending on the last token."""
    n_blocks = max(1, math.ceil(length / block))
    return n_blocks, n_blocks * block - length


@dataclasses.dataclass
class TokenInput:
    index: int   # position among the graph's inputs
    dim: int     # its sequence dimension
    role: str    # "input_ids", "position_ids", "attention_mask" or "other"


@dataclasses.dataclass
class BlockLayout:
    """Which inputs and outputs of a block graph run along the prompt."""

    tokens: list[TokenInput]
    seq_inputs: list[int]              # SymInt inputs equal to the prompt length
    token_outputs: dict[int, int]      # output index -> sequence dim
    stores: list[tuple[torch.Size, torch.dtype]]  # per layer (plan order): store shape (batch 0), dtype
    # output index -> its expression of the prompt length (``seq``) and of int inputs: a count the model returns, such
    # as HF's sliding layers' ``cumulative_length`` (tokens before + prompt), which the runner evaluates for the whole
    # prompt, not the block
    seq_outputs: dict[int, sympy.Expr] = dataclasses.field(default_factory=dict)
    lengths: tuple[sympy.Symbol, ...] = ()  # the symbols of the prompt length (see :func:`_prompt_lengths`)
    symbols: dict[sympy.Symbol, int] = dataclasses.field(default_factory=dict)  # their other symbols' int inputs
    # layer -> HF's sliding window of a layer whose cache keeps only that window (``window - 1`` tokens): its store
    # carries the window from block to block and is handed back to HF's cache in HF's layout
    windows: dict[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, placeholders: list[fx.Node], outputs: list[fx.Node], block: BlockInputs,
           plans: list[LayerPlan], windows: dict[int, int] | None = None) -> BlockLayout:
        seq = _prompt_lengths(block.seq.node.expr, placeholders)
        tokens, seq_inputs, symbols = [], [], {}
        for i, node in enumerate(placeholders):
            value = node_value(node)
            if isinstance(value, torch.SymInt) and value.node.expr in seq:
                seq_inputs.append(i)
            elif isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
                symbols[value.node.expr] = i
            elif isinstance(value, torch.Tensor):
                dims = _seq_dims(value, seq)
                if dims:
                    role = next((r for r in ("input_ids", "position_ids", "attention_mask") if r in node.name), "other")
                    tokens.append(TokenInput(i, dims[0], role))
        if not any(t.role == "position_ids" for t in tokens):
            raise UnsupportedGraph(
                "kvpass: block-wise prefill needs the tokens' positions as an input, but this prefill graph takes "
                "no position_ids (the model would restart RoPE positions at 0 in every block). Pass position_ids= "
                "(generate() does)."
            )
        token_outputs, seq_outputs = {}, {}
        for i, node in enumerate(outputs):
            value = node_value(node) if isinstance(node, fx.Node) else None
            if isinstance(value, torch.Tensor):
                dims = _seq_dims(value, seq)
                if dims:
                    token_outputs[i] = dims[0]
            elif isinstance(value, torch.SymInt) and seq & value.node.expr.free_symbols:
                unknown = value.node.expr.free_symbols - {*seq, *symbols}
                if unknown:
                    raise UnsupportedGraph(
                        f"kvpass: block-wise prefill: output {i} of the prefill graph is a count "
                        f"({value.node.expr}) of the prompt length and of sizes {sorted(map(str, unknown))} that are "
                        "no int input, which the block runner cannot evaluate for the whole prompt")
                seq_outputs[i] = value.node.expr
        stores = []
        for plan in plans:
            k = node_value(block.past[plan.layer][0])
            stores.append((k.shape, k.dtype))
        used = {sym for expr in seq_outputs.values() for sym in expr.free_symbols}
        symbols = {sym: i for sym, i in symbols.items() if sym in used}
        return cls(tokens, seq_inputs, token_outputs, stores, seq_outputs, tuple(seq), symbols, dict(windows or {}))


@dataclasses.dataclass
class BlockRewrite:
    """What :func:`rewrite_blocks` made of a prefill graph."""

    block: BlockInputs
    plans: list[LayerPlan]
    layout: BlockLayout
    n_outputs: int               # the graph's outputs before the rewrite (the state outputs follow them)
    counters: dict[str, int]     # both passes' counters


def rewrite_blocks(graph: fx.Graph, sites: list[AttentionSite], options: KVPassOptions) -> BlockRewrite:
    """Rewrite a dynamic-length prefill ``graph`` (in place) into the block graph: :class:`BlockwisePrefill`
    with the capacities :class:`InsertKVEviction` gives each layer, then ``InsertKVEviction`` with the block
    inputs. Its inputs: the graph's own, the stores ``k_0, v_0, ...``, ``valid``, ``observe``, then the store
    metadata ``pos_0, acc_0, seen_0, ...``. Shared by the backend's block-wise prefill and ``kvpass export``."""
    latent = [site.layer for site in sites if site.attn_keys is not None]
    if latent:
        raise UnsupportedGraph(
            f"kvpass: option 'prefill_block'={options.prefill_block} does not support latent caches (layers {latent} "
            "project their keys and values from a cached latent, as MLA does): the model's projection is traced for "
            "the prompt's own length and cannot be run over a store plus a block. Leave 'prefill_block' unset for "
            "this model"
        )
    seq = BlockwisePrefill.prompt_symbol(sites)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_outputs = len(graph.output_node().args[0])
    rewrite = InsertKVEviction(options)
    to_blocks = BlockwisePrefill({site.layer: rewrite.block_budget(site, len(sites), seq)[1] for site in sites})
    # sliding layers whose cache keeps HF's window (Gemma-3's local layers, Mistral's): carried, not evicted
    windows = {site.layer: site.window for site in sites if site.hf_window}
    block = to_blocks(graph, sites)
    plans = rewrite(graph, sites, block)
    layout = BlockLayout.of(placeholders, list(graph.output_node().args[0][:n_outputs]), block, plans, windows)
    return BlockRewrite(block, plans, layout, n_outputs, {**rewrite.counters, **to_blocks.counters})



def _prompt_lengths(seq: sympy.Symbol, placeholders: list[fx.Node]) -> set[sympy.Symbol]:
    """The symbols that stand for the prompt length: ``seq`` (the queries'), and the length of a 2-D
    ``attention_mask`` input. A first forward's mask spans exactly the prompt, but once Dynamo has seen the mask longer
    than the tokens (``generate()``'s decode steps run through the same frame) it traces it with a symbol of its own."""
    lengths = {seq}
    for node in placeholders:
        value = node_value(node)
        if "attention_mask" in node.name and isinstance(value, torch.Tensor) and value.dim() == 2 \
                and isinstance(value.shape[1], torch.SymInt) and value.shape[1].node.expr.is_Symbol:
            lengths.add(value.shape[1].node.expr)
    return lengths


def _seq_dims(value: torch.Tensor, seq: set[sympy.Symbol]) -> list[int]:
    """Dimensions of ``value`` whose size is one of the prompt-length symbols ``seq``."""
    return [d for d, size in enumerate(value.shape) if isinstance(size, torch.SymInt) and size.node.expr in seq]
