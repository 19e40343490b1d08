"""The ``kvpass`` command: ``kvpass demo`` (the main job), ``kvpass eval`` (benchmark grids), ``kvpass export``,
``kvpass tune``.

Every error about the user's input is one line on stderr (``kvpass <subcommand>: error: ...``) and exit status 2;
``KVPASS_DEBUG=1`` shows its traceback (:mod:`kvpass.apps.command`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

import torch

import kvpass
from kvpass.apps.command import Parser, run_handler
from kvpass.apps.eval.cli import add_eval_parser, run_eval
from kvpass.apps.export import add_export_parser, run_export
from kvpass.apps.tune import add_tune_parser, run_tune
from kvpass.config import COMPILERS, parse_options
from kvpass.validate import positive_int

# policies whose kept tokens were compared with kvpress's at equal settings (BENCHMARKS.md, "kept tokens")
KVPRESS_AGREEMENT = {"snapkv": "exactly the tokens kvpress's SnapKV keeps",
                     "streaming_llm": "exactly the tokens kvpress's StreamingLLM keeps",
                     "tova": "exactly the tokens kvpress's TOVA keeps",
                     "knorm": "the tokens kvpress's Knorm keeps (up to exact ties of key norms)"}


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers``."""
    from kvpass.models import DEFAULT_MODEL, MODELS

    p = subparsers.add_parser(
        "demo", help="compressed, compiled generation on a real model next to the uncompressed run",
        description="Hide a pass key in the Paul Graham essays, then answer with the full KV cache (eager HF) "
        "and with kvpass (compiled, compressed); print answers, KV bytes and speed side by side, and why an "
        "answer was missed. Progress goes to stderr.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="shipped model (%(default)s)")
    p.add_argument("--policy", default="snapkv", choices=sorted(kvpass.POLICIES), help="eviction policy (%(default)s)")
    p.add_argument("--budget", type=positive_int, default=512, help="KV slots kept per layer (%(default)s)")
    p.add_argument("--context", type=positive_int, default=2048, help="prompt length in tokens (%(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    p.add_argument("--compiler", default="inductor", choices=COMPILERS, help="graph compiler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="needle and haystack seed (default: %(default)s)")
    return p


class Progress:
    """Timestamped progress lines, ``[  12.3s] what``, on stderr; a long step repeats a line every ``every`` s."""

    def __init__(self, out: TextIO | None = None, every: float = 30.0) -> None:
        self.out = out or sys.stderr
        self.every = every
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, text: str, doing: str) -> Iterator[None]:
        """Say ``text ...``, then ``still <doing>`` while it runs, then how long it took."""
        self.say(f"{text} ...")
        began = time.perf_counter()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.every):
                self.say(f"  still {doing} ({time.perf_counter() - began:.0f} s so far)")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.say(f"  done {doing} in {time.perf_counter() - began:.1f} s")


@dataclasses.dataclass
class DemoRun:
    """One row of the demo's table."""

    name: str
    answer: str
    correct: bool
    prefill_s: float
    decode_ms: float
    kv_bytes: int
    slots: list[int] | None = None  # KV slots each layer's cache holds (the kvpass run)


def _span(slots: list[int]) -> str:
    return str(slots[0]) if min(slots) == max(slots) else f"{min(slots)} to {max(slots)}"


def report(runs: list[DemoRun], *, policy: str, budget: int, prompt_len: int, new_tokens: int, expected: str,
           needle: tuple[int, int] | None = None, compile_s: float | None = None) -> str:
    """The demo's closing text: the table (full KV first, then kvpass) and, in plain words, what the result means.

    ``needle``: the pass key sentence's token span ``[start, end)`` in the prompt."""
    lines = [f"{'run':<34} {'KV bytes held':>14} {'prefill s':>10} {'decode ms/tok':>14}  answer"]
    for r in runs:
        verdict = "right" if r.correct else f"missed: expected {expected}"
        lines.append(f"{r.name:<34} {r.kv_bytes:>14,} {r.prefill_s:>10.2f} {r.decode_ms:>14.1f}  {r.answer[:40]!r} "
                     f"({verdict})")
    if compile_s is not None:
        lines.append(f"\nkvpass compiled its prefill and decode graphs on the first forward: {compile_s:.1f} s "
                     "(incl. a warm-up run)")
    full, compressed = runs[0], runs[-1]
    name = kvpass.POLICIES[policy].__name__ if policy in kvpass.POLICIES else policy
    slots = [min(n, prompt_len) for n in compressed.slots or [budget]]
    kept = f"{_span(slots)} of the {prompt_len}"
    everything = prompt_len + new_tokens
    where = f" (the pass key sentence is prompt tokens {needle[0]}-{needle[1] - 1})" if needle else ""
    lines.append("")
    if not full.correct:
        lines.append(f"The model misses the pass key even with its full KV cache at {prompt_len} tokens, so "
                     "compression cannot be judged here: try a shorter --context or another --seed.")
    elif compressed.correct:
        ratio = full.kv_bytes / compressed.kv_bytes if compressed.kv_bytes else float("nan")
        lines.append(f"Both answered. kvpass kept {kept} prompt tokens per layer ({name}, budget {budget}) and held "
                     f"{ratio:.1f}x less KV.")
    else:
        agreement = KVPRESS_AGREEMENT.get(policy)
        if agreement:
            proof = f"kvpass keeps {agreement} at equal settings (BENCHMARKS.md)"
        else:
            proof = "with nothing evicted, kvpass's compiled model answers as the full-KV run does"
        lines.append(
            f"Why kvpass missed: the compiled model kept {kept} prompt tokens per layer, and {name} at budget {budget} "
            f"did not keep the pass key's tokens{where} well enough for the model to read it back. That is "
            f"{name}'s retrieval fidelity at this budget, not a compilation error: {proof}.\n"
            f"The budget that answers: --budget {everything} (the {prompt_len} prompt tokens plus the {new_tokens} new "
            "ones: no eviction, the full-KV answer); a budget in between, or another --policy, may answer with "
            "less KV.")
    return "\n".join(lines)


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
    """Handler of ``kvpass demo``: full KV vs kvpass on a needle prompt, with progress on stderr."""
    from kvpass.models import load
    from kvpass.models.data.niah import niah_samples
    from kvpass.models.loaders import gguf_sources

    options = {"policy": args.policy, "budget": args.budget, "compiler": args.compiler}
    parse_options(options)  # reject bad settings, and a model whose weights are not installed, before loading anything
    gguf_sources(args.model)
    progress = Progress()
    torch.manual_seed(args.seed)
    with progress.step(f"loading {args.model} and a {args.context}-token needle prompt", "loading"):
        model, tokenizer = load(args.model)
        sample = niah_samples(tokenizer, lengths=[args.context], depths=[0.5], seed=args.seed)[0]
    ids = torch.tensor([sample.prompt_ids])
    expected = sample.answers[0]
    spans = sample.meta.get("needle_spans")
    needle = tuple(spans[0]) if spans else None
    progress.say(f"prompt: {ids.shape[1]} tokens, a pass key hidden at half depth; expected answer {expected}")

    def row(name: str, out, prefill: float, decode: float, slots: list[int] | None = None) -> DemoRun:
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
        text = (text.splitlines() or [""])[0]
        kv = sum(layer.kv_bytes for layer in kvpass.kv_stats(out.cache))
        return DemoRun(name, text, sample.is_correct(text), prefill, decode, kv, slots)

    runs = []
    with progress.step(f"full KV (eager HF): prefill {ids.shape[1]} tokens, generate {args.new_tokens}", "generating"):
        with torch.inference_mode():
            runs.append(row("full KV (eager HF)", *_timed_generate(model, ids, args.new_tokens)))
    progress.say(f"  full KV answered {runs[0].answer[:40]!r}")

    forward = model.forward
    compiled = torch.compile(forward, backend="kvpass", options=options)
    model.forward = compiled
    try:
        slow = "~3 min on 2 CPU cores" if args.compiler == "inductor" else "seconds to a minute"
        with progress.step(f"kvpass ({args.policy}, budget {args.budget}): compiling the prefill and decode graphs "
                           f"with {args.compiler} on the first forward ({slow})", "compiling"):
            start = time.perf_counter()
            _timed_generate(model, ids, 2)  # warm-up: compiles the prefill and decode graphs
            compile_s = time.perf_counter() - start
        with progress.step(f"kvpass: prefill {ids.shape[1]} tokens, generate {args.new_tokens}", "generating"):
            out, prefill, decode = _timed_generate(model, ids, args.new_tokens)
            slots = [layer.slots for layer in kvpass.kv_stats(out.cache)]
            runs.append(row(f"kvpass {args.policy} budget {args.budget}", out, prefill, decode, slots))
        progress.say(f"  kvpass answered {runs[1].answer[:40]!r}")
        explanation = kvpass.explain(compiled)
    finally:
        model.forward = forward
    print(report(runs, policy=args.policy, budget=args.budget, prompt_len=ids.shape[1], new_tokens=args.new_tokens,
                 expected=expected, needle=needle, compile_s=compile_s))
    print(f"\n{explanation}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``kvpass`` parser with its four subcommands (each stores its handler as ``handler``)."""
    parser = Parser(prog="kvpass", description="KV-cache compression compiled into the model",
                    epilog="Errors are one line; KVPASS_DEBUG=1 shows their traceback.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub).set_defaults(handler=run_demo)
    add_eval_parser(sub).set_defaults(handler=run_eval)
    add_export_parser(sub).set_defaults(handler=run_export)
    add_tune_parser(sub).set_defaults(handler=run_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpass`` console script; returns the exit status (argparse exits 2 on a bad command
    line, a bad input found later returns 2 after one line on stderr)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `kvpass tune --smoke` reruns itself in a child
    return run_handler(args.handler, args, f"kvpass {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
