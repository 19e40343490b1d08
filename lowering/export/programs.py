"""The rewritten programs every export format packages: a prefill and a decode step of a HF decoder.

Both are ``torch.export`` programs of the model's forward with the KV cache passed *explicitly*
(DynamicCache layers set from graph inputs, the new stores returned as graph outputs), rewritten by
kvpass's passes exactly as the ``kvpass`` backend rewrites Dynamo graphs (:mod:`kvpass.exporter` makes them).
The calling convention (batch 1, one list of flat tensors, ``L`` attention layers):

* prefill: ``(input_ids [1, T], position_ids [1, T])``;
* decode:  ``(input_ids [1, 1], position_ids [1, 1], *state)``;
* both return ``(logits [1, 1, V], *state)`` with ``state = (k_0, v_0, ..., k_{L-1}, v_{L-1},
  pos_0, acc_0, seen_0, ..., pos_{L-1}, acc_{L-1}, seen_{L-1})``: each layer's store of exactly its
  ``capacity`` slots (``[1, H_kv, capacity, D]``) and the store metadata the ops thread
  (``pos [1, H_kv, capacity]`` int64, ``acc`` float32, ``seen [1]`` int64).

A generation is one prefill then one decode per new token, feeding each call's ``state`` to the next:
the store never grows, so the decode program has static shapes.

With ``prefill_block=C`` the prefill is instead the *block program* of
:class:`kvpass.passes.BlockwisePrefill` (static shapes, ``C`` tokens):
``(input_ids [1, C], position_ids [1, C], valid [1, C] bool, observe [1, C] bool, *state)`` →
``(logits [1, 1, V], *state)``. A prompt of any length is prefilled by calling it once per block from the
empty state (zero stores, ``pos`` -1): the first block left-padded (``valid`` False, id and position 0),
the last one ending on the prompt's last token, exactly as :class:`kvpass.runtime.blockwise.BlockwiseRunner` does
(:func:`split_prompt`). ``observe`` marks observation-only tokens (none here: all False).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram

from kvpass.ops import REFERENCES

MANIFEST_VERSION = 1


@dataclasses.dataclass
class Programs:
    """The two rewritten programs, example inputs for each, and what a loader needs to drive them."""

    prefill: ExportedProgram
    decode: ExportedProgram
    prefill_example: tuple[torch.Tensor, ...]
    decode_example: tuple[torch.Tensor, ...]
    manifest: dict[str, Any]


def split_prompt(length: int, block: int) -> tuple[int, int]:
    """(number of blocks, left padding) of a ``length``-token prompt prefilled by the block program of ``block``
    tokens: every block full, the padding in front of the first one, the last block ending on the last token
    (the split :class:`kvpass.runtime.blockwise.BlockwiseRunner` makes)."""
    n_blocks = max(1, math.ceil(length / block))
    return n_blocks, n_blocks * block - length


def empty_state(capacities: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The state a block-wise prefill starts from (batch 1): empty stores, ``pos`` -1 marking every slot empty."""
    stores, meta = [], []
    for capacity in capacities:
        shape = (1, kv_heads, capacity)
        stores += [torch.zeros(*shape, head_dim, dtype=dtype) for _ in range(2)]
        meta += [torch.full(shape, -1, dtype=torch.int64), torch.zeros(shape), torch.zeros(1, dtype=torch.int64)]
    return stores + meta


def decompose(ep: ExportedProgram) -> ExportedProgram:
    """Core ATen only: the ``kvpass::*`` ops replaced by their pure-torch references (for formats that
    cannot hold custom ops). Needs static shapes: the references branch on sizes."""
    table = torch.export.default_decompositions()
    table.update(REFERENCES)
    ep = ep.run_decompositions(table)
    # DynamicCache's first update is cat([tensor([]), new]): torch skips the legacy 1-D empty operand,
    # other compilers reject mixed ranks. Drop it.
    for node in ep.graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default):
        parts = node.args[0]
        kept = [p for p in parts if not _legacy_empty(p)]
        if len(kept) != len(parts) and kept:
            node.args = (kept, *node.args[1:])
    _normalize_indices(ep.graph)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep


def _normalize_indices(graph: fx.Graph) -> None:
    """Make ``select``/``slice`` indices non-negative and in range (static shapes): some importers
    (TVM's) mistranslate torch's negative indices."""
    aten = torch.ops.aten
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor):
            continue
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        args = list(node.args)
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        size = value.shape[dim]
        if not isinstance(size, int):
            continue
        if node.target is aten.select.int:
            if args[2] < 0:
                args[2] += size
        else:
            args += [0, None, None, 1][len(args) :]  # (self, dim, start, end, step)
            start = 0 if args[2] is None else args[2]
            end = size if args[3] is None else args[3]
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            args[2], args[3] = start, max(end, start)
        node.args = tuple(args)


def _legacy_empty(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == 0


def kvpass_ops_in(ep: ExportedProgram) -> list[str]:
    """Names of the ``kvpass::*`` ops a program still calls."""
    return sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "kvpass"})
