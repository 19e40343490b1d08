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

# Query rows processed at once by the reference attention: bounds its [rows, N] temporaries (at most
# _QUERY_CHUNK rows, and about _CHUNK_ELEMENTS weights per kv head, so a long store shrinks the chunk).
_QUERY_CHUNK = 512
_CHUNK_ELEMENTS = 2**20


def extend_meta_reference(pos: Tensor, acc: Tensor, seen: Tensor, new_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


extend_meta = torch.library.custom_op("kvpass::extend_meta", mutates_args=())(extend_meta_reference)


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


def attend_reference(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str, window: int
) -> tuple[Tensor, Tensor]:
    """Attention of ``T`` new queries over ``N`` candidate slots, plus the weights policies score with.

    q: ``[B, H_q, T, D]``; k/v: ``[B, H_kv, N, D]`` (GQA when ``H_q > H_kv``); pos as in the module doc;
    window: sliding-window length of the layer, 0 for full attention.
    Returns ``(out [B, H_q, T, D], obs [B, H_q, N])`` where ``obs`` is the float32 softmax weights of the
    last ``policy.n_obs(T)`` queries summed (or, for a policy with ``obs_reduce == "max"``, maximized) over
    those queries (``[B, H_q, 0]`` if the policy reads none).
    """
    b, hq, t, d = q.shape
    rule = policy_from_spec(policy)
    n_obs = rule.n_obs(t) if rule.needs_obs else 0
    hkv, n = k.shape[1], k.shape[2]
    group = hq // hkv
    # GQA without copying K/V: query heads j*group..(j+1)*group-1 share kv head j (HF's repeat_kv order),
    # so fold each group into the query axis: [B, H_kv, group * rows, D] against [B, H_kv, N, D].
    qg = q.view(b, hkv, group, t, d)
    chunks: list[Tensor] = []
    obs = torch.zeros(b, hkv, group, n if n_obs > 0 else 0, dtype=torch.float32, device=q.device)
    first_obs = t - n_obs
    # chunks never straddle first_obs: only observed queries take the explicit-weights path
    rows = max(16, min(_QUERY_CHUNK, _CHUNK_ELEMENTS // (group * n))) if isinstance(n, int) else _QUERY_CHUNK
    bounds = [*range(0, first_obs, rows), *range(first_obs, t, rows), t]
    if n == t and window == 0 and first_obs > 0 and not torch.compiler.is_compiling() and bool((pos >= 0).all()):
        # a prefill with no padding is plain causal attention: one fused SDPA call for the unobserved
        # queries (HF's own kernel) instead of masked chunks
        head = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, :first_obs], k[:, :, :first_obs], v[:, :, :first_obs], is_causal=True, scale=scale,
            enable_gqa=True)
        chunks.append(head.reshape(b, hkv, group, first_obs, d))
        bounds = [*range(first_obs, t, rows), t]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):  # functional: also serves as a decomposition
        rows = slice(start, stop)
        r = rows.stop - rows.start
        mask = attention_mask(pos, t, rows, window)[:, :, None].expand(b, hkv, group, r, n).reshape(b, hkv, -1, n)
        qc = qg[:, :, :, rows].reshape(b, hkv, group * r, d)
        if rows.stop <= first_obs:
            chunk = torch.nn.functional.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale)
        else:
            logits = (qc.float() @ k.float().transpose(-1, -2)) * scale
            weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            chunk = (weights.to(v.dtype) @ v).to(q.dtype)
            observed = weights.view(b, hkv, group, r, n)[:, :, :, max(first_obs - start, 0) :]
            if rule.obs_reduce == "max":
                obs = torch.maximum(obs, observed.amax(dim=3))
            else:
                obs = obs + observed.sum(dim=3)
        chunks.append(chunk.view(b, hkv, group, r, -1))
    out = torch.cat(chunks, dim=3) if len(chunks) > 1 else chunks[0]
    return out.reshape(b, hq, t, d), obs.view(b, hq, -1)


attend = torch.library.custom_op("kvpass::attend", mutates_args=())(attend_reference)


@attend.register_fake
def _(q, k, v, pos, scale, policy, window):
    b, hq = q.shape[:2]
    n = k.shape[2] if policy_from_spec(policy).needs_obs else 0
    return q.new_empty(q.shape), q.new_empty(b, hq, n, dtype=torch.float32)  # contiguous, like the reference


def score_reference(
    policy: str, obs: Tensor, k: Tensor, pos: Tensor, acc: Tensor, n_new: int, budget: int
) -> tuple[Tensor, Tensor]:
    """Run the policy given by its JSON ``policy`` spec; returns ``(keep, acc)`` ``[B, H_kv, N]`` float32."""
    keep, acc_out = policy_from_spec(policy).score(obs, k, pos, acc, n_new, budget)
    # clones: a custom op's outputs may not alias its inputs or each other (TOVA returns keep twice)
    return keep.float().clone(), acc_out.float().clone()


score = torch.library.custom_op("kvpass::score", mutates_args=())(score_reference)


@score.register_fake
def _(policy, obs, k, pos, acc, n_new, budget):
    shape = pos.shape
    return pos.new_empty(shape, dtype=torch.float32), pos.new_empty(shape, dtype=torch.float32)


# Evicting at most this many slots (a decode step) avoids sorting the whole store.
_FEW_EVICTIONS = 8


def kept_indices(rank: Tensor, n_keep: int) -> Tensor:
    """Indices (ascending) of the ``n_keep`` highest-``rank`` slots per row of ``[B, H, N]`` (ties: any valid choice).

    Decode evicts only a few slots: find those with ``argmin`` (one) or a small ``topk`` and shift
    ``arange(n_keep)`` past each (in ascending order) instead of sorting ``N`` scores twice.
    """
    n = rank.shape[-1]
    n_evict = n - n_keep
    if n_evict > _FEW_EVICTIONS:
        return rank.sort(dim=-1, descending=True, stable=True).indices[..., :n_keep].sort(dim=-1).values
    idx = torch.arange(n_keep, device=rank.device).expand(*rank.shape[:-1], n_keep)
    if n_evict == 0:
        return idx.contiguous()
    if n_evict == 1:  # a decode step: argmin is a reduction Inductor fuses; topk and sort are library calls
        evicted = rank.argmin(dim=-1, keepdim=True)
    else:
        evicted = rank.topk(n_evict, dim=-1, largest=False).indices.sort(dim=-1).values
    for i in range(n_evict):
        idx = idx + (idx >= evicted[..., i : i + 1]).to(idx.dtype)
    return idx


def gather_slots(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, h, idx[b, h, i], :]`` as whole-row copies (``gather`` with an expanded index is ~10x slower)."""
    b, h, n, d = x.shape
    flat = (idx + torch.arange(b * h, device=x.device).view(b, h, 1) * n).reshape(-1)
    return x.reshape(b * h * n, d).index_select(0, flat).view(b, h, -1, d)


def compact_reference(
    k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int, window: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the ``budget`` highest-``keep`` slots of each (batch, kv-head), in position order.

    Padding/empty slots (``pos < 0``) rank below every real token. The result always has
    ``capacity >= budget`` slots (static shapes for the next forward): slots beyond the kept tokens,
    or beyond the real tokens available, are empty (``pos = -1``; their K/V are never attended). With a sliding
    ``window``, tokens no future query can see (``window - 1`` or more behind the newest) are dropped.
    """
    n = k.shape[2]
    dead = pos < 0
    if window > 0:
        dead = dead | (pos <= pos.amax(dim=-1, keepdim=True) - (window - 1))
    rank = keep.masked_fill(dead, float("-inf"))
    n_keep = min(budget, n)
    idx = kept_indices(rank, n_keep)
    kept_pos = pos.gather(2, idx).masked_fill(dead.gather(2, idx), -1)
    k_out, v_out, acc_out = gather_slots(k, idx), gather_slots(v, idx), acc.gather(2, idx)
    pad = capacity - n_keep
    if pad > 0:  # empty slots: never attended (pos = -1), so their K/V content is irrelevant
        k_out = torch.nn.functional.pad(k_out, (0, 0, 0, pad))
        v_out = torch.nn.functional.pad(v_out, (0, 0, 0, pad))
        kept_pos = torch.nn.functional.pad(kept_pos, (0, pad), value=-1)
        acc_out = torch.nn.functional.pad(acc_out, (0, pad))
    return k_out, v_out, kept_pos, acc_out


compact = torch.library.custom_op("kvpass::compact", mutates_args=())(compact_reference)


@compact.register_fake
def _(k, v, pos, keep, acc, budget, capacity, window):
    b, h, _, d = k.shape
    return (k.new_empty(b, h, capacity, d), v.new_empty(b, h, capacity, v.shape[-1]),
            pos.new_empty(b, h, capacity), acc.new_empty(b, h, capacity))


# op overload → its pure-torch reference; lowering passes these to AOTAutograd as decompositions so
# Inductor compiles (and fuses) the reference code instead of calling the opaque op.
REFERENCES = {
    torch.ops.kvpass.extend_meta.default: extend_meta_reference,
    torch.ops.kvpass.attend.default: attend_reference,
    torch.ops.kvpass.score.default: score_reference,
    torch.ops.kvpass.compact.default: compact_reference,
}
