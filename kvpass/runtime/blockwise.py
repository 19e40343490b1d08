"""Run a block graph (:mod:`kvpass.passes.block_graph`) over a prompt of any length.

The prompt is split into blocks of ``prefill_block`` tokens; the *first* block is left-padded so every
block is full (one compiled graph, no recompiles) and the last block ends on the prompt's last token
(so ``logits_to_keep=1`` still returns its logits). After each block every layer's store is back at its
budget, so the KV held never exceeds budget + one block, however long the prompt is.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from kvpass.errors import OptionError
from kvpass.passes import LayerPlan
from kvpass.passes.block_graph import BlockLayout, TokenInput, split_prompt
from kvpass.runtime.state import GraphRecord, attach_states

# Token ids appended to every block of the prefills run in this context as observation-only queries (EpiCache's
# patched prompt), "repeat" for a copy of the block itself (KVzip-style), or None: a parameter of the calls made in
# a ``with observing(...)`` block (per thread and task), never state of a compiled model
_OBSERVATION: contextvars.ContextVar[torch.Tensor | str | None] = contextvars.ContextVar("kvpass_observation",
                                                                                        default=None)


@contextlib.contextmanager
def observing(observe: torch.Tensor | str | None) -> Iterator[None]:
    """Block-wise prefills run inside this block append ``observe`` to every block as observation-only queries: they
    attend and are scored from like ordinary tokens but are never stored. ``observe``: token ids, ``"repeat"`` (each
    block observed by a copy of itself, KVzip-style), or None (the policy's own rule)."""
    if isinstance(observe, str) and observe != "repeat":
        raise OptionError(f"kvpass: observe must be token ids, 'repeat' or None, got {observe!r}")
    if observe is not None and not isinstance(observe, str | torch.Tensor):
        raise OptionError(f"kvpass: observe must be token ids (a tensor), 'repeat' or None, got {observe!r}")
    token = _OBSERVATION.set(observe)
    try:
        yield
    finally:
        _OBSERVATION.reset(token)


class BlockwiseRunner:
    """Call a compiled block graph once per block, threading the stores and their metadata."""

    def __init__(self, compiled: Callable, layout: BlockLayout, plans: list[LayerPlan], block_size: int,
                 record: GraphRecord, packed: bool, n_outputs: int, store_outputs: dict[int, tuple[int, int]]) -> None:
        self.compiled = compiled
        self.layout = layout
        self.plans = plans
        self.block_size = block_size
        self.record = record
        self.packed = packed
        self.n_outputs = n_outputs
        self.store_outputs = store_outputs  # layer -> output indices of its keys and values store
        self._boxed: Callable | bool | None = None  # resolved on the first call

    def __call__(self, *args) -> list:
        layout = self.layout
        first = args[layout.tokens[0].index]
        b, t = first.shape[0], first.shape[layout.tokens[0].dim]
        device = first.device
        block = self.block_size
        n_blocks, pad = split_prompt(t, block)
        observe_ids = _OBSERVATION.get()
        repeat = isinstance(observe_ids, str)  # "repeat": each block observed by a copy of itself (KVzip-style)
        n_obs = 0 if observe_ids is None else block if repeat else observe_ids.shape[-1]
        if n_obs and any(tok.role == "other" for tok in layout.tokens):
            names = [tok.index for tok in layout.tokens if tok.role == "other"]
            raise ValueError(f"kvpass: an observation prompt needs token inputs kvpass knows; inputs {names} are not")

        padded = {tok.index: _pad_front(args[tok.index], tok.dim, pad) for tok in layout.tokens}
        mask = next((args[tok.index] for tok in layout.tokens if tok.role == "attention_mask"), None)
        valid = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask != 0
        valid = _pad_front(valid, 1, pad)
        observe = torch.zeros(b, block + n_obs, dtype=torch.bool, device=device)
        observe[:, block:] = True

        stores, state = [], []
        for shape, dtype in layout.stores:
            shape = (b, *shape[1:])
            stores += [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
            state += [torch.full(shape[:3], -1, dtype=torch.int64, device=device),
                      torch.zeros(shape[:3], device=device), torch.zeros(b, dtype=torch.int64, device=device)]
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in layout.token_outputs}
        outs: list = []
        for i in range(n_blocks):
            call = list(args)
            own_ids = next((padded[t.index].narrow(t.dim, i * block, block) for t in layout.tokens
                            if t.role == "input_ids"), None)
            for tok in layout.tokens:
                x = padded[tok.index].narrow(tok.dim, i * block, block).contiguous()
                if n_obs:
                    x = torch.cat([x, _observation_part(tok, x, own_ids if repeat else observe_ids, b)], dim=tok.dim)
                call[tok.index] = x
            for j in layout.seq_inputs:
                call[j] = block + n_obs
            block_valid = valid[:, i * block : (i + 1) * block].contiguous()
            if n_obs:
                block_valid = torch.nn.functional.pad(block_valid, (0, n_obs), value=False)
            inputs = [*call, *stores, block_valid, observe, *state]
            call = stores = state = x = outs = None  # drop our references: the graph frees the old stores
            outs = self._call(inputs)
            for j, d in layout.token_outputs.items():
                pieces[j].append(outs[j].narrow(d, 0, block))
            stores, state = [], list(outs[self.n_outputs :])
            for plan in self.plans:
                k_index, v_index = self.store_outputs[plan.layer]
                stores += [outs[k_index], outs[v_index]]
        outs = list(outs)
        for j, d in layout.token_outputs.items():
            whole = torch.cat(pieces[j], dim=d) if len(pieces[j]) > 1 else pieces[j][0]
            outs[j] = whole.narrow(d, pad, t)
        if n_obs:  # outputs of the last position belong to the observation prompt: make misuse loud
            stores_out = {i for pair in self.store_outputs.values() for i in pair}
            for j in range(self.n_outputs):
                x = outs[j]
                if j not in layout.token_outputs and j not in stores_out and isinstance(x, torch.Tensor) \
                        and x.is_floating_point():
                    outs[j] = torch.full_like(x, float("nan"))
        stores = {layer: outs[k] for layer, (k, _) in self.store_outputs.items()}
        attach_states(self.plans, outs, self.n_outputs, stores, self.record, self.packed)
        return outs[: self.n_outputs]


    def _call(self, inputs: list) -> list:
        """Run the block graph; through the boxed convention when available, so the compiled code frees each
        previous store right after its layer reads it instead of keeping all of them alive until the block ends."""
        if self._boxed is None:
            self._boxed = _boxed_runtime(self.compiled) or False
        if self._boxed:
            return self._boxed(inputs)  # clears ``inputs``
        return self.compiled(*inputs)


def _boxed_runtime(compiled: Callable) -> Callable | None:
    """AOTAutograd's boxed runtime function under ``compiled``, if it prepends no lifted parameters.

    ``aot_module_simplified`` returns an unboxed ``forward(*args)`` (``__wrapped__`` chain) that copies the
    arguments into a list for a boxed ``compiled_fn``; Dynamo graphs take their parameters as inputs, so
    nothing is prepended and the boxed function can be called directly (under Dynamo's disable context, as
    the wrapper does).
    """
    fn = compiled
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and {"compiled_fn", "params_buffers_flat"} <= set(code.co_freevars):
            cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True))
            inner = cells["compiled_fn"]
            if cells["params_buffers_flat"] or not getattr(inner, "_boxed_call", False):
                return None
            return torch._dynamo.disable(inner, reason="kvpass block graph runtime")
        fn = getattr(fn, "__wrapped__", None)
    return None


def _pad_front(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _observation_part(tok: TokenInput, x: torch.Tensor, observe_ids: torch.Tensor, b: int) -> torch.Tensor:
    """The observation prompt's entries of token input ``tok`` (its ids, positions after the block, mask 1)."""
    n = observe_ids.shape[-1]
    if tok.role == "input_ids":
        return observe_ids.to(x.device).reshape(-1, n).expand(b, n)
    if tok.role == "position_ids":
        last = x.narrow(tok.dim, x.shape[tok.dim] - 1, 1)
        return last + torch.arange(1, n + 1, device=x.device)
    return torch.ones(b, n, dtype=x.dtype, device=x.device)
