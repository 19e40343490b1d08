"""The rewritten programs every export format packages: a prefill and a decode step of a HF decoder.

Both are ``torch.export`` programs of the model's forward with the KV cache passed *explicitly*
(DynamicCache layers set from graph inputs, the new stores returned as graph outputs), rewritten by
:class:`kvpass.passes.InsertKVEviction` exactly as the ``kvpass`` backend rewrites Dynamo graphs.
The calling convention (batch 1, one list of flat tensors, ``L`` attention layers):

* prefill: ``(input_ids [1, T], position_ids [1, T])``;
* decode:  ``(input_ids [1, 1], position_ids [1, 1], *state)``;
* both return ``(logits [1, 1, V], *state)`` with ``state = (k_0, v_0, ..., k_{L-1}, v_{L-1},
  pos_0, acc_0, seen_0, ..., pos_{L-1}, acc_{L-1}, seen_{L-1})``: each layer's store of exactly its
  ``capacity`` slots (``[1, H_kv, capacity, D]``) and the store metadata the ops thread
  (``pos [1, H_kv, capacity]`` int64, ``acc`` float32, ``seen [1]`` int64).

A generation is one prefill then one decode per new token, feeding each call's ``state`` to the next:
the store never grows, so the decode program has static shapes.

With ``prefill_block=C`` the prefill is instead the *block program* of
:class:`kvpass.passes.BlockwisePrefill` (static shapes, ``C`` tokens):
``(input_ids [1, C], position_ids [1, C], valid [1, C] bool, observe [1, C] bool, *state)`` →
``(logits [1, 1, V], *state)``. A prompt of any length is prefilled by calling it once per block from the
empty state (zero stores, ``pos`` -1): the first block left-padded (``valid`` False, id and position 0),
the last one ending on the prompt's last token, exactly as :class:`kvpass.runtime.blockwise.BlockwiseRunner` does
(see :func:`kvpass.passes.block_graph.split_prompt`). ``observe`` marks observation-only tokens (none here: all False).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram

import kvpass
import kvpass.ops  # noqa: F401  (registers the kvpass::* ops the programs call)
from kvpass.analysis import find_attention_sites
from kvpass.config import KVPassOptions
from kvpass.ops import REFERENCES
from kvpass.passes import InsertKVEviction, LayerPlan
from kvpass.passes.block_graph import rewrite_blocks

MANIFEST_VERSION = 1


class _ExplicitCacheForward(torch.nn.Module):
    """``model.forward`` with the KV cache as flat tensor inputs/outputs (last-token logits only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if past:
            for layer, k, v in zip(cache.layers, past[0::2], past[1::2], strict=True):
                # the store is the layer's whole cache: the model's update is cat([store, new])
                layer.keys, layer.values = k, v
                layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


@dataclasses.dataclass
class Programs:
    """The two rewritten programs, example inputs for each, and what a loader needs to drive them."""

    prefill: ExportedProgram
    decode: ExportedProgram
    prefill_example: tuple[torch.Tensor, ...]
    decode_example: tuple[torch.Tensor, ...]
    manifest: dict[str, Any]


def _plain_graph(ep: ExportedProgram) -> tuple[torch.nn.Module, fx.Graph]:
    """The unlifted module of an exported forward and a copy of its graph with plain (flat-args) codegen."""
    module = ep.module()
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))  # plain codegen: flat positional inputs and outputs
    for node in list(graph.nodes):  # the unlifted module's input guard: re-export checks shapes itself
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            graph.erase_node(node)
    return module, graph


def _rewrite(ep: ExportedProgram, options: KVPassOptions) -> tuple[fx.GraphModule, list[LayerPlan], dict[str, int]]:
    """Run kvpass's analysis and rewrite on an exported forward; returns a plain (flat-args) GraphModule."""
    module, graph = _plain_graph(ep)
    sites = find_attention_sites(graph)
    rewrite = InsertKVEviction(options)
    plans = rewrite(graph, sites)
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph), plans, dict(rewrite.counters)


def _rewrite_blocks(ep: ExportedProgram, options: KVPassOptions) -> tuple[fx.GraphModule, list[LayerPlan],
                                                                            dict[str, int]]:
    """Rewrite an exported dynamic-length prefill into the block graph, as the backend's block-wise path does
    (:func:`kvpass.passes.block_graph.rewrite_blocks`). The graph takes
    ``(ids, positions, k_0, v_0, ..., valid, observe, pos_0, acc_0, seen_0, ...)``."""
    module, graph = _plain_graph(ep)
    rewritten = rewrite_blocks(graph, find_attention_sites(graph), options)
    layout = rewritten.layout
    roles = [(tok.index, tok.dim, tok.role) for tok in layout.tokens]
    if roles != [(0, 1, "input_ids"), (1, 1, "position_ids")] or layout.seq_inputs or layout.token_outputs:
        raise RuntimeError(f"kvpass export: unexpected block graph layout (token inputs {roles}, length inputs "
                           f"{layout.seq_inputs}, per-token outputs {sorted(layout.token_outputs)})")
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph), rewritten.plans, rewritten.counters


class _FlatCall(torch.nn.Module):
    """Re-exportable wrapper: the rewritten graph's outputs regrouped as ``(logits, *state)``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        outs = self.gm(*args)
        # gm returns (logits, k_0, v_0, ..., state of layer 0, 1, ...): already in the documented order
        return tuple(outs)


class _BlockCall(torch.nn.Module):
    """Re-exportable block program: ``(ids, positions, valid, observe, *state)`` in the documented order."""

    def __init__(self, gm: fx.GraphModule, n_layers: int) -> None:
        super().__init__()
        self.gm = gm
        self.n_stores = 2 * n_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                observe: torch.Tensor, *state: torch.Tensor):
        stores, meta = state[: self.n_stores], state[self.n_stores :]
        return tuple(self.gm(input_ids, position_ids, *stores, valid, observe, *meta))


def empty_state(capacities: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The state a block-wise prefill starts from (batch 1): empty stores, ``pos`` -1 marking every slot empty."""
    stores, meta = [], []
    for capacity in capacities:
        shape = (1, kv_heads, capacity)
        stores += [torch.zeros(*shape, head_dim, dtype=dtype) for _ in range(2)]
        meta += [torch.full(shape, -1, dtype=torch.int64), torch.zeros(shape), torch.zeros(1, dtype=torch.int64)]
    return stores + meta


def _check_decode_inputs(gm: fx.GraphModule, n_layers: int) -> None:
    """The decode graph takes ids, positions, the stores, then (added by the pass) the metadata."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    expected = 2 + 2 * n_layers + 3 * n_layers
    if len(names) != expected:
        raise RuntimeError(f"kvpass export: decode graph has {len(names)} inputs, expected {expected}: {names}")


def export_programs(model: torch.nn.Module, options: KVPassOptions, *, prompt_len: int | None = None,
                    max_prompt: int | None = None, prefill_block: int | None = None) -> Programs:
    """torch.export the prefill and decode step of ``model`` (batch 1) and rewrite both with kvpass.

    ``prompt_len``: export the prefill for exactly that many tokens (formats without dynamic shapes);
    ``None`` exports a dynamic prompt length (2 .. ``max_prompt``, default the model's
    ``max_position_embeddings``). ``prefill_block``: export the block program instead (static shapes,
    that many tokens per call; a loader loops it over a prompt of any length up to ``max_prompt``).
    The programs keep the ``kvpass::*`` ops; see :func:`decompose`.
    """
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) and any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["sliding_attention"])
    ):
        raise ValueError(f"kvpass export: sliding-window attention layers (sliding_window={cfg.sliding_window}) are "
                         "not supported by the exporters; use a model with full attention (sliding_window: null)")
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096))
    wrapper = _ExplicitCacheForward(model).eval()
    vocab = int(cfg.vocab_size)
    t = prompt_len if prompt_len is not None else 16
    ids = torch.randint(0, vocab, (1, t))
    positions = torch.arange(t)[None]
    with torch.no_grad():
        if prompt_len is None:
            dim = Dim("prompt", min=2, max=max(max_prompt or max_pos, prefill_block or 0))
            dynamic = ({1: dim}, {1: dim})
        else:
            dynamic = None
        ep = torch.export.export(wrapper, (ids, positions), dynamic_shapes=dynamic, strict=False)
        if prefill_block is None:
            prefill_gm, plans, prefill_counters = _rewrite(ep, options)
            n_layers = len(plans)
            prefill_example = (ids, positions)
            prefill = torch.export.export(_FlatCall(prefill_gm), prefill_example, dynamic_shapes=(
                None if dynamic is None else ((dynamic[0], dynamic[1]),)), strict=False)
            logits, *state = prefill.module()(ids, positions)
        else:
            block_gm, plans, prefill_counters = _rewrite_blocks(ep, options)
            n_layers = len(plans)
            k = next(n for n in block_gm.graph.nodes if n.op == "placeholder" and n.name.startswith("kvpass_store_k"))
            _, kv_heads, _, head_dim = k.meta["example_value"].shape
            ids = torch.randint(0, vocab, (1, prefill_block))
            positions = torch.arange(prefill_block)[None]
            valid = torch.ones(1, prefill_block, dtype=torch.bool)
            state = empty_state([p.capacity for p in plans], int(kv_heads), int(head_dim),
                                k.meta["example_value"].dtype)
            prefill_example = (ids, positions, valid, torch.zeros_like(valid), *state)
            prefill = torch.export.export(_BlockCall(block_gm, n_layers), prefill_example, strict=False)
            logits, *state = prefill.module()(*prefill_example)
            t = prefill_block
        kv_shape = (1, state[0].shape[1], state[0].shape[3])
        stores = state[: 2 * n_layers]
        step_ids, step_pos = ids[:, -1:], torch.tensor([[t]])
        ep = torch.export.export(wrapper, (step_ids, step_pos, *stores), strict=False)
        decode_gm, decode_plans, decode_counters = _rewrite(ep, options)
        _check_decode_inputs(decode_gm, n_layers)
        decode_example = (step_ids, step_pos, *state)
        decode = torch.export.export(_FlatCall(decode_gm), decode_example, strict=False)
    for plan, dplan in zip(plans, decode_plans, strict=True):
        if (plan.budget, plan.capacity) != (dplan.budget, dplan.capacity):
            raise RuntimeError(f"kvpass export: layer {plan.layer} keeps {plan.budget}/{plan.capacity} slots after "
                               f"prefill but {dplan.budget}/{dplan.capacity} after a decode step")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    manifest = {
        "kvpass_version": kvpass.__version__,
        "manifest_version": MANIFEST_VERSION,
        "model_type": getattr(cfg, "model_type", None),
        "policy": options.policy.spec(),
        "budgets": [p.budget for p in plans],
        "capacities": [p.capacity for p in plans],
        "n_layers": n_layers,
        "kv_heads": kv_shape[1],
        "head_dim": kv_shape[2],
        "vocab_size": vocab,
        "dtype": str(logits.dtype).removeprefix("torch."),
        "kv_dtype": str(state[0].dtype).removeprefix("torch."),
        "batch": 1,
        "prompt_len": prompt_len,
        "max_prompt": None if prompt_len is not None else (max_prompt or max_pos),
        "prefill_block": prefill_block,
        "eos_token_id": [eos] if isinstance(eos, int) else list(eos or []),
        "counters": {"prefill": prefill_counters, "decode": decode_counters},
    }
    return Programs(prefill, decode, prefill_example, decode_example, manifest)


def decompose(ep: ExportedProgram) -> ExportedProgram:
    """Core ATen only: the ``kvpass::*`` ops replaced by their pure-torch references (for formats that
    cannot hold custom ops). Needs static shapes: the references branch on sizes."""
    table = torch.export.default_decompositions()
    table.update(REFERENCES)
    ep = ep.run_decompositions(table)
    # DynamicCache's first update is cat([tensor([]), new]): torch skips the legacy 1-D empty operand,
    # other compilers reject mixed ranks. Drop it.
    for node in ep.graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default):
        parts = node.args[0]
        kept = [p for p in parts if not _legacy_empty(p)]
        if len(kept) != len(parts) and kept:
            node.args = (kept, *node.args[1:])
    _normalize_indices(ep.graph)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep


def _normalize_indices(graph: fx.Graph) -> None:
    """Make ``select``/``slice`` indices non-negative and in range (static shapes): some importers
    (TVM's) mistranslate torch's negative indices."""
    aten = torch.ops.aten
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor):
            continue
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        args = list(node.args)
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        size = value.shape[dim]
        if not isinstance(size, int):
            continue
        if node.target is aten.select.int:
            if args[2] < 0:
                args[2] += size
        else:
            args += [0, None, None, 1][len(args) :]  # (self, dim, start, end, step)
            start = 0 if args[2] is None else args[2]
            end = size if args[3] is None else args[3]
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            args[2], args[3] = start, max(end, start)
        node.args = tuple(args)


def _legacy_empty(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == 0


def kvpass_ops_in(ep: ExportedProgram) -> list[str]:
    """Names of the ``kvpass::*`` ops a program still calls."""
    return sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "kvpass"})
