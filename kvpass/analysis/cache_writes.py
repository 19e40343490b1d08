"""The KV-cache write an attention call reads, followed back from its keys and values through layout ops (GQA
``repeat_kv`` expands, reshapes, transposes):

* ``cat([past, new], dim=-2)`` — DynamicCache; ``past`` is a graph input (decode) or an empty constant (first
  forward), and the cat (or, for a sliding-window layer, its tail) is a graph output the cache stores;
* ``buffer.index_copy_(2, index, new)`` — StaticCache: ``buffer`` (a graph input, or allocated in the graph on the
  cache's first update) is a fixed-size tensor the cache keeps at one address; kvpass uses it as the store itself
  and writes the compacted store back into it in place.

A latent cache, whose tensors the keys and values are computed from, is :mod:`kvpass.analysis.latent`'s.
"""

from __future__ import annotations

import torch.fx as fx

from kvpass.analysis.ops import CAT_TARGETS
from kvpass.analysis.site import AttentionCall, AttentionSite, node_value, trace_to_source
from kvpass.analysis.window import sliding_tail
from kvpass.errors import UnsupportedGraph

INDEX_COPY_NAMES = ("index_copy_", "index_copy")


def is_index_copy(node: fx.Node) -> bool:
    """Any ``index_copy`` (in place or functional, a method or an ATen op)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return any(n in str(name) for n in INDEX_COPY_NAMES)


def static_write(buffer: fx.Node) -> fx.Node | None:
    """The ``buffer.index_copy_(2, index, new)`` that writes a StaticCache layer, or None."""
    for user in buffer.users:
        if user.op == "call_method" and user.target == "index_copy_" and user.args[0] is buffer and (
            user.args[1] in (2, -2) and len(user.args) == 4
        ):
            return user
    return None


def cat_cache_parts(source: fx.Node) -> tuple[fx.Node | None, bool]:
    """For a key/value source node: (past-store graph input or None, whether it is a DynamicCache ``cat``)."""
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


def stored_output(source: fx.Node, outputs: set[fx.Node]) -> tuple[fx.Node | None, int]:
    """The graph output through which ``source`` reaches the cache, and the layer's sliding window (0: none).

    A DynamicCache layer stores ``source`` itself; a sliding-window layer stores ``source[:, :, -(window - 1):]``
    and attends to all of ``source``.
    """
    if source in outputs:
        return source, 0
    return sliding_tail(source, outputs) or (None, 0)


def is_cache_write(node: fx.Node, outputs: set[fx.Node]) -> bool:
    """A DynamicCache layer's ``cat(past, new)`` stored as a graph output (whole or its tail), or a StaticCache
    layer's in-place ``index_copy_`` of new tokens."""
    if node.op == "call_function" and cat_cache_parts(node)[1]:
        return node in outputs or any(u in outputs for u in node.users)
    return node.op == "call_method" and node.target == "index_copy_" and len(node.args) == 4 and node.args[1] in (2, -2)


def static_cache_site(call: AttentionCall, outputs: set[fx.Node],
                      earlier: list[AttentionSite]) -> AttentionSite | None:
    """The site of a call reading a StaticCache layer's buffers, both written in place by ``index_copy_``: the buffers
    are the store (graph inputs, or allocated by a first forward). Refuses any other ``index_copy`` write."""
    k_src, v_src = trace_to_source(call.k), trace_to_source(call.v)
    k_write, v_write = static_write(k_src), static_write(v_src)
    if k_write is not None and v_write is not None:
        if call.sinks is not None:
            raise UnsupportedGraph(f"kvpass: attention at '{call.attn.name}' has learned attention sinks and writes a "
                                   "StaticCache; kvpass supports sinks with the default DynamicCache")
        # (a list: with dynamic=True the shapes hold SymInts, which do not hash)
        shapes = [tuple(node_value(n).shape) for n in (k_src, v_src)] if node_value(k_src) is not None else []
        if shapes and shapes[0] != shapes[1]:
            raise UnsupportedGraph(f"kvpass: StaticCache keys and values of '{call.attn.name}' differ in shape: "
                                   f"{shapes}")
        past_k, past_v = (n if n.op == "placeholder" else None for n in (k_src, v_src))
        # a window only the mask applies (GPT-Neo's local layers) is kvpass's to apply over the buffers, as over a
        # DynamicCache that keeps every token
        return AttentionSite(call.kind, call.attn, call.q, k_src, v_src, k_src, v_src, past_k, past_v, call.mask,
                             call.scale, call.window, softcap=call.softcap, static_writes=(k_write, v_write),
                             masked_window=bool(call.window))
    for src in (k_src, v_src):
        if is_index_copy(src) or any(is_index_copy(u) for u in src.users):
            raise UnsupportedGraph(
                f"kvpass: attention at '{call.attn.name}' reads keys/values written by '{src.name}' with an "
                "index_copy that is not a StaticCache layer's in-place write of new tokens along the sequence "
                "dimension (a functional index_copy, as in an export graph of a StaticCache model, or a "
                "sliding-window StaticCache layer); use the default DynamicCache"
            )
    return None


def dynamic_cache_site(call: AttentionCall, outputs: set[fx.Node],
                       earlier: list[AttentionSite]) -> AttentionSite | None:
    """The site of a call reading a DynamicCache layer's ``cat`` writes (stored whole, or a sliding layer's tail);
    None when its keys and values are no cache's graph outputs. Refuses a cat the graph does not store (a forward
    called with ``use_cache=False``), keys read straight from an input, and a window both masked and kept."""
    k_src, v_src = trace_to_source(call.k), trace_to_source(call.v)
    past_k, k_is_cache = cat_cache_parts(k_src)
    past_v, v_is_cache = cat_cache_parts(v_src)
    k_write, window = stored_output(k_src, outputs)
    v_write, _ = stored_output(v_src, outputs)
    if k_write is None or v_write is None:
        if k_is_cache or v_is_cache:
            raise UnsupportedGraph(
                f"kvpass: attention at '{call.attn.name}' reads keys from '{k_src.name}' and values from "
                f"'{v_src.name}', which are not written to a KV cache kvpass knows (a DynamicCache cat or a "
                "StaticCache index_copy_): forward called with use_cache=False, or a sliding-window StaticCache "
                "layer? kvpass compresses KV caches, so there is nothing it can compress here"
            )
        return None
    if not (k_is_cache or k_src.op != "placeholder"):
        raise UnsupportedGraph(f"kvpass: attention at '{call.attn.name}' reads keys straight from an input")
    if call.window and window:
        raise UnsupportedGraph(f"kvpass: attention at '{call.attn.name}' masks a {call.window}-token window and its "
                               f"cache keeps a {window}-token one; kvpass expects one of the two")
    return AttentionSite(call.kind, call.attn, call.q, k_src, v_src, k_write, v_write, past_k, past_v, call.mask,
                         call.scale, window or call.window, call.softcap, sinks=call.sinks,
                         masked_window=bool(call.window))
