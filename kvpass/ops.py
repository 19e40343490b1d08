"""``kvpass::*`` custom ops: schema, fake (meta) implementation and pure-torch reference together.

The passes insert these ops around every attention site; the references define correctness (kernels
in ``kvpass.kernels`` are tested against them). Shapes, per layer:

* the candidates of a forward are ``N = C + T`` slots: the kept store (``C`` slots) followed by the
  ``T`` new tokens, keys/values ``[B, H_kv, N, D]`` (exactly what a DynamicCache ``cat`` produces);
* ``pos`` ``[B, H_kv, N]`` int64 holds each slot's logical position (``-1``: padding or empty slot);
* ``acc`` ``[B, H_kv, N]`` float32 is the policy's carried statistic.

All four ops are functional (no mutation), so graphs stay exportable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpass.policies import policy_from_spec

# Query rows processed at once by the reference attention: bounds its [rows, N] temporaries.
_QUERY_CHUNK = 512


@torch.library.custom_op("kvpass::extend_meta", mutates_args=())
def extend_meta(pos: Tensor, acc: Tensor, seen: Tensor, new_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Append ``T`` new tokens to the store's metadata.

    pos/acc: ``[B, H_kv, C]``; seen: ``[B]`` int64, real tokens consumed so far; new_valid: ``[B, T]``
    bool (False for left padding). New tokens get positions ``seen + (running count of valid tokens)``;
    returns ``(pos_all [B,H_kv,C+T], acc_all [B,H_kv,C+T], seen_after [B])``.
    """
    b, h, _ = pos.shape
    t = new_valid.shape[1]
    valid = new_valid.to(torch.int64)
    new_pos = seen[:, None] + valid.cumsum(dim=1) - 1
    new_pos = torch.where(new_valid, new_pos, torch.full_like(new_pos, -1))
    pos_all = torch.cat([pos, new_pos[:, None, :].expand(b, h, t)], dim=2)
    acc_all = torch.cat([acc, acc.new_zeros(b, h, t)], dim=2)
    return pos_all, acc_all, seen + valid.sum(dim=1)


@extend_meta.register_fake
def _(pos, acc, seen, new_valid):
    b, h, c = pos.shape
    t = new_valid.shape[1]
    return pos.new_empty(b, h, c + t), acc.new_empty(b, h, c + t), seen.new_empty(seen.shape)


def attention_mask(pos: Tensor, n_new: int, rows: slice, window: int = 0) -> Tensor:
    """``[B, H_kv, len(rows), N]`` bool: new query ``i`` sees valid store slots and new keys ``j <= i``
    (and, with a sliding ``window``, only keys less than ``window`` positions behind it).

    A query with nothing to see (a padding query) sees itself, so no softmax row is empty.
    """
    n = pos.shape[-1]
    past = n - n_new
    q_idx = torch.arange(n_new, device=pos.device)[rows, None]
    k_idx = torch.arange(n, device=pos.device)[None, :]
    causal = (k_idx < past) | (k_idx - past <= q_idx)
    allowed = (pos >= 0)[:, :, None, :] & causal
    if window > 0:
        q_pos = pos[:, :, past:][:, :, rows]
        allowed = allowed & (q_pos[..., None] - pos[:, :, None, :] < window)
    own = k_idx - past == q_idx
    return allowed | (own & ~allowed.any(dim=-1, keepdim=True))


@torch.library.custom_op("kvpass::attend", mutates_args=())
def attend(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str, window: int
) -> tuple[Tensor, Tensor]:
    """Attention of ``T`` new queries over ``N`` candidate slots, plus the weights policies score with.

    q: ``[B, H_q, T, D]``; k/v: ``[B, H_kv, N, D]`` (GQA when ``H_q > H_kv``); pos as in the module doc;
    window: sliding-window length of the layer, 0 for full attention.
    Returns ``(out [B, H_q, T, D], obs [B, H_q, N])`` where ``obs`` is the float32 softmax weights of the
    last ``policy.n_obs(T)`` queries summed over those queries (``[B, H_q, 0]`` if the policy reads none).
    """
    b, hq, t, d = q.shape
    rule = policy_from_spec(policy)
    n_obs = rule.n_obs(t) if rule.needs_obs else 0
    hkv, n = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    obs = torch.zeros(b, hq, n if n_obs > 0 else 0, dtype=torch.float32, device=q.device)
    first_obs = t - n_obs
    for start in range(0, t, _QUERY_CHUNK):
        rows = slice(start, min(start + _QUERY_CHUNK, t))
        mask = attention_mask(pos, t, rows, window).repeat_interleave(group, dim=1)
        qc = q[:, :, rows]
        if rows.stop <= first_obs:
            out[:, :, rows] = torch.nn.functional.scaled_dot_product_attention(
                qc, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
            continue
        kr = k.repeat_interleave(group, dim=1)
        vr = v.repeat_interleave(group, dim=1)
        logits = (qc.float() @ kr.float().transpose(-1, -2)) * scale
        weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out[:, :, rows] = (weights.to(v.dtype) @ vr).to(q.dtype)
        obs += weights[:, :, max(first_obs - start, 0) :].sum(dim=2)
    return out, obs


@attend.register_fake
def _(q, k, v, pos, scale, policy, window):
    b, hq = q.shape[:2]
    n = k.shape[2] if policy_from_spec(policy).needs_obs else 0
    return torch.empty_like(q), q.new_empty(b, hq, n, dtype=torch.float32)


@torch.library.custom_op("kvpass::score", mutates_args=())
def score(
    policy: str, obs: Tensor, k: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int
) -> tuple[Tensor, Tensor]:
    """Run the policy given by its JSON ``policy`` spec; returns ``(keep, acc)`` ``[B, H_kv, N]`` float32."""
    keep, acc_out = policy_from_spec(policy).score(obs, k, pos, acc, n_new, budget)
    # clones: a custom op's outputs may not alias its inputs or each other (TOVA returns keep twice)
    return keep.float().clone(), acc_out.float().clone()


@score.register_fake
def _(policy, obs, k, pos, acc, n_new, budget):
    shape = pos.shape
    return pos.new_empty(shape, dtype=torch.float32), pos.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("kvpass::compact", mutates_args=())
def compact(
    k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int, window: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the ``budget`` highest-``keep`` slots of each (batch, kv-head), in position order.

    Padding/empty slots (``pos < 0``) rank below every real token. The result always has
    ``capacity >= budget`` slots (static shapes for the next forward): slots beyond the kept tokens,
    or beyond the real tokens available, are empty (``pos = -1``, zero K/V). With a sliding
    ``window``, tokens no future query can see (``window - 1`` or more behind the newest) are dropped.
    """
    n = k.shape[2]
    dead = pos < 0
    if window > 0:
        dead = dead | (pos <= pos.amax(dim=-1, keepdim=True) - (window - 1))
    rank = keep.masked_fill(dead, float("-inf"))
    n_keep = min(budget, n)
    idx = rank.topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    kept_pos = pos.gather(2, idx).masked_fill(rank.gather(2, idx) == float("-inf"), -1)
    gather_idx = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    k_out, v_out, acc_out = k.gather(2, gather_idx), v.gather(2, gather_idx), acc.gather(2, idx)
    pad = capacity - n_keep
    if pad > 0:
        k_out = torch.nn.functional.pad(k_out, (0, 0, 0, pad))
        v_out = torch.nn.functional.pad(v_out, (0, 0, 0, pad))
        kept_pos = torch.nn.functional.pad(kept_pos, (0, pad), value=-1)
        acc_out = torch.nn.functional.pad(acc_out, (0, pad))
    k_out = k_out.masked_fill((kept_pos < 0)[..., None], 0)
    v_out = v_out.masked_fill((kept_pos < 0)[..., None], 0)
    return k_out, v_out, kept_pos, acc_out


@compact.register_fake
def _(k, v, pos, keep, acc, budget, capacity, window):
    b, h, _, d = k.shape
    return (k.new_empty(b, h, capacity, d), v.new_empty(b, h, capacity, v.shape[-1]),
            pos.new_empty(b, h, capacity), acc.new_empty(b, h, capacity))
