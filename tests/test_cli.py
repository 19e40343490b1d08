"""The kvpass command line: every bad input is one line on stderr and exit status 2; the demo says what it does
and what a miss means; the demo runs end to end."""

import io
import subprocess
import sys
import time

import pytest

from kvpass.apps import command
from kvpass.apps.cli import DemoRun, Progress, main, report
from kvpass.errors import OptionError


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--budget", "0"], "argument --budget: expected a positive integer, got 0"),
    (["demo", "--budget", "lots"], "argument --budget: expected a positive integer, got 'lots'"),
    (["demo", "--context", "-5"], "argument --context: expected a positive integer, got -5"),
    (["demo", "--policy", "h3o"], "argument --policy: invalid choice: 'h3o'"),
    (["demo", "--compiler", "tvm"], "argument --compiler: invalid choice: 'tvm'"),
    (["demo", "--model", "gpt5"], "argument --model: invalid choice: 'gpt5'"),
    (["export", "smollm2-135m", "--budget", "0", "-o", "x"], "argument --budget: expected a positive integer, got 0"),
    (["export", "smollm2-135m", "--budget", "8", "--format", "onnx", "-o", "x"], "invalid choice: 'onnx'"),
    (["export", "smollm2-135m", "--budget", "8", "--policy", "nope", "-o", "x"], "invalid choice: 'nope'"),
    (["export", "smollm2-135m", "--budget", "8"], "the following arguments are required: -o/--out"),
    (["eval", "--budgets", "256,x"], "argument --budgets: expected comma-separated int values, got '256,x'"),
    (["eval", "--policies", "full,magic"], "argument --policies: unknown policy 'magic'; valid policies: full, "),
    (["eval", "--threads", "-1"], "argument --threads: expected a non-negative integer, got -1"),
    (["tune", "--kernels", "softmax"], "argument --kernels: unknown kernel 'softmax'; valid kernels: attend_scores"),
    ([], "the following arguments are required: command"),
])
def test_bad_arguments_are_one_line_quoting_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"kvpass{' ' + argv[0] if argv else ''}: error: ") and message in line


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("mine")
    cases = [
        (["nosuchmodel"], "model 'nosuchmodel' is neither a local Hugging Face model directory nor a model kvpass "
                          "ships (gemma3-270m, smollm2-135m)"),
        ([str(tmp_path / "empty")], "has no config.json: not a Hugging Face model directory"),
        (["smollm2-135m", "--format", "jax"], "format 'jax' has static shapes only"),
        (["smollm2-135m", "--format", "jax", "--prefill-block", "8", "--prompt-len", "40"],
         "--prompt-len 40 does not apply with --prefill-block 8"),
        (["smollm2-135m", "--prefill-block", "1"], "--prefill-block must be at least 2 tokens, got 1"),
    ]
    for argv, message in cases:
        assert main(["export", *argv, "--budget", "16", "-o", str(tmp_path / "out"), "--quiet"]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("kvpass export: error: ") and message in line
    for out, message in [(tmp_path / "file" / "out", f"{str(tmp_path / 'file')!r} is not an existing folder"),
                         (tmp_path / "file", f"output {str(tmp_path / 'file')!r} exists and is not an empty "
                                             "directory")]:
        assert main(["export", "smollm2-135m", "--budget", "16", "-o", str(out)]) == 2
        assert message in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]
    assert (tmp_path / "file").read_text() == "mine"


def test_eval_output_folder_is_checked_before_running(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["eval", "--out", str(tmp_path / "file" / "results"), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (f"kvpass eval: error: cannot write the results folder {str(tmp_path / 'file' / 'results')!r}: "
                    f"{str(tmp_path / 'file')!r} is a file, not a folder; pass a writable folder with --out")


def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "kvpass.apps.cli", "export", "nosuchmodel", "--budget", "512",
                          "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert one_line(run.stderr).startswith("kvpass export: error: model 'nosuchmodel' is neither")


def test_user_errors_are_one_line_bugs_keep_their_traceback(monkeypatch, capsys):
    def fails(err):
        def handler(args):
            raise err
        return handler

    monkeypatch.delenv("KVPASS_DEBUG", raising=False)
    message = "kvpass: option 'budget' must be a positive integer, got 0\n\nfrom user code:\n  File x.py, line 1"
    for err in (OptionError(message), ValueError("kvpass demo: bad\nvalue"), FileNotFoundError(2, "No such file", "f"),
                ModuleNotFoundError("model 'x' needs the package 'y'")):
        assert command.run_handler(fails(err), None, "kvpass demo") == 2
    assert capsys.readouterr().err.splitlines() == [
        "kvpass demo: error: option 'budget' must be a positive integer, got 0",
        "kvpass demo: error: bad value",
        "kvpass demo: error: [Errno 2] No such file: 'f'",
        "kvpass demo: error: model 'x' needs the package 'y'",
    ]
    with pytest.raises(KeyError):  # a bug: traceback
        command.run_handler(fails(KeyError("layer")), None, "kvpass demo")
    with pytest.raises(ModuleNotFoundError):  # kvpass's own module missing: a broken install, traceback
        command.run_handler(fails(ModuleNotFoundError("no kvpass.ops", name="kvpass.ops")), None, "kvpass demo")
    monkeypatch.setenv("KVPASS_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        command.run_handler(fails(ValueError("bad")), None, "kvpass demo")


def test_progress_lines_are_timestamped_and_a_long_step_keeps_talking():
    out = io.StringIO()
    progress = Progress(out, every=0.05)
    with progress.step("kvpass: compiling", "compiling"):
        time.sleep(0.17)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[") and lines[0].endswith("s] kvpass: compiling ...")
    assert any("still compiling (" in line for line in lines[1:-1])
    assert "done compiling in" in lines[-1]


def runs(full_ok: bool, kvpass_ok: bool) -> list[DemoRun]:
    return [DemoRun("full KV (eager HF)", "3806588." if full_ok else "12.", full_ok, 5.2, 95.4, 95_063_040),
            DemoRun("kvpass snapkv budget 512", "3806588." if kvpass_ok else "38.", kvpass_ok, 4.8, 67.3, 23_592_960,
                    slots=[512] * 30)]


def test_a_miss_is_explained_in_plain_words_with_the_budget_that_answers():
    text = report(runs(True, False), policy="snapkv", budget=512, prompt_len=2048, new_tokens=16,
                  expected="3806588", needle=(1010, 1031), compile_s=201.3)
    assert "'38.' (missed: expected 3806588)" in text and "'3806588.' (right)" in text
    assert "kept 512 of the 2048 prompt tokens per layer" in text
    assert "SnapKV at budget 512 did not keep the pass key's tokens (the pass key sentence is prompt tokens " \
           "1010-1030)" in text
    assert "retrieval fidelity at this budget, not a compilation error" in text
    assert "kvpass keeps exactly the tokens kvpress's SnapKV keeps at equal settings (BENCHMARKS.md)" in text
    assert "--budget 2064 (the 2048 prompt tokens plus the 16 new ones: no eviction" in text
    assert "201.3 s" in text


def test_the_report_says_when_both_answer_or_the_model_itself_misses():
    both = report(runs(True, True), policy="snapkv", budget=512, prompt_len=2048, new_tokens=16, expected="3806588")
    assert "Both answered" in both and "4.0x less KV" in both and "Why" not in both
    neither = report(runs(False, False), policy="h2o", budget=512, prompt_len=2048, new_tokens=16, expected="3806588")
    assert "misses the pass key even with its full KV cache" in neither and "Why" not in neither
    other = report(runs(True, False), policy="h2o", budget=512, prompt_len=2048, new_tokens=16, expected="3806588")
    assert "H2O at budget 512" in other and "kvpress" not in other
    assert "with nothing evicted, kvpass's compiled model answers as the full-KV run does" in other


def test_demo_runs_on_the_default_model(capsys):
    assert main(["demo", "--compiler", "aot_eager", "--context", "256", "--budget", "64", "--new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "full KV (eager HF)" in captured.out and "kvpass snapkv budget 64" in captured.out
    assert "layers 0-29: sdpa attention" in captured.out
    for step in ("loading smollm2-135m", "full KV (eager HF): prefill", "compiling the prefill and decode graphs",
                 "done compiling in", "kvpass: prefill"):
        assert step in captured.err
