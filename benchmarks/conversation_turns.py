"""Follow-up turns over a compressed cache: one forward per follow-up vs feeding it token by token.

A conversation: a context of essay text, then follow-ups of ``--follow-up`` tokens (later essay text), each answered
with ``--generate`` greedy tokens. Modes:

* ``full``: eager HF with the full cache (the reference answers);
* ``kvpass``: compiled with ``backend="kvpass"`` and a :class:`kvpass.CompressedCache`, each follow-up appended in
  one forward, also over stores of different lengths (per-layer budgets: PyramidKV, the default policy);
* ``kvpass-tokenwise``: the same compiled model, each follow-up fed one token at a time (how a plain
  ``DynamicCache`` must be fed once per-layer budgets make its stores differ; kvpass's harness did so before
  ``CompressedCache``). Each one-token step also evicts, so later follow-up tokens see a store already evicted by the
  earlier ones.

Per follow-up: the time from its first token to the first answer token's logits, the answer, and the KV bytes held.
Every mode runs its conversation once untimed first (compiles, warm-up), then once timed.

    python benchmarks/conversation_turns.py                      # SmolLM2-135M, 2048-token context, PyramidKV 256
    python benchmarks/conversation_turns.py --policy snapkv --budget 512 --follow-ups 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpass.validate import choice, csv, positive_int

MODES = ("full", "kvpass", "kvpass-tokenwise")


def conversation(forward, model, context: list[int], follow_ups: list[list[int]], generate: int,
                 tokenwise: bool) -> list[dict]:
    """Run one conversation; one record per turn (turn 0: the context)."""
    from kvpass import kv_stats
    from kvpass.apps.eval.runner import cache_bytes, greedy_generate, new_cache

    cache = new_cache(model)
    first = greedy_generate(forward, model, context, generate, cache=cache)
    turns = [{"turn": 0, "tokens": len(context), "ms": round(first.prefill_s * 1000, 1), "answer": first.token_ids,
              "kv_mib": round(cache_bytes(cache) / 2**20, 2)}]
    fed, last = len(context) + len(first.token_ids) - 1, first.token_ids[-1]  # the last answer token is not fed yet
    for i, follow in enumerate(follow_ups, 1):
        prompt = [last, *follow]
        t0 = time.perf_counter()
        if tokenwise:
            with torch.inference_mode():
                for j, token in enumerate(prompt[:-1]):
                    forward(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[fed + j]]),
                            cache=cache, use_cache=True, logits_to_keep=1)
            prompt_start, prompt = fed + len(prompt) - 1, prompt[-1:]
        else:
            prompt_start = fed
        out = greedy_generate(forward, model, prompt, generate, cache=cache, start=prompt_start)
        ms = (time.perf_counter() - t0) * 1000 - out.decode_ms_per_token * (len(out.token_ids) - 1)
        seen = kv_stats(cache)[0].tokens_seen
        turns.append({"turn": i, "tokens": len(follow) + 1, "ms": round(ms, 1), "answer": out.token_ids,
                      "kv_mib": round(cache_bytes(cache) / 2**20, 2), "decode_ms": round(out.decode_ms_per_token, 1),
                      "tokens_seen": seen[0] if seen else None})
        fed = prompt_start + len(prompt) + len(out.token_ids) - 1
        last = out.token_ids[-1]
    return turns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=positive_int, default=2048, help="context tokens (essays)")
    parser.add_argument("--follow-ups", type=positive_int, default=3)
    parser.add_argument("--follow-up", type=positive_int, default=64, help="tokens per follow-up")
    parser.add_argument("--generate", type=positive_int, default=16, help="answer tokens per turn")
    parser.add_argument("--policy", default="pyramidkv")
    parser.add_argument("--budget", type=positive_int, default=256)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--modes", type=csv(choice(MODES, "mode")), default=list(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    modes = args.modes
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvpass.models import load
    from kvpass.models.data.corpora import essays_text

    model, tokenizer = load(args.model)
    model.eval()
    text_ids = tokenizer.encode(essays_text())
    need = args.context + args.follow_ups * args.follow_up
    if len(text_ids) < need:
        parser.error(f"--context + --follow-ups x --follow-up = {need} tokens, but the essays have {len(text_ids)}")
    context = text_ids[: args.context]
    follow_ups = [text_ids[args.context + i * args.follow_up: args.context + (i + 1) * args.follow_up]
                  for i in range(args.follow_ups)]
    compiled = None
    rows = []
    for mode in modes:
        if mode == "full":
            forward = model.forward
        else:
            if compiled is None:
                options = {"policy": args.policy, "budget": args.budget, "compiler": args.compiler}
                compiled = torch.compile(model.forward, backend="kvpass", options=options)
            forward = compiled
        conversation(forward, model, context, follow_ups, args.generate, mode == "kvpass-tokenwise")  # warm-up
        turns = conversation(forward, model, context, follow_ups, args.generate, mode == "kvpass-tokenwise")
        rows.append({"mode": mode, "turns": turns})
    reference = next((r["turns"] for r in rows if r["mode"] == "full"), None)
    print(f"{args.model}, context {args.context}, {args.follow_ups} follow-ups of {args.follow_up} tokens, "
          f"{args.generate} answer tokens; kvpass: {args.policy} budget {args.budget} ({args.compiler}); "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    print("| mode | follow-up ms (median) | per follow-up ms | KV MiB after | answers = full KV's |")
    print("|---|---|---|---|---|")
    for row in rows:
        follow = row["turns"][1:]
        same = "—" if reference is None else (
            f"{sum(a['answer'] == b['answer'] for a, b in zip(row['turns'], reference, strict=True))}/{len(reference)}")
        print(f"| {row['mode']} | {statistics.median(t['ms'] for t in follow):.0f} | {[t['ms'] for t in follow]} | "
              f"{row['turns'][-1]['kv_mib']} | {same} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
