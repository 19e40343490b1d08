"""Split a diffusion LM's forward into per-layer graphs whose attention runs under Elastic-Cache."""

from __future__ import annotations

import collections
import dataclasses
import operator
import re

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

import kvpass.ops.dllm  # noqa: F401  (registers kvpass::elastic_attend)
from kvpass.analysis import SDPA_TARGETS, UnsupportedGraph
from kvpass.ops.dllm import DRIFT_STATISTICS

__all__ = ["DRIFT_STATISTICS", "STATE_INPUTS", "STATE_OUTPUTS", "ElasticProgram", "RefreshDLLMKV"]

# the Elastic-Cache state every rewritten layer graph takes after its own inputs, in this order
STATE_INPUTS = ("rows", "k_cache", "v_cache", "q_cache", "x_cache", "track", "track_weight", "window",
                "window_weight", "excluded")
# and returns after its hidden output
STATE_OUTPUTS = ("k_cache", "v_cache", "q_cache", "x_cache", "sim", "track_score")

_LAYER_PATH = re.compile(r"^(.*\.)?\d+$")


@dataclasses.dataclass
class ElasticProgram:
    """What the pass produces; :mod:`kvpass.apps.elastic` runs it.

    ``prologue(*inputs)`` returns the values the layers share (embeddings, RoPE tables, ...);
    ``layers[i](*layer_args, *STATE_INPUTS)`` returns ``(hidden, *STATE_OUTPUTS)``; ``epilogue``
    maps the last hidden to logits. Argument sources: ``("input", j)`` the forward's j-th input,
    ``("prologue", j)`` the prologue's j-th output, ``("hidden",)`` the running hidden stream,
    ``("const", tensor)`` a weight the split lifted out of the part that uses it.
    """

    prologue: fx.GraphModule
    layers: list[fx.GraphModule]
    epilogue: fx.GraphModule
    prologue_args: list[tuple]
    layer_args: list[list[tuple]]
    epilogue_args: list[tuple]
    hidden_from_prologue: int          # which prologue output is the first layer's hidden input
    n_heads: int
    head_dim: int


class RefreshDLLMKV:
    """Rewrite a bidirectional (diffusion) LM forward for Elastic-Cache KV refresh.

    Elastic-Cache (Nguyen-Tri et al., "Attention Is All You Need for KV Cache in Diffusion LLMs",
    2025) keeps every layer's keys/values (and queries) for all canvas positions, runs only a few
    rows per denoising step, and recomputes all positions from the layer where a tracked token's
    attention drifted. That needs the forward cut at layer boundaries, so the rows that flow through
    a layer can be either the step's few rows or the whole canvas.

    Requires: an exported forward graph (``torch.export(...).module()``) taking ``(input_ids,
    position_ids)`` with a dynamic sequence dimension, with ``nn_module_stack`` metadata; one
    ``scaled_dot_product_attention`` per layer, bidirectional (no mask, not causal, no dropout,
    default scale), inside a module whose path ends in an index (``layers.3``); each layer's
    only output to later layers is its hidden stream.

    Ensures: the graph is split into a prologue (everything before the first layer), one graph per
    layer and an epilogue (everything after the last layer); in every layer graph the attention
    site is replaced by ``kvpass::elastic_attend`` over per-layer caches that the graph takes as
    extra trailing inputs (``STATE_INPUTS``) and returns, updated, after the hidden output
    (``STATE_OUTPUTS``), together with the drift statistics (``sim [2]``, indexed by
    ``DRIFT_STATISTICS``: the reference's cosine across heads, kvpass's earlier cosine across keys)
    and the tracking scores; the layer's
    hidden input rows are written into ``x_cache`` (the cached layer input of every position).
    All other computation is untouched, so running a layer graph on all canvas rows with fresh
    caches equals the original layer. ``counters``: ``attention_sites``, ``layer_graphs``.
    """

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()

    def uuid(self) -> str:
        return f"{type(self).__name__}:v2:" + ",".join(STATE_INPUTS) + "->" + ",".join(STATE_OUTPUTS)

    # ------------------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule) -> ElasticProgram:
        graph = gm.graph
        for node in list(graph.nodes):  # export's input-shape guard module: shapes change by design here
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                graph.erase_node(node)
        sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        if not sdpas:
            ops = sorted({str(n.target) for n in graph.nodes if n.op == "call_function"})[:30]
            raise UnsupportedGraph(f"RefreshDLLMKV: no scaled_dot_product_attention in the graph; it calls {ops}")
        paths = [self._check_site(n) for n in sdpas]
        if len(set(paths)) != len(paths):
            raise UnsupportedGraph(f"RefreshDLLMKV: expected one attention per layer, found layer paths {paths}")
        q_val = sdpas[0].args[0].meta.get("val")
        if q_val is None:
            raise UnsupportedGraph("RefreshDLLMKV: the graph has no shape metadata (meta['val']); export it first")
        n_heads, head_dim = int(q_val.shape[1]), int(q_val.shape[-1])

        order = {n: i for i, n in enumerate(graph.nodes)}
        first_layer_node = None
        part: dict[fx.Node, int] = {}
        for node in graph.nodes:
            layer = self._layer_of(node, paths)
            if layer is not None:
                part[node] = layer + 1
                if first_layer_node is None:
                    first_layer_node = node
        n_layers = len(paths)

        def callback(node: fx.Node) -> int:
            if node in part:
                return part[node]
            return 0 if order[node] < order[first_layer_node] else n_layers + 1

        split = split_module(gm, gm, callback, keep_original_order=True)
        calls = {int(n.target.split("_")[1]): n for n in split.graph.nodes if n.op == "call_module"}
        if sorted(calls) != list(range(n_layers + 2)):
            raise UnsupportedGraph(f"RefreshDLLMKV: expected prologue, {n_layers} layers and epilogue, got "
                                   f"partitions {sorted(calls)}")
        placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]

        def source(arg: fx.Node) -> tuple:
            if arg.op == "placeholder":
                return ("input", placeholders.index(arg))
            if arg.op == "get_attr":
                return ("const", operator.attrgetter(arg.target)(split))
            if arg.op == "call_function" and arg.target is operator.getitem and arg.args[0] is calls[0]:
                return ("prologue", arg.args[1])
            if arg is calls[0]:
                return ("prologue", None)
            for i in range(1, n_layers + 1):
                if arg is calls[i]:
                    return ("layer", i - 1)
            raise UnsupportedGraph(f"RefreshDLLMKV: cannot place the value {arg.name} ({arg.op} {arg.target})")

        pro_args = [source(a) for a in calls[0].args]
        specs = [[source(a) for a in calls[i + 1].args] for i in range(n_layers)]
        epi_args = [source(a) for a in calls[n_layers + 1].args]
        # the hidden stream: layer i > 0 gets it from layer i-1, at the same argument slot in every layer
        if n_layers < 2:
            raise UnsupportedGraph(f"RefreshDLLMKV: needs at least 2 layers to find the hidden stream, got {n_layers}")
        slots = [j for j, s in enumerate(specs[1]) if s == ("layer", 0)]
        if len(slots) != 1:
            raise UnsupportedGraph(f"RefreshDLLMKV: layer 1 takes {len(slots)} values from layer 0, expected 1")
        hid = slots[0]
        for i, spec in enumerate(specs):
            if any(s[0] == "layer" for j, s in enumerate(spec) if j != hid) or (i and spec[hid] != ("layer", i - 1)):
                raise UnsupportedGraph(f"RefreshDLLMKV: layer {i} reads layer outputs other than its hidden input")
        if specs[0][hid][0] != "prologue" or epi_args.count(("layer", n_layers - 1)) != 1:
            raise UnsupportedGraph("RefreshDLLMKV: the hidden stream must start in the prologue and end in the "
                                   "epilogue")
        hidden_from_prologue = specs[0][hid][1]
        layer_args = [[("hidden",) if j == hid else s for j, s in enumerate(spec)] for spec in specs]
        epi = [("hidden",) if s == ("layer", n_layers - 1) else s for s in epi_args]

        layers = []
        for i in range(n_layers):
            sub = getattr(split, f"submod_{i + 1}")
            self._rewrite_layer(sub, hid)
            layers.append(sub)
        return ElasticProgram(split.submod_0, layers, getattr(split, f"submod_{n_layers + 1}"), pro_args,
                              layer_args, epi, hidden_from_prologue, n_heads, head_dim)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_site(node: fx.Node) -> str:
        args = list(node.args) + [None] * (7 - len(node.args))
        mask = node.kwargs.get("attn_mask", args[3])
        dropout = node.kwargs.get("dropout_p", args[4] or 0.0)
        causal = node.kwargs.get("is_causal", args[5] or False)
        scale = node.kwargs.get("scale", args[6])
        if mask is not None or causal or dropout:
            raise UnsupportedGraph(f"RefreshDLLMKV: attention '{node.name}' is not bidirectional and unmasked "
                                   f"(attn_mask={mask}, is_causal={causal}, dropout_p={dropout}); "
                                   "Elastic-Cache applies to diffusion LMs with full attention")
        head_dim = node.args[0].meta["val"].shape[-1] if "val" in node.args[0].meta else None
        if scale is not None and head_dim is not None and abs(float(scale) - head_dim**-0.5) > 1e-9:
            raise UnsupportedGraph(f"RefreshDLLMKV: attention '{node.name}' has scale {scale}, "
                                   f"expected the default {head_dim ** -0.5}")
        stack = node.meta.get("nn_module_stack") or {}
        layer_paths = [path for path, _ in stack.values() if _LAYER_PATH.match(path)]
        if not layer_paths:
            raise UnsupportedGraph(f"RefreshDLLMKV: attention '{node.name}' is not inside an indexed layer module "
                                   f"(module stack {[p for p, _ in stack.values()]})")
        return layer_paths[-1]

    @staticmethod
    def _layer_of(node: fx.Node, paths: list[str]) -> int | None:
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            for i, p in enumerate(paths):
                if path == p or path.startswith(p + "."):
                    return i
        return None

    def _rewrite_layer(self, sub: fx.GraphModule, hidden_slot: int) -> None:
        graph = sub.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        hidden = inputs[hidden_slot]
        sdpa = [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        if len(sdpa) != 1:
            raise UnsupportedGraph(f"RefreshDLLMKV: a layer graph holds {len(sdpa)} attention calls, expected 1")
        (site,) = sdpa
        state = {}
        last = inputs[-1]
        for name in STATE_INPUTS:
            with graph.inserting_after(last):
                last = state[name] = graph.placeholder(f"elastic_{name}")
        q, k, v = site.args[:3]
        with graph.inserting_before(site):
            call = graph.call_function(torch.ops.kvpass.elastic_attend.default,
                                       (q, k, v, state["rows"], state["k_cache"], state["v_cache"], state["q_cache"],
                                        state["track"], state["track_weight"], state["window"],
                                        state["window_weight"], state["excluded"]))
            outs = [graph.call_function(operator.getitem, (call, j)) for j in range(6)]
            x_cache = graph.call_function(torch.ops.aten.index_copy.default,
                                          (state["x_cache"], 1, state["rows"], hidden))
        site.replace_all_uses_with(outs[0])
        graph.erase_node(site)
        output = graph.output_node()
        (result,) = output.args
        if isinstance(result, (tuple, list)):
            if len(result) != 1:
                raise UnsupportedGraph(f"RefreshDLLMKV: a layer graph returns {len(result)} values, "
                                       "expected its hidden stream only")
            result = result[0]
        output.args = ((result, outs[1], outs[2], outs[3], x_cache, outs[4], outs[5]),)
        graph.lint()
        sub.recompile()
        self.counters["attention_sites"] += 1
        self.counters["layer_graphs"] += 1
