"""SentenceKV's state for one cache: its sentences, and per layer the sentences' abstracts and where their tokens lie
in the lower tier (policy ``"sentencekv"``: :mod:`kvpass.policies.sentencekv`).

A compiled forward continuing such a cache ranks the sentences and gathers their tokens itself (graph nodes:
:func:`kvpass.ops.tier.retrieval_index`, ``kvpass::tier_gather``); the runner keeps what those nodes read, as the
reference keeps it: sentences end after a ``sentence_ends`` token; a prompt sentence's abstract is the mean of its
kept keys, a generated sentence's the mean of its keys once it ends; the query a step scores with is the mean of the
queries of the sentence being generated. Everything here belongs to the cache (each layer's
:class:`~kvpass.runtime.state.StoreState` holds its :class:`SentenceLayer`, all of them one :class:`Sentences`), so
caches interleave freely and a copy of a cache (``copy.deepcopy``) continues on its own.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from kvpass.errors import UnsupportedGraph
from kvpass.policies.sentencekv import SentenceKV
from kvpass.runtime.tier import LowerTier

_FIRST_SENTENCES = 64


@dataclasses.dataclass(eq=False)
class Sentences:
    """The cache's token-level bookkeeping, shared by its layers (batch 1, as the reference)."""

    policy: SentenceKV
    sentence_of: Tensor          # int64: each position's sentence (the first `positions` entries; grows by doubling)
    positions: int               # positions so far
    open_id: int                 # the sentence being generated
    open_len: int = 0            # its tokens so far
    cap: int = 0                 # tokens of a sentence the reference can retrieve (its per-sentence index width)

    @classmethod
    def of_prompt(cls, policy: SentenceKV, ids: Tensor) -> Sentences:
        """Sentences of a prompt ``[1, T]``: each ends after a sentence-ending token; a trailing partial sentence is
        one too. Generation starts a new sentence."""
        ends = torch.isin(ids[0].cpu(), torch.tensor(policy.sentence_ends))
        owner = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1].long()]).cumsum(0)
        return cls(policy, owner, len(owner), int(owner[-1]) + 1)

    def owner(self, pos: Tensor) -> Tensor:
        """The sentence of each position in ``pos`` (any shape, all real)."""
        return self.sentence_of[pos]

    @property
    def count(self) -> int:
        """Sentences with an id so far (the open one included)."""
        return self.open_id + 1

    def advance(self, ids: Tensor) -> tuple[int, list[tuple[int, int, int]]]:
        """Take a forward's tokens ``ids [1, T]``: (the open sentence's length before them, ``(t, sentence,
        length)`` for each token ``t`` that ends a sentence)."""
        before, ended = self.open_len, []
        tokens = ids[0].tolist()
        if self.positions + len(tokens) > len(self.sentence_of):
            more = max(len(self.sentence_of), len(tokens))
            self.sentence_of = torch.cat([self.sentence_of, self.sentence_of.new_zeros(more)])
        for t, token in enumerate(tokens):
            self.sentence_of[self.positions] = self.open_id
            self.positions += 1
            self.open_len += 1
            if token in self.policy.sentence_ends:
                ended.append((t, self.open_id, self.open_len))
                self.open_id += 1
                self.open_len = 0
        return before, ended

    def attends_all(self, ids: Tensor) -> bool:
        """Whether the next forward, of tokens ``ids [1, T]``, attends to every kept token: while the sentence being
        generated is at most ``length_threshold`` tokens long (the reference's rule; a sentence-ending token closes
        it first), and (kvpass) for a forward of several tokens."""
        if ids.shape[1] != 1:
            return True
        if int(ids[0, 0]) in self.policy.sentence_ends:
            return True
        return self.open_len + 1 <= self.policy.length_threshold


@dataclasses.dataclass(eq=False)
class SentenceLayer:
    """One layer's abstracts and lower-tier runs; the graph's inputs are views of the first tensors."""

    sentences: Sentences
    means: Tensor        # [1, H_kv, S, D] float32 each sentence's abstract (0 until it has one)
    starts: Tensor       # [1, H_kv, S] int64 the first retrievable lower-tier slot of each sentence
    lens: Tensor         # [1, H_kv, S] int64 its retrievable slots (0: none, or not ended yet)
    first: Tensor        # [H_kv, S] int64 the sentence's first lower-tier slot (-1: none yet)
    in_tier: Tensor      # [H_kv, S] int64 its tokens in the lower tier
    allowed: Tensor      # [H_kv, S] int64 how many of its tier tokens the reference may retrieve (its width less the
    #                      sink tokens it has; 0 for a sentence not ended, or generated longer than the width)
    q_sum: Tensor        # [1, H_q, D] float32 the open sentence's queries, summed
    k_sum: Tensor        # [1, H_kv, D] float32 the open sentence's keys, summed

    @classmethod
    def of_prefill(cls, sentences: Sentences, store_k: Tensor, store_pos: Tensor, tier: LowerTier,
                   n_query_heads: int, with_tier: bool = False) -> SentenceLayer:
        """After the prefill: the abstracts of the prompt's sentences over the kept tokens (device store and lower
        tier), the runs of each in the tier, the reference's per-sentence width and sink counts. The abstracts and
        runs live on the device, or (``with_tier``) beside the lower tier, whose side then ranks them."""
        policy = sentences.policy
        _, h, _, d = store_k.shape
        n = max(_FIRST_SENTENCES, sentences.count)
        used = tier.used
        keys = torch.cat([store_k.float().cpu(), tier.k[:, :, :used].float()], dim=2)[0]   # [H, N, D]
        pos = torch.cat([store_pos.cpu(), tier.pos[:, :, :used]], dim=2)[0]
        real = pos >= 0
        owner = torch.where(real, sentences.owner(pos.clamp(min=0)), n)                      # [H, N]; n: nowhere
        sums = torch.zeros(h, n + 1, d).scatter_add_(1, owner[..., None].expand(-1, -1, d), keys)
        counts = torch.zeros(h, n + 1).scatter_add_(1, owner, real.float())
        means = (sums / counts.clamp(min=1)[..., None])[:, :n].contiguous()
        # the reference's first `sinks` compressed slots: the device store's smallest positions
        store_pos = store_pos[0].cpu()
        ranked = torch.where(store_pos >= 0, store_pos, torch.iinfo(torch.int64).max).sort(dim=-1).values
        sinks = ranked[:, : policy.sinks]
        far = sinks == torch.iinfo(torch.int64).max
        sink_owner = torch.where(far, n, sentences.owner(sinks.masked_fill(far, 0)))
        sink_counts = torch.zeros(h, n + 1, dtype=torch.int64).scatter_add_(1, sink_owner, torch.ones_like(sink_owner))
        kept = int(real[0].sum())  # the reference's compressed length (every head keeps as many)
        sentences.cap = max(100, (kept // max(sentences.open_id, 1)) * 2 + 50)
        allowed = (sentences.cap - sink_counts[:, :n]).clamp(min=0)
        allowed[:, sentences.open_id:] = 0
        where = tier.k.device if with_tier else store_k.device
        layer = cls(sentences, means[None].to(where), torch.zeros(1, h, n, dtype=torch.int64, device=where),
                    torch.zeros(1, h, n, dtype=torch.int64, device=where),
                    torch.full((h, n), -1, dtype=torch.int64), torch.zeros(h, n, dtype=torch.int64), allowed,
                    torch.zeros(1, n_query_heads, d, device=store_k.device), torch.zeros(1, h, d,
                                                                                         device=store_k.device))
        layer._place(tier, 0)
        return layer

    @property
    def ended(self) -> int:
        """Sentences with an abstract: the prompt's and the generated ones that ended."""
        return self.sentences.open_id

    @property
    def nbytes(self) -> int:
        """Bytes kept for retrieval: abstracts and runs (the sentences' allocated room included), on the device or
        (``offload_attention``) beside the lower tier."""
        return sum(x.numel() * x.element_size() for x in (self.means, self.starts, self.lens))

    def inputs(self, attends_all: bool) -> list[Tensor]:
        """The graph's inputs: abstracts, runs, the open sentence's query sum and length, whether to skip retrieval."""
        device = self.q_sum.device  # (the count and the skip flag are read on the device)
        return [self.means, self.starts, self.lens, self.q_sum,
                torch.tensor([float(self.sentences.open_len)], device=device),
                torch.tensor([attends_all], device=device)]

    def advance(self, ended: list[tuple[int, int, int]], queries: Tensor, keys: Tensor, tier: LowerTier,
                tier_from: int) -> None:
        """After a forward continuing the cache, with ``queries [1, H_q, T, D]`` and new ``keys [1, H_kv, T, D]``
        (``ended``: :meth:`Sentences.advance`'s): the open sentence's sums, the abstract of each sentence ending here
        (the mean of all its keys), and the runs of the tokens the forward moved to the lower tier (from slot
        ``tier_from``)."""
        cap, start = self.sentences.cap, 0
        for t, sid, length in ended:
            self.k_sum += keys[:, :, start : t + 1].float().sum(dim=2)
            start = t + 1
            self._grow(sid + 1)
            self.means[:, :, sid] = self.k_sum / length
            self.allowed[:, sid] = cap if length <= cap else 0  # (the reference indexes all of it, or none)
            self.k_sum.zero_()
        self.k_sum += keys[:, :, start:].float().sum(dim=2)
        self.q_sum = (self.q_sum if not ended else torch.zeros_like(self.q_sum)) + queries[:, :, start:].float().sum(2)
        self._place(tier, tier_from)

    def _place(self, tier: LowerTier, tier_from: int) -> None:
        """Record the lower-tier slots ``[tier_from, used)`` in their sentences' runs; refresh what a step retrieves."""
        pos = tier.pos[0, :, tier_from:tier.used]                                           # [H, n]
        if pos.shape[-1]:
            self._grow(self.sentences.count)
            n = self.first.shape[1]
            real = pos >= 0
            owner = torch.where(real, self.sentences.owner(pos.clamp(min=0)), n)
            slot = torch.arange(tier_from, tier.used).expand_as(pos)
            first = torch.full((self.first.shape[0], n + 1), torch.iinfo(torch.int64).max)
            first.scatter_reduce_(1, owner, slot, reduce="amin")
            first = torch.where(first[:, :n] == torch.iinfo(torch.int64).max, -1, first[:, :n])
            self.first = torch.where(self.first < 0, first, self.first)
            counts = torch.zeros(self.first.shape[0], n + 1, dtype=torch.int64).scatter_add_(1, owner, real.long())
            self.in_tier += counts[:, :n]
        lens = torch.minimum(self.in_tier, self.allowed)
        starts = self.first.clamp(min=0)
        # the reference never retrieves compressed slot `sinks` (its filter is `slot > sinks`): the tier's slot 0
        at_zero = (self.first == 0) & (lens > 0)
        starts = torch.where(at_zero, 1, starts)
        lens = torch.where(at_zero, lens - 1, lens)
        self.starts.copy_(starts[None])
        self.lens.copy_(lens[None])

    def _grow(self, n: int) -> None:
        """Room for ``n`` sentences (doubling): the graph takes the sentence count as a symbolic size."""
        have = self.first.shape[1]
        if n <= have:
            return
        more = max(2 * have, n) - have
        pad = torch.nn.functional.pad
        self.means = pad(self.means, (0, 0, 0, more))
        self.starts, self.lens = pad(self.starts, (0, more)), pad(self.lens, (0, more))
        self.first = pad(self.first, (0, more), value=-1)
        self.in_tier, self.allowed = pad(self.in_tier, (0, more)), pad(self.allowed, (0, more))


def check_batch(ids: Tensor | None) -> None:
    """SentenceKV's runner keeps one row's sentences (the reference runs batch 1)."""
    if ids is None:
        raise UnsupportedGraph("kvpass: policy 'sentencekv' finds sentences in the token ids; call the model with "
                               "input_ids (not inputs_embeds)")
    if ids.shape[0] != 1:
        raise UnsupportedGraph(f"kvpass: policy 'sentencekv' runs one sequence at a time (batch 1, as the "
                               f"reference); got a batch of {ids.shape[0]}")


def _layers(plans, previous: dict) -> list:
    """The SentenceLayer of each layer a forward continues, from the states its stores carry."""
    layers = []
    for plan in plans:
        if not plan.retrieval_inputs:
            continue
        state = previous.get(plan.layer)
        if state is None or state.sentences is None:
            raise UnsupportedGraph(
                f"kvpass: policy 'sentencekv' continues a cache whose layer {plan.layer} it did not fill (no "
                "sentences, no lower tier): run the prompt through the compiled model first")
        layers.append(state.sentences)
    return layers


def attends_every_token(plans, previous: dict, ids: Tensor) -> bool:
    """Whether a forward continuing SentenceKV stores attends to every kept token (:meth:`Sentences.attends_all`);
    True for a first forward (it attends to its own tokens)."""
    layers = _layers(plans, previous)
    return layers[0].sentences.attends_all(ids) if layers else True


def sentence_inputs(plans, previous: dict, attends_all: bool) -> list[Tensor]:
    """The SentenceKV inputs of a forward continuing the stores (plan order; none for other forwards)."""
    return [x for layer in _layers(plans, previous) for x in layer.inputs(attends_all)]


def advance_sentences(policy: SentenceKV, plans, outs, n_outputs: int, stores: dict, previous: dict,
                      used_before: dict[int, int], ids: Tensor, retrieved: bool, with_tier: bool = False) -> None:
    """After a forward: a first one finds the prompt's sentences and each layer's abstracts (``with_tier``, option
    ``offload_attention``: kept beside the lower tier, whose side ranks them); one continuing the stores takes its
    tokens, queries and keys (the graph's outputs after the evicted slots) into them. Each layer's
    :class:`SentenceLayer` goes to its new store's state; bytes a retrieval moved count as moved."""
    from kvpass.runtime.state import store_state

    continued = _layers(plans, previous)
    if not continued:
        sentences = Sentences.of_prompt(policy, ids)
        for plan in plans:
            state = store_state(stores[plan.layer])
            if state is not None and state.tier is not None:
                state.sentences = SentenceLayer.of_prefill(sentences, stores[plan.layer], state.pos, state.tier,
                                                           plan.query_heads, with_tier)
        return
    _, ended = continued[0].sentences.advance(ids)
    extra = outs[n_outputs + 3 * len(plans) + 3 * sum(1 for p in plans if p.evicted_outputs):]
    layers = iter(continued)
    for i, plan in enumerate(p for p in plans if p.retrieval_inputs):
        layer = next(layers)
        state = store_state(stores[plan.layer])
        layer.advance(ended, extra[2 * i], extra[2 * i + 1], state.tier, used_before[plan.layer])
        state.sentences = layer
        if retrieved:  # the whole-tier part was empty (used 0: nothing sent), the step's traffic is the retrieval's
            state.tier.moved_bytes += plan.retrieval_bytes - plan.tier_query_bytes
