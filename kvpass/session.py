"""Run-time state of one ``torch.compile(..., backend="kvpass", options=...)`` call.

The rewritten graphs are functional: each takes the store metadata of every layer (positions, the
policy's statistic, tokens seen) as trailing inputs and returns the updated metadata. A session holds
that metadata between forwards and remembers what each compiled graph did, for
:func:`kvpass.explain` and :func:`kvpass.kv_stats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpass.config import KVPassOptions
from kvpass.ops import pack_positions, tokens_per_head
from kvpass.passes import LayerPlan


@dataclasses.dataclass
class LayerState:
    pos: torch.Tensor    # [B, H_kv, C] int64, -1 = empty slot (head_budgets "adaptive": pos * H_kv + head)
    acc: torch.Tensor    # [B, H_kv, C] float32
    seen: torch.Tensor   # [B] int64
    keys: torch.Tensor   # the store this metadata describes (the tensor the cache now holds)


@dataclasses.dataclass
class GraphRecord:
    kind: str                      # "prefill", "decode" or "prefill-block"
    sites: list[str]               # every attention site, rewritten or left to HF
    budgets: list[int]             # per site: its budget, or the window HF keeps for a site left to it
    counters: dict[str, int]

    @classmethod
    def of(cls, kind: str, sites: list, plans: list[LayerPlan], counters: dict[str, int]) -> GraphRecord:
        budgets = {plan.layer: plan.budget for plan in plans}
        return cls(kind, [s.describe() + ("" if s.layer in budgets else ", HF's window kept") for s in sites],
                   [budgets.get(s.layer, s.window - 1) for s in sites], dict(counters))


class Session:
    """State shared by the prefill and decode graphs compiled for one options dict."""

    def __init__(self, options: KVPassOptions, raw_options: Any) -> None:
        self.options = options
        self._raw_options = raw_options  # keeps id(raw_options) unique while this session lives
        self.layers: dict[int, LayerState] = {}
        self.prefill_budgets: dict[int, tuple[int, int]] = {}
        self.graphs: list[GraphRecord] = []
        self.adopted_caches = 0
        self.forwards = 0
        # Block-wise prefill: token ids appended to every block as observation-only queries (EpiCache's
        # patched prompt), "repeat" for a copy of the block itself (KVzip-style), or None
        self.observation_ids: torch.Tensor | str | None = None

    def state_inputs(self, plans: list[LayerPlan], args: tuple) -> list[torch.Tensor]:
        """Metadata inputs of a decode graph, in plan order.

        A store this session did not produce (a cache filled by an uncompiled forward, say) is adopted
        as-is: every slot real, positions 0..C-1. For a StaticCache buffer the graph adopts it instead
        (it knows how many tokens the cache holds): ``seen = -1`` asks it to.
        """
        inputs: list[torch.Tensor] = []
        for plan in plans:
            if plan.past_index is None:
                continue
            store = args[plan.past_index]
            state = self.layers.get(plan.layer)
            if state is None or state.keys.data_ptr() != store.data_ptr() or state.keys.shape != store.shape:
                b, h, c, _ = store.shape
                pos = torch.arange(c, device=store.device).expand(b, h, c).contiguous()
                if self.options.head_budgets == "adaptive":  # row r holds head r's tokens
                    pos = pack_positions(pos, torch.arange(h, device=store.device).view(1, h, 1), h)
                state = LayerState(pos, torch.zeros(b, h, c, device=store.device),
                                   torch.full((b,), -1 if plan.static else c, dtype=torch.int64, device=store.device),
                                   store)
                self.adopted_caches += 1
            inputs += [state.pos, state.acc, state.seen]
        return inputs

    def update(self, plans: list[LayerPlan], outputs: list[torch.Tensor], n_outputs: int,
               stores: dict[int, torch.Tensor]) -> None:
        """Record each layer's metadata (trailing ``outputs``) for the key store it describes (``stores``)."""
        self.forwards += 1
        extra = outputs[n_outputs:]
        for i, plan in enumerate(plans):
            pos, acc, seen = extra[3 * i : 3 * i + 3]
            self.layers[plan.layer] = LayerState(pos, acc, seen, stores[plan.layer])

    def head_tokens(self, layer: int, keys: torch.Tensor) -> list[int] | None:
        """Real tokens the store ``keys`` of ``layer`` holds per kv head, summed over the batch (None: unknown)."""
        state = self.layers.get(layer)
        if state is None or state.keys.data_ptr() != keys.data_ptr():
            return None
        return tokens_per_head(state.pos, self.options.head_budgets == "adaptive").sum(dim=0).tolist()


_SESSIONS: dict[int, Session] = {}
_LAST: list[Session] = []


def session_for(options: KVPassOptions, raw_options: Any) -> Session:
    """The session of one ``options`` dict (the same dict object across a torch.compile's recompiles)."""
    key = id(raw_options)
    session = _SESSIONS.get(key)
    if session is None or session.options != options:
        session = _SESSIONS[key] = Session(options, raw_options)
    _LAST[:] = [session]
    return session


def last_session() -> Session | None:
    return _LAST[0] if _LAST else None


def find_session(keys: torch.Tensor) -> tuple[Session, int] | None:
    """The session and layer whose store is ``keys``."""
    for session in _SESSIONS.values():
        for layer, state in session.layers.items():
            if state.keys.data_ptr() == keys.data_ptr():
                return session, layer
    return None
