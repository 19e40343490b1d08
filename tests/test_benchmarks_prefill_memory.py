"""benchmarks/prefill_memory.py --measure kv: the K/V tracker sees the block-wise prefill's stores, not the prompt's."""

import pytest
from conftest import tiny_model
from test_benchmarks_cli import script


def test_kv_peak_of_blockwise_prefill_is_flat_and_full_prefill_holds_the_prompt():
    bench = script("prefill_memory")
    model = tiny_model("llama", "sdpa", layers=4)
    rows = {(mode, n): bench.measure_prefill(model, mode, n, budget=64, block=16, policy="snapkv",
                                             compiler="aot_eager", measure="kv")
            for mode in ("blockwise", "full") for n in (128, 512)}
    block_short, block_long = rows["blockwise", 128], rows["blockwise", 512]
    assert block_long["peak_bytes"] == block_short["peak_bytes"]  # independent of the prompt length
    # every layer's store plus one layer's candidates and temporaries: above the stores, within 1.1x the bound
    # (the previous block's stores must be freed as each layer reads them: holding them all gave 2.1x)
    bound = block_long["kv_bound_bytes"]
    assert bound * 64 / (64 + 16) < block_long["peak_bytes"] <= 1.1 * bound
    for n in (128, 512):  # the full prefill holds at least the whole prompt's K/V
        assert rows["full", n]["peak_bytes"] >= rows["full", n]["kv_full_mib"] * 2**20 * 0.99
    assert rows["full", 512]["peak_bytes"] > 3 * rows["full", 128]["peak_bytes"]


def test_kv_measure_refuses_a_model_without_grouped_query_attention():
    model = tiny_model("llama", "sdpa", num_key_value_heads=4)  # 4 query heads, 4 kv-heads
    with pytest.raises(SystemExit, match="needs grouped-query attention .* this model has 4 of each"):
        script("prefill_memory").measure_prefill(model, "blockwise", 64, budget=32, block=16, policy="snapkv",
                                                 compiler="aot_eager", measure="kv")


def test_head_adaptive_blockwise_prefill_holds_the_budget_in_the_same_bound():
    bench = script("prefill_memory")
    model = tiny_model("llama", "sdpa", layers=4)
    rows = {hb: bench.measure_prefill(model, "blockwise", 512, budget=128, block=32, policy="snapkv",
                                      compiler="aot_eager", measure="kv", head_budgets=hb)
            for hb in ("uniform", "adaptive")}
    uniform, adaptive = rows["uniform"], rows["adaptive"]
    assert adaptive["peak_bytes"] <= 1.1 * adaptive["kv_bound_bytes"]
    assert adaptive["kv_held_mib"] == uniform["kv_held_mib"]
    assert all(sum(heads) == 2 * 128 for heads in adaptive["head_tokens"])  # 2 kv heads x budget, however shared
    assert uniform["head_tokens"] == [[128, 128]] * 4 and adaptive["kv_masked_mib"] >= adaptive["kv_held_mib"]
