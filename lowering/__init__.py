"""Lower a rewritten graph for the device it runs on.

On CPU the ``kvpass::*`` ops run their pure-torch references. With Inductor, graphs whose shapes are
small per step (decode) get the references *inlined* as AOTAutograd decompositions, so Inductor
fuses the masking, scoring and compaction with the surrounding code instead of calling opaque ops
(dozens of tiny eager kernels per layer); prefill graphs keep the opaque ops, whose references chunk
the queries to bound memory. ``aot_eager`` compiles in seconds and is what most tests use.

On CUDA the attention and compaction ops run the fused Triton kernels (``triton_lowering``): as the
ops' CUDA implementations, and for Inductor as ``triton_op``s it schedules with the surrounding code.
``KVPASS_REFERENCE=1`` forces the references on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx

from . import triton_lowering

triton_lowering.register()


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, compiler: str, inline_ops: bool = False) -> Callable:
    """Compile ``gm`` with ``compiler`` ('inductor', 'aot_eager' or 'eager'); call the result as ``fn(*args)``.

    ``inline_ops``: let Inductor compile the kvpass ops' references rather than call the ops.
    """
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        table = triton_lowering.decompositions(example_inputs, inline_ops)
        decompositions = {**select_decomp_table(), **table} if table is not None else None
        return compile_fx(gm, list(example_inputs), decompositions=decompositions)
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, list(example_inputs))
    if compiler == "eager":
        return gm.forward
    raise ValueError(f"kvpass: unknown compiler {compiler!r}; valid: 'inductor', 'aot_eager', 'eager'")


__all__ = ["compile_graph"]
