"""kvpass tune: smoke run in the interpreter, the cache it writes, --show, errors, and launches reading it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import kernel_helpers as kh  # noqa: F401  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
import triton
from kvpass.kernels import attend_scores as A
from kvpass.kernels import tuning

from kvpass.apps.cli import main

SIZES = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--budget", "20", "--block", "4", "--max-configs", "2"]


def test_smoke_tune_writes_cache_that_launches_use(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "sub" / "tune.json"
    assert main(["tune", "--smoke", *SIZES, "--cache", str(cache), "--dtype", "float32"]) == 0
    entries = json.loads(cache.read_text())["entries"]
    kernels = sorted(e["kernel"] for e in entries.values())
    assert kernels == ["attend_scores", "attend_scores", "compact"]  # compact's two shapes share a bucket
    for key, e in entries.items():
        assert key == f"{e['kernel']}|{e['bucket']}|cpu (triton interpreter)|{triton.__version__}"
        assert e["ms"] > 0 and e["configs_timed"] >= 1 and e["smoke"] is True
    assert "wrote 3 entries" in capsys.readouterr().out

    assert main(["tune", "--show", "--cache", str(cache)]) == 0
    shown = capsys.readouterr().out
    assert "3 entries" in shown and "d16-g2-t4-n32-float32-obs1" in shown

    # a launch of a tuned shape takes the cached config, not the default heuristic
    monkeypatch.setenv("KVPASS_TUNE_CACHE", str(cache))
    key = next(k for k in entries if k.startswith("attend_scores|d16-g2-t1-"))
    q, k, pos = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 21, 16), torch.arange(21).expand(1, 2, 21).contiguous()
    assert tuning.lookup("attend_scores", A.shape_bucket(q, k, 1), q.device) == entries[key]["config"]
    with mock.patch.object(A, "default_config", side_effect=AssertionError("default used")):
        out, obs = A.attend_scores(q, k, k, pos, 0.25, 1)
    assert out.shape == q.shape and torch.allclose(obs.sum(-1), torch.ones(1, 4))


def test_the_console_command_smoke_tunes_though_kvpass_imported_triton_first(tmp_path):
    """`kvpass tune --smoke` from a shell: kvpass (torch._dynamo) imports Triton before the command can turn the
    interpreter on, so the command reruns itself in a process that has TRITON_INTERPRET=1 from the start."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tmp_path / "t.json"
    run = subprocess.run([sys.executable, "-m", "kvpass.apps.cli", "tune", "--smoke", "--heads", "2", "--head-dim",
                          "16", "--budget", "8", "--block", "2", "--max-configs", "1", "--kernels", "compact",
                          "--cache", str(cache)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 1 entries" in run.stdout and len(json.loads(cache.read_text())["entries"]) == 1


def test_model_config_path(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}))
    cache = tmp_path / "t.json"
    argv = ["tune", "--smoke", "--model", str(tmp_path), "--kernels", "compact", "--budget", "8", "--block", "2",
            "--max-configs", "1", "--cache", str(cache)]
    assert main(argv) == 0
    (entry,) = json.loads(cache.read_text())["entries"].values()
    assert entry["bucket"] == "d16-n16-c8-bfloat16" and entry["shape"]["heads"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "4", "--kv-heads", "3", "--head-dim", "16"], "query heads (4) must be a multiple of kv heads (3)"),
        (["--heads", "4"], "give --model NAME_OR_PATH, or --heads, --head-dim"),
        (["--model", "no/such/model"], "--model 'no/such/model' is neither a shipped model"),
    ],
)
def test_bad_shapes_are_clear_errors(argv, message, tmp_path, capsys):
    assert main(["tune", "--smoke", *argv, "--cache", str(tmp_path / "t.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert line.startswith("kvpass tune: error: ") and message in line


def test_unknown_kernel_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--smoke", "--heads", "2", "--head-dim", "16", "--kernels", "compact,softmax"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "argument --kernels: unknown kernel 'softmax'; valid kernels: attend_scores, compact" in line


def test_missing_gpu_without_smoke(tmp_path, capsys):
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert main(["tune", *SIZES, "--cache", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU found" in err and "--smoke" in err


def test_unwritable_cache_path_is_quoted(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = blocker / "tune.json"  # a folder that cannot exist: its parent is a file
    assert main(["tune", "--smoke", *SIZES, "--cache", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"kvpass tune: error: cannot write the tune cache {str(bad)!r}: {str(blocker)!r} is a file, not a "
                    "folder; pass a writable file with --cache or set $KVPASS_TUNE_CACHE")


def test_smoke_tune_of_the_elastic_kernel(tmp_path, monkeypatch, capsys):
    from kvpass.kernels import elastic_drift as E

    cfg = tmp_path / "config.json"  # a diffusion LM's config: its kernel is the default
    cfg.write_text(json.dumps({"model_type": "llada", "num_attention_heads": 2, "hidden_size": 32}))
    cache = tmp_path / "t.json"
    argv = ["tune", "--smoke", "--model", str(cfg), "--canvas", "24", "--step-rows", "6", "--max-configs", "2",
            "--dtype", "float32", "--cache", str(cache)]
    assert main(argv) == 0
    entries = json.loads(cache.read_text())["entries"]
    assert sorted(e["bucket"] for e in entries.values()) == ["d16-q32-n32-float32", "d16-q8-n32-float32"]
    assert all(e["kernel"] == "elastic_drift" and e["configs_timed"] >= 1 for e in entries.values())
    monkeypatch.setenv("KVPASS_TUNE_CACHE", str(cache))
    q, kc = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 24, 16)
    rows, one = torch.arange(6), torch.ones(1)
    with mock.patch.object(E, "default_config", side_effect=AssertionError("default used")):
        out = E.elastic_attend(q, q, q, rows, kc, kc, kc, rows[:1], one, rows[:1], one, torch.zeros(24, dtype=bool))
    assert out[0].shape == q.shape and torch.allclose(out[5].sum(), torch.tensor(2.0))  # one window row, 2 heads


def test_smoke_tune_of_snapkv_scores(tmp_path):
    cache = tmp_path / "t.json"
    assert main(["tune", "--smoke", *SIZES, "--kernels", "snapkv_scores,compact", "--cache", str(cache)]) == 0
    entries = json.loads(cache.read_text())["entries"]
    # compact's prefill and decode shapes share a bucket; SnapKV scores only the prefill block
    assert sorted(e["bucket"] for e in entries.values()) == ["d16-n32-c32-bfloat16", "g2-n32"]


def test_elastic_kernel_needs_multi_head_shapes(tmp_path, capsys):
    argv = ["tune", "--smoke", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--kernels", "elastic_drift",
            "--cache", str(tmp_path / "t.json")]
    assert main(argv) == 2
    assert "elastic_drift: the Elastic-Cache attention is multi-head (kv heads = heads); got 4 heads and 2" in \
        capsys.readouterr().err
