"""Eager attention: ``matmul → (scale, soft cap, mask) → softmax → (cast, dropout) → matmul``.

:func:`eager_call` anchors on a softmax and walks the chain out from it; the ops it accepts on the way are the entries
of the tables below, one small recognizer per op family or model quirk, as Inductor's ``fuse_attention`` registers one
pattern per variant. A model that spells a step its own way is a new entry, never a branch inside another one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx

from kvpass.analysis.chain import (
    EagerChain,
    LogitsStepRecognizer,
    OutputStepRecognizer,
    QueryRecognizer,
    WeightsStepRecognizer,
    cast_or_dropout,
    direct_queries,
    logits_view,
    lowest_float_clamp,
    mask_step,
    max_shift,
    scale_step,
)
from kvpass.analysis.folded_heads import folded_queries, weights_fold
from kvpass.analysis.ops import MATMUL_TARGETS, MUL_TARGETS, SOFTMAX_TARGETS
from kvpass.analysis.sinks import drops_sink_column, sigmoid_sink_scale, sink_column
from kvpass.analysis.site import AttentionCall, constant_float, live_users, reads_only_size
from kvpass.analysis.softcap import softcap_step
from kvpass.analysis.window import band_mask_step
from kvpass.errors import UnsupportedGraph

# Ops at softmax's input, each tried once, in this order (GPT-OSS shifts its sink-extended logits)
SOFTMAX_INPUT_STEPS: tuple[LogitsStepRecognizer, ...] = (
    max_shift,      # x - x.max(-1): an overflow guard
    sink_column,    # cat([logits, sinks]): GPT-OSS's learned sinks
)
# Ops between the score matmul and softmax, read backwards from softmax; the first entry that matches an op takes it
# (the soft cap before the scale: its outer op is a multiply)
LOGITS_STEPS: tuple[LogitsStepRecognizer, ...] = (
    softcap_step,        # c * tanh(x / c): Gemma-2
    logits_view,         # a view of the score matmul's product: Falcon
    band_mask_step,      # where(bool band buffer, x, finfo.min): GPT-Neo's causal or local mask
    lowest_float_clamp,  # max(x, finfo.min): XGLM
    scale_step,          # x * c, x / c, in place too (Falcon)
    mask_step,           # x + mask
)
# Ops between softmax and the value matmul that pass the weights on
WEIGHTS_STEPS: tuple[WeightsStepRecognizer, ...] = (
    cast_or_dropout,
    drops_sink_column,  # weights[..., :-1]: GPT-OSS
    weights_fold,       # [B, H, T, N] → [B * H, T, N]: XGLM
)
# Ops on the value matmul's product that still belong to the attention; the first that matches is taken
OUTPUT_STEPS: tuple[OutputStepRecognizer, ...] = (
    sigmoid_sink_scale,  # out * sigmoid(lse - sinks): GraniteSWA's learned sinks
)
# How the score matmul reads the [B, H, T, D] queries; the first that finds them wins, none: not an attention
QUERY_STEPS: tuple[QueryRecognizer, ...] = (
    direct_queries,
    folded_queries,  # bmm with heads folded into the batch: XGLM
)


def _first(recognizers: Iterable, node: fx.Node, chain: EagerChain) -> Any:
    """What the first of ``recognizers`` to match ``node`` found, or None."""
    return next((found for recognize in recognizers if (found := recognize(node, chain)) is not None), None)


def eager_call(softmax: fx.Node) -> AttentionCall | None:
    """The call whose softmax is ``softmax``, when a score matmul and a value matmul frame it through the steps of
    the tables above; None when ``softmax`` is not one of attention.

    kvpass replaces the whole computation, so no node of it but the output may be read elsewhere (the weights
    returned with ``output_attentions=True``, a statistic of the logits): such a graph is refused, as are logits with
    two additive terms (a position bias besides the mask) and a scale that is not a constant.
    """
    if not (softmax.op == "call_function" and softmax.target in SOFTMAX_TARGETS):
        return None
    chain = EagerChain(softmax)
    node = softmax.args[0]
    for recognize in SOFTMAX_INPUT_STEPS:
        step = recognize(node, chain) if isinstance(node, fx.Node) else None
        if step is not None:
            node = chain.take(step)
    chain.logits = node
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        step = _first(LOGITS_STEPS, node, chain)
        if step is None:
            break
        node = chain.take(step)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMUL_TARGETS):
        return None
    if len(chain.biases) > 1:  # kvpass rebuilds the mask from slot positions: any other additive term would be lost
        raise UnsupportedGraph(
            f"kvpass: attention logits at '{softmax.name}' get {len(chain.biases)} additive terms before softmax "
            f"({[n.name for n in reversed(chain.biases)]}): a position bias such as ALiBi besides the mask. kvpass "
            "supports rotary-position models (it keeps each token's rotated key), not additive position biases"
        )
    chain.score = node
    weights = softmax
    while len(live_users(weights)) == 1:
        (user,) = live_users(weights)
        if not any(passes(user, chain) for passes in WEIGHTS_STEPS):
            break
        weights = user
    value_matmuls = [u for u in live_users(weights) if u.op == "call_function" and u.target in MATMUL_TARGETS
                     and u.args[0] is weights]
    if len(value_matmuls) != 1:
        return None
    (pv,) = value_matmuls
    out = pv
    output = _first(OUTPUT_STEPS, pv, chain)
    if output is not None:
        out = output.out
        if output.sinks is not None:
            chain.sinks = output.sinks
    _refuse_readers_inside(chain.score, out, softmax)
    scale = _scale(chain)
    q = _first(QUERY_STEPS, chain.score.args[0], chain)
    if q is None:
        return None
    mask = chain.biases[0] if chain.biases else None
    return AttentionCall("eager", out, q, chain.score.args[1], pv.args[1], mask, scale, chain.softcap, chain.sinks,
                         chain.window)


def _scale(chain: EagerChain) -> float:
    """The product of the constant factors between the score matmul and softmax (none: the model scaled its queries)."""
    scale = 1.0
    for factor in chain.factors:
        a, b = factor.args[0], factor.args[1]
        const = constant_float(b) if constant_float(b) is not None else constant_float(a)
        if const is None:
            raise UnsupportedGraph(f"kvpass: the attention logits at '{chain.softmax.name}' are scaled by "
                                   f"'{factor.name}', which is not a constant; kvpass needs the scale its attention "
                                   "applies")
        scale = scale * const if factor.target in MUL_TARGETS else scale / const
    return scale


def _refuse_readers_inside(first: fx.Node, out: fx.Node, softmax: fx.Node) -> None:
    """Refuse an attention computation (from ``first`` to ``out``) whose intermediates are read outside it."""
    inside = _inside(first, out)
    for n in inside - {out}:
        elsewhere = [u.name for u in live_users(n) if u not in inside and not reads_only_size(u)]
        if elsewhere:
            raise UnsupportedGraph(
                f"kvpass: the attention computed at '{softmax.name}' has its intermediate '{n.name}' also read by "
                f"{elsewhere} (attention weights returned with output_attentions=True, or a statistic of the logits "
                "kvpass does not know). kvpass replaces the whole attention computation with its own over the "
                "compressed store, so those readers would get values kvpass never computed; call the model with "
                "output_attentions=False"
            )


def _inside(first: fx.Node, last: fx.Node) -> set[fx.Node]:
    """Every node on a path from ``first`` to ``last`` (both included)."""
    order = {n: i for i, n in enumerate(first.graph.nodes)}
    after, frontier = {first}, [first]
    while frontier:
        for user in frontier.pop().users:
            if user not in after and order[user] <= order[last]:
                after.add(user)
                frontier.append(user)
    inside, frontier = {last}, [last]
    while frontier:
        for parent in frontier.pop().all_input_nodes:
            if parent in after and parent not in inside:
                inside.add(parent)
                frontier.append(parent)
    return inside
