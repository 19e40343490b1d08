"""Latent caches (MLA: DeepSeek-V2/V3, MiniCPM3): the cache holds a compressed latent and the rotary key, and the
attention reads keys and values projected from them token by token.

The cached tensors are the store: kvpass scores, keeps and evicts their slots, and the model's own projection turns
the kept slots into keys and values (it runs over the candidates of each forward, as HF's does).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from kvpass.analysis.cache_writes import cat_cache_parts, static_write
from kvpass.analysis.ops import (
    ADD_TARGETS,
    CAT_TARGETS,
    DIV_TARGETS,
    LAYOUT_FUNCTIONS,
    LAYOUT_METHODS,
    MUL_TARGETS,
    SUB_TARGETS,
    aten,
)
from kvpass.analysis.site import (
    AttentionCall,
    AttentionSite,
    is_layout,
    mutates,
    node_value,
    reads_only_size,
    same_size,
)
from kvpass.errors import UnsupportedGraph

# Ops that transform each token of a cached tensor on its own: a latent cache's keys/values are computed through
# these (MLA's up-projection, head split, rotary-key broadcast)
PER_TOKEN_METHODS = LAYOUT_METHODS | {"new_empty", "new_zeros", "copy_", "split", "chunk", "pow", "mean", "rsqrt",
                                      "mul", "add", "sub", "neg", "type", "permute"}
PER_TOKEN_FUNCTIONS = LAYOUT_FUNCTIONS | MUL_TARGETS | DIV_TARGETS | ADD_TARGETS | SUB_TARGETS | {
    torch.nn.functional.linear, torch.split, torch.chunk, torch.rsqrt, torch.sqrt, torch.pow, torch.neg,
    operator.neg, torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.nn.functional.silu,
    # the same in torch.export graphs
    aten.linear.default, aten.split_with_sizes.default, aten.split.Tensor, aten.new_empty.default,
    aten.new_zeros.default, aten.copy_.default, aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default,
    aten.to.dtype, aten.neg.default, aten.expand.default}


def per_token(node: fx.Node, n) -> bool:
    """Whether ``node`` transforms each of the ``n`` tokens of a cached tensor on its own (a projection, a norm,
    a split of the feature axis, a layout change): then slot ``j`` of its result still belongs to token ``j``."""
    values = node_value(node)
    for value in values if isinstance(values, list | tuple) else [values]:
        if isinstance(value, torch.Tensor) and not any(same_size(s, n) for s in value.shape):
            return False  # the sequence axis was reduced or merged away
    if node.op == "call_method":
        return node.target in PER_TOKEN_METHODS
    if node.op != "call_function":
        return False
    if node.target in CAT_TARGETS:  # joining feature halves, never along the sequence
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = node_value(node).dim()
        return dim in (-1, rank - 1)
    return node.target in PER_TOKEN_FUNCTIONS


def writes_into(node: fx.Node):
    """In-place writes into ``node`` or a view of it (HF's MLA fills a ``new_empty`` key tensor with ``copy_``)."""
    for user in node.users:
        if user.args and user.args[0] is node and user.op in ("call_method", "call_function") and mutates(user):
            yield user
        elif is_layout(user) and user.args and user.args[0] is node:
            yield from writes_into(user)


def latent_stores(attn_inputs: list[fx.Node], n, outputs: set[fx.Node]) -> tuple[list[fx.Node], list[str], bool]:
    """The DynamicCache ``cat`` writes an attention's keys/values are computed from token by token, the names of the
    nodes on the way that do not act token by token, and whether a StaticCache buffer was reached."""
    stores, mixing, seen, static = [], [], set(), False
    frontier = list(attn_inputs)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if cat_cache_parts(node)[1] and node in outputs:
            stores.append(node)
            continue
        if static_write(node) is not None:  # a StaticCache buffer (an input, or allocated by a first forward)
            static = True
            continue
        if node.op in ("placeholder", "get_attr") or reads_only_size(node):  # (a size is no data)
            continue
        if not per_token(node, n):
            mixing.append(node.name)
            continue
        frontier.extend(node.all_input_nodes)
        frontier.extend(writes_into(node))
    order = {node: i for i, node in enumerate(attn_inputs[0].graph.nodes)}
    return sorted(stores, key=order.__getitem__), mixing, static


def latent_cache_site(call: AttentionCall, outputs: set[fx.Node], earlier: list[AttentionSite]) -> AttentionSite:
    """The site of a call whose keys/values are computed token by token from one layer's two DynamicCache writes,
    which no earlier site reads. Tried after the caches a call reads directly, it refuses what it does not match
    (no cache at all, a StaticCache, operations that mix tokens)."""
    attn_keys = call.k
    if call.kind == "eager":  # the score matmul reads the keys transposed
        k = call.k
        if not (k.op in ("call_method", "call_function") and str(getattr(k.target, "__name__", k.target)) in (
                "transpose", "transpose.int") and {a % 4 for a in k.args[1:3]} == {2, 3}):
            raise UnsupportedGraph(f"kvpass: attention at '{call.attn.name}' reads keys through '{k.name}', not a "
                                   "transpose of the last two dimensions; kvpass cannot recover the keys it scores")
        attn_keys = k.args[0]
    v = call.v
    k_value, v_value = node_value(attn_keys), node_value(v)
    n = k_value.shape[2]
    stores, mixing, static = latent_stores([attn_keys, v], n, outputs)
    claimed = {node for site in earlier for node in (site.keys, site.values)}
    fresh = [s for s in stores if s not in claimed]
    if static:
        raise UnsupportedGraph(
            f"kvpass: attention at '{call.attn.name}' reads keys/values computed from a StaticCache's buffers (a "
            "latent cache, as MLA's, in a StaticCache): kvpass compresses latent caches in the default DynamicCache; "
            "drop the StaticCache"
        )
    if not stores:
        raise UnsupportedGraph(
            f"kvpass: attention at '{call.attn.name}' reads keys from '{attn_keys.name}' and values from '{v.name}', "
            "which are not written to a KV cache kvpass knows (a DynamicCache cat or a StaticCache index_copy_), nor "
            "computed from one: forward called with use_cache=False, or a sliding-window StaticCache layer? kvpass "
            "compresses KV caches, so there is nothing it can compress here"
        )
    if mixing or len(fresh) != 2 or len(stores) != 2 or not all(
            same_size(x.shape[2], n) for x in (v_value, *(node_value(s) for s in stores))):
        raise UnsupportedGraph(
            f"kvpass: attention at '{call.attn.name}' reads keys '{attn_keys.name}' and values '{v.name}' computed "
            f"from the cache writes {[s.name for s in stores]}, but not token by token from one layer's two writes (a "
            f"latent cache, as MLA's: a projection of each cached token): operations on the way that mix tokens or "
            f"are unknown: {mixing[:5]}. kvpass keeps and evicts cached tokens, so it needs each slot's keys and "
            "values to depend on that slot's token alone"
        )
    (store_k, past_k), (store_v, past_v) = ((s, cat_cache_parts(s)[0]) for s in stores)
    if (past_k is None) != (past_v is None) or node_value(store_k).shape[1] == 0 or (
            k_value.shape[1] % node_value(store_k).shape[1]):
        raise UnsupportedGraph(f"kvpass: the latent cache writes {[s.name for s in stores]} of attention "
                               f"'{call.attn.name}' do not form one layer's store (heads {k_value.shape[1]} over "
                               f"{node_value(store_k).shape[1]})")
    return AttentionSite(call.kind, call.attn, call.q, store_k, store_v, store_k, store_v, past_k, past_v, call.mask,
                         call.scale, softcap=call.softcap, sinks=call.sinks, attn_keys=attn_keys, attn_values=v)
