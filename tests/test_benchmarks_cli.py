"""The benchmark scripts refuse nonsense counts before running anything, quoting the value."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, argv", [
    ("decode_floor", ["--repeats", "0"]),
    ("decode_floor", ["--steps", "-3"]),
    ("elastic_cache", ["--accuracy-only", "--problems", "0"]),
])
def test_benchmark_counts_must_be_positive(name, argv, capsys):
    with pytest.raises(SystemExit):
        script(name).main(argv)
    err = capsys.readouterr().err
    assert f"expected a positive integer, got '{argv[-1]}'" in err


def test_llada_problems_may_be_zero_but_not_negative(capsys):
    with pytest.raises(SystemExit):
        script("elastic_cache").main(["--accuracy-only", "--llada-problems", "-1"])
    assert "expected a non-negative integer, got '-1'" in capsys.readouterr().err


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
    ("conversation_turns", ["--modes", "kvpass,tokenwise"], "unknown mode(s) ['tokenwise']"),
    ("conversation_turns", ["--follow-up", "0"], "expected a positive integer, got '0'"),
    ("hf_decoder_coverage", ["--types", "llama,lama"], "unknown model type(s) ['lama']"),
    ("hf_decoder_coverage", ["--timeout", "0"], "expected a positive integer, got '0'"),
    ("hf_decoder_coverage", ["--resume"], "--resume needs an existing --out file; got no --out"),
])
def test_arguments_are_checked_before_loading_a_model(name, argv, message, capsys):
    with pytest.raises(SystemExit):
        script(name).main(argv)
    assert message in capsys.readouterr().err
