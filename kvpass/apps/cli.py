"""The ``kvpass`` command: ``kvpass demo`` (the main job), ``kvpass eval`` (benchmark grids), ``kvpass tune``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from kvpass.config import COMPILERS, parse_options
from kvpass.policies import POLICIES


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of every ``kvpass`` subcommand's count/size flags."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type of count flags where 0 means "none"."""
    return _int_at_least(text, 0, "a non-negative integer")


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    from kvpass.models import DEFAULT_MODEL, MODELS

    p = subparsers.add_parser(
        "demo", help="compressed, compiled generation on a real model next to the uncompressed run",
        description="Hide a pass key in the Paul Graham essays, then answer with the full KV cache (eager HF) "
        "and with kvpass (compiled, compressed); print answers, KV bytes and speed side by side.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="shipped model (%(default)s)")
    p.add_argument("--policy", default="snapkv", choices=sorted(POLICIES), help="eviction policy (%(default)s)")
    p.add_argument("--budget", type=positive_int, default=512, help="KV slots kept per layer (%(default)s)")
    p.add_argument("--context", type=positive_int, default=2048, help="prompt length in tokens (%(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    p.add_argument("--compiler", default="inductor", choices=COMPILERS, help="graph compiler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="needle and haystack seed (default: %(default)s)")
    return p


def _timed_generate(model, ids, new_tokens: int):
    """Greedy generation; returns (output, prefill seconds, decode ms/token)."""
    marks: list[float] = []

    class Clock:  # a logits processor runs once per forward: timestamps each step
        def __call__(self, input_ids, scores):
            marks.append(time.perf_counter())
            return scores

    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         logits_processor=[Clock()], return_dict_in_generate=True, pad_token_id=0)
    prefill = marks[0] - start
    decode = (marks[-1] - marks[0]) / max(len(marks) - 1, 1) * 1000
    return out, prefill, decode


def run_demo(args: argparse.Namespace) -> int:
    import kvpass
    from kvpass.models import load
    from kvpass.models.data.niah import niah_samples

    options = {"policy": args.policy, "budget": args.budget, "compiler": args.compiler}
    parse_options(options)  # reject bad settings before loading anything
    torch.manual_seed(args.seed)
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load(args.model)
    sample = niah_samples(tokenizer, lengths=[args.context], depths=[0.5], seed=args.seed)[0]
    ids = torch.tensor([sample.prompt_ids])
    print(f"prompt: {ids.shape[1]} tokens, a pass key hidden at half depth; expected answer {sample.answers[0]}")

    rows = []
    with torch.inference_mode():
        out, prefill, decode = _timed_generate(model, ids, args.new_tokens)
    kv_held = lambda cache: sum(layer.kv_bytes for layer in kvpass.kv_stats(cache))
    rows.append(("full KV (eager HF)", out, prefill, decode, kv_held(out.cache)))

    forward = model.forward
    model.forward = torch.compile(forward, backend="kvpass", options=options)
    print(f"compiling with kvpass ({args.policy}, budget {args.budget}, {args.compiler}) ...", flush=True)
    start = time.perf_counter()
    _timed_generate(model, ids, 2)  # warm-up: compiles the prefill and decode graphs
    compile_s = time.perf_counter() - start
    out, prefill, decode = _timed_generate(model, ids, args.new_tokens)
    rows.append((f"kvpass {args.policy} budget {args.budget}", out, prefill, decode, kv_held(out.cache)))
    model.forward = forward

    print(f"\n{'run':<34} {'KV bytes held':>14} {'prefill s':>10} {'decode ms/tok':>14}  answer")
    for name, out, prefill, decode, kv in rows:
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip().splitlines()[0]
        mark = "ok" if sample.is_correct(text) else "MISSED"
        print(f"{name:<34} {kv:>14,} {prefill:>10.2f} {decode:>14.1f}  {text[:40]!r} [{mark}]")
    print(f"\nkvpass compile (prefill + decode graphs, incl. warm-up run): {compile_s:.1f} s")
    print(kvpass.explain())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from kvpass.apps.eval.cli import add_eval_parser, run_eval
    from kvpass.apps.tune import add_tune_parser, run_tune
    from kvpass.lowering.export.cli import add_export_parser, run_export

    parser = argparse.ArgumentParser(prog="kvpass", description="KV-cache compression compiled into the model")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub).set_defaults(handler=run_demo)
    add_eval_parser(sub).set_defaults(handler=run_eval)
    add_export_parser(sub).set_defaults(handler=run_export)
    add_tune_parser(sub).set_defaults(handler=run_tune)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
