"""``--format pt2``: both programs (the prefill or, with ``--prefill-block``, the block program; the decode step),
kvpass ops and KV stores inside, in one PT2 archive.

The two programs are exports of one model and hold the same weight tensors. torch's ``package_pt2`` dedups
weights within a program only, which would store every weight twice; :func:`package_shared` writes a standard
PT2 archive (``load_pt2`` reads it) in which each weight is stored once and both programs' weights configs point
at it. :func:`load` then re-binds the decode program's weights to the prefill's, so a loaded artifact holds them
once in memory too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.programs import Programs
from torch.export import ExportedProgram

FILE = "program.pt2"


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    progress.add(1)
    progress.start("packaging pt2")
    package_shared(out / FILE, {"prefill": programs.prefill, "decode": programs.decode})
    progress.done()
    return [FILE]


def package_shared(path: Path, programs: dict[str, ExportedProgram]) -> None:
    """``package_pt2(path, exported_programs=programs)``, except that a weight several programs hold is stored once.

    Weights are grouped by storage across all programs (torch's ``group_weights``, which AOTInductor packaging
    uses across models); each group is one record under ``data/weights/``, and every program's weights config
    names that record with the program's own view (shape, strides, offset) of it. Constants and the serialized
    graphs are written per program as ``package_pt2`` does; the example inputs are not (an empty record, so a
    loaded program's ``example_inputs`` is ``None``): the block program's and the decode step's are whole KV
    states (46 MiB of the SmolLM2-135M archive), and the manifest documents the calling convention instead.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import serialize, serialize_tensor_meta
    from torch.export.pt2_archive import PT2ArchiveWriter
    from torch.export.pt2_archive import _package as pt2
    from torch.export.pt2_archive import constants as names
    from torch.export.pt2_archive._package_weights import TensorProperties, Weights, get_complete_tensor, group_weights

    weights = {}
    for name, ep in programs.items():
        pickled = [fqn for fqn, t in ep.state_dict.items() if pt2._should_use_pickle(t)]
        if pickled:
            raise ValueError(f"kvpass export: --format pt2 stores plain tensors; program {name!r} has tensor-subclass "
                             f"weights {pickled[:5]}")
        weights[name] = Weights({fqn: (t, TensorProperties(t)) for fqn, t in ep.state_dict.items()})
    configs: dict[str, dict[str, schema.PayloadMeta]] = {name: {} for name in programs}
    with PT2ArchiveWriter(str(path)) as archive:
        for index, group in enumerate(group_weights(weights)):
            record = f"{names.WEIGHT_FILENAME_PREFIX}{index}"
            complete = get_complete_tensor(group, weights)  # the whole storage the group's tensors view
            archive.write_bytes(f"{names.WEIGHTS_DIR}{record}", pt2._get_raw_tensor_bytes(complete))
            for name, fqn in group:
                tensor = weights[name].get_weight(fqn)[0]
                configs[name][fqn] = schema.PayloadMeta(
                    path_name=record, is_param=isinstance(tensor, torch.nn.Parameter), use_pickle=False,
                    tensor_meta=serialize_tensor_meta(tensor))
        for name, ep in programs.items():
            pt2._package_payload_config(archive, schema.PayloadConfig(config=configs[name]),
                                        names.WEIGHTS_CONFIG_FILENAME_FORMAT.format(name))
            pt2._package_payload_config(archive, pt2._package_constants(name, ep, archive),
                                        names.CONSTANTS_CONFIG_FILENAME_FORMAT.format(name))
            artifact = serialize(ep, None, pt2.DEFAULT_PICKLE_PROTOCOL, serialize_state_dict=False,
                                 serialize_constants=False, serialize_example_inputs=False)
            archive.write_bytes(names.MODELS_FILENAME_FORMAT.format(name), artifact.exported_program)
            archive.write_bytes(names.SAMPLE_INPUTS_FILENAME_FORMAT.format(name), artifact.example_inputs)


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

    @torch.no_grad()
    def prefill_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, observe: np.ndarray,
                      state: Any) -> tuple[np.ndarray, Any]:
        logits, *state = self._prefill(*(torch.from_numpy(a) for a in (ids, positions, valid, observe)), *state)
        return logits[0, -1].float().numpy(), state


def load(path: Path, manifest: dict) -> TorchRunner:
    from torch.export.pt2_archive._package import load_pt2

    import kvpass.ops  # noqa: F401  (the programs call kvpass::* ops: register them before deserializing)

    programs = load_pt2(path / FILE).exported_programs
    share_weights(programs["prefill"], programs["decode"])
    return TorchRunner(programs["prefill"].module(), programs["decode"].module())


def share_weights(source: ExportedProgram, target: ExportedProgram) -> int:
    """Re-bind ``target``'s weights to ``source``'s where both hold the same name with equal values (``load_pt2``
    gives each program its own copy of a shared record); returns how many were re-bound. Weights ``target``
    mutates keep their own copy."""
    mutated = set(target.graph_signature.buffers_to_mutate.values())
    shared = 0
    for fqn, tensor in target.state_dict.items():
        mine = source.state_dict.get(fqn)
        if fqn in mutated or mine is None or mine is tensor or (mine.dtype, mine.shape, mine.stride()) != (
                tensor.dtype, tensor.shape, tensor.stride()) or not torch.equal(mine, tensor):
            continue
        target.state_dict[fqn] = mine
        shared += 1
    return shared


FORMAT = ExportFormat(
    name="pt2",
    description="torch.export programs (prefill + decode step) with the kvpass ops, in a PT2 archive",
    requires=(),
    install="",
    dynamic_prompt=True,
    keeps_kvpass_ops=True,
    runnable=True,
    prefill_block=True,
    write=write,
    load=load,
)
