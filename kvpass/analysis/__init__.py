"""Find attention sites and the KV-cache writes that feed them in an FX graph.

Works on Dynamo graphs (torch functions / Tensor methods) and on torch.export graphs (ATen ops). The matcher is two
tables of small recognizers, one per pattern family, each returning what it matched or None (and raising
:class:`UnsupportedGraph` for a form of its family kvpass must refuse):

* :data:`CALL_RECOGNIZERS` find attention calls: ``scaled_dot_product_attention`` (:mod:`.sdpa`) and the eager
  ``matmul → (scale) → (soft cap) → (+mask) → softmax → matmul`` (:mod:`.eager`, whose own step tables take the
  modifiers: :mod:`.softcap`, :mod:`.sinks`, :mod:`.window`, :mod:`.folded_heads`, :mod:`.chain`);
* :data:`STORE_RECOGNIZERS` find the cache a call reads: a StaticCache's buffers or a DynamicCache's ``cat``
  (:mod:`.cache_writes`, sliding tails from :mod:`.window`), or a latent cache its keys/values are computed from
  (:mod:`.latent`).

A new model's quirk is a new entry in one of these tables, never a branch inside another recognizer.
"""

from __future__ import annotations

import torch.fx as fx

from kvpass.analysis.cache_writes import dynamic_cache_site, is_cache_write, static_cache_site
from kvpass.analysis.eager import eager_call
from kvpass.analysis.latent import latent_cache_site
from kvpass.analysis.ops import CAT_TARGETS, MATMUL_TARGETS, SOFTMAX_TARGETS
from kvpass.analysis.sdpa import SDPA_TARGETS, sdpa_call
from kvpass.analysis.site import (
    AttentionCall,
    AttentionSite,
    CallRecognizer,
    StoreRecognizer,
    constant_float,
    node_value,
    trace_to_source,
)
from kvpass.errors import UnsupportedGraph

__all__ = [
    "CALL_RECOGNIZERS", "CAT_TARGETS", "MATMUL_TARGETS", "SDPA_TARGETS", "SOFTMAX_TARGETS", "STORE_RECOGNIZERS",
    "AttentionCall", "AttentionSite", "UnsupportedGraph", "constant_float", "find_attention_sites", "node_value",
    "trace_to_source",
]

# Each anchors on its own op (an SDPA call; an eager chain's softmax) and returns the call or None
CALL_RECOGNIZERS: tuple[CallRecognizer, ...] = (sdpa_call, eager_call)
# The first that returns a site wins; the latent cache last, since it refuses the calls it does not match
STORE_RECOGNIZERS: tuple[StoreRecognizer, ...] = (static_cache_site, dynamic_cache_site, latent_cache_site)


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site that reads a DynamicCache ``cat`` or a StaticCache buffer, in graph (= layer) order.

    Raises :class:`UnsupportedGraph` naming what was found when a site cannot be rewritten.
    """
    outputs = set(graph.output_node().all_input_nodes)
    sites: list[AttentionSite] = []
    found_attention = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        call = next((found for recognize in CALL_RECOGNIZERS if (found := recognize(node)) is not None), None)
        if call is None:
            continue
        found_attention += 1
        _refuse_per_head_mask(call)
        sites.append(_site_of(call, outputs, sites))
    for i, site in enumerate(sites):  # graph order is layer order, in prefill and decode graphs alike
        site.layer = i
    _refuse_unread_cache_writes(graph, sites, outputs, found_attention)
    static_slots = [node_value(s.keys).shape[2] for s in sites if s.static_writes]  # (SymInts do not hash)
    if any(slots != static_slots[0] for slots in static_slots):
        raise UnsupportedGraph(
            f"kvpass: the StaticCache's layers hold different numbers of slots {static_slots} (sliding-window "
            "layers?); kvpass supports a StaticCache of full-attention layers only — use the default DynamicCache"
        )
    if not sites:
        ops = sorted({str(getattr(n.target, "__name__", n.target)) for n in graph.nodes if n.op == "call_function"})
        raise UnsupportedGraph(
            f"kvpass: no attention site found (looked for scaled_dot_product_attention and "
            f"matmul-softmax-matmul reading a KV cache; {found_attention} attention call(s) seen). "
            f"The graph calls: {ops[:40]}{' ...' if len(ops) > 40 else ''}. If this is a piece of a model whose "
            "forward Dynamo split at a graph break (TORCH_LOGS=graph_breaks shows where and why), kvpass needs the "
            "forward as one graph: fullgraph=True names the break"
        )
    return sites


def _site_of(call: AttentionCall, outputs: set[fx.Node], earlier: list[AttentionSite]) -> AttentionSite:
    """The site of ``call`` from the first cache recognizer that knows the cache it reads."""
    for recognize in STORE_RECOGNIZERS:
        site = recognize(call, outputs, earlier)
        if site is not None:
            return site
    raise AssertionError(f"no cache recognizer answered for attention '{call.attn.name}' (the last must refuse)")


def _refuse_per_head_mask(call: AttentionCall) -> None:
    """A mask with one row per head carries a position bias (ALiBi), which rebuilding the mask would drop."""
    mask_value = node_value(call.mask) if isinstance(call.mask, fx.Node) else None
    if mask_value is not None and mask_value.dim() == 4 and mask_value.shape[1] > 1:
        raise UnsupportedGraph(
            f"kvpass: the mask of attention '{call.attn.name}' has one row per head (shape "
            f"{tuple(mask_value.shape)}): it carries a position bias such as ALiBi, which kvpass would drop when "
            "it rebuilds the mask from slot positions. kvpass supports rotary-position models, whose keys are "
            "cached after rotation"
        )


def _refuse_unread_cache_writes(graph: fx.Graph, sites: list[AttentionSite], outputs: set[fx.Node],
                                found_attention: int) -> None:
    """Every cache write must feed a rewritten site: a layer whose attention kvpass did not recognize would otherwise
    keep its whole cache, uncompressed, beside the compressed ones."""
    claimed = {n for site in sites for n in (site.keys, site.values, site.key_write, site.value_write,
                                             *(site.static_writes or ()))}
    unread = [n.name for n in graph.nodes if n not in claimed and is_cache_write(n, outputs)]
    if unread:
        raise UnsupportedGraph(
            f"kvpass: the KV cache writes {unread[:6]}{' ...' if len(unread) > 6 else ''} feed no attention kvpass "
            f"recognizes ({len(sites)} site(s) recognized, {found_attention} attention call(s) matched): those layers "
            "attend in a form kvpass does not know, and would keep their whole cache uncompressed. kvpass matches "
            "scaled_dot_product_attention and matmul → (constant scale, soft cap, mask, learned sinks) → softmax → "
            "matmul over a DynamicCache or StaticCache"
        )
