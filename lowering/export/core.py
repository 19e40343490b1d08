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
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
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


def _rewrite(ep: ExportedProgram, options: KVPassOptions) -> tuple[fx.GraphModule, list[LayerPlan], dict[str, int]]:
    """Run kvpass's analysis and rewrite on an exported forward; returns a plain (flat-args) GraphModule."""
    module = ep.module()
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))  # plain codegen: flat positional inputs and outputs
    for node in list(graph.nodes):  # the unlifted module's input guard: re-export checks shapes itself
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            graph.erase_node(node)
    sites = find_attention_sites(graph)
    rewrite = InsertKVEviction(options)
    plans = rewrite(graph, sites)
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph), plans, dict(rewrite.counters)


class _FlatCall(torch.nn.Module):
    """Re-exportable wrapper: the rewritten graph's outputs regrouped as ``(logits, *state)``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        outs = self.gm(*args)
        # gm returns (logits, k_0, v_0, ..., state of layer 0, 1, ...): already in the documented order
        return tuple(outs)


def _check_decode_inputs(gm: fx.GraphModule, n_layers: int) -> None:
    """The decode graph takes ids, positions, the stores, then (added by the pass) the metadata."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    expected = 2 + 2 * n_layers + 3 * n_layers
    if len(names) != expected:
        raise RuntimeError(f"kvpass export: decode graph has {len(names)} inputs, expected {expected}: {names}")


def export_programs(model: torch.nn.Module, options: KVPassOptions, *, prompt_len: int | None = None,
                    max_prompt: int | None = None) -> Programs:
    """torch.export the prefill and decode step of ``model`` (batch 1) and rewrite both with kvpass.

    ``prompt_len``: export the prefill for exactly that many tokens (formats without dynamic shapes);
    ``None`` exports a dynamic prompt length (2 .. ``max_prompt``, default the model's
    ``max_position_embeddings``). The programs keep the ``kvpass::*`` ops; see :func:`decompose`.
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
            dim = Dim("prompt", min=2, max=max_prompt or max_pos)
            dynamic = ({1: dim}, {1: dim})
        else:
            dynamic = None
        ep = torch.export.export(wrapper, (ids, positions), dynamic_shapes=dynamic, strict=False)
        prefill_gm, plans, prefill_counters = _rewrite(ep, options)
        n_layers = len(plans)
        prefill = torch.export.export(_FlatCall(prefill_gm), (ids, positions), dynamic_shapes=(
            None if dynamic is None else ((dynamic[0], dynamic[1]),)), strict=False)
        logits, *state = prefill.module()(ids, positions)
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
        "batch": 1,
        "prompt_len": prompt_len,
        "max_prompt": None if prompt_len is not None else (max_prompt or max_pos),
        "eos_token_id": [eos] if isinstance(eos, int) else list(eos or []),
        "counters": {"prefill": prefill_counters, "decode": decode_counters},
    }
    return Programs(prefill, decode, (ids, positions), decode_example, manifest)


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
