"""EpiCache's adaptive layer-wise budgets: measure each layer's sensitivity to block-restricted attention once
per model, then split a total KV budget across layers (Kim et al., arXiv:2509.17396, Sec. "layer-wise budget").

A layer whose keys change little when attention is restricted to the current block (plus attention sinks
and an overlap with the previous block) tolerates eviction; one whose keys change a lot needs more of the
budget. Sensitivity is the cosine similarity of each layer's keys under full vs restricted attention,
averaged over kv-heads and windows of ``window`` tokens. Budgets follow the reference
(apple/ml-epicache, ``allocate_layer_budget``): weights ``(1 - normalized similarity) ** power`` (power 1.3, its
scripts' setting for Qwen; 1.1 for Llama), each layer ``int(weight / sum · budget x layers)``, raised to a floor of
``budget // 4``, so the total can exceed ``budget x layers`` by the floors' lift. ``allocation="exact-total"`` (a
kvpass departure) gives every layer the floor first and shares the rest in proportion, adding up to exactly
``budget x layers``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def block_restricted_mask(length: int, block: int, sinks: int, overlap: int) -> torch.Tensor:
    """``[T, T]`` bool: query ``i`` sees the ``sinks`` first tokens, its own block causally, and the last
    ``overlap`` tokens of the previous block."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = j <= i
    same_block = (i // block) == (j // block)
    prev_block = (i // block) - 1 == (j // block)
    in_overlap = prev_block & (j >= (j // block + 1) * block - overlap)
    return causal & (same_block | in_overlap | (j < sinks))


@torch.inference_mode()
def _keys(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    from transformers import DynamicCache

    kwargs = {} if mask is None else {"attention_mask": mask[None, None]}
    out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1, **kwargs)
    return [layer.keys.float() for layer in out.cache.layers]


def key_similarity(model: torch.nn.Module, ids: Sequence[int], block: int, sinks: int = 128,
                   overlap_ratio: float = 0.5, window: int = 100) -> list[float]:
    """Per layer: mean cosine similarity of key windows under full vs block-restricted attention."""
    if block < 1 or not 0 <= overlap_ratio <= 1 or window < 1:
        raise ValueError(f"kvpass: bad profile settings block={block!r}, overlap_ratio={overlap_ratio!r}, "
                         f"window={window!r} (need block >= 1, overlap_ratio in [0, 1], window >= 1)")
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    mask = block_restricted_mask(x.shape[1], block, sinks, int(block * overlap_ratio)).to(device)
    full, restricted = _keys(model, x, None), _keys(model, x, mask)
    scores = []
    for a, b in zip(full, restricted, strict=True):
        _, h, t, d = a.shape
        n = -(-t // window)
        pad = n * window - t  # zero padding adds nothing to dot products or norms
        a = torch.nn.functional.pad(a[0], (0, 0, 0, pad)).reshape(h, n, window * d)
        b = torch.nn.functional.pad(b[0], (0, 0, 0, pad)).reshape(h, n, window * d)
        scores.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
    return scores


ALLOCATIONS = ("reference", "exact-total")


def allocate_layer_budgets(similarity: Sequence[float], budget: int, power: float = 1.3,
                           floor_ratio: float = 0.25, allocation: str = "reference") -> list[int]:
    """Split ``budget x len(similarity)`` slots: less similar (more sensitive) layers get more.

    ``allocation="reference"``: ``int(w / sum(w) · total)`` per layer, clamped below at ``max(1, budget // 4)``
    (``floor_ratio`` 0.25); ``"exact-total"``: the floor first, the rest in proportion (largest remainders round up),
    summing to exactly ``budget x layers``. Equal similarities: every layer gets ``budget``.
    """
    n = len(similarity)
    if n == 0 or budget < 1 or power < 0 or not 0 <= floor_ratio <= 1 or allocation not in ALLOCATIONS:
        raise ValueError(f"kvpass: cannot allocate budget={budget!r} over {n} layers with power={power!r}, "
                         f"floor_ratio={floor_ratio!r}, allocation={allocation!r} (need layers >= 1, budget >= 1, "
                         f"power >= 0, floor in [0, 1], allocation in {ALLOCATIONS})")
    s = torch.tensor(similarity, dtype=torch.float64)
    total = budget * n
    floor = max(1, int(budget * floor_ratio))
    if float(s.max() - s.min()) == 0:
        return [budget] * n
    weight = (1 - (s - s.min()) / (s.max() - s.min())) ** power
    if allocation == "reference":
        return [max(floor, int(x)) for x in (weight * total / weight.sum()).tolist()]
    # the floor first, the rest in proportion to the weights (largest remainders round up)
    share = floor + weight / weight.sum() * (total - floor * n) if weight.sum() > 0 else torch.full((n,), float(budget))
    out = share.floor().long()
    for i in torch.argsort(share - out, descending=True)[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def layer_budgets(model: torch.nn.Module, ids: Sequence[int], budget: int, block: int, power: float = 1.3,
                  cache_dir: str | os.PathLike | None = None, allocation: str = "reference",
                  **profile: float) -> list[int]:
    """Layer budgets for ``model`` from its (cached) key-similarity profile on ``ids``.

    The profile is computed once per (model weights, sample, settings) and stored as JSON under
    ``cache_dir`` (default ``$KVPASS_CACHE/layer_profiles``).
    """
    root = Path(cache_dir or Path(os.environ.get("KVPASS_CACHE", Path.home() / ".cache" / "kvpass")) / "layer_profiles")
    digest = hashlib.sha256()
    digest.update(json.dumps([model.config.to_dict().get("_name_or_path", ""), model.config.num_hidden_layers,
                              block, sorted(profile.items())], default=str).encode())
    digest.update(torch.tensor(list(ids)).numpy().tobytes())
    digest.update(next(model.parameters()).detach().float().flatten()[:4096].numpy().tobytes())
    path = root / f"{digest.hexdigest()[:24]}.json"
    if path.exists():
        similarity = json.loads(path.read_text())["similarity"]
    else:
        similarity = key_similarity(model, ids, block, **profile)
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"block": block, "tokens": len(ids), "similarity": similarity, **profile}))
    return allocate_layer_budgets(similarity, budget, power, allocation=allocation)
