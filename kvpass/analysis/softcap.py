"""Logit soft cap: ``c * tanh(logits / c)`` before the mask (Gemma-2, Grok): bounds the logits to ``(-c, c)``."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from kvpass.analysis.chain import EagerChain, LogitsStep
from kvpass.analysis.ops import DIV_TARGETS, MUL_TARGETS, aten
from kvpass.analysis.site import constant_float

TANH_TARGETS = {torch.tanh, aten.tanh.default}


def softcap_of(node: fx.Node) -> tuple[float, fx.Node] | None:
    """``(c, x)`` when ``node`` is ``tanh(x / c) * c`` (also as ``x * (1/c)``, and with the factors swapped)."""
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


def softcap_step(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """The soft cap of an eager chain's logits, once per attention (a second is no soft cap kvpass knows)."""
    if chain.softcap:
        return None
    capped = softcap_of(node)
    if capped is None:
        return None
    cap, logits = capped
    return LogitsStep(logits, softcap=cap)
