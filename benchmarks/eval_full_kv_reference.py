"""Full-KV reference rows: how well the shipped models do on the generated benchmarks, uncompressed.

Runs :func:`kvpass.apps.eval.run_grid` with only the ``"full"`` policy (eager HF forward, DynamicCache),
then prints the grid table and a per-context-length breakdown. Every accuracy target of a
compressed policy is read against these rows.

    python benchmarks/eval_full_kv_reference.py --model smollm2-135m --lengths 1024,2048,4096
    python benchmarks/eval_full_kv_reference.py --model gemma3-270m --lengths 1024,4096,8192,16384 \\
        --depths 0.1,0.5,0.9 --benchmarks niah
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from kvpass.apps.eval import BENCHMARKS, BenchConfig, format_table, run_grid
from kvpass.validate import choice, csv, fraction, non_negative_int, positive_int


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--benchmarks", type=csv(choice(list(BENCHMARKS), "benchmark")),
                   default=["niah", "niah-multikey", "locomo", "ppl-essays"])
    p.add_argument("--lengths", type=csv(positive_int), default=[1024, 2048, 4096])
    p.add_argument("--depths", type=csv(fraction()), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=positive_int, default=2, help="NIAH samples per (length, depth)")
    p.add_argument("--conversations", type=positive_int, default=4)
    p.add_argument("--distractors", action="store_true")
    p.add_argument("--ppl-lengths", type=csv(positive_int), default=[1024, 4096])
    p.add_argument("--ppl-target", type=positive_int, default=64)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", default="results/reference")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig(
        niah_lengths=tuple(args.lengths),
        niah_depths=tuple(args.depths),
        niah_samples_per_cell=args.samples,
        conversations=args.conversations,
        distractors=args.distractors,
        ppl_lengths=tuple(args.ppl_lengths),
        ppl_target=args.ppl_target,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/eval_full_kv_reference.py " + shlex.join(argv)
    result = run_grid([args.model], ["full"], [], args.benchmarks, config=config, out_dir=args.out, command=command)
    print(format_table(result))
    print("\nper context length (tokens: score, n, prefill s, decode ms/token, KV MiB):")
    for row in result["rows"]:
        metric = row["metric"]
        print(f"  {row['benchmark']} ({BENCHMARKS[row['benchmark']].label}):")
        if row["benchmark"] == "locomo":  # lengths vary by a few tokens: break down by fact kind instead
            kinds = sorted({s["meta"]["kind"] for s in row["samples"]})
            for kind in kinds:
                sel = [s["correct"] for s in row["samples"] if s["meta"]["kind"] == kind]
                print(f"    {kind:>8}: acc {sum(sel) / len(sel):.2f}  n={len(sel)}")
            lengths = [s["context_tokens"] for s in row["samples"]]
            print(f"    context {min(lengths)}-{max(lengths)} tokens, prefill {row['prefill_s']:.2f} s, "
                  f"decode {row['decode_ms_per_token']:.1f} ms, KV {row['kv_mib']:.1f} MiB")  # fmt: skip
            continue
        for n, s in row["by_context"].items():
            score = f"acc {s['accuracy']:.2f}" if metric == "accuracy" else f"ppl {s['perplexity']:.2f}"
            print(
                f"    {n:>6}: {score}  n={s['n']}  prefill {s['prefill_s']:.2f} s  "
                f"decode {s['decode_ms_per_token']:.1f} ms  KV {s['kv_mib']:.1f} MiB"
            )
    print(f"\nwall time {result['meta']['wall_s']:.0f} s; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
