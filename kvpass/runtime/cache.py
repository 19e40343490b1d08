"""A Hugging Face ``DynamicCache`` that knows kvpass evicts from it.

Two things Hugging Face reads off a cache's tensors stop holding once kvpass keeps each layer at its budget:

* **How many tokens the cache has seen.** ``get_seq_length()`` counts slots, and ``generate()`` uses it to pick the
  tokens of ``input_ids`` a cache has not seen yet. Continuing a conversation from a compressed cache then re-feeds
  or skips tokens (kvpass refuses such a forward: :func:`kvpass.backend.check_continuation`).
* **One mask for every layer.** HF builds one mask for all full-attention layers, sized by the first one's cache.
  With per-layer budgets (PyramidKV, ``layer_budgets``) the layers' stores differ in length, and a forward of several
  tokens (a follow-up question) no longer traces.

A third: **batch-row operations** (beam search's ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) make new key tensors; the cache carries each store's kvpass state over to them, row for
row, its lower tier included (option ``offload``; a plain ``DynamicCache`` would leave the new stores without it, and
kvpass would take every slot for a token in position order).

:class:`CompressedCache` answers all three, and is otherwise a ``DynamicCache``.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpass.errors import KVPassError
from kvpass.runtime.state import STATE_ATTR, store_state


class CompressedCache(DynamicCache):
    """``DynamicCache`` for a model compiled with ``backend="kvpass"``; pass it as ``cache``.

    * ``get_seq_length()`` is the number of tokens of the sequence so far, kept or evicted (the most of any batch
      row: with left padding, the columns of ``input_ids`` already fed), as the store's kvpass state counts them. So
      ``generate(whole_conversation, cache=cache)`` feeds exactly the new tokens. While Dynamo traces a
      forward it stays HF's slot count, a shape: reading kvpass's count would specialize the graph on it.
    * While Dynamo traces a forward over full-attention stores of different lengths, HF's mask is one key column
      wide, so it broadcasts over every layer's keys: kvpass masks attention over its stores itself, from each slot's
      position, and never reads HF's mask there. Sliding-window layers (kept by HF) get HF's own masks.
    """

    def get_seq_length(self, layer_idx: int = 0) -> int:
        slots = super().get_seq_length(layer_idx)
        if slots == 0 or torch.compiler.is_compiling() or layer_idx >= len(self.layers):
            return slots
        state = store_state(self.layers[layer_idx].keys)
        if state is None:  # not (yet) a kvpass store: every token is still in its slot
            return slots
        return int(state.seen.max())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows_with_state(lambda x: x.index_select(0, beam_idx.to(x.device)), super().reorder_cache, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows_with_state(lambda x: x[indices, ...], super().batch_select_indices, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows_with_state(lambda x: x.repeat_interleave(repeats, dim=0), super().batch_repeat_interleave, repeats)

    def crop(self, max_length: int) -> None:
        if any(store_state(getattr(layer, "keys", None)) is not None for layer in self.layers):
            raise KVPassError(
                f"kvpass: crop({max_length}) cannot cut a compressed cache: its slots hold the kept tokens of the "
                "whole sequence, not its last tokens in order (assisted or DoLa decoding crop the cache). Use "
                "generate() without an assistant model, or a DynamicCache without kvpass")
        super().crop(max_length)

    def _rows_with_state(self, rows, operation, argument) -> None:
        """Run HF's batch-row ``operation`` and apply the same ``rows`` selection to each store's kvpass state."""
        states = [store_state(getattr(layer, "keys", None)) for layer in self.layers]
        operation(argument)
        for layer, state in zip(self.layers, states, strict=True):
            if state is not None:
                tier = None if state.tier is None else state.tier.rows(rows)
                setattr(layer.keys, STATE_ATTR, dataclasses.replace(
                    state, pos=rows(state.pos), acc=rows(state.acc), seen=rows(state.seen), tier=tier))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if (torch.compiler.is_compiling() and layer_idx < len(self.layers)
                and not isinstance(self.layers[layer_idx], DynamicSlidingWindowLayer) and self._stores_differ()):
            return 1, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def _stores_differ(self) -> bool:
        """Whether the full-attention layers' stores hold different numbers of slots (per-layer budgets)."""
        lengths = {layer.keys.shape[-2] for layer in self.layers
                   if not isinstance(layer, DynamicSlidingWindowLayer) and getattr(layer, "keys", None) is not None
                   and layer.keys.numel() > 0}
        return len(lengths) > 1
