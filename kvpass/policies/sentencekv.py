"""SentenceKV: sentence-level semantic retrieval over a tiered KV store.

Zhu et al., "SentenceKV: Efficient LLM Inference via Sentence-Level Semantic KV Caching" (arXiv:2504.00970);
rules read from the authors' code (zzbright1998/SentenceKV, ``models/sentencekv/custom_llama_sentencekv.py`` and
the RULER/LongBench runners). At prefill, SnapKV (observation ``window`` 32, max pooling with ``kernel_size`` 7)
keeps ``semantic_factor x budget`` tokens (the runners' factor 3); the prompt is cut into sentences after
punctuation tokens (``sentence_ends``: :func:`kvpass.sentence_end_ids` converts the reference's list); each
sentence's abstract is, per layer and head, the mean of its kept keys. Every decode step attends to the first
``sinks`` kept tokens, the ``recent`` newest ones and the tokens of the sentences whose abstracts score highest
against the mean query of the sentence being generated, up to ``budget`` tokens in all; while that sentence is at
most ``length_threshold`` tokens long the step attends to every kept token instead.

In kvpass the device store holds the sinks and the newest ``recent - 1`` tokens (the step's own token makes
``recent``): this policy's :meth:`score` is that store's rule. The other kept tokens live in the lower tier
(option ``offload``), the abstracts beside the device store (:mod:`kvpass.runtime.sentences`), and retrieval,
gather and attention are graph nodes (:mod:`kvpass.ops.tier`). Departures from the reference are listed in the
README ("SentenceKV: departures").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from kvpass.errors import OptionError
from kvpass.policies.base import Policy, check_window_and_kernel, zeros_like_scores
from kvpass.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class SentenceKV(Policy):
    sinks: int = 32                  # the reference's start_budget
    recent: int = 32                 # the reference's recent_budget (the step's own token included)
    window: int = 32                 # SnapKV's observation window at prefill
    kernel_size: int = 7             # SnapKV's max-pooling kernel at prefill
    semantic_factor: float = 3.0     # tokens kept at prefill: semantic_factor x budget; 0 keeps every token
    length_threshold: int = 1        # a sentence this short (or shorter) so far: attend to every kept token
    sentence_ends: tuple[int, ...] = ()  # token ids that end a sentence

    name = "sentencekv"
    needs_obs = False
    retrieves = True  # reads its lower tier back by retrieval (option offload without offload_attention is whole)

    def __post_init__(self) -> None:
        check_window_and_kernel(self.window, self.kernel_size)
        factor = self.semantic_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
            raise OptionError(f"kvpass: option 'semantic_factor' of policy 'sentencekv' must be a number >= 0 "
                              f"(tokens kept at prefill = semantic_factor x budget; 0 keeps all), got {factor!r}")
        ends = self.sentence_ends
        if (not isinstance(ends, list | tuple) or not ends
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ends)):
            raise OptionError(
                "kvpass: policy 'sentencekv' needs option 'sentence_ends', the token ids that end a sentence (a "
                f"non-empty list of ints >= 0; kvpass.sentence_end_ids(tokenizer) gives the reference's), got {ends!r}")
        object.__setattr__(self, "sentence_ends", tuple(ends))
        object.__setattr__(self, "semantic_factor", float(factor))

    def layer_budget(self, total: int, layer: int, n_layers: int, prompt_len: int | None = None) -> int:
        """The device store: sinks and the newest ``recent - 1`` tokens; ``total`` also counts the retrieval slots."""
        return self.sinks + self.recent - 1

    def retrieval_slots(self, total: int) -> int:
        """Tokens a step retrieves from the lower tier: the budget less the sinks and the recent window."""
        slots = total - self.sinks - self.recent
        if slots < 1:
            raise OptionError(f"kvpass: policy 'sentencekv' attends 'budget' tokens per step: {self.sinks} sinks, "
                              f"{self.recent} recent and the retrieved rest, so budget must exceed "
                              f"{self.sinks + self.recent}; got {total!r}")
        return slots

    def semantic_budget(self, total: int) -> int:
        """Tokens SnapKV keeps at prefill (0: every token)."""
        return int(total * self.semantic_factor)

    def prefill_policy(self) -> SnapKV:
        """The reference's prefill compression."""
        return SnapKV(window=self.window, kernel_size=self.kernel_size, pooling="max")

    def score(self, obs: Tensor, keys: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int):
        """The first ``sinks`` real slots by position (the reference's first compressed slots), then by recency."""
        real = pos >= 0
        k = torch.sym_min(self.sinks, pos.shape[-1])
        far = torch.iinfo(torch.int64).max
        kth = torch.where(real, pos, far).topk(k, dim=-1, largest=False).values[..., -1:]
        return torch.where(real & (pos <= kth), float("inf"), pos.float()), zeros_like_scores(pos)


def sentence_end_ids(tokenizer) -> list[int]:
    """The reference's sentence-ending tokens (``. ! ? ...``, blank lines, CJK stops) as ``tokenizer``'s ids, by
    ``convert_tokens_to_ids`` as the reference converts them; strings that are no token of the vocabulary are left
    out (the reference would map them to the unknown token)."""
    strings = [".", "!", "?", ". ", "! ", "? ", "...", "\n\n", "\n\n\n", "。", "！", "？", "。。"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(s) for s in strings]
    return sorted({i for i in ids if i is not None and i != unknown})
