"""``kvpass::*`` custom ops: schema, fake (meta) implementation and pure-torch reference together.

The passes insert these ops around every attention site; the references define correctness (kernels
in ``kvpass.kernels`` are tested against them). Shapes, per layer:

* the candidates of a forward are ``N = C + T`` slots: the kept store (``C`` slots) followed by the
  ``T`` new tokens, keys/values ``[B, H_kv, N, D]`` (exactly what a DynamicCache ``cat`` produces);
* ``pos`` ``[B, H_kv, N]`` int64 holds each slot's logical position (``-1``: padding or empty slot);
* ``acc`` ``[B, H_kv, N]`` float32 is the policy's carried statistic.

All ops are functional (no mutation), so graphs stay exportable. Head-adaptive stores (packed) have their own
three ops, below.
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


def attention_mask(pos: Tensor, n_new: int, rows: slice, window: int = 0) -> tuple[Tensor, Tensor]:
    """``[B, H_kv, len(rows), N]`` bool: new query ``i`` sees valid store slots and new keys ``j <= i``
    (and, with a sliding ``window``, only keys less than ``window`` positions behind it); and ``[B, H_kv,
    len(rows)]`` bool: whether the query sees any key by that rule.

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
    sees = allowed.any(dim=-1)
    return allowed | (own & ~sees[..., None]), sees


def soft_capped(logits: Tensor, softcap: float) -> Tensor:
    """Gemma-2's logit soft cap ``softcap * tanh(logits / softcap)``; ``softcap == 0``: the logits unchanged."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def sink_softmax(logits: Tensor, sinks: Tensor | None, real_rows: Tensor | None) -> Tensor:
    """Softmax of masked ``logits [..., rows, N]``; with ``sinks [..., rows]`` each row's denominator also gets
    ``exp(sink)`` (a learned attention sink: GPT-OSS's extra logit column, dropped after the softmax; GraniteSWA's
    ``sigmoid(lse - sink)`` output scale is the same). Rows that are not ``real_rows`` (a padding query seeing only
    itself) take no sink, so their output is their own value."""
    if sinks is None:
        return logits.softmax(dim=-1)
    sink = sinks.float().masked_fill(~real_rows, float("-inf"))[..., None]
    return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]


def attend_reference(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, policy: str, window: int, softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``T`` new queries over ``N`` candidate slots, plus the weights policies score with.

    q: ``[B, H_q, T, D]``; k: ``[B, H_kv, N, D]``, v: ``[B, H_kv, N, D_v]`` (GQA when ``H_q > H_kv``; MLA's
    values may be narrower than its keys); pos as in the module doc;
    window: sliding-window length of the layer, 0 for full attention; softcap: the logits become
    ``softcap * tanh(logits / softcap)`` before masking (Gemma-2), 0 for none; sinks: ``None`` or a learned
    attention-sink logit per query row, broadcastable to ``[B, H_q, T]`` (:func:`sink_softmax`).
    Returns ``(out [B, H_q, T, D_v], obs [B, H_q, N])`` where ``obs`` is the float32 softmax weights of the
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
    sink_rows = None if sinks is None else sinks.expand(b, hq, t).reshape(b, hkv, group, t)
    chunks: list[Tensor] = []
    obs = torch.zeros(b, hkv, group, n if n_obs > 0 else 0, dtype=torch.float32, device=q.device)
    first_obs = t - n_obs
    plain = not softcap and sinks is None  # SDPA computes these rows when no weights are needed
    # chunks never straddle first_obs: only observed queries take the explicit-weights path
    rows = max(16, min(_QUERY_CHUNK, _CHUNK_ELEMENTS // (group * n))) if isinstance(n, int) else _QUERY_CHUNK
    bounds = [*range(0, first_obs, rows), *range(first_obs, t, rows), t]
    if n == t and window == 0 and plain and first_obs > 0 and not torch.compiler.is_compiling() and bool(
        (pos >= 0).all()
    ):
        # a prefill with no padding is plain causal attention: one fused SDPA call for the unobserved
        # queries (HF's own kernel) instead of masked chunks
        head = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, :first_obs], k[:, :, :first_obs], v[:, :, :first_obs], is_causal=True, scale=scale,
            enable_gqa=True)
        chunks.append(head.reshape(b, hkv, group, first_obs, -1))
        bounds = [*range(first_obs, t, rows), t]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):  # functional: also serves as a decomposition
        rows = slice(start, stop)
        r = rows.stop - rows.start
        mask, sees = attention_mask(pos, t, rows, window)
        mask = mask[:, :, None].expand(b, hkv, group, r, n).reshape(b, hkv, -1, n)
        qc = qg[:, :, :, rows].reshape(b, hkv, group * r, d)
        if rows.stop <= first_obs and plain:
            chunk = torch.nn.functional.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale)
        else:
            logits = soft_capped((qc.float() @ k.float().transpose(-1, -2)) * scale, softcap)
            real = sees[:, :, None].expand(b, hkv, group, r).reshape(b, hkv, -1)
            sink = None if sink_rows is None else sink_rows[:, :, :, rows].reshape(b, hkv, -1)
            weights = sink_softmax(logits.masked_fill(~mask, float("-inf")), sink, real)
            chunk = (weights.to(v.dtype) @ v).to(q.dtype)
            if rows.stop > first_obs:  # (with a soft cap or sinks unobserved chunks take this path too)
                observed = weights.view(b, hkv, group, r, n)[:, :, :, max(first_obs - start, 0) :]
                obs = torch.maximum(obs, observed.amax(dim=3)) if rule.obs_reduce == "max" else obs + observed.sum(3)
        chunks.append(chunk.view(b, hkv, group, r, -1))
    out = torch.cat(chunks, dim=3) if len(chunks) > 1 else chunks[0]
    # contiguous, as the fake says: the CPU SDPA kernel returns a permuted layout, which a model's later .view() of
    # the output (XGLM's) cannot take
    return out.reshape(b, hq, t, -1).contiguous(), obs.view(b, hq, -1)


attend = torch.library.custom_op("kvpass::attend", mutates_args=())(attend_reference)


@attend.register_fake
def _(q, k, v, pos, scale, policy, window, softcap=0.0, sinks=None):
    b, hq, t = q.shape[:3]
    n = k.shape[2] if policy_from_spec(policy).needs_obs else 0
    # contiguous, like the reference
    return q.new_empty(b, hq, t, v.shape[-1]), q.new_empty(b, hq, n, dtype=torch.float32)


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


def evicted_indices(rank: Tensor, n_keep: int) -> Tensor:
    """Indices (ascending) of the slots :func:`kept_indices` leaves out: the same ranking, the same ties."""
    n_evict = rank.shape[-1] - n_keep
    if n_evict > _FEW_EVICTIONS:
        return rank.sort(dim=-1, descending=True, stable=True).indices[..., n_keep:].sort(dim=-1).values
    if n_evict <= 0:
        return rank.new_zeros(*rank.shape[:-1], 0, dtype=torch.int64)
    if n_evict == 1:
        return rank.argmin(dim=-1, keepdim=True)
    return rank.topk(n_evict, dim=-1, largest=False).indices.sort(dim=-1).values


def compact_ranks(pos: Tensor, keep: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(dead, rank) of a compaction's candidates: ``dead`` the empty or padding slots and, with a sliding ``window``,
    those no future query can see; ``rank`` the policy's ``keep`` score, ``-inf`` for the dead."""
    dead = pos < 0
    if window > 0:
        dead = dead | (pos <= pos.amax(dim=-1, keepdim=True) - (window - 1))
    return dead, keep.masked_fill(dead, float("-inf"))


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
    dead, rank = compact_ranks(pos, keep, window)
    idx = kept_indices(rank, min(budget, k.shape[2]))
    kept_pos = pos.gather(2, idx).masked_fill(dead.gather(2, idx), -1)
    return pad_store(gather_slots(k, idx), gather_slots(v, idx), kept_pos, acc.gather(2, idx), capacity)


def pad_store(k: Tensor, v: Tensor, pos: Tensor, acc: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad a compacted store ``[B, H_kv, C, ...]`` to ``capacity`` slots with empty ones (``pos = -1``: never
    attended, so their K/V content is irrelevant)."""
    pad = capacity - k.shape[2]
    if pad > 0:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        pos = torch.nn.functional.pad(pos, (0, pad), value=-1)
        acc = torch.nn.functional.pad(acc, (0, pad))
    return k, v, pos, acc


def _store_like(k: Tensor, v: Tensor, pos: Tensor, acc: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake result of a compaction: a store of ``capacity`` slots."""
    b, h, _, d = k.shape
    return (k.new_empty(b, h, capacity, d), v.new_empty(b, h, capacity, v.shape[-1]),
            pos.new_empty(b, h, capacity), acc.new_empty(b, h, capacity))


compact = torch.library.custom_op("kvpass::compact", mutates_args=())(compact_reference)


@compact.register_fake
def _(k, v, pos, keep, acc, budget, capacity, window):
    return _store_like(k, v, pos, acc, capacity)


# Head-adaptive stores (option head_budgets "adaptive", after Ada-KV: Feng et al., "Ada-KV: Optimizing KV Cache
# Eviction by Adaptive Budget Allocation for Efficient LLM Inference", arXiv:2407.11550). A layer keeps
# ``H_kv * budget`` slots in all, shared by its kv heads as their scores decide, so one head may keep many tokens and
# another few while the store stays ``[B, H_kv, budget, D]`` bytes: the store is *packed*. Its slots, read flat
# (``H_kv * budget`` of them), belong to any head; each slot's head is carried in the store metadata, packed with its
# position as ``pos * H_kv + head`` (-1: empty). HF's cache appends each forward's new tokens to the rows
# (``cat`` along the slot axis), row ``r`` getting kv head ``r``'s, so the candidates ``[B, H_kv, N, D]`` of a
# forward are the packed store's slots followed by each head's new tokens: every slot carries its head.


def pack_positions(pos: Tensor, head: Tensor, n_kv_heads: int) -> Tensor:
    """``pos * H_kv + head`` for real slots, -1 for empty ones."""
    return torch.where(pos >= 0, pos * n_kv_heads + head, -1)


def unpack_positions(packed: Tensor, n_kv_heads: int) -> tuple[Tensor, Tensor]:
    """``(pos, head)`` of packed store metadata; an empty slot has pos -1 and an arbitrary head."""
    return torch.where(packed >= 0, packed.div(n_kv_heads, rounding_mode="floor"), -1), packed.remainder(n_kv_heads)


def slot_heads(pos: Tensor, packed: bool) -> tuple[Tensor, Tensor]:
    """``(pos, head)`` ``[B, H_kv, C]`` of a store's metadata, packed or not (an unpacked store's row ``r`` is head
    ``r``)."""
    if packed:
        return unpack_positions(pos, pos.shape[1])
    return pos, torch.arange(pos.shape[1], device=pos.device).view(1, -1, 1).expand(pos.shape)


def tokens_per_head(pos: Tensor, packed: bool) -> Tensor:
    """``[B, H_kv]`` real tokens each kv head holds in a store with metadata ``pos``."""
    pos, head = slot_heads(pos, packed)
    heads = torch.arange(pos.shape[1], device=pos.device)
    return ((head[..., None] == heads) & (pos >= 0)[..., None]).sum(dim=(1, 2))


def extend_packed_meta_reference(
    pos: Tensor, acc: Tensor, seen: Tensor, new_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`extend_meta_reference` for a packed store: ``pos`` ``[B, H_kv, C]`` is packed; returns
    ``(pos_all, head_all, acc_all, seen_after)``, positions and heads unpacked, ``[B, H_kv, C + T]`` each."""
    b, h, _ = pos.shape
    past_pos, past_head = unpack_positions(pos, h)
    pos_all, acc_all, seen_after = extend_meta_reference(past_pos, acc, seen, new_valid)
    rows = torch.arange(h, device=pos.device).view(1, h, 1).expand(b, h, new_valid.shape[1])
    return pos_all, torch.cat([past_head, rows], dim=2), acc_all, seen_after


extend_packed_meta = torch.library.custom_op("kvpass::extend_packed_meta", mutates_args=())(
    extend_packed_meta_reference)


@extend_packed_meta.register_fake
def _(pos, acc, seen, new_valid):
    b, h, c = pos.shape
    t = new_valid.shape[1]
    return (pos.new_empty(b, h, c + t), pos.new_empty(b, h, c + t), acc.new_empty(b, h, c + t),
            seen.new_empty(seen.shape))


def attend_packed_reference(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, head: Tensor, scale: float, policy: str, softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`attend_reference` over packed candidates: kv head ``g`` attends to the slots whose ``head`` is ``g``.

    Slot ``(r, j)`` of ``k``/``v`` ``[B, H_kv, N, D]`` is a store slot for ``j < N - T`` and else new token
    ``j - (N - T)`` (of head ``r``); causality is by that index, as in :func:`attention_mask`. Every query reads
    all ``H_kv * N`` slots (masked to its head's), so this costs ``H_kv``x the FLOPs of a uniform store of the
    same bytes. ``obs [B, H_q, N]`` is laid out like the candidates: entry ``(r * group + i, j)`` is query head
    ``i`` of slot ``(r, j)``'s own kv head group, so the policies score packed slots unchanged. ``softcap`` and
    ``sinks`` as in :func:`attend_reference`.
    """
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    group, m, past = hq // hkv, hkv * n, n - t
    rule = policy_from_spec(policy)
    n_obs = rule.n_obs(t) if rule.needs_obs else 0
    first_obs = t - n_obs
    k_flat, v_flat = k.reshape(b, 1, m, d), v.reshape(b, 1, m, v.shape[-1])
    slot = torch.arange(n, device=q.device).repeat(hkv)                          # index within its row
    kv_heads = torch.arange(hkv, device=q.device)
    visible = (head.reshape(b, 1, m) == kv_heads.view(1, hkv, 1)) & (pos.reshape(b, 1, m) >= 0)  # [B, H_kv, M]
    qg = q.view(b, hkv, group, t, d)
    sink_rows = None if sinks is None else sinks.expand(b, hq, t).reshape(b, hkv, group, t)
    obs = torch.zeros(b, hkv, group, m if n_obs > 0 else 0, dtype=torch.float32, device=q.device)
    rows = max(1, min(_QUERY_CHUNK, _CHUNK_ELEMENTS // (group * m))) if isinstance(m, int) else _QUERY_CHUNK
    bounds = [*range(0, first_obs, rows), *range(first_obs, t, rows), t]
    chunks: list[Tensor] = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        query = torch.arange(start, stop, device=q.device)
        r = stop - start
        causal = (slot < past) | (slot - past <= query[:, None])                  # [r, M]
        allowed = visible[:, :, None, :] & causal                                 # [B, H_kv, r, M]
        own = torch.arange(m, device=q.device) == (kv_heads * n + past).view(hkv, 1, 1) + query.view(1, r, 1)
        sees = allowed.any(dim=-1)
        allowed = allowed | (own & ~sees[..., None])  # a padding query sees itself
        mask = allowed[:, :, None].expand(b, hkv, group, r, m).reshape(b, hkv, group * r, m)
        qc = qg[:, :, :, start:stop].reshape(b, hkv, group * r, d)
        logits = soft_capped((qc.float() @ k_flat.float().transpose(-1, -2)) * scale, softcap)
        real = sees[:, :, None].expand(b, hkv, group, r).reshape(b, hkv, -1)
        sink = None if sink_rows is None else sink_rows[:, :, :, start:stop].reshape(b, hkv, -1)
        weights = sink_softmax(logits.masked_fill(~mask, float("-inf")), sink, real)
        chunks.append((weights.to(v.dtype) @ v_flat).to(q.dtype).view(b, hkv, group, r, -1))
        if stop > first_obs:
            observed = weights.view(b, hkv, group, r, m)[:, :, :, max(first_obs - start, 0) :]
            obs = torch.maximum(obs, observed.amax(dim=3)) if rule.obs_reduce == "max" else obs + observed.sum(dim=3)
    out = torch.cat(chunks, dim=3) if len(chunks) > 1 else chunks[0]
    if n_obs > 0:  # weights of slot (r, j) from its own head's group: [B, H_kv(g), group, H_kv(r), N] → [B, H_q, N]
        own_head = head.view(b, 1, 1, hkv, n).expand(b, 1, group, hkv, n)
        obs = obs.view(b, hkv, group, hkv, n).gather(1, own_head).squeeze(1).transpose(1, 2).reshape(b, hq, n)
    else:
        obs = obs.view(b, hq, 0)
    return out.reshape(b, hq, t, -1), obs


attend_packed = torch.library.custom_op("kvpass::attend_packed", mutates_args=())(attend_packed_reference)


@attend_packed.register_fake
def _(q, k, v, pos, head, scale, policy, softcap=0.0, sinks=None):
    b, hq, t = q.shape[:3]
    n = k.shape[2] if policy_from_spec(policy).needs_obs else 0
    return q.new_empty(b, hq, t, v.shape[-1]), q.new_empty(b, hq, n, dtype=torch.float32)


def compact_packed_reference(
    k: Tensor, v: Tensor, pos: Tensor, head: Tensor, keep: Tensor, acc: Tensor, budget: int, capacity: int,
    floor: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the ``H_kv * budget`` highest-``keep`` slots of each batch row, whatever their heads, packed.

    Every head first keeps its ``int(floor * budget)`` best real slots (Ada-KV's safeguard against starving a
    head). Returns the packed store ``[B, H_kv, capacity, D]`` (slots in flat candidate order), its packed
    positions and ``acc``; slots beyond the kept real tokens are empty.
    """
    b, hkv, n, d = k.shape
    m = hkv * n
    per_head = min(budget, n)
    n_keep = hkv * per_head
    rank = keep.masked_fill(pos < 0, float("-inf")).reshape(b, m)
    head_flat = head.reshape(b, m)
    n_floor = int(floor * per_head)
    if n_floor > 0:
        kv_heads = torch.arange(hkv, device=k.device).view(1, hkv, 1)
        best = rank[:, None, :].masked_fill(head_flat[:, None, :] != kv_heads, float("-inf")).topk(n_floor, dim=-1)
        # scatter_add, not scatter: a head with fewer real slots than the floor picks -inf slots of other heads
        guarded = torch.zeros(b, m, device=k.device).scatter_add(
            1, best.indices.reshape(b, -1), best.values.isfinite().float().reshape(b, -1)) > 0
        rank = rank.masked_fill(guarded, float("inf"))
    idx = kept_indices(rank.view(b, 1, m), n_keep).view(b, n_keep)
    kept = (b, hkv, per_head)
    k_out = gather_slots(k.reshape(b, 1, m, d), idx.view(b, 1, -1)).view(*kept, d)
    v_out = gather_slots(v.reshape(b, 1, m, v.shape[-1]), idx.view(b, 1, -1)).view(*kept, -1)
    kept_pos = pack_positions(pos.reshape(b, m).gather(1, idx), head_flat.gather(1, idx), hkv).view(kept)
    return pad_store(k_out, v_out, kept_pos, acc.reshape(b, m).gather(1, idx).view(kept), capacity)


compact_packed = torch.library.custom_op("kvpass::compact_packed", mutates_args=())(compact_packed_reference)


@compact_packed.register_fake
def _(k, v, pos, head, keep, acc, budget, capacity, floor):
    return _store_like(k, v, pos, acc, capacity)


# op overload → its pure-torch reference; lowering passes these to AOTAutograd as decompositions so
# Inductor compiles (and fuses) the reference code instead of calling the opaque op.
REFERENCES = {
    torch.ops.kvpass.extend_meta.default: extend_meta_reference,
    torch.ops.kvpass.attend.default: attend_reference,
    torch.ops.kvpass.score.default: score_reference,
    torch.ops.kvpass.compact.default: compact_reference,
    torch.ops.kvpass.extend_packed_meta.default: extend_packed_meta_reference,
    torch.ops.kvpass.attend_packed.default: attend_packed_reference,
    torch.ops.kvpass.compact_packed.default: compact_packed_reference,
}
