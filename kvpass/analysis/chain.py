"""The steps of an eager attention chain, ``matmul → … → softmax → … → matmul``, and the plain ones most models take.

:func:`kvpass.analysis.eager.eager_call` walks the chain from its softmax; what may stand between its anchors is read
by step recognizers listed in its tables. A step recognizer matches one op (or a few) and reports what it contributes
to the attention; it never walks the chain itself. The steps here are the ones with no attention parameter of their own
(an overflow guard, views, casts, a clamp) plus the scale and the additive mask; a family with parameters (soft cap,
sinks, windows, folded heads) has its own module.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from kvpass.analysis.ops import ADD_TARGETS, DIV_TARGETS, MUL_TARGETS, SUB_TARGETS, aten
from kvpass.analysis.site import is_layout, is_masked_fill, node_value

POST_SOFTMAX_METHODS = {"to", "type_as", "float", "type"}
POST_SOFTMAX_FUNCTIONS = {torch.nn.functional.dropout, aten.dropout.default, aten._to_copy.default,
                          aten.clone.default, aten.to.dtype}


@dataclasses.dataclass(frozen=True)
class LogitsStep:
    """One op on the logits before softmax, read backwards: the logits it was applied to and what it contributes."""

    source: fx.node.Argument  # the op's logits input: the walk goes on from it
    factor: fx.Node | None = None  # a multiply or divide by the attention's scale (checked to be a constant later)
    bias: fx.Node | None = None    # an additive term: the mask
    softcap: float = 0.0
    window: int | None = None      # the window a mask op restricts the logits to (0: causal only); None: no mask op
    sinks: fx.Node | None = None   # a learned sink logit column joined to the logits


@dataclasses.dataclass(frozen=True)
class OutputStep:
    """An op on the value matmul's product that still belongs to the attention (its result is the attention's)."""

    out: fx.Node
    sinks: fx.Node | None = None


@dataclasses.dataclass
class EagerChain:
    """What the walk has read of one eager attention so far; step recognizers read it (a soft cap is taken once)."""

    softmax: fx.Node
    logits: fx.node.Argument = None  # softmax's logits once the steps at its input are read
    score: fx.Node | None = None     # the score matmul ``q @ k^T``
    factors: list[fx.Node] = dataclasses.field(default_factory=list)
    biases: list[fx.Node] = dataclasses.field(default_factory=list)  # additive terms, the one nearest softmax first
    softcap: float = 0.0
    window: int = 0
    sinks: fx.Node | None = None

    def take(self, step: LogitsStep) -> fx.node.Argument:
        """Record what ``step`` contributes; returns the logits it was applied to."""
        if step.factor is not None:
            self.factors.append(step.factor)
        if step.bias is not None:
            self.biases.append(step.bias)
        if step.softcap:
            self.softcap = step.softcap
        if step.window is not None:
            self.window = step.window
        if step.sinks is not None:
            self.sinks = step.sinks
        return step.source


# Step recognizers of each table of :mod:`kvpass.analysis.eager`
LogitsStepRecognizer = Callable[[fx.Node, EagerChain], LogitsStep | None]
WeightsStepRecognizer = Callable[[fx.Node, EagerChain], bool]
OutputStepRecognizer = Callable[[fx.Node, EagerChain], OutputStep | None]
QueryRecognizer = Callable[[fx.Node, EagerChain], fx.Node | None]


def max_shift(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``x - x.max(dim=-1, keepdim=True).values``: an overflow guard softmax is invariant to (GPT-OSS)."""
    if not (node.op == "call_function" and node.target in SUB_TARGETS and len(node.args) == 2):
        return None
    x, shift = node.args
    if not (isinstance(shift, fx.Node) and shift.target is operator.getitem and shift.args[1] == 0):
        return None
    reduced = shift.args[0]
    is_max = (reduced.op == "call_method" and reduced.target == "max") or (
        reduced.op == "call_function" and reduced.target in (torch.max, aten.max.dim))
    return LogitsStep(x) if is_max and reduced.args[0] is x else None


def scale_step(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``logits * c`` or ``logits / c``, in place too (Falcon's ``*=``): the attention's scale."""
    if node.op == "call_function" and node.target in MUL_TARGETS | DIV_TARGETS:
        return LogitsStep(node.args[0], factor=node)
    return None


def mask_step(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``logits + mask``: the additive mask (a constant added is no mask, and passes)."""
    if node.op == "call_function" and node.target in ADD_TARGETS:
        bias = node.args[1]
        return LogitsStep(node.args[0], bias=bias if isinstance(bias, fx.Node) else None)
    return None


def logits_view(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """A view, reshape or cast of the logits (Falcon views its score matmul's product); not an index, which could
    select some of them."""
    if is_layout(node) and node.target is not operator.getitem:
        return LogitsStep(node.args[0])
    return None


def lowest_float_clamp(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``max(logits, finfo.min)``: XGLM's clamp of masked logits at the lowest float, which softmax does not see."""
    if node.target in (torch.max, torch.maximum) and len(node.args) == 2 and is_masked_fill(node.args[1]):
        return LogitsStep(node.args[0])
    return None


def cast_or_dropout(node: fx.Node, chain: EagerChain) -> bool:
    """A cast of the attention weights back to the values' dtype, or dropout (the identity in eval)."""
    return (node.op == "call_method" and node.target in POST_SOFTMAX_METHODS) or (
        node.op == "call_function" and node.target in POST_SOFTMAX_FUNCTIONS)


def direct_queries(q: fx.Node, chain: EagerChain) -> fx.Node | None:
    """The score matmul reads the queries themselves, ``[B, H, T, D]`` (any layout but heads folded into a batch)."""
    value = node_value(q)
    return q if value is None or value.dim() != 3 else None
