"""``--format aoti``: both programs compiled ahead of time by AOTInductor into one package (CPU here).

The decode step is compiled with the kvpass ops' references inlined (static shapes: Inductor fuses the
masking, scoring and compaction with the model's code, as the backend does for decode graphs); so is the
block program of ``--prefill-block`` (static shapes as well). A whole-prompt prefill keeps the opaque ops
(dynamic prompt length), which the package calls back through the PyTorch dispatcher, so the loading
process imports ``kvpass.ops`` (not the model's code).

The weights are not compiled into the shared libraries: AOTInductor writes them beside (its
``package_constants_on_disk_format="pickle_weights"``), and the packager stores a weight both programs use
once (it groups weights by storage across models); the loader loads them once and hands the same tensors
to both programs (``load_pt2(..., load_weights_from_disk=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.programs import Programs, decompose
from kvpass.lowering.export.pt2 import TorchRunner

FILE = "model.pt2"
# package, and keep the weights out of the .so files: package_aoti then stores each one once for both programs
OPTIONS = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
           "aot_inductor.package_constants_on_disk_format": "pickle_weights"}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    from torch._inductor.package import package_aoti

    if _device() != "cpu":  # the programs were exported on CPU tensors; AOTI compiles for where they live
        raise ValueError("kvpass export: --format aoti compiles for CPU here; a CUDA package needs the model and "
                         "example inputs on CUDA, which the exporter does not do yet")
    progress.add(3)
    files = {}
    block = programs.manifest["prefill_block"] is not None  # the block program has static shapes too
    for name, ep, example, inline in (("prefill", programs.prefill, programs.prefill_example, block),
                                      ("decode", programs.decode, programs.decode_example, True)):
        progress.start(f"AOTInductor: compiling {name} (minutes on a small CPU)")
        if inline:
            ep = decompose(ep)
        files[name] = torch._inductor.aot_compile(ep.module(), example, options=OPTIONS)
        progress.done()
    progress.start("packaging AOTInductor")
    package_aoti(str(out / FILE), files)
    progress.done()
    return [FILE]


def load(path: Path, manifest: dict) -> TorchRunner:
    from torch.export.pt2_archive._package import load_pt2

    import kvpass.ops  # noqa: F401  (the prefill calls kvpass::* ops through the dispatcher)

    runners = load_pt2(str(path / FILE), load_weights_from_disk=True).aoti_runners
    return TorchRunner(runners["prefill"], runners["decode"])


FORMAT = ExportFormat(
    name="aoti",
    description="AOTInductor package (compiled prefill + decode step shared libraries), CPU",
    requires=(),
    install="",
    dynamic_prompt=True,
    keeps_kvpass_ops=True,
    runnable=True,
    prefill_block=True,
    write=write,
    load=load,
)
