"""The decoder-coverage harness: a row per (model type, attention) that says what kvpass did, never a guess."""

import json

from test_benchmarks_cli import script

coverage = script("hf_decoder_coverage")


def test_llama_row_is_exact_and_compressed_to_the_budget():
    row = coverage.check("llama", "sdpa")
    assert row["status"] == "exact" and row["tokens_equal"] and row["max_logit_diff"] <= 1e-5
    assert row["counters"]["sdpa_sites"] == 4
    assert row["compressed_slots"] == [16, 16, 16, 16] and row["compressed_compiles"] == 2


def test_a_form_kvpass_does_not_compress_is_a_refused_row_with_kvpass_message():
    row = coverage.check("diffllama", "eager")  # differential attention: two softmaxes over one cache
    assert row["status"] == "refused" and "kvpass:" in row["error"]


def test_sub_configs_are_shrunk_too():
    model = coverage.tiny_model("gemma3", "sdpa")  # a full-size vision tower would fill memory
    assert model.config.vision_config.hidden_size == 64 and model.config.text_config.num_hidden_layers == 4


def test_per_layer_kinds_cycle_so_the_tiny_layers_mix_them():
    # Jamba-style hybrids put their first attention layer past the 4th; Gemma-3 its first full-attention layer
    sizes = coverage.tiny_sizes({"layer_types": ["mamba"] * 5 + ["attention"], "hidden_size": 2048})
    assert sizes == {"layer_types": ["mamba", "attention", "mamba", "attention"], "hidden_size": 64}


def test_a_crash_is_reported_by_its_exception_not_a_trailing_warning():
    stderr = "Traceback (most recent call last):\nRuntimeError: boom\n[transformers] `cache_params` is deprecated."
    assert coverage.crash(1, stderr) == "RuntimeError: boom"
    assert coverage.crash(-9, "[transformers] a warning") == "process died (exit -9)"


def test_resume_keeps_the_rows_it_has(tmp_path, capsys):
    out = tmp_path / "coverage.json"
    rows = [{"type": "llama", "attn": a, "status": "exact"} for a in coverage.ATTENTION]
    out.write_text(json.dumps({"rows": rows}))
    assert coverage.main(["--types", "llama", "--out", str(out), "--resume"]) == 0  # nothing left to check
    assert "1 model types, 2 rows" in capsys.readouterr().out
