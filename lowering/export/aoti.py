"""``--format aoti``: both programs compiled ahead of time by AOTInductor into one package (CPU here).

The decode step is compiled with the kvpass ops' references inlined (static shapes: Inductor fuses the
masking, scoring and compaction with the model's code, as the backend does for decode graphs); the
prefill keeps the opaque ops (dynamic prompt length), which the package calls back through the
PyTorch dispatcher, so the loading process imports ``kvpass.ops`` (not the model's code).
"""

from __future__ import annotations

from pathlib import Path

import torch
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.core import Programs, decompose
from kvpass.lowering.export.pt2 import TorchRunner

FILE = "model.pt2"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    from torch._inductor.package import package_aoti

    if _device() != "cpu":  # the programs were exported on CPU tensors; AOTI compiles for where they live
        raise ValueError("kvpass export: --format aoti compiles for CPU here; a CUDA package needs the model and "
                         "example inputs on CUDA, which the exporter does not do yet")
    progress.add(3)
    files = {}
    for name, ep, example, inline in (("prefill", programs.prefill, programs.prefill_example, False),
                                      ("decode", programs.decode, programs.decode_example, True)):
        progress.start(f"AOTInductor: compiling {name} (minutes on a small CPU)")
        if inline:
            ep = decompose(ep)
        files[name] = torch._inductor.aot_compile(ep.module(), example, options={"aot_inductor.package": True})
        progress.done()
    progress.start("packaging AOTInductor")
    package_aoti(str(out / FILE), files)
    progress.done()
    return [FILE]


def load(path: Path, manifest: dict) -> TorchRunner:
    from torch._inductor.package import load_package

    import kvpass.ops  # noqa: F401  (the prefill calls kvpass::* ops through the dispatcher)

    file = str(path / FILE)
    return TorchRunner(load_package(file, "prefill"), load_package(file, "decode"))


FORMAT = ExportFormat(
    name="aoti",
    description="AOTInductor package (compiled prefill + decode step shared libraries), CPU",
    requires=(),
    install="",
    dynamic_prompt=True,
    keeps_kvpass_ops=True,
    runnable=True,
    write=write,
    load=load,
)
