"""The kvpass command line: bad input is rejected with the value quoted; the demo runs end to end."""

import pytest

from kvpass.apps.cli import main


@pytest.mark.parametrize("argv, quoted", [
    (["demo", "--budget", "0"], "'0'"),
    (["demo", "--budget", "lots"], "'lots'"),
    (["demo", "--policy", "h3o"], "'h3o'"),
    (["demo", "--compiler", "tvm"], "'tvm'"),
    (["demo", "--model", "gpt5"], "'gpt5'"),
])
def test_bad_arguments_exit_with_the_value_quoted(argv, quoted, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert quoted in capsys.readouterr().err


def test_demo_runs_on_the_default_model(capsys):
    assert main(["demo", "--compiler", "aot_eager", "--context", "256", "--budget", "64", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "full KV (eager HF)" in out and "kvpass snapkv budget 64" in out
    assert "layers 0-29: sdpa attention" in out
