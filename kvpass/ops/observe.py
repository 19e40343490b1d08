"""``kvpass::context_scores``: how much an observation prompt attends to each context slot (EpiCache's scores).

EpiCache (Kim et al., arXiv:2509.17396; apple/ml-epicache ``KVScore._get_score_flatten``) scores the cache by running
the episode's patched prompt over it and normalizing each patched query's attention with a softmax over the **context
keys only** (the store and the block, not the patched prompt's own keys), then taking the largest weight any query of
a slot's GQA group gives it. The attention op's own softmax also spans the patched prompt's keys, so the block graph
asks this op for the scores instead; the outputs the observation tokens carry to the next layer stay those of the
ordinary causal attention, as in the reference's forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpass.ops.kv import soft_capped

_CHUNK_ELEMENTS = 2**22  # weights per chunk of query rows

REDUCTIONS = ("max", "sum")


def context_scores_reference(q: Tensor, k: Tensor, context: Tensor, rows: Tensor, scale: float, reduce: str,
                             head: Tensor | None = None, softcap: float = 0.0) -> Tensor:
    """Softmax weights of the observation queries over the context slots, reduced over the queries.

    q: ``[B, H_q, M, D]`` the observation queries (after RoPE); k: ``[B, H_kv, N, D]`` the candidates, the last ``M``
    of them the observation tokens themselves (never scored, so never read);
    context: ``[B, H_kv, N]`` bool, the slots scored (real store and block tokens; not padding, empty slots or the
    observation tokens); rows: ``[B, M]`` bool, the real observation queries (a shorter prompt in a batch is padded);
    reduce: ``"max"`` (EpiCache) or ``"sum"`` over the queries; head: ``[B, H_kv, N]`` int64 kv head of each slot for a
    packed store (``head_budgets="adaptive"``: query head group ``g`` reads the slots of head ``g``), else None.
    Returns ``[B, H_q, N]`` float32 laid out like :func:`kvpass.ops.kv.attend_reference`'s ``obs`` (for a packed store:
    entry ``(r * group + i, j)`` is query head ``i`` of slot ``(r, j)``'s own group). A query row with no context slot
    (a padded row, or no context yet) contributes 0.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"kvpass: context_scores reduce must be one of {REDUCTIONS}, got {reduce!r}")
    b, hq, m, d = q.shape
    hkv, total = k.shape[1], k.shape[2]
    n = total - m  # the store and the block: the candidates that can be context
    k, context = k[:, :, :n], context[:, :, :n]
    head = None if head is None else head[:, :, :n]
    group = hq // hkv
    qg = q.float().view(b, hkv, group, m, d)
    if head is None:
        keys, allowed = k.float(), context[:, :, None, :]
    else:  # every kv head's queries read all H_kv * N packed slots, masked to their own head's
        keys = k.float().reshape(b, 1, hkv * n, d)
        own = head.reshape(b, 1, hkv * n) == torch.arange(hkv, device=q.device).view(1, hkv, 1)
        allowed = (own & context.reshape(b, 1, hkv * n))[:, :, None, :]
    cols = allowed.shape[-1]
    # query rows at a time: bounds the [B, H_kv, group * rows, cols] temporaries (one chunk when traced symbolically)
    step = max(1, _CHUNK_ELEMENTS // (b * hkv * group * cols)) if isinstance(cols, int) and isinstance(m, int) else m
    obs = None
    for start in range(0, m, step) if isinstance(m, int) else [0]:
        r = min(step, m - start) if isinstance(m, int) else m
        chunk = qg[:, :, :, start : start + r].reshape(b, hkv, group * r, d)
        logits = soft_capped((chunk @ keys.transpose(-1, -2)) * scale, softcap).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)                         # rows with no context: 0
        weights = weights.view(b, hkv, group, r, cols) * rows[:, start : start + r].view(b, 1, 1, r, 1)
        part = weights.amax(dim=3) if reduce == "max" else weights.sum(dim=3)          # [B, H_kv, group, cols]
        obs = part if obs is None else torch.maximum(obs, part) if reduce == "max" else obs + part
    if obs is None:  # no observation queries
        obs = q.new_zeros(b, hkv, group, cols, dtype=torch.float32)
    if head is None:
        obs = obs.reshape(b, hq, n)
    else:  # weights of slot (r, j) from its own head's group, laid out as attend_packed's obs
        own_head = head.reshape(b, 1, 1, hkv, n).expand(b, 1, group, hkv, n)
        obs = obs.view(b, hkv, group, hkv, n).gather(1, own_head).squeeze(1).transpose(1, 2).reshape(b, hq, n)
    return torch.nn.functional.pad(obs, (0, m)).contiguous()  # the observation tokens score 0


context_scores = torch.library.custom_op("kvpass::context_scores", mutates_args=())(context_scores_reference)


@context_scores.register_fake
def _(q, k, context, rows, scale, reduce, head=None, softcap=0.0):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)
