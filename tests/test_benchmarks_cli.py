"""The benchmark scripts refuse nonsense counts and lists before running anything, quoting the value (their
argument types are kvpass.validate's, as the CLI's)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, argv", [
    ("decode_floor", ["--repeats", "0"]),
    ("decode_floor", ["--steps", "-3"]),
    ("elastic_cache", ["--accuracy-only", "--problems", "0"]),
    ("many_conversations", ["--conversations", "0"]),
    ("many_conversations", ["--lockstep", "0"]),
    ("distributed_kv", ["--ranks", "0"]),
    ("distributed_kv", ["--rank-threads", "0"]),
    ("distributed_kv", ["--rank-budget", "0"]),
    ("offload", ["--budget", "0"]),
    ("offload", ["--steps", "0"]),
])
def test_benchmark_counts_must_be_positive(name, argv, capsys):
    with pytest.raises(SystemExit):
        script(name).main(argv)
    err = capsys.readouterr().err
    assert f"expected a positive integer, got {argv[-1]}" in err


def test_distributed_profile_steps_may_be_zero_but_not_negative(capsys):
    with pytest.raises(SystemExit):
        script("distributed_kv").main(["--profile-steps", "-1"])
    assert "expected a non-negative integer, got -1" in capsys.readouterr().err


def test_distributed_rank_budget_must_hold_a_context(capsys):
    with pytest.raises(SystemExit):
        script("distributed_kv").main(["--rank-budget", "20", "--ranks", "1,2"])
    assert "--rank-budget 20 holds no context" in capsys.readouterr().err


def test_offload_rows_must_be_known_ones(capsys):
    with pytest.raises(SystemExit):
        script("offload").main(["--rows", "full,offload-gpu"])
    assert "'offload-gpu'" in capsys.readouterr().err


def test_llada_problems_may_be_zero_but_not_negative(capsys):
    with pytest.raises(SystemExit):
        script("elastic_cache").main(["--accuracy-only", "--llada-problems", "-1"])
    assert "expected a non-negative integer, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, got", [(["--first-conversation", "-1"], "-1"),
                                       (["--conversations", "4", "--first-conversation", "4"], "4")])
def test_first_conversation_must_leave_conversations_to_run(argv, got, capsys):
    with pytest.raises(SystemExit):
        script("question_agnostic").main(argv)
    err = capsys.readouterr().err
    assert "--first-conversation must be in [0, --conversations=" in err and err.rstrip().endswith(f"got {got}")


@pytest.mark.parametrize("method, message", [("snapkv+head", "unknown method 'snapkv+head'"),
                                             ("full+heads", "method 'full+heads': +heads needs a method that scores")])
def test_question_agnostic_methods_are_checked_before_loading_a_model(method, message, capsys):
    with pytest.raises(SystemExit):
        script("question_agnostic").main(["--methods", method])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, argv, message", [
    ("conversation_turns", ["--modes", "kvpass,tokenwise"],
     "argument --modes: unknown mode 'tokenwise'; valid modes: full, kvpass, kvpass-tokenwise"),
    ("conversation_turns", ["--follow-up", "0"], "expected a positive integer, got 0"),
    ("hf_decoder_coverage", ["--types", "llama,lama"], "unknown model type(s) ['lama']"),
    ("hf_decoder_coverage", ["--timeout", "0"], "expected a positive integer, got 0"),
    ("hf_decoder_coverage", ["--resume"], "--resume needs an existing --out file; got no --out"),
    ("decode_floor", ["--models", "tiny,gpt5"], "argument --models: unknown model 'gpt5'; valid models: smollm2-135m"),
    ("decode_floor", ["--budgets", "512,0"], "argument --budgets: expected a positive integer, got 0 (in '512,0')"),
    ("prefill_memory", ["--lengths", "2048,lots"], "argument --lengths: expected comma-separated int values, got "
                                                   "'2048,lots' (each a positive integer)"),
    ("prefill_memory", ["--modes", "full,half"], "argument --modes: unknown mode 'half'; valid modes: full, blockwise"),
    ("question_agnostic", ["--depths", "0.5,1.5"], "argument --depths: expected a number in [0, 1], got 1.5"),
    ("question_agnostic", ["--budgets", ""], "argument --budgets: expected comma-separated int values, got ''"),
    ("vs_kvpress", ["--policies", "snapkv,h2o"], "argument --policies: unknown policy 'h2o'; valid policies: snapkv"),
    ("vs_kvpress", ["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    ("eval_full_kv_reference", ["--benchmarks", "ruler"], "argument --benchmarks: unknown benchmark 'ruler'"),
    ("export_sizes", ["--prefill-block", "none,0"],
     "argument --prefill-block: expected a positive integer, got 0 (in 'none,0')"),
    ("export_sizes", ["--formats", "pt2,onnx"], "argument --formats: unknown format 'onnx'; valid formats: pt2"),
    ("kernels_gpu", ["--heads", "0"], "argument --heads: expected a positive integer, got 0"),
])
def test_arguments_are_checked_before_loading_a_model(name, argv, message, capsys):
    with pytest.raises(SystemExit):
        script(name).main(argv)
    assert message in capsys.readouterr().err
