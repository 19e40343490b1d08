"""Lower a rewritten graph for the device it runs on.

On CPU the ``kvpass::*`` ops run their pure-torch references inside the graph compiled by the chosen
compiler (Inductor by default; ``aot_eager`` compiles in seconds and is what most tests use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, compiler: str) -> Callable:
    """Compile ``gm`` with ``compiler`` ('inductor', 'aot_eager' or 'eager'); call the result as ``fn(*args)``."""
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, list(example_inputs))
    elif compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(gm, list(example_inputs))
    elif compiler == "eager":
        compiled = gm.forward
    else:
        raise ValueError(f"kvpass: unknown compiler {compiler!r}; valid: 'inductor', 'aot_eager', 'eager'")
    return compiled


__all__ = ["compile_graph"]
