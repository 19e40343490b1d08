"""EpiCache's layer-wise budgets: the block-restricted mask, the allocation rule, the cached profile."""

import pytest
import torch
from conftest import tiny_model

from kvpass.apps.layer_profile import allocate_layer_budgets, block_restricted_mask, key_similarity, layer_budgets


def test_block_restricted_mask_sees_sinks_own_block_and_the_overlap():
    mask = block_restricted_mask(12, block=4, sinks=1, overlap=2)
    assert mask[9].nonzero().flatten().tolist() == [0, 6, 7, 8, 9]  # sink, overlap of block 1, own block
    assert mask[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert not mask.triu(1).any()


def reference_allocation(scores, kv_budget, power):
    """apple/ml-epicache's allocate_layer_budget, transcribed (torch ops as the reference uses them)."""
    scores = torch.tensor(scores, dtype=torch.float32)
    if not scores.max() > scores.min():
        return [kv_budget] * len(scores)
    normalized = (scores - scores.min()) / (scores.max() - scores.min())
    inverse = (1.0 - normalized) ** power
    budget = (inverse * (kv_budget * len(scores)) / inverse.sum()).int()
    return torch.clamp(budget, min=max(1, kv_budget // 4)).tolist()


@pytest.mark.parametrize("scores", [[0.99, 0.5, 0.9, 0.7], [0.97, 0.96, 0.9, 0.4, 0.8, 0.95], [0.3, 0.9]])
@pytest.mark.parametrize("power", [1.1, 1.3, 2.0])
def test_allocation_is_the_references(scores, power):
    assert allocate_layer_budgets(scores, budget=512, power=power) == reference_allocation(scores, 512, power)
    assert allocate_layer_budgets(scores, budget=100, power=power) == reference_allocation(scores, 100, power)


def test_exact_total_allocation_favours_sensitive_layers_keeps_the_floor_and_the_total():
    budgets = allocate_layer_budgets([0.99, 0.5, 0.9, 0.7], budget=100, power=2.0, floor_ratio=0.25,
                                     allocation="exact-total")
    assert sum(budgets) == 400 and min(budgets) >= 25
    assert budgets[1] == max(budgets) and budgets[0] == min(budgets)
    assert budgets[3] > budgets[2]
    assert allocate_layer_budgets([0.8, 0.8], budget=64) == [64, 64]
    with pytest.raises(ValueError, match="budget=0"):
        allocate_layer_budgets([0.5], budget=0)
    with pytest.raises(ValueError, match="allocation='even'"):
        allocate_layer_budgets([0.5, 0.6], budget=8, allocation="even")


def test_profile_settings_are_checked_quoting_them():
    with pytest.raises(ValueError, match="overlap_ratio=1.5"):
        key_similarity(tiny_model(), [1, 2, 3], block=16, overlap_ratio=1.5)
    with pytest.raises(ValueError, match="block=0"):
        key_similarity(tiny_model(), [1, 2, 3], block=0)


def test_profile_is_measured_once_and_cached(tmp_path):
    model = tiny_model(layers=3)
    ids = torch.randint(1, 128, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    sim = key_similarity(model, ids, block=16, sinks=4, window=10)
    assert len(sim) == 3 and all(-1 <= s <= 1 for s in sim)
    assert sim[0] == pytest.approx(1.0)  # layer 0's keys do not depend on attention at all
    first = layer_budgets(model, ids, budget=32, block=16, cache_dir=tmp_path, sinks=4, window=10)
    assert first == reference_allocation(sim, 32, 1.3) and len(list(tmp_path.iterdir())) == 1
    assert layer_budgets(model, ids, budget=32, block=16, cache_dir=tmp_path, sinks=4, window=10) == first
