"""``kvpass eval``: the command-line face of :func:`kvpass.apps.eval.run_grid`.

``add_eval_parser(subparsers)`` adds the ``eval`` subcommand to a top-level ``argparse`` parser (its
handler is stored as ``func``); ``main(argv)`` runs it standalone (``python -m kvpass.apps.eval.cli``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import torch

from kvpass.apps.command import Parser, run_handler
from kvpass.apps.eval.benchmarks import BENCHMARKS, DEFAULT_BENCHMARKS, BenchConfig
from kvpass.apps.eval.grid import (
    DEFAULT_BUDGETS,
    DEFAULT_POLICIES,
    format_table,
    run_grid,
    valid_policies,
    validate_grid,
)
from kvpass.config import COMPILERS
from kvpass.models import DEFAULT_MODEL, MODELS
from kvpass.validate import check_writable, choice, csv, fraction, integer, non_negative_int

__all__ = ["add_eval_parser", "run_eval", "main"]


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    d = BenchConfig()
    p = subparsers.add_parser(
        "eval",
        help="run a model x policy x budget x benchmark grid through the kvpass backend",
        description=(
            "Evaluate KV-cache policies compiled by the kvpass backend against the uncompressed full-KV "
            "row. Writes results.json and PNG plots to --out and prints a table. Benchmarks: "
            + "; ".join(f"{b.name} ({b.label})" for b in BENCHMARKS.values())
        ),
    )
    p.add_argument(
        "--models",
        type=csv(choice(list(MODELS), "model")),
        default=[DEFAULT_MODEL],
        help=f"comma-separated, from {', '.join(MODELS)} (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--policies",
        type=csv(choice(valid_policies, "policy", "policies")),
        default=list(DEFAULT_POLICIES),
        help=f"comma-separated policy names or 'full' (default: {','.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--budgets",
        type=csv(integer(1, "budget")),
        default=list(DEFAULT_BUDGETS),
        help=f"KV slots per layer, comma-separated (default: {','.join(map(str, DEFAULT_BUDGETS))})",
    )
    p.add_argument(
        "--benchmarks",
        type=csv(choice(list(BENCHMARKS), "benchmark")),
        default=list(DEFAULT_BENCHMARKS),
        help=f"comma-separated, from {', '.join(BENCHMARKS)} (default: {','.join(DEFAULT_BENCHMARKS)})",
    )
    p.add_argument(
        "--lengths",
        type=csv(integer(1, "length")),
        default=list(d.niah_lengths),
        help="NIAH prompt lengths in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--depths",
        type=csv(fraction("depth")),
        default=list(d.niah_depths),
        help="NIAH needle depths in [0, 1] (default: %(default)s)",
    )
    p.add_argument(
        "--samples",
        type=integer(1, "--samples"),
        default=d.niah_samples_per_cell,
        help="NIAH samples per (length, depth) (default: %(default)s)",
    )
    p.add_argument(
        "--conversations",
        type=integer(1, "--conversations"),
        default=d.conversations,
        help="LoCoMo-style conversations (default: %(default)s)",
    )
    p.add_argument(
        "--questions",
        type=integer(1, "--questions"),
        default=d.questions,
        help="questions per conversation (default: %(default)s)",
    )
    p.add_argument("--distractors", action="store_true", help="plant distractor facts about the other speaker")
    p.add_argument(
        "--ppl-lengths",
        type=csv(integer(1, "length")),
        default=list(d.ppl_lengths),
        help="perplexity context lengths (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="generator seed (default: %(default)s)")
    p.add_argument(
        "--compiler",
        default="aot_eager",
        choices=COMPILERS,
        help="kvpass backend 'compiler' option (default: %(default)s; "
        "on CPU Inductor compiles each new prompt shape for ~40-70 s)",
    )
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        help="torch CPU threads (default: torch's; use 1 when other jobs share the cores)",
    )
    p.add_argument("--out", default="results/eval", help="output folder (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="do not draw plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``kvpass eval``: validate, run the grid, print the table. Returns the exit code."""
    validate_grid(args.models, args.policies, args.budgets, args.benchmarks)  # for Namespaces built in code
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads!r}")
    check_writable(args.out, "the results folder", folder=True, hint="pass a writable folder with --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig(
        seed=args.seed,
        niah_lengths=tuple(args.lengths),
        niah_depths=tuple(args.depths),
        niah_samples_per_cell=args.samples,
        conversations=args.conversations,
        questions=args.questions,
        distractors=args.distractors,
        ppl_lengths=tuple(args.ppl_lengths),
    )
    result = run_grid(
        args.models,
        args.policies,
        args.budgets,
        args.benchmarks,
        config=config,
        out_dir=args.out,
        backend_options={"compiler": args.compiler} if args.compiler else None,
        plots=not args.no_plots,
        progress=not args.no_progress,
        command=getattr(args, "command_line", None) or "kvpass " + shlex.join(sys.argv[1:]),
    )
    print(format_table(result))
    print(f"\nwrote {args.out}/results.json" + ("" if args.no_plots else " and plots"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``main(["--policies", "full,snapkv", ...])`` (the arguments after ``eval``)."""
    parser = Parser(prog="kvpass")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        argv = ["eval", *argv]
    args = parser.parse_args(argv)
    args.command_line = "kvpass " + shlex.join(argv)
    return run_handler(args.func, args, "kvpass eval")


if __name__ == "__main__":
    sys.exit(main())
