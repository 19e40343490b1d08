"""``--format tvm``: Relax modules imported from the decomposed programs, compiled for ``llvm``.

Each program is decomposed into core ATen (kvpass ops → references), imported with
``tvm.relax.frontend.torch.from_exported_program`` (weights kept as inputs, stored once in
``weights.npz``), compiled with ``tvm.compile(mod, "llvm")`` into a shared library, and run by the
Relax VM. Two ATen ops the importer lacks (``amax``, stable ``sort``) get converters here. The prefill is
compiled for one ``--prompt-len``; with ``--prefill-block`` it is the (static) block program instead, which
the loader loops over prompts of any length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.programs import Programs, decompose

WEIGHTS = "weights.npz"
PARAMS = "tvm_params.json"


def _converters() -> dict:
    from tvm import relax

    def amax(node, importer):
        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return importer.block_builder.emit(relax.op.max(x, list(dim) or None, keepdims=keepdim))

    def sort_stable(node, importer):  # relax's argsort is a stable sort
        x = importer.env[node.args[0]]
        dim, descending = node.kwargs.get("dim", -1), node.kwargs.get("descending", False)
        idx = importer.block_builder.emit(relax.op.argsort(x, dim, descending, dtype="int64"))
        values = importer.block_builder.emit(relax.op.gather_elements(x, idx, axis=dim))
        return importer.block_builder.emit(relax.Tuple([values, idx]))

    return {"amax.default": amax, "sort.stable": sort_stable}


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    progress.add(3)
    weights: dict[str, np.ndarray] = {}
    order: dict[str, list[str]] = {}
    files = []
    for name, ep in (("prefill", programs.prefill), ("decode", programs.decode)):
        progress.start(f"decomposing {name}, importing into Relax, compiling for llvm")
        mod = from_exported_program(decompose(ep), keep_params_as_input=True, custom_convert_map=_converters(),
                                    run_ep_decomposition=False)
        mod, params = relax.frontend.detach_params(mod)
        func = mod["main"]
        n_inputs = int(func.attrs["num_input"])
        names = [v.name for v in func.params[n_inputs:]]
        for key, arr in zip(names, params["main"], strict=True):
            value = arr.numpy()
            if key in weights and not np.array_equal(weights[key], value):
                raise RuntimeError(f"kvpass export --format tvm: weight {key!r} differs between the programs")
            weights[key] = value
        order[name] = names
        tvm.compile(mod, "llvm").export_library(str(out / f"{name}.so"))
        files.append(f"{name}.so")
        progress.done()
    progress.start("saving weights")
    np.savez(out / WEIGHTS, **weights)
    (out / PARAMS).write_text(json.dumps(order))
    progress.done()
    return [*files, WEIGHTS, PARAMS]


class TvmRunner:
    """Runs both compiled modules in Relax VMs; the state stays TVM tensors between calls."""

    def __init__(self, path: Path) -> None:
        import tvm
        from tvm import relax

        order = json.loads((path / PARAMS).read_text())
        dev = tvm.cpu()
        with np.load(path / WEIGHTS) as data:
            weights = {k: tvm.runtime.tensor(data[k], dev) for k in data.files}
        self._vms, self._params = {}, {}
        for name in ("prefill", "decode"):
            self._vms[name] = relax.VirtualMachine(tvm.runtime.load_module(str(path / f"{name}.so")), dev)
            self._params[name] = [weights[k] for k in order[name]]
        self._tensor = lambda a: tvm.runtime.tensor(a, dev)

    def _run(self, name: str, *inputs: Any) -> tuple[np.ndarray, Any]:
        logits, *state = self._vms[name]["main"](*inputs, *self._params[name])
        return logits.numpy()[0, -1], state

    def prefill(self, ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        return self._run("prefill", self._tensor(ids), self._tensor(positions))

    def decode(self, ids: np.ndarray, positions: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        return self._run("decode", self._tensor(ids), self._tensor(positions), *state)

    def prefill_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, observe: np.ndarray,
                      state: Any) -> tuple[np.ndarray, Any]:
        import torch

        state = [self._tensor(s.numpy()) if isinstance(s, torch.Tensor) else s for s in state]
        return self._run("prefill", *map(self._tensor, (ids, positions, valid, observe)), *state)


def load(path: Path, manifest: dict) -> TvmRunner:
    return TvmRunner(path)


FORMAT = ExportFormat(
    name="tvm",
    description="Relax modules (apache-tvm) compiled for llvm, run by the Relax VM",
    requires=("tvm",),
    install="pip install apache-tvm==0.27.0",
    dynamic_prompt=False,
    keeps_kvpass_ops=False,
    runnable=True,
    prefill_block=True,
    write=write,
    load=load,
)
