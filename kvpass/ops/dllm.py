"""``kvpass::elastic_attend``: the attention of one diffusion-LM layer under Elastic-Cache.

Schema, fake implementation and pure-torch reference together (as in :mod:`kvpass.ops.kv`). Shapes,
per layer, for a canvas of ``N`` positions of which ``Q`` rows are run this step:

* ``q, k, v`` ``[B, H, Q, D]``: the rows' queries/keys/values (after RoPE);
* ``rows`` ``[Q]`` int64: their canvas positions (may repeat a position: padding rows are copies of a
  real row, so writing them twice writes the same values);
* ``k_cache, v_cache, q_cache`` ``[B, H, N, D]``: every position's key/value/query, as last computed;
* ``track`` ``[T]`` int64 canvas positions of the tracked (most-attended) tokens, all among ``rows``;
  ``track_weight`` ``[T]`` float, 0 for padding slots;
* ``window`` ``[W]`` int64: indices *into the Q rows* of the sliding window of masked positions;
  ``window_weight`` ``[W]`` float, 0 for padding slots;
* ``excluded`` ``[N]`` bool: positions that cannot be tracked (still masked).

Returns ``(out [B,H,Q,D], k_cache', v_cache', q_cache', sim [2], track_score [N])``: the rows'
attention output over the updated caches (bidirectional, no mask), the caches with the rows
written, the drift statistics ``sim`` and ``track_score``: attention received by each position from
the window rows (summed over batch, heads and rows), ``-1`` where ``excluded``. The op is
functional (no mutation), so graphs that use it stay exportable.

``sim`` compares each tracked token's attention probabilities before (old query over old keys,
``A_old [B,H,T,N]``) and after (new query over updated keys, ``A_new``), in two ways, indexed by
:data:`DRIFT_STATISTICS` (both 1.0 when nothing is tracked):

* ``sim[0]``, ``"heads"`` — the reference implementation's (``LLaDABlock.attention`` in
  VILA-Lab/Elastic-Cache ``llada/model/modeling_llada.py``: ``F.cosine_similarity(past_att_weight,
  att_weight, dim=1).mean()``): the cosine across the **heads** axis for every (batch, tracked token,
  key), ``torch``'s ``cosine_similarity`` arithmetic (each norm clamped below at ``1e-8``, so a key no
  head attends to counts as cosine ~0), averaged over batch, tracked tokens and keys;
* ``sim[1]``, ``"keys"`` — kvpass's earlier statistic (a departure): the cosine across the **keys**
  (each head's attention row) for every (batch, head, tracked token), averaged over batch, heads and
  tracked tokens.

Padding tracked slots (``track_weight`` 0) are left out of both means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# what ``sim[i]`` of ``kvpass::elastic_attend`` measures: the cosine across heads (the reference's) or across keys
DRIFT_STATISTICS = ("heads", "keys")


def _attention_rows(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


def elastic_attend_reference(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor,
                             q_cache: Tensor, track: Tensor, track_weight: Tensor, window: Tensor,
                             window_weight: Tensor, excluded: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                               Tensor, Tensor]:
    scale = q.shape[-1] ** -0.5
    k_new = k_cache.index_copy(2, rows, k)
    v_new = v_cache.index_copy(2, rows, v)
    q_new = q_cache.index_copy(2, rows, q)
    out = F.scaled_dot_product_attention(q, k_new, v_new)
    # drift test on the tracked tokens: their attention row last time vs now
    n_track = track.shape[0]
    before = _attention_rows(q_cache.index_select(2, track), k_cache, scale)
    # one product serves the tracked rows (after) and the window rows
    probe = _attention_rows(torch.cat([q_new.index_select(2, track), q.index_select(2, window)], dim=2), k_new, scale)
    after, win = probe[:, :, :n_track], probe[:, :, n_track:]              # [B, H, T, N], [B, H, W, N]
    w = track_weight.to(before.dtype)
    n_batch, n_heads, _, n_keys = before.shape
    cos_heads = F.cosine_similarity(before, after, dim=1)                  # [B, T, N]: the reference's
    cos_keys = F.cosine_similarity(before, after, dim=-1)                  # [B, H, T]: kvpass's earlier one
    sims = torch.stack([(cos_heads * w[:, None]).sum() / (n_batch * n_keys),
                        (cos_keys * w).sum() / (n_batch * n_heads)])
    denom = w.sum()
    sim = torch.where(denom > 0, sims / denom.clamp_min(1e-12), torch.ones_like(sims))
    # attention the window rows pay to every position picks the next tracked token
    score = (win * window_weight.to(win.dtype)[:, None]).sum(dim=(0, 1, 2))
    score = torch.where(excluded, torch.full_like(score, -1.0), score)
    # contiguous outputs, as the fake implementation promises (compiled graphs check strides)
    return out.contiguous(), k_new.contiguous(), v_new.contiguous(), q_new.contiguous(), sim, score.contiguous()


elastic_attend = torch.library.custom_op("kvpass::elastic_attend", mutates_args=())(elastic_attend_reference)


@elastic_attend.register_fake
def _(q, k, v, rows, k_cache, v_cache, q_cache, track, track_weight, window, window_weight, excluded):
    return (q.new_empty(q.shape), k_cache.new_empty(k_cache.shape), v_cache.new_empty(v_cache.shape),
            q_cache.new_empty(q_cache.shape), q.new_empty(len(DRIFT_STATISTICS)),
            q.new_empty(k_cache.shape[2]))


REFERENCES = {torch.ops.kvpass.elastic_attend.default: elastic_attend_reference}
