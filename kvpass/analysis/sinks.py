"""Learned attention sinks: one extra logit per head that joins softmax's denominator and attends to nothing.

Two models spell them two ways, so there are two entries:

* GPT-OSS joins a one-wide sink column to the logits before softmax and drops it after
  (:func:`sink_column`, :func:`drops_sink_column`);
* GraniteSWA leaves softmax alone and scales the attention's output by ``sigmoid(logsumexp(logits) - sink)``,
  the share of the denominator the real logits keep (:func:`sigmoid_sink_scale`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from kvpass.analysis.chain import POST_SOFTMAX_METHODS, EagerChain, LogitsStep, OutputStep
from kvpass.analysis.ops import CAT_TARGETS, MUL_TARGETS, SUB_TARGETS, aten
from kvpass.analysis.site import live_users, node_value

LOGSUMEXP_TARGETS = {torch.logsumexp, aten.logsumexp.default}
SIGMOID_TARGETS = {torch.sigmoid, torch.nn.functional.sigmoid, aten.sigmoid.default}


def sink_column(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``cat([logits, sinks], dim=-1)`` with a one-wide ``sinks`` column (GPT-OSS)."""
    if not (node.op == "call_function" and node.target in CAT_TARGETS):
        return None
    parts = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not (isinstance(parts, list | tuple) and len(parts) == 2 and all(isinstance(p, fx.Node) for p in parts)):
        return None
    logits, column = parts
    value = node_value(column)
    if value is None or dim not in (-1, value.dim() - 1) or value.shape[-1] != 1:
        return None
    return LogitsStep(logits, sinks=column)


def drops_last_column(node: fx.Node) -> bool:
    """``node`` is ``x[..., :-1]`` (in an export graph: ``aten.slice(x, last dim, 0, -1)``)."""
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        rank = node_value(node.args[0]).dim()
        return len(node.args) == 4 and node.args[1] in (-1, rank - 1) and node.args[2] == 0 and node.args[3] == -1
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    return isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and index[1] == slice(None, -1, None)


def drops_sink_column(node: fx.Node, chain: EagerChain) -> bool:
    """The weights' sink column dropped after softmax, in a chain whose logits got one (GPT-OSS)."""
    return chain.sinks is not None and drops_last_column(node)


def sigmoid_sink_scale(pv: fx.Node, chain: EagerChain) -> OutputStep | None:
    """``pv * sigmoid(logsumexp(logits, -1) - sinks)`` (GraniteSWA), with ``pv`` the value matmul's product, in a
    chain with no sink yet."""
    if chain.sinks is not None:
        return None
    lse = next((u for u in chain.logits.users if u.op == "call_function" and u.target in LOGSUMEXP_TARGETS), None)
    if lse is None or len(live_users(lse)) != 1:
        return None
    (sub,) = live_users(lse)
    if not (sub.op == "call_function" and sub.target in SUB_TARGETS and sub.args[0] is lse
            and isinstance(sub.args[1], fx.Node)):
        return None
    node, through_sigmoid = sub, False
    passing = SIGMOID_TARGETS | {torch.unsqueeze, aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default}
    while len(live_users(node)) == 1:
        (node,) = live_users(node)
        if node.op == "call_method" and node.target in POST_SOFTMAX_METHODS | {"unsqueeze", "sigmoid"} or (
                node.op == "call_function" and node.target in passing):
            through_sigmoid |= node.target in SIGMOID_TARGETS or node.target == "sigmoid"
            continue
        break
    if not (node.op == "call_function" and node.target in MUL_TARGETS and pv in node.args
            and len(live_users(pv)) == 1):
        return None
    return OutputStep(node, sinks=sub.args[1]) if through_sigmoid else None
