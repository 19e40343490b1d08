"""Shared by the kernel tests: Triton's CPU interpreter switch, random store layouts, AOT compilation."""

from __future__ import annotations

import os

# must be set before triton decorates the kernels (the kernel tests import this module first)
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def random_pos(gen: torch.Generator, b: int, h: int, c: int, t: int, p_dead: float = 0.2,
               p_pad: float = 0.2) -> torch.Tensor:
    """``[B, H, C + T]`` positions: a store in position order with random empty slots, then ``T`` new tokens
    of which a random subset (left padding included) is padding (``-1``)."""
    store = torch.arange(c).expand(b, h, c).clone()
    store[torch.rand(b, h, c, generator=gen) < p_dead] = -1
    valid = torch.rand(b, t, generator=gen) >= p_pad
    new = torch.where(valid, c + valid.long().cumsum(1) - 1, torch.full((b, t), -1))
    return torch.cat([store, new[:, None].expand(b, h, t)], dim=2).contiguous()


_AOT_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for module, kernel, signature, constexprs in json.load(sys.stdin):
    fn = getattr(importlib.import_module("kvpass.kernels." + module), kernel)
    names = fn.arg_names
    sig = {n: signature.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    src = ASTSource(fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    out.append(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
json.dump(out, sys.stdout)
"""


def compile_ptx_sm90(jobs: list[tuple[str, str, dict[str, str], dict[str, object]]]) -> list[str]:
    """Compile kernels ahead of time for sm_90 (no GPU needed); returns their PTX.

    Each job is ``(module in kvpass.kernels, kernel name, {arg: type}, {constexpr arg: value})``; arguments
    named in neither are int32 scalars. Runs in a fresh process without the interpreter: the interpreter
    patches ``triton.language`` in this one, which breaks real compilation afterwards.
    """
    import json
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)
