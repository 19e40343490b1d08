"""kvpass export: each runnable format, loaded in a fresh process, generates the compiled model's greedy tokens."""

import dataclasses
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import tiny_model
from kvpass.lowering.export import FORMATS, get_format

import kvpass
from kvpass import export
from kvpass.apps.cli import main

PROMPT, BUDGET, STEPS = 40, 16, 32  # compression active: 16 of 40 prompt tokens kept, and through decode
OPTIONS = {"policy": "snapkv", "budget": BUDGET, "window": 4}


def prompt_ids() -> list[int]:
    return torch.randint(1, 128, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()


def greedy(model, ids: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # exactly STEPS tokens, like the artifact's loop
    out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def compiled_tokens(options: dict, make=tiny_model) -> list[int]:
    """Greedy tokens of the kvpass-compiled model ``make()`` (fp32), checked to differ from the uncompressed model's."""
    torch._dynamo.reset()
    model = make()
    full = greedy(model, prompt_ids())
    model.forward = torch.compile(model.forward, backend="kvpass", options={**options, "compiler": "aot_eager"})
    tokens = greedy(model, prompt_ids())
    assert tokens != full, "the budget must change the output, or this test could not see compression missing"
    torch._dynamo.reset()
    return tokens


@pytest.fixture(scope="module")
def reference() -> list[int]:
    return compiled_tokens(OPTIONS)


def generate_in_fresh_process(path, prompts: list[list[int]] | None = None) -> list:
    """Greedy tokens of the artifact at ``path`` for ``prompts`` (default: the one test prompt, its tokens only),
    from a fresh process that loads nothing but kvpass."""
    many = prompts is not None
    code = (f"import json, sys, kvpass; m = kvpass.load({str(path)!r}); "
            f"tokens = [m.generate(p, {STEPS}) for p in {prompts or [prompt_ids()]}]; "
            "print(json.dumps([tokens, sorted(k for k in sys.modules if k.startswith('transformers'))]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, model_code = json.loads(run.stdout.strip().splitlines()[-1])
    assert model_code == [], "the loader must not need the model's code"
    return tokens if many else tokens[0]


def assert_weights_stored_once(out) -> None:
    """A pt2/aoti artifact stores each weight once, though both programs use it (twice would be 2x the bytes)."""
    manifest = json.loads((out / "kvpass_export.json").read_text())
    with zipfile.ZipFile(out / manifest["files"][0]) as archive:
        records = [i for i in archive.infolist() if "/data/weights/weight_" in i.filename]
    stored = sum(r.file_size for r in records)
    params = list(tiny_model().parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    assert weight_bytes <= stored < 1.3 * weight_bytes, (stored, weight_bytes)
    assert len(params) <= len(records) < 2 * len(params)


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
    if fmt in ("pt2", "aoti"):
        assert_weights_stored_once(out)
    assert generate_in_fresh_process(out) == reference


def test_head_adaptive_pt2_artifact_matches_compiled_model(tmp_path):
    options = {**OPTIONS, "head_budgets": "adaptive"}
    export(tiny_model(), tmp_path / "pt2", format="pt2", progress=False, **options)
    assert generate_in_fresh_process(tmp_path / "pt2") == compiled_tokens(options)


@pytest.mark.parametrize("arch, attn", [("deepseek_v3", "sdpa"), ("granite_swa", "eager")])
def test_pt2_artifact_of_a_latent_cache_or_with_attention_sinks_matches_compiled_model(arch, attn, tmp_path):
    # dense layers only: an MoE layer calls transformers' own grouped-matmul op, which a loader without transformers
    # cannot deserialize
    full = {"first_k_dense_replace": 2} if arch == "deepseek_v3" else {
        "layer_types": ["full_attention"] * 2, "initializer_range": 0.1}  # (at 0.02 its greedy tokens are constant)

    def make():
        return tiny_model(arch, attn, **full)

    export(make(), tmp_path / "pt2", format="pt2", progress=False, **OPTIONS)
    counters = json.loads((tmp_path / "pt2" / "kvpass_export.json").read_text())["counters"]["decode"]
    assert counters["latent_sites" if arch == "deepseek_v3" else "sink_sites"] == 2
    assert generate_in_fresh_process(tmp_path / "pt2") == compiled_tokens(OPTIONS, make)


def test_jax_breaks_decode_eviction_ties_like_torch(tmp_path):
    # SnapKV's default window (64) exceeds the budget (16): every slot is protected, so each decode eviction is a
    # tie among all slots; torch's and JAX's argmin both take the first, so the tokens still agree
    options = {"policy": "snapkv", "budget": BUDGET}
    torch._dynamo.reset()
    model = tiny_model()
    model.forward = torch.compile(model.forward, backend="kvpass", options={**options, "compiler": "aot_eager"})
    expected = greedy(model, prompt_ids())
    torch._dynamo.reset()
    out = export(tiny_model(), tmp_path / "jax", format="jax", prompt_len=PROMPT, progress=False, **options)
    assert kvpass.load(out).generate(prompt_ids(), STEPS) == expected


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
    assert main(["export", str(tmp_path / "hf"), "--budget", "16", "--format", "jax", "--prefill-block", "8",
                 "--prompt-len", "40", "-o", str(tmp_path / "o2"), "--quiet"]) == 2
    assert capsys.readouterr().err == ("kvpass export: error: --prompt-len 40 does not apply with --prefill-block 8: "
                                       "the block program takes prompts of any length; give one of them\n")
    assert not (tmp_path / "o2").exists()
    (tmp_path / "file").write_text("")
    assert main(["export", str(tmp_path / "hf"), "--budget", "16", "-o", str(tmp_path / "file" / "o3")]) == 2
    assert capsys.readouterr().err == (f"kvpass export: error: cannot write {str(tmp_path / 'file' / 'o3')!r}: "
                                       f"{str(tmp_path / 'file')!r} is not an existing folder\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "onnx"}, "unknown format 'onnx'; valid formats are"),
    ({"format": "jax"}, "static shapes only"),
    ({"ratio": 0.5}, "do not apply to an export"),
    ({"ratio": 0.5, "prefill_block": 8}, "options {'ratio': 0.5} do not apply to an export"),
    ({"prefill_block": 8, "prompt_len": 40, "format": "jax"}, "--prompt-len 40 does not apply with --prefill-block 8"),
    ({"prefill_block": 1}, "at least 2 tokens, got 1"),
    ({"prefill_block": 0}, "prefill_block must be a positive integer, got 0"),
    ({"prefill_block": 8, "policy": "epicache", "episodes": 2}, "'episodes' \\(2\\) keeps one cache per episode"),
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
    with pytest.raises(ValueError, match="has no config.json: not a Hugging Face model directory"):
        export(tmp_path / "out", tmp_path / "o2", progress=False, budget=BUDGET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="is not a kvpass export"):
        kvpass.load(tmp_path / "out")


def test_the_loader_splits_prompts_as_the_block_pass_does():
    """The artifacts' calling convention (lowering, no passes imported) and the backend's block-wise prefill agree."""
    from kvpass.lowering.export.programs import split_prompt

    from kvpass.passes.block_graph import split_prompt as backend_split

    assert all(split_prompt(n, c) == backend_split(n, c) for n in range(1, 70) for c in (1, 2, 7, 8, 64))


def test_every_format_declares_what_it_supports():
    for name in FORMATS:
        fmt = get_format(name)
        assert fmt.name == name and fmt.description
        assert fmt.runnable == (fmt.load is not None)
        assert fmt.prefill_block  # every format exports the block program
        assert fmt.missing() == [], f"{name} needs {fmt.missing()}: the test extra must install it"


# --- block-wise prefill (--prefill-block): one static block program looped over prompts of any length ---------------

BLOCK = 8
BLOCK_OPTIONS = {**OPTIONS, "prefill_block": BLOCK}
BLOCK_PROMPTS = (37, 51)  # longer than budget + block, neither a multiple of the block: a padded first block


def block_prompts() -> list[list[int]]:
    return [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in BLOCK_PROMPTS]


@pytest.fixture(scope="module")
def block_reference() -> list[list[int]]:
    """Greedy tokens of the model compiled with the same options (block-wise prefill, dynamic shapes), per prompt."""
    torch._dynamo.reset()
    model = tiny_model()
    full = [greedy(model, ids) for ids in block_prompts()]
    model.forward = torch.compile(model.forward, backend="kvpass", dynamic=True,
                                  options={**BLOCK_OPTIONS, "compiler": "aot_eager"})
    tokens = [greedy(model, ids) for ids in block_prompts()]
    assert "prefill-block" in [g["kind"] for g in kvpass.explain(model).graphs]
    assert all(a != b for a, b in zip(tokens, full, strict=True)), "compression must change every output"
    torch._dynamo.reset()
    return tokens


@pytest.fixture(scope="module")
def block_artifacts(tmp_path_factory):
    """Block-wise exports, one per format, made on first use and shared by the tests of this module."""
    made = {}

    def get(fmt: str):
        if fmt not in made:
            made[fmt] = export(tiny_model(), tmp_path_factory.mktemp("block") / fmt, format=fmt, progress=False,
                               **BLOCK_OPTIONS)
        return made[fmt]

    return get


@pytest.mark.parametrize("fmt", [
    "pt2", "jax",
    pytest.param("aoti", marks=pytest.mark.slow), pytest.param("tvm", marks=pytest.mark.slow),
])
def test_block_artifact_in_fresh_process_matches_compiled_model(fmt, block_reference, block_artifacts):
    out = block_artifacts(fmt)
    manifest = json.loads((out / "kvpass_export.json").read_text())
    assert manifest["prefill_block"] == BLOCK and manifest["prompt_len"] is None
    assert manifest["budgets"] == [BUDGET, BUDGET]
    assert manifest["counters"]["prefill"]["blocked_sites"] == 2 and manifest["counters"]["prefill"]["block_sites"] == 2
    assert manifest["counters"]["decode"]["decode_sites"] == 2
    if fmt in ("pt2", "aoti"):
        assert_weights_stored_once(out)
    # static-shape formats too: two prompt lengths from one artifact
    assert generate_in_fresh_process(out, block_prompts()) == block_reference


def test_pt2_programs_share_their_weights_in_the_archive_and_once_loaded(block_artifacts, tmp_path):
    from kvpass.lowering.export.pt2 import share_weights
    from torch.export.pt2_archive._package import load_pt2

    out = block_artifacts("pt2")
    assert_weights_stored_once(out)
    with zipfile.ZipFile(out / "program.pt2") as archive:
        configs = [json.loads(archive.read(f"program/data/weights/{name}_weights_config.json"))["config"]
                   for name in ("prefill", "decode")]
    shared = {meta["path_name"] for meta in configs[0].values()} & {meta["path_name"] for meta in configs[1].values()}
    assert len(shared) >= len(list(tiny_model().parameters()))  # every weight: one record, named by both programs
    runner = kvpass.load(out).runner
    prefill = {id(p) for p in runner._prefill.parameters()}
    decode = [id(p) for p in runner._decode.parameters()]
    assert decode and all(p in prefill for p in decode), "the loaded programs must hold the weights once"
    # re-binding only joins equal weights of the same name
    programs = load_pt2(out / "program.pt2").exported_programs
    name, n = next(iter(programs["decode"].state_dict)), len(programs["decode"].state_dict)
    programs["decode"].state_dict[name] = programs["decode"].state_dict[name] + 1
    assert share_weights(programs["prefill"], programs["decode"]) == n - 1
    assert programs["decode"].state_dict[name] is not programs["prefill"].state_dict[name]


def test_block_program_is_static_and_takes_prompts_of_any_length(block_artifacts):
    from torch.export.pt2_archive._package import load_pt2

    out = block_artifacts("pt2")
    programs = load_pt2(out / "program.pt2").exported_programs
    shapes = [tuple(n.meta["val"].shape) for n in programs["prefill"].graph.nodes
              if n.op == "placeholder" and n.name in programs["prefill"].graph_signature.user_inputs]
    assert shapes[:4] == [(1, BLOCK)] * 4  # ids, positions, valid, observe: exactly one block
    assert shapes[4:8] == [(1, 2, BUDGET, 16)] * 4  # the stores of both layers, at the budget
    assert all(isinstance(d, int) for shape in shapes for d in shape)
    model = kvpass.load(out)
    for n in (1, 5, BLOCK, 3 * BLOCK + 1):  # shorter than a block, exactly one, one token into the fourth
        assert len(model.generate(list(range(1, n + 1)), 3)) == 3
    with pytest.raises(ValueError, match="takes 1..1024 tokens"):
        model.generate(list(range(2000)), 3)


def test_block_mlir_parses_back_without_kvpass_ops(block_artifacts):
    from kvpass.lowering.export.to_mlir import check

    out = block_artifacts("mlir")
    assert json.loads((out / "kvpass_export.json").read_text())["prefill_block"] == BLOCK
    files = sorted(p.name for p in out.glob("*.mlir"))
    assert files == ["decode.linalg.mlir", "decode.torch.mlir", "prefill.linalg.mlir", "prefill.torch.mlir"]
    for name in files:
        text = (out / name).read_text()
        assert "kvpass" not in text
        check(text)
    # the block program: ids, positions, valid, observe of one block
    assert f"!torch.vtensor<[1,{BLOCK}],i1>" in (out / "prefill.torch.mlir").read_text()
