"""Option distribute="context": one context's KV split over gloo ranks, started by the tests themselves (spawned
processes, one thread each, bounded in time). Every rank runs the same model on the same tokens and must return what
one process returns."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from conftest import family_model, tiny_model

import kvpass
from kvpass.errors import OptionError, UnsupportedGraph
from kvpass.passes.context_split import ContextSplit, most_free_owner

NEW_TOKENS = 6
EXACT_FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "deepseek_v3")


# ----------------------------------------------------------------------------------------------- harness

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        try:
            results.put((rank, job(rank, world, *args)))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:  # the test reports it: a hung peer would otherwise hide it
        results.put((rank, traceback.format_exc()))


def run_ranks(world: int, job, *args, timeout: float = 600) -> list:
    """Run ``job(rank, world, *args)`` in ``world`` spawned gloo ranks; each rank's return value, in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [v for v in got.values() if isinstance(v, str)]  # (a job returns a dict; a traceback is a str)
    assert not failures, failures[0]
    return [got[r] for r in range(world)]


def _prompt(arch: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; with two rows the second is left-padded by 5."""
    ids = torch.randint(3, 128, (batch, 37), generator=torch.Generator().manual_seed(len(arch)))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :5] = 0
        ids[1, :5] = 0
    return ids, mask


def _generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, pad_token_id=0)


def _compiled(model, **options):
    return torch.compile(model.forward, backend="kvpass", options={"compiler": "aot_eager", **options}, dynamic=True)


def _exactness_job(rank: int, world: int, archs: tuple[str, ...], budget: int) -> dict:
    """Per family: plain HF vs the split model on this rank (tokens, logits, per-rank slots and tokens, graphs)."""
    results = {}
    for arch in archs:
        torch._dynamo.reset()
        model = family_model(arch)
        ids, mask = _prompt(arch, 2 if arch == "llama" else 1)
        ref = _generate(model, ids, mask)
        model.forward = _compiled(model, policy="snapkv", budget=budget, distribute="context")
        torch._dynamo.utils.counters.clear()
        out = _generate(model, ids, mask)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        again = _generate(model, *_prompt(arch + "x", ids.shape[0]))  # another prompt, another cache
        stats = [s for s in kvpass.kv_stats(out.past_key_values) if s.real_tokens is not None]
        counters = kvpass.explain(model.forward).graphs[0]["counters"]
        results[arch] = dict(
            same_tokens=torch.equal(out.sequences, ref.sequences),
            logit_diff=max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True)),
            slots=stats[0].slots, real_tokens=stats[0].real_tokens, seen=stats[0].tokens_seen,
            kv_heads=out.past_key_values.layers[stats[0].layer].keys.shape[1],
            graphs=graphs, graphs_after_second_cache=torch._dynamo.utils.counters["stats"]["unique_graphs"],
            second_ok=again.sequences.shape[1] == ids.shape[1] + NEW_TOKENS,
            split_sites=counters.get("split_sites", 0), sites=counters.get("prefill_sites", 0))
    return results


# ----------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, _exactness_job, EXACT_FAMILIES, 64)


@pytest.mark.parametrize("arch", EXACT_FAMILIES)
def test_two_ranks_give_one_process_tokens_and_logits(two_ranks, arch):
    for rank in two_ranks:
        got = rank[arch]
        assert got["same_tokens"], got
        assert got["logit_diff"] < 1e-5, got
        assert got["split_sites"] == got["sites"] > 0


@pytest.mark.parametrize("arch", EXACT_FAMILIES)
def test_each_rank_holds_half_the_context_in_half_the_slots(two_ranks, arch):
    per_rank = [rank[arch] for rank in two_ranks]
    assert [r["slots"] for r in per_rank] == [32, 32]  # budget 64 over 2 ranks
    seen = per_rank[0]["seen"]
    assert all(r["seen"] == seen for r in per_rank)  # every rank counts the whole sequence
    # the union of the ranks' stores is every token of every row (no eviction: 37 + 6 - 1 < 64 per row)
    rows_tokens = sum(seen) * per_rank[0]["kv_heads"]
    assert sum(r["real_tokens"] for r in per_rank) == rows_tokens
    assert max(r["real_tokens"] for r in per_rank) - min(r["real_tokens"] for r in per_rank) <= (
        len(seen) * per_rank[0]["kv_heads"])  # dealt one token at a time: within one token per row and head


@pytest.mark.parametrize("arch", EXACT_FAMILIES)
def test_decode_compiles_once_on_every_rank(two_ranks, arch):
    for rank in two_ranks:
        got = rank[arch]
        assert got["graphs"] == 2  # the prefill and the decode step
        assert got["graphs_after_second_cache"] == 2 and got["second_ok"]


def _eviction_job(rank: int, world: int, budget: int, sinks: int) -> dict:
    """StreamingLLM split over ``world`` ranks (each keeping ``budget / world``) and in one process (``budget``)."""
    model = tiny_model("llama")
    ids, mask = _prompt("llama-evict", 1)
    model.forward = _compiled(model, policy="streaming_llm", sinks=sinks, budget=budget)
    alone = _generate(model, ids, mask)
    torch._dynamo.reset()
    model.forward = _compiled(model, policy="streaming_llm", sinks=sinks, budget=budget, distribute="context")
    split = _generate(model, ids, mask)
    kept = [s.real_tokens for s in kvpass.kv_stats(split.past_key_values)]
    return dict(same_tokens=torch.equal(split.sequences, alone.sequences),
                logit_diff=max(float((a - b).abs().max()) for a, b in zip(split.logits, alone.logits, strict=True)),
                kept=kept)


def test_four_ranks_evicting_keep_what_one_process_keeps():
    """Dealt one token at a time, each rank's sinks and newest tokens are its share of one process's: the union is
    the same set of tokens, so the same outputs (StreamingLLM's choice does not depend on the placement)."""
    budget = 24  # the prompt alone (37 tokens) overflows it
    ranks = run_ranks(4, _eviction_job, budget, 4)
    for got in ranks:
        assert got["same_tokens"], got
        assert got["logit_diff"] < 1e-5, got
        assert all(k == budget // 4 * 2 for k in got["kept"])  # a full store of 6 slots per rank, 2 kv heads


def _placed_job(rank: int, world: int) -> dict:
    """Two ranks: block-wise prefill (exact, and evicting as one process does), unequal stores under each placement
    rule, and a reserve."""
    results = {}
    for arch in ("llama", "gemma3"):  # exact while the budget covers the prompt; Gemma-3's local layers carried whole
        torch._dynamo.reset()
        model = family_model(arch)
        ids, mask = _prompt(arch, 2 if arch == "llama" else 1)
        ref = _generate(model, ids, mask)
        model.forward = _compiled(model, policy="snapkv", budget=64, prefill_block=8, distribute="context")
        out = _generate(model, ids, mask)
        stats = [s for s in kvpass.kv_stats(out.past_key_values) if s.real_tokens is not None]
        counters = kvpass.explain(model.forward).graphs[0]["counters"]
        results[f"block-{arch}"] = dict(
            same_tokens=torch.equal(out.sequences, ref.sequences), logit_diff=_logit_diff(out, ref),
            slots=stats[0].slots, split_sites=counters.get("split_sites", 0), block_sites=counters.get("block_sites"))
    model = tiny_model("llama")
    ids, mask = _prompt("llama-placed", 1)
    ref = _generate(model, ids, mask)
    for placement in ("most_free", "round_robin"):  # 37 + 6 - 1 = 42 tokens kept of a 64-slot budget, split 48:16
        torch._dynamo.reset()
        model.forward = _compiled(model, policy="snapkv", rank_budgets=[48, 16], placement=placement,
                                  distribute="context")
        out = _generate(model, ids, mask)
        stats = kvpass.kv_stats(out.past_key_values)
        results[placement] = dict(same_tokens=torch.equal(out.sequences, ref.sequences),
                                  logit_diff=_logit_diff(out, ref), slots=stats[0].slots,
                                  real_tokens=stats[0].real_tokens,
                                  kv_heads=out.past_key_values.layers[0].keys.shape[1])
    for name, options in (("reserve", {"reserve": 8}), ("block-evicting", {"prefill_block": 8})):
        # StreamingLLM, whose choice does not depend on the placement: split, the union is one process's store
        torch._dynamo.reset()
        model.forward = _compiled(model, policy="streaming_llm", sinks=4, budget=24, **options)
        alone = _generate(model, ids, mask)
        torch._dynamo.reset()
        model.forward = _compiled(model, policy="streaming_llm", sinks=4, budget=24, distribute="context", **options)
        split = _generate(model, ids, mask)
        stats = kvpass.kv_stats(split.past_key_values)
        results[name] = dict(same_tokens=torch.equal(split.sequences, alone.sequences),
                             logit_diff=_logit_diff(split, alone), slots=stats[0].slots)
    return results


def _logit_diff(out, ref) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True))


@pytest.fixture(scope="module")
def placed() -> list[dict]:
    return run_ranks(2, _placed_job)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_blockwise_prefill_over_two_ranks_gives_one_process_tokens_and_logits(placed, arch):
    for rank in placed:
        got = rank[f"block-{arch}"]
        assert got["same_tokens"] and got["logit_diff"] < 1e-5, got
        assert got["slots"] == 32 and got["split_sites"] > 0 and got["block_sites"] > 0, got


def test_blockwise_prefill_evicting_over_two_ranks_keeps_what_one_process_keeps(placed):
    for rank in placed:
        got = rank["block-evicting"]
        assert got["same_tokens"] and got["logit_diff"] < 1e-5 and got["slots"] == 12, got


def test_a_reserve_is_shared_by_the_ranks_and_fills_before_eviction(placed):
    for rank in placed:
        got = rank["reserve"]  # 6 answer tokens: 3 per rank, within each rank's 4 reserve slots
        assert got["same_tokens"] and got["logit_diff"] < 1e-5 and got["slots"] == 12 + 4, got


def test_most_free_placement_fills_unequal_stores_without_evicting(placed):
    stored = 37 + NEW_TOKENS - 1
    owners = _most_free_by_hand((48, 16), stored)
    for rank, got in enumerate(placed):
        got = got["most_free"]
        assert got["same_tokens"] and got["logit_diff"] < 1e-5, got
        assert got["slots"] == (48, 16)[rank]
        assert got["real_tokens"] == owners.count(rank) * got["kv_heads"]


def test_round_robin_placement_overfills_the_smaller_store(placed):
    """Why most-free is the default: dealt in turn, rank 1 gets 21 of the 42 tokens for its 16 slots and evicts."""
    got = placed[1]["round_robin"]
    assert got["slots"] == 16 and got["real_tokens"] == 16 * got["kv_heads"]


# ----------------------------------------------------------------------------------------------- refusals

def _adoption_job(rank: int, world: int) -> dict:
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12))
    cache = transformers.DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)  # filled without kvpass: not placed on ranks
    model.forward = _compiled(model, budget=64, distribute="context")
    try:
        model(input_ids=ids[:, :1], cache=cache, position_ids=torch.tensor([[12]]), use_cache=True)
    except UnsupportedGraph as err:
        return {"refused": str(err)}
    return {"refused": None}


def test_a_store_kvpass_did_not_place_is_refused_not_attended_on_every_rank():
    (got,) = run_ranks(1, _adoption_job)
    assert "12 slots kvpass did not fill" in got["refused"] and "'distribute'" in got["refused"]


def _rank_budgets_job(rank: int, world: int) -> dict:
    model = tiny_model("llama")
    model.forward = _compiled(model, rank_budgets=[32, 32], distribute="context")
    try:
        model(torch.randint(3, 128, (1, 8)))
    except OptionError as err:
        return {"refused": str(err)}
    return {"refused": None}


def test_rank_budgets_not_one_per_rank_are_refused_quoting_them():
    (got,) = run_ranks(1, _rank_budgets_job)
    assert "2 entries ([32, 32])" in got["refused"] and "1 ranks" in got["refused"]


def test_distribute_without_a_process_group_is_refused_by_name():
    model = tiny_model("llama")
    model.forward = _compiled(model, budget=64, distribute="context")
    with pytest.raises(UnsupportedGraph, match="init_process_group"):
        model(torch.randint(3, 128, (1, 8)))


@pytest.mark.parametrize("options, quoted", [
    ({"distribute": "tensor"}, "'tensor'"),
    ({"placement_block": 4}, "4"),
    ({"distribute": "context", "placement_block": 0}, "0"),
    ({"distribute": "context", "head_budgets": "adaptive"}, "'adaptive'"),
    ({"distribute": "context", "placement": "nearest"}, "'nearest'"),
    ({"placement": "round_robin"}, "'round_robin'"),
    ({"distribute": "context", "rank_budgets": [32, 0]}, r"\[32, 0\]"),
    ({"distribute": "context", "rank_budgets": [32, 16]}, "48"),  # budget 64 given too: not their sum
    # EpiCache's softmax over the context alone is a rank's own keys only: not normalized across ranks
    ({"distribute": "context", "policy": "epicache", "head_budgets": "uniform", "prefill_block": 16},
     "'epicache'.*'context'"),
])
def test_bad_distribute_options_are_refused_quoting_them(options, quoted):
    with pytest.raises(OptionError, match=quoted):
        kvpass.parse_options({"budget": 64, **options})


def test_rank_budgets_give_the_budget():
    opts = kvpass.parse_options({"distribute": "context", "rank_budgets": [48, 16]})
    assert opts.budget == 64 and opts.rank_budgets == (48, 16) and opts.placement == "most_free"


def test_share_covers_any_context_the_budget_covers():
    for world in (1, 2, 3, 4):
        for run in (1, 4, 16):
            for budget in (1, 7, 64, 100, 257):
                split = [ContextSplit(r, world, "g", run) for r in range(world)]
                share = split[0].share(budget)
                owned = [sum((p // run) % world == r for p in range(budget)) for r in range(world)]
                assert max(owned) <= share < max(owned) + run  # never short, at most one run over


def _most_free_by_hand(runs: tuple[int, ...], n: int) -> list[int]:
    """The rule as the README states it, one run at a time: the rank with the most free runs (ties: the lowest)."""
    free, owners = list(runs), []
    for _ in range(n):
        rank = max(range(len(runs)), key=lambda r: (free[r], -r))
        free[rank] -= 1
        owners.append(rank)
    return owners


@pytest.mark.parametrize("weights", [(4, 2, 1), (1, 1), (3, 5), (2, 2, 7, 1), (6, 6, 1)])
@pytest.mark.parametrize("block", [1, 3])
def test_most_free_placement_in_closed_form_is_the_rule_run_by_hand(weights, block):
    split = ContextSplit(0, len(weights), "g", block, "most_free", weights).of_budget(sum(weights) * block * 5 + 1)
    runs = torch.arange(-1, sum(split.runs) * 3)  # past every store's capacity (then the ranks in turn); -1: padding
    got = most_free_owner(runs, *split.segments())
    assert got[1:].tolist() == _most_free_by_hand(split.runs, len(runs) - 1)
    assert sum(split.runs) * block >= sum(weights) * block * 5 + 1  # the stores cover the budget


@pytest.mark.parametrize("world, block", [(2, 1), (3, 1), (2, 4), (4, 3)])
def test_reserve_share_covers_any_run_of_positions_once_the_stores_are_full(world, block):
    split = ContextSplit(0, world, "g", block)
    for reserve in (1, 2, 5, 8, 13):
        share = split.reserve_share(reserve)
        for start in range(3 * world * block):
            owned = [sum((p // block) % world == r for p in range(start, start + reserve)) for r in range(world)]
            assert max(owned) <= share
