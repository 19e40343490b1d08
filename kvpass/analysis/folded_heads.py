"""Heads folded into the batch: ``bmm`` over ``[B * H, T, D]`` queries and ``[B * H, D, N]`` keys (XGLM).

The model views its ``[B, H, T, D]`` tensors to 3-D for ``bmm``, and its ``[B, H, T, N]`` weights back to
``[B * H, T, N]`` after softmax; kvpass attends over ``[B, H, ...]`` stores, so it reads the 4-D queries.
"""

from __future__ import annotations

import torch.fx as fx

from kvpass.analysis.chain import EagerChain
from kvpass.analysis.site import is_layout, node_value, same_size, trace_to_source


def weights_fold(node: fx.Node, chain: EagerChain) -> bool:
    """A view or reshape of the attention weights (``[B, H, T, N]`` → ``[B * H, T, N]`` for the value ``bmm``)."""
    return node.op == "call_method" and node.target in ("view", "reshape")


def folded_queries(q: fx.Node, chain: EagerChain) -> fx.Node | None:
    """The ``[B, H, T, D]`` queries a 3-D score matmul reads through a view, when its keys come from ``[B, H, N, D]``
    ones with as many heads; None otherwise."""
    q_value = node_value(q)
    if q_value is None or q_value.dim() != 3:
        return None
    folded = q
    while is_layout(folded) and node_value(folded).dim() != 4 and isinstance(folded.args[0], fx.Node):
        folded = folded.args[0]
    q4, k4 = node_value(folded), node_value(trace_to_source(chain.score.args[1]))
    if q4 is None or q4.dim() != 4 or k4 is None or k4.dim() != 4 or k4.shape[1] != q4.shape[1] or (
            not same_size(q4.shape[0] * q4.shape[1], q_value.shape[0])):
        return None
    return folded
