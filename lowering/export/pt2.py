"""``--format pt2``: both programs, kvpass ops and KV stores inside, in one PT2 archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.core import Programs

FILE = "program.pt2"


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    from torch.export.pt2_archive._package import package_pt2

    progress.add(1)
    progress.start("packaging pt2")
    package_pt2(out / FILE, exported_programs={"prefill": programs.prefill, "decode": programs.decode})
    progress.done()
    return [FILE]


class TorchRunner:
    """Runs two callables taking and returning flat torch tensors (an ExportedProgram's module, an AOTI model)."""

    def __init__(self, prefill, decode) -> None:
        self._prefill, self._decode = prefill, decode

    @torch.no_grad()
    def prefill(self, ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        logits, *state = self._prefill(torch.from_numpy(ids), torch.from_numpy(positions))
        return logits[0, -1].float().numpy(), state

    @torch.no_grad()
    def decode(self, ids: np.ndarray, positions: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        logits, *state = self._decode(torch.from_numpy(ids), torch.from_numpy(positions), *state)
        return logits[0, -1].float().numpy(), state


def load(path: Path, manifest: dict) -> TorchRunner:
    from torch.export.pt2_archive._package import load_pt2

    import kvpass.ops  # noqa: F401  (the programs call kvpass::* ops: register them before deserializing)

    programs = load_pt2(path / FILE).exported_programs
    return TorchRunner(programs["prefill"].module(), programs["decode"].module())


FORMAT = ExportFormat(
    name="pt2",
    description="torch.export programs (prefill + decode step) with the kvpass ops, in a PT2 archive",
    requires=(),
    install="",
    dynamic_prompt=True,
    keeps_kvpass_ops=True,
    runnable=True,
    write=write,
    load=load,
)
