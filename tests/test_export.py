"""kvpass export: each runnable format, loaded in a fresh process, generates the compiled model's greedy tokens."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from kvpass.lowering.export import FORMATS, export, get_format

import kvpass
from kvpass.cli import main

PROMPT, BUDGET, STEPS = 40, 16, 32  # compression active: 16 of 40 prompt tokens kept, and through decode
OPTIONS = {"policy": "snapkv", "budget": BUDGET, "window": 4}


def prompt_ids() -> list[int]:
    return torch.randint(1, 128, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()


def greedy(model, ids: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # exactly STEPS tokens, like the artifact's loop
    out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """Greedy tokens of the kvpass-compiled model (fp32), checked to differ from the uncompressed model's."""
    torch._dynamo.reset()
    model = tiny_model()
    full = greedy(model, prompt_ids())
    model.forward = torch.compile(model.forward, backend="kvpass", options={**OPTIONS, "compiler": "aot_eager"})
    tokens = greedy(model, prompt_ids())
    assert tokens != full, "the budget must change the output, or this test could not see compression missing"
    torch._dynamo.reset()
    return tokens


def generate_in_fresh_process(path) -> list[int]:
    code = f"import json, kvpass; print(json.dumps(kvpass.load({str(path)!r}).generate({prompt_ids()}, {STEPS})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", [
    "pt2", "jax",
    pytest.param("aoti", marks=pytest.mark.slow), pytest.param("tvm", marks=pytest.mark.slow),
])
def test_artifact_in_fresh_process_matches_compiled_model(fmt, reference, tmp_path):
    out = tmp_path / fmt
    static = {} if get_format(fmt).dynamic_prompt else {"prompt_len": PROMPT}
    export(tiny_model(), out, format=fmt, progress=False, **OPTIONS, **static)
    manifest = json.loads((out / "kvpass_export.json").read_text())
    assert manifest["budgets"] == [BUDGET, BUDGET] and manifest["format"] == fmt
    assert manifest["counters"]["decode"]["decode_sites"] == 2
    assert generate_in_fresh_process(out) == reference


def test_loader_does_not_import_the_model_code(tmp_path):
    export(tiny_model(), tmp_path / "a", progress=False, **OPTIONS)
    code = (f"import sys, kvpass; m = kvpass.load({str(tmp_path / 'a')!r}); m.generate([1, 2, 3], 2); "
            "print(sorted(k for k in sys.modules if k.startswith('transformers')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"


def test_pt2_dynamic_prompt_and_static_prompt_check(tmp_path):
    export(tiny_model(), tmp_path / "pt2", progress=False, **OPTIONS)
    model = kvpass.load(tmp_path / "pt2")
    assert len(model.generate(list(range(1, 9)), 3)) == 3  # shorter than the budget: empty slots
    assert len(model.generate(list(range(1, 100)), 3)) == 3
    with pytest.raises(ValueError, match="2..1024"):
        model.generate([5], 3)


def test_mlir_parses_back_without_kvpass_ops(tmp_path):
    from kvpass.lowering.export.to_mlir import check

    out = export(tiny_model(), tmp_path / "m", format="mlir", prompt_len=PROMPT, progress=False, **OPTIONS)
    files = sorted(p.name for p in out.glob("*.mlir"))
    assert files == ["decode.linalg.mlir", "decode.torch.mlir", "prefill.linalg.mlir", "prefill.torch.mlir"]
    for name in files:
        text = (out / name).read_text()
        assert "kvpass" not in text
        ops = check(text)
        if "linalg" in name:
            assert ops.get("linalg.generic", 0) > 0 and not any(op.startswith("torch.") for op in ops)
        else:
            assert any(op.startswith("torch.aten.") for op in ops) and "torch.operator" not in ops
    with pytest.raises(ValueError, match="downstream compilers"):
        kvpass.load(out)
    with pytest.raises(ValueError, match="unresolved kvpass op"):
        check('func.func @f(%a: !torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32> {\n'
              '  %0 = torch.operator "kvpass.attend"(%a) : (!torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32>\n'
              '  return %0 : !torch.vtensor<[2],f32>\n}')


def test_cli_exports_a_local_hf_directory(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "hf")
    assert main(["export", str(tmp_path / "hf"), "--budget", "16", "--format", "pt2", "-o", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(kvpass.load(tmp_path / "o").generate(prompt_ids(), 4)) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "onnx"}, "unknown format 'onnx'; valid formats are"),
    ({"format": "jax"}, "static shapes only"),
    ({"prefill_block": 64}, "--prefill-block 64 is not yet supported"),
    ({"ratio": 0.5}, "do not apply to an export"),
    ({"policy": "nope"}, "unknown policy 'nope'"),
    ({"prompt_len": 1, "format": "jax"}, "at least 2"),
    ({"budget": 0}, "positive integer"),
])
def test_bad_requests_fail_before_writing(kwargs, message, tmp_path):
    kwargs = {"budget": BUDGET, **kwargs}
    with pytest.raises(ValueError, match=message):
        export(tiny_model(), tmp_path / "out", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    from kvpass.lowering.export import pt2

    def broken(programs, out, progress):
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pt2, "FORMAT", dataclasses.replace(pt2.FORMAT, write=broken))
    with pytest.raises(RuntimeError, match="disk full"):
        export(tiny_model(), tmp_path / "out", progress=False, budget=BUDGET)
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output_and_unknown_model(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export(tiny_model(), tmp_path / "out", progress=False, budget=BUDGET)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="neither a local Hugging Face model directory nor a model kvpass ships"):
        export("no-such-model", tmp_path / "o2", progress=False, budget=BUDGET)
    with pytest.raises(ValueError, match="is not a kvpass export"):
        kvpass.load(tmp_path / "out")


def test_every_format_declares_what_it_supports():
    for name in FORMATS:
        fmt = get_format(name)
        assert fmt.name == name and fmt.description
        assert fmt.runnable == (fmt.load is not None)
        assert fmt.missing() == [], f"{name} needs {fmt.missing()}: the test extra must install it"
