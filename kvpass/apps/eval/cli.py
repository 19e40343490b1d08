"""``kvpass eval``: the command-line face of :func:`kvpass.apps.eval.run_grid`.

``add_eval_parser(subparsers)`` adds the ``eval`` subcommand to a top-level ``argparse`` parser (its
handler is stored as ``func``); ``main(argv)`` runs it standalone (``python -m kvpass.apps.eval.cli``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpass.apps.eval.benchmarks import BENCHMARKS, DEFAULT_BENCHMARKS, BenchConfig
from kvpass.apps.eval.grid import (
    DEFAULT_BUDGETS,
    DEFAULT_POLICIES,
    format_table,
    run_grid,
    valid_policies,
    validate_grid,
)
from kvpass.models import DEFAULT_MODEL, MODELS

__all__ = ["add_eval_parser", "run_eval", "main"]


def _csv(kind: type, check: Callable[[Any], None] | None = None) -> Callable[[str], list]:
    """An argparse ``type``: comma-separated values of ``kind``, each passed through ``check``.

    Errors become ``argparse.ArgumentTypeError``, so whichever parser this is added to prints a usage
    error quoting the value (exit 2) instead of a traceback.
    """

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        if check is not None:
            for v in values:
                try:
                    check(v)
                except ValueError as err:
                    raise argparse.ArgumentTypeError(str(err)) from None
        return values

    return parse


def _one_of(kind: str, plural: str, valid: Callable[[], Sequence[str]]) -> Callable[[str], None]:
    def check(value: str) -> None:
        names = list(valid())
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; valid {plural}: {', '.join(names)}")

    return check


def _positive(name: str) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    return check


def _positive_int(name: str) -> Callable[[str], int]:
    parse = _csv(int, _positive(name))

    def one(text: str) -> int:
        values = parse(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError(f"{name} takes one integer, got {text!r}")
        return values[0]

    return one


def _depth(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {value!r}")


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
        type=_csv(str, _one_of("model", "models", lambda: list(MODELS))),
        default=[DEFAULT_MODEL],
        help=f"comma-separated, from {', '.join(MODELS)} (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--policies",
        type=_csv(str, _one_of("policy", "policies", valid_policies)),
        default=list(DEFAULT_POLICIES),
        help=f"comma-separated policy names or 'full' (default: {','.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--budgets",
        type=_csv(int, _positive("budget")),
        default=list(DEFAULT_BUDGETS),
        help=f"KV slots per layer, comma-separated (default: {','.join(map(str, DEFAULT_BUDGETS))})",
    )
    p.add_argument(
        "--benchmarks",
        type=_csv(str, _one_of("benchmark", "benchmarks", lambda: list(BENCHMARKS))),
        default=list(DEFAULT_BENCHMARKS),
        help=f"comma-separated, from {', '.join(BENCHMARKS)} (default: {','.join(DEFAULT_BENCHMARKS)})",
    )
    p.add_argument(
        "--lengths",
        type=_csv(int, _positive("length")),
        default=list(d.niah_lengths),
        help="NIAH prompt lengths in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--depths",
        type=_csv(float, _depth),
        default=list(d.niah_depths),
        help="NIAH needle depths in [0, 1] (default: %(default)s)",
    )
    p.add_argument(
        "--samples",
        type=_positive_int("--samples"),
        default=d.niah_samples_per_cell,
        help="NIAH samples per (length, depth) (default: %(default)s)",
    )
    p.add_argument(
        "--conversations",
        type=_positive_int("--conversations"),
        default=d.conversations,
        help="LoCoMo-style conversations (default: %(default)s)",
    )
    p.add_argument(
        "--questions",
        type=_positive_int("--questions"),
        default=d.questions,
        help="questions per conversation (default: %(default)s)",
    )
    p.add_argument("--distractors", action="store_true", help="plant distractor facts about the other speaker")
    p.add_argument(
        "--ppl-lengths",
        type=_csv(int, _positive("length")),
        default=list(d.ppl_lengths),
        help="perplexity context lengths (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="generator seed (default: %(default)s)")
    p.add_argument(
        "--compiler",
        default="aot_eager",
        help="kvpass backend 'compiler' option: inductor, aot_eager or eager (default: %(default)s; "
        "on CPU Inductor compiles each new prompt shape for ~40-70 s)",
    )
    p.add_argument(
        "--threads",
        type=int,
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
    parser = argparse.ArgumentParser(prog="kvpass")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        argv = ["eval", *argv]
    args = parser.parse_args(argv)
    args.command_line = "kvpass " + shlex.join(argv)
    try:
        return int(args.func(args))
    except ValueError as err:
        parser.exit(2, f"kvpass eval: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
