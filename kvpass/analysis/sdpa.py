"""``scaled_dot_product_attention``: the attention of HF's ``sdpa`` implementation, one op."""

from __future__ import annotations

import torch
import torch.fx as fx

from kvpass.analysis.ops import aten
from kvpass.analysis.site import AttentionCall, constant_float, node_value
from kvpass.errors import UnsupportedGraph

SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
}


def sdpa_call(node: fx.Node) -> AttentionCall | None:
    """The call when ``node`` is ``scaled_dot_product_attention(q, k, v, attn_mask, ..., scale=)``, else None.

    Its scale is the op's (``1 / sqrt(head_dim)`` by default); a scale computed in the graph is refused, since
    kvpass's own attention over the store needs it as a number.
    """
    if not (node.op == "call_function" and node.target in SDPA_TARGETS):
        return None
    q, k, v = node.args[:3]
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    scale = node.kwargs.get("scale")
    if scale is None:
        scale = node_value(q).shape[-1] ** -0.5
    elif constant_float(scale) is None:
        raise UnsupportedGraph(f"kvpass: attention '{node.name}' has a scale that is not a constant: {scale}")
    else:
        scale = constant_float(scale)
    return AttentionCall("sdpa", node, q, k, v, mask, scale)
