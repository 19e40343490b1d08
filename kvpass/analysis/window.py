"""Sliding windows: where a layer's window of attended tokens shows in a graph.

* the cache keeps only the window: a DynamicCache sliding layer stores the tail ``keys[:, :, -(w - 1):]`` of what it
  attends to (:func:`sliding_tail`; HF's own window, which kvpass leaves to HF);
* the mask alone applies it: GPT-Neo's ``where(bias[..], logits, finfo.min)`` with a constant bool band ``bias``
  (:func:`band_mask_step`; its cache keeps every token, so kvpass applies the window and evicts what falls out).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from kvpass.analysis.chain import EagerChain, LogitsStep
from kvpass.analysis.site import constant_float, is_masked_fill


def sliding_tail(source: fx.Node, outputs: set[fx.Node]) -> tuple[fx.Node, int] | None:
    """``(tail, w)`` when a graph output ``tail`` is ``source[:, :, -(w - 1):]``: a sliding-window layer's cache
    keeps the last ``w - 1`` tokens of the keys/values ``source`` it attends to."""
    for user in source.users:
        if user in outputs and user.op == "call_function" and user.target is operator.getitem:
            index = user.args[1]
            if isinstance(index, tuple) and len(index) >= 3 and index[:2] == (slice(None),) * 2:
                tail = index[2]
                # with dynamic=True the window is a SymInt input of the graph: its traced value is the model's
                start = constant_float(tail.start) if isinstance(tail, slice) and tail.stop is None else None
                if start is not None and start < 0:
                    return user, 1 - int(start)
    return None


def band_window(cond: fx.Node) -> int | None:
    """The window of GPT-Neo's mask ``bias[:, :, K-Q:K, :K]``: ``bias`` is a constant bool ``[1, 1, P, P]`` buffer, the
    causal lower triangle (0: no window) or its band ``i - j < w`` (a local layer: ``w``); None for anything else.

    Dynamo keeps a buffer's real tensor on its placeholder while a backend runs (not after), which is where the band
    is read."""
    if not (cond.op == "call_function" and cond.target is operator.getitem and isinstance(cond.args[0], fx.Node)
            and cond.args[0].op == "placeholder"):
        return None
    buffer = getattr(cond.args[0].meta.get("grapharg"), "example", None)
    if not (isinstance(buffer, torch.Tensor) and buffer.dtype == torch.bool and buffer.dim() == 4
            and buffer.shape[:2] == (1, 1) and buffer.shape[2] == buffer.shape[3]):
        return None
    band = buffer[0, 0]
    p = band.shape[-1]
    w = int(band[-1].sum())
    causal = torch.ones(p, p, dtype=torch.bool, device=band.device).tril()
    if not torch.equal(band, causal & ~causal.tril(-w)):
        return None
    return 0 if w >= p else w


def band_mask_step(node: fx.Node, chain: EagerChain) -> LogitsStep | None:
    """``where(band, logits, finfo.min)`` with a causal or local band from a bool buffer (GPT-Neo)."""
    if not (node.target is torch.where and len(node.args) == 3 and isinstance(node.args[0], fx.Node)
            and is_masked_fill(node.args[2])):
        return None
    window = band_window(node.args[0])
    return None if window is None else LogitsStep(node.args[1], window=window)
