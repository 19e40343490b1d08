"""Find attention sites and the KV-cache writes that feed them in an FX graph.

Works on Dynamo graphs (torch functions / Tensor methods) and on torch.export graphs (ATen ops).
A site is ``scaled_dot_product_attention`` or an eager ``matmul → (scale) → (soft cap) → (+mask) →
softmax → matmul``; its keys and values are followed back through layout ops (GQA ``repeat_kv`` expands,
reshapes, transposes) to the tensor the model writes into its cache:

* ``cat([past, new], dim=-2)`` — DynamicCache; ``past`` is a graph input (decode) or an empty
  constant (first forward);
* ``buffer.index_copy_(2, index, new)`` — StaticCache: ``buffer`` (a graph input, or allocated in the
  graph on the cache's first update) is a fixed-size tensor the cache keeps at one address; kvpass
  uses it as the store itself and writes the compacted store back into it in place.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


class UnsupportedGraph(ValueError):
    """kvpass found no attention site it can rewrite; the message says what it found instead."""


SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
}
SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, aten._softmax.default, aten.softmax.int}
MATMUL_TARGETS = {torch.matmul, operator.matmul, aten.matmul.default, aten.bmm.default}
CAT_TARGETS = {torch.cat, aten.cat.default}
INDEX_COPY_NAMES = ("index_copy_", "index_copy")
# Ops that only re-lay-out a tensor (GQA repeat, head split, transposes, casts): followed backwards.
LAYOUT_METHODS = {"expand", "reshape", "view", "contiguous", "transpose", "to", "float", "clone",
                  "repeat_interleave", "unsqueeze", "type_as"}
LAYOUT_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.repeat_interleave,
                    torch.unsqueeze, aten.view.default, aten.expand.default, aten.reshape.default,
                    aten._unsafe_view.default, aten.clone.default, aten.unsqueeze.default,
                    aten.transpose.int, aten.slice.Tensor, aten.contiguous.default,
                    aten.repeat_interleave.self_int, aten._to_copy.default, aten.alias.default}
# Eager attention: between the score matmul and softmax (scale, mask, cast) and after softmax.
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
DIV_TARGETS = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
PRE_SOFTMAX = MUL_TARGETS | DIV_TARGETS | ADD_TARGETS
TANH_TARGETS = {torch.tanh, aten.tanh.default}
POST_SOFTMAX_METHODS = {"to", "type_as", "float", "type"}
POST_SOFTMAX_FUNCTIONS = {torch.nn.functional.dropout, aten.dropout.default, aten._to_copy.default,
                          aten.clone.default}


@dataclasses.dataclass
class AttentionSite:
    """One attention call and the cache write that feeds it."""

    kind: str                 # "sdpa" or "eager"
    attn: fx.Node             # node whose output is the attention result [B, H_q, T, D]
    q: fx.Node
    keys: fx.Node             # all candidate keys this forward attends to [B, H_kv, N, D]
    values: fx.Node
    key_write: fx.Node        # graph output the cache stores: ``keys`` or, for a sliding layer, its tail
    value_write: fx.Node
    past_keys: fx.Node | None  # graph input holding the previous store, None on a first forward
    past_values: fx.Node | None
    mask: fx.Node | None
    scale: float
    window: int = 0           # sliding-window length of the layer (0: full attention)
    softcap: float = 0.0      # logits soft-capped to ``softcap * tanh(logits / softcap)`` (Gemma-2); 0: none
    layer: int = -1
    # StaticCache: the in-place ``index_copy_`` writes of new keys and values into the buffers ``keys`` and
    # ``values`` (which are then also ``key_write``/``value_write``); None for a DynamicCache
    static_writes: tuple[fx.Node, fx.Node] | None = None

    def describe(self) -> str:
        past = "store input" if self.past_keys is not None else "empty (first forward)"
        if self.static_writes:
            past = f"StaticCache buffer of {node_value(self.keys).shape[2]} slots" + (
                "" if self.past_keys is not None else " (allocated by this forward)")
        window = f", sliding window {self.window}" if self.window else ""
        return f"layer {self.layer}: {self.kind} attention at '{self.attn.name}', cache={past}{window}"


def node_value(node: fx.Node):
    """The fake tensor/value recorded on a node (Dynamo: example_value, export: val)."""
    return node.meta.get("example_value", node.meta.get("val"))


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in LAYOUT_METHODS
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


def trace_to_source(node: fx.Node) -> fx.Node:
    """Follow layout ops back to the node that produced the data."""
    while isinstance(node, fx.Node) and _is_layout(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_index_copy(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return any(n in str(name) for n in INDEX_COPY_NAMES)


def _static_write(buffer: fx.Node) -> fx.Node | None:
    """The ``buffer.index_copy_(2, index, new)`` that writes a StaticCache layer, or None."""
    for user in buffer.users:
        if user.op == "call_method" and user.target == "index_copy_" and user.args[0] is buffer and (
            user.args[1] in (2, -2) and len(user.args) == 4
        ):
            return user
    return None


def _cache_parts(source: fx.Node) -> tuple[fx.Node | None, bool]:
    """For a key/value source node: (past-store graph input or None, whether it is a cache cat)."""
    if source.op == "call_function" and source.target in CAT_TARGETS:
        parts = source.args[0]
        dim = source.kwargs.get("dim", source.args[1] if len(source.args) > 1 else 0)
        if isinstance(parts, list | tuple) and len(parts) == 2 and dim in (-2, 2):
            past = parts[0]
            if isinstance(past, fx.Node) and past.op == "placeholder":
                return past, True
            value = node_value(past) if isinstance(past, fx.Node) else None
            if value is not None and value.numel() == 0:
                return None, True
    return None, False


def _cache_write(source: fx.Node, outputs: set[fx.Node]) -> tuple[fx.Node | None, int]:
    """The graph output through which ``source`` reaches the cache, and the layer's sliding window.

    A DynamicCache layer stores ``source`` itself; a sliding-window layer stores
    ``source[:, :, -(window - 1):]`` and attends to all of ``source``.
    """
    if source in outputs:
        return source, 0
    for user in source.users:
        if user in outputs and user.op == "call_function" and user.target is operator.getitem:
            index = user.args[1]
            if isinstance(index, tuple) and len(index) >= 3 and index[:2] == (slice(None),) * 2:
                tail = index[2]
                # with dynamic=True the window is a SymInt input of the graph: its traced value is the model's
                start = constant_float(tail.start) if isinstance(tail, slice) and tail.stop is None else None
                if start is not None and start < 0:
                    return user, 1 - int(start)
    return None, 0


def constant_float(x) -> float | None:
    """``x`` as a Python float: a number, or a node whose traced value is a scalar.

    With ``dynamic=True`` Dynamo lifts float module attributes (HF's ``self.scaling``) to graph inputs
    read by ``.item()``; their value is constant for a given model, so the traced value is used.
    """
    if isinstance(x, int | float) and not isinstance(x, bool):
        return float(x)
    value = node_value(x) if isinstance(x, fx.Node) else x
    if isinstance(value, torch.SymFloat | torch.SymInt) and value.node.hint is not None:
        return float(value.node.hint)
    return None


def _scale_of(node: fx.Node, default: float) -> float:
    """Constant multiplier/divisor applied to the attention logits between matmul and softmax."""
    scale = default
    while node.op == "call_function" and node.target in PRE_SOFTMAX:
        a, b = node.args[0], node.args[1]
        const = constant_float(b) if constant_float(b) is not None else constant_float(a)
        if const is not None and node.target in MUL_TARGETS:
            scale = float(const)
        elif const is not None and node.target in DIV_TARGETS:
            scale = 1.0 / float(const)
        node = a if isinstance(a, fx.Node) and a.op != "placeholder" else b
    return scale


def _softcap_of(node: fx.Node) -> tuple[float, fx.Node] | None:
    """``(c, x)`` when ``node`` is ``tanh(x / c) * c`` (Gemma-2's logit soft cap, also as ``x * (1/c)``)."""
    if not (node.op == "call_function" and node.target in MUL_TARGETS):
        return None
    a, b = node.args[0], node.args[1]
    tanh, cap = (a, constant_float(b)) if isinstance(a, fx.Node) else (b, constant_float(a))
    if cap is None or not (isinstance(tanh, fx.Node) and tanh.op == "call_function" and tanh.target in TANH_TARGETS):
        return None
    inner = tanh.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in MUL_TARGETS | DIV_TARGETS):
        return None
    divisor = constant_float(inner.args[1])
    if divisor is None or divisor == 0:
        return None
    inverse = divisor if inner.target in DIV_TARGETS else 1.0 / divisor
    if not math.isclose(inverse, cap, rel_tol=1e-6):
        return None
    return cap, inner.args[0]


def _eager_site(softmax: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node | None, float, float] | None:
    """Match matmul → scale → (soft cap) → (+mask) → softmax → (cast/dropout) → matmul; return its parts."""
    node, added, softcap = softmax.args[0], [], 0.0
    logits_chain = node
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        capped = _softcap_of(node) if not softcap else None
        if capped is not None:
            softcap, node = capped
            logits_chain = node  # the scale sits below the cap
            continue
        if _is_layout(node) and node.target is not operator.getitem:  # (a view of the score matmul: Falcon)
            node = node.args[0]
            continue
        if node.target not in PRE_SOFTMAX:
            break
        if node.target in ADD_TARGETS and isinstance(node.args[1], fx.Node):
            added.append(node.args[1])
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMUL_TARGETS):
        return None
    if len(added) > 1:  # kvpass rebuilds the mask from slot positions: any other additive term would be lost
        raise UnsupportedGraph(
            f"kvpass: attention logits at '{softmax.name}' get {len(added)} additive terms before softmax "
            f"({[n.name for n in reversed(added)]}): a position bias such as ALiBi besides the mask. kvpass supports "
            "rotary-position models (it keeps each token's rotated key), not additive position biases"
        )
    mask = added[0] if added else None
    score_mm = node
    q, k_t = score_mm.args[0], score_mm.args[1]
    out = softmax
    while len(out.users) == 1:
        (user,) = out.users
        if user.op == "call_method" and user.target in POST_SOFTMAX_METHODS or (
            user.op == "call_function" and user.target in POST_SOFTMAX_FUNCTIONS
        ):
            out = user
            continue
        break
    users = [u for u in out.users if u.op == "call_function" and u.target in MATMUL_TARGETS and u.args[0] is out]
    if len(users) != 1:
        return None
    pv = users[0]
    head_dim = node_value(q).shape[-1] if node_value(q) is not None else None
    scale = _scale_of(logits_chain, head_dim**-0.5 if head_dim else 1.0)
    return pv, q, k_t, pv.args[1], mask, scale, softcap


def _static_site(kind, attn, q, k_buf, v_buf, k_write, v_write, mask, scale, softcap) -> AttentionSite:
    """A site reading StaticCache buffers: the buffers are the store (graph inputs, or allocated by a first forward)."""
    shapes = {tuple(node_value(n).shape) for n in (k_buf, v_buf)} if node_value(k_buf) is not None else set()
    if len(shapes) > 1:
        raise UnsupportedGraph(f"kvpass: StaticCache keys and values of '{attn.name}' differ in shape: {shapes}")
    past_k, past_v = (n if n.op == "placeholder" else None for n in (k_buf, v_buf))
    return AttentionSite(kind, attn, q, k_buf, v_buf, k_buf, v_buf, past_k, past_v, mask, scale,
                         softcap=softcap, static_writes=(k_write, v_write))


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site that reads a DynamicCache ``cat`` or a StaticCache buffer, in graph (= layer) order.

    Raises :class:`UnsupportedGraph` naming what was found when a site cannot be rewritten.
    """
    output = graph.output_node()
    outputs = set(output.all_input_nodes)
    sites: list[AttentionSite] = []
    found_attention = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            q, k, v = node.args[:3]
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            head_dim = node_value(q).shape[-1]
            scale = node.kwargs.get("scale")
            if scale is not None and constant_float(scale) is None:
                raise UnsupportedGraph(f"kvpass: attention '{node.name}' has a scale that is not a constant: {scale}")
            parts = ("sdpa", node, q, k, v, mask, head_dim**-0.5 if scale is None else constant_float(scale))
            softcap = 0.0
        elif node.target in SOFTMAX_TARGETS:
            matched = _eager_site(node)
            if matched is None:
                continue
            pv, q, k_t, v, mask, scale, softcap = matched
            parts = ("eager", pv, q, k_t, v, mask, scale)
        else:
            continue
        found_attention += 1
        kind, attn, q, k, v, mask, scale = parts
        mask_value = node_value(mask) if isinstance(mask, fx.Node) else None
        if mask_value is not None and mask_value.dim() == 4 and mask_value.shape[1] > 1:
            raise UnsupportedGraph(
                f"kvpass: the mask of attention '{attn.name}' has one row per head (shape "
                f"{tuple(mask_value.shape)}): it carries a position bias such as ALiBi, which kvpass would drop when "
                "it rebuilds the mask from slot positions. kvpass supports rotary-position models, whose keys are "
                "cached after rotation"
            )
        k_src, v_src = trace_to_source(k), trace_to_source(v)
        static_k, static_v = _static_write(k_src), _static_write(v_src)
        if static_k is not None and static_v is not None:
            sites.append(_static_site(kind, attn, q, k_src, v_src, static_k, static_v, mask, scale, softcap))
            continue
        for src in (k_src, v_src):
            if _is_index_copy(src) or any(_is_index_copy(u) for u in src.users):
                raise UnsupportedGraph(
                    f"kvpass: attention at '{attn.name}' reads keys/values written by '{src.name}' with an "
                    "index_copy that is not a StaticCache layer's in-place write of new tokens along the sequence "
                    "dimension (a functional index_copy, as in an export graph of a StaticCache model, or a "
                    "sliding-window StaticCache layer); use the default DynamicCache"
                )
        past_k, k_is_cache = _cache_parts(k_src)
        past_v, v_is_cache = _cache_parts(v_src)
        k_write, window = _cache_write(k_src, outputs)
        v_write, _ = _cache_write(v_src, outputs)
        if k_write is None or v_write is None:
            raise UnsupportedGraph(
                f"kvpass: attention at '{attn.name}' reads keys from '{k_src.name}' and values from "
                f"'{v_src.name}', which are not written to a KV cache kvpass knows (a DynamicCache cat or a "
                "StaticCache index_copy_): forward called with use_cache=False, or a sliding-window StaticCache "
                "layer? kvpass compresses KV caches, so there is nothing it can compress here"
            )
        if not (k_is_cache or k_src.op != "placeholder"):
            raise UnsupportedGraph(f"kvpass: attention at '{attn.name}' reads keys straight from an input")
        site = AttentionSite(kind, attn, q, k_src, v_src, k_write, v_write, past_k, past_v, mask, scale, window,
                             softcap)
        sites.append(site)
    for i, site in enumerate(sites):  # graph order is layer order, in prefill and decode graphs alike
        site.layer = i
    static_slots = {node_value(s.keys).shape[2] for s in sites if s.static_writes}
    if len(static_slots) > 1:
        raise UnsupportedGraph(
            f"kvpass: the StaticCache's layers hold different numbers of slots {sorted(static_slots)} (sliding-window "
            "layers?); kvpass supports a StaticCache of full-attention layers only — use the default DynamicCache"
        )
    if not sites:
        ops = sorted({str(getattr(n.target, "__name__", n.target)) for n in graph.nodes if n.op == "call_function"})
        raise UnsupportedGraph(
            f"kvpass: no attention site found (looked for scaled_dot_product_attention and "
            f"matmul-softmax-matmul reading a KV cache; {found_attention} attention call(s) seen). "
            f"The graph calls: {ops[:40]}{' ...' if len(ops) > 40 else ''}"
        )
    return sites
