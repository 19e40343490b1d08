"""Run a block graph (:mod:`kvpass.passes.block_graph`) over a prompt of any length.

The prompt is split into blocks of ``prefill_block`` tokens; the *first* block is left-padded so every
block is full (one compiled graph, no recompiles) and the last block ends on the prompt's last token
(so ``logits_to_keep=1`` still returns its logits). After each block every layer's store is back at its
budget, so the KV held never exceeds budget + one block, however long the prompt is.

A sliding-window layer whose cache keeps HF's window (Gemma-3's local layers, Mistral's) carries that window instead:
a store of ``window - 1`` slots kept by recency, so its KV never exceeds ``window - 1`` + one block; after the last
block the runner hands it back to HF's cache in HF's own layout (its last ``min(t, window - 1)`` tokens, oldest
first), and counts the model returns of the prompt length (HF's ``cumulative_length``) are those of the whole
prompt, so decoding continues exactly as after HF's own prefill. The KV bound of a prefill is then the sum over
layers of (store slots + one block), a sliding layer's store holding ``window - 1`` slots.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from kvpass.errors import OptionError
from kvpass.ops.kv import gather_slots
from kvpass.ops.tier import release_free_heap
from kvpass.passes import LayerPlan
from kvpass.passes.block_graph import BlockLayout, TokenInput, split_prompt
from kvpass.policies import policy_from_spec
from kvpass.runtime.state import GraphRecord, attach_states
from kvpass.runtime.tier import LowerTier

# Token ids appended to every block of the prefills run in this context as observation-only queries (EpiCache's
# patched prompt; a list: one prompt per batch row), "repeat" for a copy of the block itself (KVzip-style), or None:
# a parameter of the calls made in a ``with observing(...)`` block (per thread and task), never state of a compiled
# model
Observation = torch.Tensor | list[torch.Tensor] | str | None
_OBSERVATION: contextvars.ContextVar[Observation] = contextvars.ContextVar("kvpass_observation", default=None)


@contextlib.contextmanager
def observing(observe: Observation) -> Iterator[None]:
    """Block-wise prefills run inside this block append ``observe`` to every block as observation-only queries: they
    attend and are scored from like ordinary tokens but are never stored. ``observe``: token ids (one prompt for every
    batch row), a list of 1-D token-id tensors (one prompt per batch row, any lengths: EpiCache's episodes built as
    the rows of one batch), ``"repeat"`` (each block observed by a copy of itself, KVzip-style), or None (the
    policy's own rule)."""
    if isinstance(observe, str) and observe != "repeat":
        raise OptionError(f"kvpass: observe must be token ids, 'repeat' or None, got {observe!r}")
    if isinstance(observe, list | tuple):
        bad = [i for i, ids in enumerate(observe) if not isinstance(ids, torch.Tensor) or ids.dim() != 1
               or ids.numel() == 0]
        if not observe or bad:
            raise OptionError(f"kvpass: observe as a list needs one non-empty 1-D token-id tensor per batch row; "
                              f"entries {bad} of {len(observe)} are not")
        observe = list(observe)
    elif observe is not None and not isinstance(observe, str | torch.Tensor):
        raise OptionError(f"kvpass: observe must be token ids (a tensor, or a list of one per row), 'repeat' or None, "
                          f"got {observe!r}")
    token = _OBSERVATION.set(observe)
    try:
        yield
    finally:
        _OBSERVATION.reset(token)


class BlockwiseRunner:
    """Call a compiled block graph once per block, threading the stores and their metadata."""

    def __init__(self, compiled: Callable, layout: BlockLayout, plans: list[LayerPlan], block_size: int,
                 record: GraphRecord, packed: bool, n_outputs: int, store_outputs: dict[int, tuple[int, int]],
                 offload: str | None = None, offload_dir: str | None = None) -> None:
        self.compiled = compiled
        self.layout = layout
        self.plans = plans
        self.block_size = block_size
        self.record = record
        self.packed = packed
        self.n_outputs = n_outputs
        self.store_outputs = store_outputs  # layer -> output indices of its keys and values store
        self.offload, self.offload_dir = offload, offload_dir  # option offload: each block's evictions go to a tier
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
        lengths = None  # per-row prompt lengths (a list of prompts: shorter ones padded at the end, dead tokens)
        if isinstance(observe_ids, list):
            if len(observe_ids) != b:
                raise ValueError(f"kvpass: {len(observe_ids)} observation prompts for a batch of {b} rows; give one "
                                 "per row (or one tensor for all)")
            lengths = torch.tensor([len(ids) for ids in observe_ids], device=device)
            observe_ids = torch.nn.utils.rnn.pad_sequence([ids.to(device) for ids in observe_ids], batch_first=True)
        n_obs = 0 if observe_ids is None else block if repeat else observe_ids.shape[-1]
        if not n_obs and getattr(policy_from_spec(self.record.policy), "needs_observation_prompt", False):
            raise OptionError(
                f"kvpass: policy {self.record.policy} scores each block by an observation prompt's attention over "
                "the context (EpiCache's rule), but this prefill has none: run it inside `with kvpass.observing(ids)` "
                "(EpisodicCache does), observe='repeat' for each block observed by a copy of itself, or set option "
                "'scores' to 'forward' to score by the block's own last queries")
        if n_obs and any(tok.role == "other" for tok in layout.tokens):
            names = [tok.index for tok in layout.tokens if tok.role == "other"]
            raise ValueError(f"kvpass: an observation prompt needs token inputs kvpass knows; inputs {names} are not")

        padded = {tok.index: _pad_front(args[tok.index], tok.dim, pad) for tok in layout.tokens}
        mask = next((args[tok.index] for tok in layout.tokens if tok.role == "attention_mask"), None)
        valid = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask != 0
        valid = _pad_front(valid, 1, pad)
        observe = torch.zeros(b, block + n_obs, dtype=torch.bool, device=device)
        observe[:, block:] = True if lengths is None else torch.arange(n_obs, device=device) < lengths[:, None]

        stores, state = [], []
        for shape, dtype in layout.stores:
            shape = (b, *shape[1:])
            stores += [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
            state += [torch.full(shape[:3], -1, dtype=torch.int64, device=device),
                      torch.zeros(shape[:3], device=device), torch.zeros(b, dtype=torch.int64, device=device)]
        tiers = self._empty_tiers(b, device)
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
            inputs = [*call, *stores, block_valid, observe, *state, *(x for t in tiers.values() for x in t.inputs())]
            call = stores = state = x = outs = None  # drop our references: the graph frees the old stores
            outs = self._call(inputs)
            for j, d in layout.token_outputs.items():
                pieces[j].append(outs[j].narrow(d, 0, block))
            n_state = self.n_outputs + 3 * len(self.plans)
            stores, state = [], list(outs[self.n_outputs : n_state])
            self._append_evicted(tiers, outs[n_state:])
            for plan in self.plans:
                k_index, v_index = self.store_outputs[plan.layer]
                stores += [outs[k_index], outs[v_index]]
            release_free_heap()  # (the block's freed temporaries leave the resident set: the next block's reuse them)
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
        values = {**{sym: args[i] for sym, i in layout.symbols.items()}, **dict.fromkeys(layout.lengths, t)}
        for j, expr in layout.seq_outputs.items():  # counts of the whole prompt (HF's sliding layers'), not a block's
            outs[j] = int(expr.xreplace(values))
        self._windows_to_hf(outs, t)
        # state for kvpass's stores; a sliding layer's window is HF's again (its decode steps are HF's)
        evicted = [i for i, plan in enumerate(self.plans) if plan.layer not in layout.windows]
        state = [x for i in evicted for x in outs[self.n_outputs + 3 * i : self.n_outputs + 3 * i + 3]]
        stores = {layer: outs[k] for layer, (k, _) in self.store_outputs.items()}
        attach_states([self.plans[i] for i in evicted], [*outs[: self.n_outputs], *state], self.n_outputs, stores,
                      self.record, self.packed, tiers=tiers)
        return outs[: self.n_outputs]

    def _empty_tiers(self, b: int, device: torch.device) -> dict:
        """Option offload: an empty lower tier per tiered layer (plan order), which every block's graph attends to."""
        tiers = {}
        for plan, (shape, dtype) in zip(self.plans, self.layout.stores, strict=True):
            if plan.tier_inputs:
                like_k = torch.empty(b, shape[1], 0, shape[3], dtype=dtype, device=device)
                like_v = torch.empty(b, shape[1], 0, plan.value_dim, dtype=dtype, device=device)
                tiers[plan.layer] = LowerTier.empty(self.offload, self.offload_dir, like_k, like_v)
        return tiers

    def _append_evicted(self, tiers: dict, evicted: list) -> None:
        """What a block's compactions evicted (k, v, pos per tiered layer, plan order) into the lower tiers."""
        parts = iter(evicted)
        for plan in self.plans:
            if plan.evicted_outputs:
                tier = tiers[plan.layer]
                tier.moved_bytes = tier.append(next(parts), next(parts), next(parts))

    def _windows_to_hf(self, outs: list, t: int) -> None:
        """Hand each sliding layer's store (its last ``window - 1`` real tokens, slots in any order) back in the layout
        HF's sliding cache layer has after a ``t``-token prompt: its last ``min(t, window - 1)`` slots, oldest first,
        slots without a real token (left padding) in front, as HF's own left padding is."""
        extra = outs[self.n_outputs :]
        for i, plan in enumerate(self.plans):
            window = self.layout.windows.get(plan.layer)
            if window is None:
                continue
            pos = extra[3 * i]  # -1: no token; a stable sort puts those first, then the tokens by position
            order = pos.sort(dim=-1, stable=True).indices[..., pos.shape[-1] - min(t, window - 1) :]
            for j in self.store_outputs[plan.layer]:
                outs[j] = gather_slots(outs[j], order)


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
    if tok.role == "input_ids":  # one prompt for every row, or one per row
        return observe_ids.to(x.device).reshape(-1, n).expand(b, n).contiguous()
    if tok.role == "position_ids":
        last = x.narrow(tok.dim, x.shape[tok.dim] - 1, 1)
        return last + torch.arange(1, n + 1, device=x.device)
    return torch.ones(b, n, dtype=x.dtype, device=x.device)
