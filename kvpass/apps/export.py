"""``kvpass export MODEL --policy P --budget N [--prefill-block C] --format F -o OUT``: :func:`kvpass.export`."""

from __future__ import annotations

import argparse
import os

import kvpass
from kvpass.lowering.export import FORMATS, get_format
from kvpass.validate import positive_int

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "export", help="export a compressed model (pt2, aoti, jax, tvm, mlir)",
        description="torch.export the model's prefill (or block program) and decode step with kvpass's KV "
        "compression compiled in, and package them; `kvpass.load(OUT).generate(ids, n)` runs pt2/aoti/jax/tvm "
        "artifacts.",
    )
    p.add_argument("model", help="a local Hugging Face model directory, or a model kvpass ships (e.g. smollm2-135m)")
    p.add_argument("--policy", default="snapkv", choices=sorted(kvpass.POLICIES), help="eviction policy (%(default)s)")
    p.add_argument("--budget", type=positive_int, required=True, help="KV slots kept per layer")
    p.add_argument("--format", default="pt2", choices=FORMATS, help="artifact format (%(default)s)")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--prompt-len", type=positive_int, help="export the prefill for exactly this many prompt tokens "
                   "(required by jax, tvm, mlir without --prefill-block: static shapes)")
    p.add_argument("--max-prompt", type=positive_int, help="longest prompt a dynamic-shape artifact takes "
                   "(default: the model's max_position_embeddings)")
    p.add_argument("--prefill-block", type=positive_int, help="export the block-wise prefill: a block program of this "
                   "many tokens, looped over prompts of any length (every format; replaces --prompt-len)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``kvpass export``: export, then say where the artifact is and how big."""
    out = kvpass.export(args.model, args.out, format=args.format, policy=args.policy, budget=args.budget,
                        prompt_len=args.prompt_len, max_prompt=args.max_prompt, prefill_block=args.prefill_block,
                        overwrite=args.overwrite, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}{os.sep} ({get_format(args.format).description}; {size / 2**20:.1f} MiB)")
    return 0
