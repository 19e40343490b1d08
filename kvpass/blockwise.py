"""Run a block graph (from :class:`kvpass.passes.BlockwisePrefill`) over a prompt of any length.

The prompt is split into blocks of ``prefill_block`` tokens; the *first* block is left-padded so every
block is full (one compiled graph, no recompiles) and the last block ends on the prompt's last token
(so ``logits_to_keep=1`` still returns its logits). After each block every layer's store is back at its
budget, so the KV held never exceeds budget + one block, however long the prompt is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from kvpass.analysis import AttentionSite, UnsupportedGraph, node_value
from kvpass.passes import BlockInputs, BlockwisePrefill, InsertKVEviction, LayerPlan
from kvpass.session import Session

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

    @classmethod
    def of(cls, placeholders: list[fx.Node], outputs: list[fx.Node], block: BlockInputs,
           plans: list[LayerPlan]) -> BlockLayout:
        seq = block.seq.node.expr
        tokens, seq_inputs = [], []
        for i, node in enumerate(placeholders):
            value = node_value(node)
            if isinstance(value, torch.SymInt) and value.node.expr == seq:
                seq_inputs.append(i)
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
        token_outputs = {}
        for i, node in enumerate(outputs):
            value = node_value(node) if isinstance(node, fx.Node) else None
            if isinstance(value, torch.Tensor):
                dims = _seq_dims(value, seq)
                if dims:
                    token_outputs[i] = dims[0]
        stores = []
        for plan in plans:
            k = node_value(block.past[plan.layer][0])
            stores.append((k.shape, k.dtype))
        return cls(tokens, seq_inputs, token_outputs, stores)


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
    sliding = [site.layer for site in sites if site.window and not site.masked_window]
    if sliding:
        raise UnsupportedGraph(
            f"kvpass: option 'prefill_block'={options.prefill_block} does not support sliding-window layers (layers "
            f"{sliding}, window {sites[sliding[0]].window}): HF keeps those layers' window itself and sizes their "
            "masks from its own token counter, which the block graph's stores cannot follow. Leave 'prefill_block' "
            "unset for this model (its sliding layers are bounded by their window already)"
        )
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
    to_blocks = BlockwisePrefill({site.layer: rewrite.budget(site, len(sites), seq, False)[1] for site in sites})
    block = to_blocks(graph, sites)
    plans = rewrite(graph, sites, block)
    layout = BlockLayout.of(placeholders, list(graph.output_node().args[0][:n_outputs]), block, plans)
    return BlockRewrite(block, plans, layout, n_outputs, {**rewrite.counters, **to_blocks.counters})


class BlockwiseRunner:
    """Call a compiled block graph once per block, threading the stores and their metadata."""

    def __init__(self, compiled: Callable, layout: BlockLayout, plans: list[LayerPlan], block_size: int,
                 session: Session, n_outputs: int, store_outputs: dict[int, tuple[int, int]]) -> None:
        self.compiled = compiled
        self.layout = layout
        self.plans = plans
        self.block_size = block_size
        self.session = session
        self.n_outputs = n_outputs
        self.store_outputs = store_outputs  # layer -> output indices of its keys and values store
        self._boxed: Callable | bool | None = None  # resolved on the first call

    def __call__(self, *args) -> list:
        layout = self.layout
        first = args[layout.tokens[0].index]
        b, t = first.shape[0], first.shape[layout.tokens[0].dim]
        device = first.device
        block = self.block_size
        n_blocks, pad = split_prompt(t, block)
        observe_ids = self.session.observation_ids
        repeat = isinstance(observe_ids, str)  # "repeat": each block observed by a copy of itself (KVzip-style)
        n_obs = 0 if observe_ids is None else block if repeat else observe_ids.shape[-1]
        if n_obs and any(tok.role == "other" for tok in layout.tokens):
            names = [tok.index for tok in layout.tokens if tok.role == "other"]
            raise ValueError(f"kvpass: an observation prompt needs token inputs kvpass knows; inputs {names} are not")

        padded = {tok.index: _pad_front(args[tok.index], tok.dim, pad) for tok in layout.tokens}
        mask = next((args[tok.index] for tok in layout.tokens if tok.role == "attention_mask"), None)
        valid = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask != 0
        valid = _pad_front(valid, 1, pad)
        observe = torch.zeros(b, block + n_obs, dtype=torch.bool, device=device)
        observe[:, block:] = True

        stores, state = [], []
        for shape, dtype in layout.stores:
            shape = (b, *shape[1:])
            stores += [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
            state += [torch.full(shape[:3], -1, dtype=torch.int64, device=device),
                      torch.zeros(shape[:3], device=device), torch.zeros(b, dtype=torch.int64, device=device)]
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in layout.token_outputs}
        outs: list = []
        for i in range(n_blocks):
            call = list(args)
            own_ids = next((padded[t.index].narrow(t.dim, i * block, block) for t in layout.tokens
                            if t.role == "input_ids"), None)
            for tok in layout.tokens:
                x = padded[tok.index].narrow(tok.dim, i * block, block).contiguous()
                if n_obs:
                    x = torch.cat([x, _observation_part(tok, x, own_ids if repeat else observe_ids, b)], dim=tok.dim)
                call[tok.index] = x
            for j in layout.seq_inputs:
                call[j] = block + n_obs
            block_valid = valid[:, i * block : (i + 1) * block].contiguous()
            if n_obs:
                block_valid = torch.nn.functional.pad(block_valid, (0, n_obs), value=False)
            inputs = [*call, *stores, block_valid, observe, *state]
            call = stores = state = x = outs = None  # drop our references: the graph frees the old stores
            outs = self._call(inputs)
            for j, d in layout.token_outputs.items():
                pieces[j].append(outs[j].narrow(d, 0, block))
            stores, state = [], list(outs[self.n_outputs :])
            for plan in self.plans:
                k_index, v_index = self.store_outputs[plan.layer]
                stores += [outs[k_index], outs[v_index]]
        outs = list(outs)
        for j, d in layout.token_outputs.items():
            whole = torch.cat(pieces[j], dim=d) if len(pieces[j]) > 1 else pieces[j][0]
            outs[j] = whole.narrow(d, pad, t)
        if n_obs:  # outputs of the last position belong to the observation prompt: make misuse loud
            stores_out = {i for pair in self.store_outputs.values() for i in pair}
            for j in range(self.n_outputs):
                x = outs[j]
                if j not in layout.token_outputs and j not in stores_out and isinstance(x, torch.Tensor) \
                        and x.is_floating_point():
                    outs[j] = torch.full_like(x, float("nan"))
        stores = {layer: outs[k] for layer, (k, _) in self.store_outputs.items()}
        self.session.update(self.plans, outs, self.n_outputs, stores)
        return outs[: self.n_outputs]


    def _call(self, inputs: list) -> list:
        """Run the block graph; through the boxed convention when available, so the compiled code frees each
        previous store right after its layer reads it instead of keeping all of them alive until the block ends."""
        if self._boxed is None:
            self._boxed = _boxed_runtime(self.compiled) or False
        if self._boxed:
            return self._boxed(inputs)  # clears ``inputs``
        return self.compiled(*inputs)


def _boxed_runtime(compiled: Callable) -> Callable | None:
    """AOTAutograd's boxed runtime function under ``compiled``, if it prepends no lifted parameters.

    ``aot_module_simplified`` returns an unboxed ``forward(*args)`` (``__wrapped__`` chain) that copies the
    arguments into a list for a boxed ``compiled_fn``; Dynamo graphs take their parameters as inputs, so
    nothing is prepended and the boxed function can be called directly (under Dynamo's disable context, as
    the wrapper does).
    """
    fn = compiled
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and {"compiled_fn", "params_buffers_flat"} <= set(code.co_freevars):
            cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True))
            inner = cells["compiled_fn"]
            if cells["params_buffers_flat"] or not getattr(inner, "_boxed_call", False):
                return None
            return torch._dynamo.disable(inner, reason="kvpass block graph runtime")
        fn = getattr(fn, "__wrapped__", None)
    return None


def _seq_dims(value: torch.Tensor, seq) -> list[int]:
    """Dimensions of ``value`` whose size is the prompt-length symbol ``seq``."""
    return [d for d, size in enumerate(value.shape) if isinstance(size, torch.SymInt) and size.node.expr == seq]


def _pad_front(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _observation_part(tok: TokenInput, x: torch.Tensor, observe_ids: torch.Tensor, b: int) -> torch.Tensor:
    """The observation prompt's entries of token input ``tok`` (its ids, positions after the block, mask 1)."""
    n = observe_ids.shape[-1]
    if tok.role == "input_ids":
        return observe_ids.to(x.device).reshape(-1, n).expand(b, n)
    if tok.role == "position_ids":
        last = x.narrow(tok.dim, x.shape[tok.dim] - 1, 1)
        return last + torch.arange(1, n + 1, device=x.device)
    return torch.ones(b, n, dtype=x.dtype, device=x.device)
