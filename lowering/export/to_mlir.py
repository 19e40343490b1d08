"""``--format mlir``: both programs as MLIR text, in the ``torch`` and ``linalg-on-tensors`` dialects.

The programs are decomposed into core ATen first (the ``kvpass::*`` ops replaced by their references:
torch-mlir has no kvpass dialect, and an op it does not know would stay an opaque ``torch.operator``),
then imported with ``torch_mlir.fx.export_and_import``. Nothing here runs the modules: they are for
downstream MLIR compilers (IREE, a torch-mlir backend). The linalg output uses torch-mlir's
``tm_tensor`` ops for scans and sorts (``cumsum``, ``sort``), a dialect the Python bindings do not
register: that file is written in MLIR's generic op form, and :func:`check` parses it with
unregistered dialects allowed.
torch-mlir has no ``aten.sort.stable``: it becomes ``aten.sort`` (``tm_tensor.sort``), so which of
several *equally* scored slots survives an eviction may differ from torch's stable choice.
With ``--prefill-block`` the prefill module is the static block program (see
:mod:`kvpass.lowering.export.programs` for its calling convention), usable for prompts of any length.
"""

from __future__ import annotations

from pathlib import Path

from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.programs import Programs, decompose

DIALECTS = {"torch": "torch", "linalg": "linalg-on-tensors"}


def check(text: str) -> dict[str, int]:
    """Parse ``text`` back in a torch-mlir context and verify it; returns op name → count.

    Raises ``ValueError`` if the module does not parse or verify, or still calls a kvpass op.
    """
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_dialect

    ctx = ir.Context()
    torch_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True  # tm_tensor (see the module docstring)
    try:
        module = ir.Module.parse(text, ctx)
    except Exception as err:
        raise ValueError(f"kvpass export --format mlir: the emitted module does not parse back: {err}") from err
    if not module.operation.verify():
        raise ValueError("kvpass export --format mlir: the emitted module does not verify")
    counts: dict[str, int] = {}
    kvpass_ops: list[str] = []

    def visit(op) -> ir.WalkResult:
        name = op.name
        counts[name] = counts.get(name, 0) + 1
        if "kvpass" in name or (name == "torch.operator" and "kvpass" in str(op.attributes["name"])):
            kvpass_ops.append(str(op))
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    if kvpass_ops:
        raise ValueError(f"kvpass export --format mlir: unresolved kvpass op(s) left: {kvpass_ops[:3]}")
    return counts


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    from torch_mlir.fx import export_and_import

    progress.add(2)
    files = []
    for name, ep in (("prefill", programs.prefill), ("decode", programs.decode)):
        progress.start(f"decomposing {name}, importing into MLIR (torch, linalg-on-tensors)")
        decomposed = decompose(ep)
        _unstable_sorts(decomposed)
        for short, output_type in DIALECTS.items():
            module = export_and_import(decomposed, output_type=output_type, func_name=name)
            # generic op form: parseable by any MLIR tool even where tm_tensor is not registered
            text = module.operation.get_asm(print_generic_op_form=short == "linalg")
            check(text)
            file = f"{name}.{short}.mlir"
            (out / file).write_text(text)
            files.append(file)
        progress.done()
    return files


def _unstable_sorts(ep) -> None:
    import torch

    aten = torch.ops.aten
    for node in ep.graph.find_nodes(op="call_function", target=aten.sort.stable):
        node.target = aten.sort.default
        node.args = (node.args[0], node.kwargs.get("dim", -1), node.kwargs.get("descending", False))
        node.kwargs = {}
    ep.graph_module.recompile()


FORMAT = ExportFormat(
    name="mlir",
    description="MLIR text of both programs in the torch and linalg-on-tensors dialects (torch-mlir)",
    requires=("torch_mlir",),
    install="pip install torch-mlir==20261001",
    dynamic_prompt=False,
    keeps_kvpass_ops=False,
    runnable=False,
    prefill_block=True,
    write=write,
)
