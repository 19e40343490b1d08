"""Option validation: every bad value is rejected with a message quoting it and listing what is valid."""

import pytest

from kvpass.config import parse_options
from kvpass.policies import POLICIES


@pytest.mark.parametrize(
    "options, quoted",
    [
        ({"policy": "snapkv", "budget": 8, "bogus": 1}, "'bogus'"),
        ({"policy": "nope", "budget": 8}, "'nope'"),
        ({"policy": "snapkv", "budget": 0}, "0"),
        ({"policy": "snapkv", "budget": -3}, "-3"),
        ({"policy": "snapkv", "budget": "many"}, "'many'"),
        ({"policy": "snapkv", "budget": 2.5}, "2.5"),
        ({"policy": "snapkv", "budget": True}, "True"),
        ({"policy": "snapkv", "ratio": 1.5}, "1.5"),
        ({"policy": "snapkv", "ratio": 0}, "0"),
        ({"policy": "snapkv", "budget": 8, "ratio": 0.5}, "budget"),
        ({"policy": "snapkv"}, "no budget"),
        ({"policy": "snapkv", "budget": 8, "compiler": "tvm"}, "'tvm'"),
        ({"policy": "snapkv", "budget": 8, "fallback": "yes"}, "'yes'"),
        ({"policy": "snapkv", "budget": 8, "reference_kernels": "yes"}, "'yes'"),
        ({"policy": "streaming_llm", "budget": 8, "window": 4}, "'window'"),
        ({"policy": "snapkv", "budget": 8, "window": 0}, "0"),
        ({"policy": "snapkv", "budget": 8, "pooling": "median"}, "'median'"),
        ({"policy": "snapkv", "layer_budgets": [4, 0]}, "0"),
        ({"policy": "snapkv", "layer_budgets": "4,4"}, "'4,4'"),
        ({"policy": "snapkv", "budget": 8, "head_budgets": "per-head"}, "'per-head'"),
        ({"policy": "snapkv", "budget": 8, "head_floor": 0.3}, "0.3"),
        ({"policy": "snapkv", "budget": 8, "head_budgets": "adaptive", "head_floor": 1.5}, "1.5"),
        ({"policy": "snapkv", "budget": 8, "head_budgets": "adaptive", "head_floor": "some"}, "'some'"),
        ({"policy": "tova", "budget": 8, "head_budgets": "adaptive"}, "'tova'"),
        ({"policy": "epicache", "budget": 8, "prefill_block": 16, "head_budgets": "adaptive", "kernel_size": 3},
         "kernel_size 3"),
        ({"policy": "epicache", "budget": 8, "prefill_block": 16, "scores": "softmax"}, "'softmax'"),
        ({"policy": "epicache", "budget": 8}, "'scores'='context'"),  # EpiCache's rule scores block by block
        ({"policy": "snapkv", "budget": 8, "reserve": -1}, "-1"),
        ({"policy": "snapkv", "budget": 8, "reserve": 2.5}, "2.5"),
        ({"policy": "snapkv", "budget": 8, "scores": "context"}, "'scores'"),
        ({"policy": "snapkv", "budget": 8, "offload": "gpu", "offload_attention": True}, "'gpu'"),
        ({"policy": "snapkv", "budget": 8, "offload": "disk", "offload_attention": True}, "offload_dir None"),
        ({"policy": "snapkv", "budget": 8, "offload": "disk", "offload_dir": "/no/such/dir", "offload_attention": True},
         "'/no/such/dir'"),
        ({"policy": "snapkv", "budget": 8, "offload_dir": "."}, "'.'"),
        ({"policy": "snapkv", "budget": 8, "offload_attention": True}, "needs 'offload'"),
        ({"policy": "snapkv", "budget": 8, "offload": "cpu", "offload_attention": "yes"}, "'yes'"),
        ({"policy": "snapkv", "budget": 8, "offload": "cpu"}, "not built yet"),  # retrieval: SentenceKV, LeoAM
        ({"policy": "snapkv", "budget": 8, "offload": "cpu", "offload_attention": True, "head_budgets": "adaptive"},
         "'head_budgets': 'adaptive'"),
    ],
)
def test_bad_options_are_rejected_with_the_value_quoted(options, quoted):
    with pytest.raises(ValueError) as err:
        parse_options(options)
    assert quoted in str(err.value)


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="valid policies") as err:
        parse_options({"policy": "h3o", "budget": 4})
    for name in POLICIES:
        assert name in str(err.value)


def test_budget_ratio_and_layer_budgets():
    assert parse_options({"policy": "h2o", "budget": 16}).budget_for(3, 30, 1000) == 16
    assert parse_options({"policy": "h2o", "ratio": 0.25}).budget_for(0, 30, 1000) == 250
    opts = parse_options({"policy": "snapkv", "layer_budgets": [4, 8]})
    assert [opts.budget_for(i, 2, 100) for i in range(2)] == [4, 8]
    with pytest.raises(ValueError, match="2 entries but the model has 3"):
        opts.budget_for(0, 3, 100)
    assert parse_options({"policy": "snapkv", "budget": 8, "window": 4}).policy.window == 4


def test_head_budgets_default_uniform_and_adaptive_keeps_its_floor():
    assert parse_options({"policy": "snapkv", "budget": 8}).head_budgets == "uniform"
    opts = parse_options({"policy": "h2o", "budget": 8, "head_budgets": "adaptive", "head_floor": 0.5})
    assert (opts.head_budgets, opts.head_floor) == ("adaptive", 0.5)
    assert parse_options({"policy": "snapkv", "budget": 8, "head_budgets": "adaptive"}).head_floor == 0.2


def test_epicache_defaults_to_its_references_pair_heads_and_context_scores():
    opts = parse_options({"policy": "epicache", "budget": 8, "prefill_block": 16})
    assert (opts.head_budgets, opts.head_floor, opts.policy.scores, opts.reserve) == ("adaptive", 0.0, "context", 0)
    uniform = parse_options({"policy": "epicache", "budget": 8, "prefill_block": 16, "head_budgets": "uniform"})
    assert uniform.head_budgets == "uniform"
    assert parse_options({"policy": "snapkv", "budget": 8}).head_budgets == "uniform"
    assert parse_options({"policy": "epicache", "budget": 8, "scores": "forward"}).policy.scores == "forward"
    assert parse_options({"policy": "h2o", "budget": 8, "reserve": 32}).reserve == 32
