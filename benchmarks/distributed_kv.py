"""One context's KV split over CPU ranks (option ``distribute="context"``): per-rank KV bytes, decode ms/token and
the collective's share of each step, against one process holding the whole KV.

    python benchmarks/distributed_kv.py                                   # SmolLM2-135M, 8K, 1 and 2 ranks
    python benchmarks/distributed_kv.py --contexts 8192,32768 --ranks 1,2,4

Each row runs in fresh processes. ``ranks 1`` is one process with ``--threads`` torch threads (default 2: the
machine) and no split, kvpass keeping every token; ``ranks N`` is ``torchrun --nproc-per-node N`` with
``--rank-threads`` threads per rank (default 1) and ``distribute="context"``, same total budget, so each rank keeps
``1/N`` of the context. The prompt is the first ``context`` tokens of the Paul Graham essays; after the prefill and
3 warm-up steps (which compile), ``--steps`` greedy decode steps are timed (median) and ``--profile-steps`` more run
under ``torch.profiler``, whose functional all-gather and wait events give the collective's share of a step. Every
row's greedy tokens are compared: across ranks, and with the 1-rank row of the same context.

The budget is the context plus the generated tokens, rounded up to a multiple of ``--ranks``' runs: nothing is
evicted, so the rows show what spreading the KV costs, not what compressing it loses. With a fixed per-rank budget of
``S`` slots, ``N`` ranks hold an ``N * S``-token context: the table's "context held" column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvpass.validate import choice, csv, non_negative_int, positive_int

MODELS = ("smollm2-135m", "gemma3-270m")
WARMUP = 3


def run_rank(row: dict) -> dict:
    """Prefill, warm up, time ``steps`` decode steps; this process's figures (every rank runs this)."""
    import torch.distributed as dist
    from kvpass.models import load
    from kvpass.models.data.niah import corpus_ids

    import kvpass

    split = row["ranks"] > 1
    if split:
        dist.init_process_group("gloo")
    torch.set_num_threads(row["threads"])
    model, tokenizer = load(row["model"])
    ids = torch.tensor([corpus_ids(tokenizer)[: row["context"]]])
    options = {"policy": "snapkv", "budget": row["budget"], "compiler": row["compiler"]}
    if split:
        options["distribute"] = "context"
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    cache = kvpass.CompressedCache(config=model.config)
    tokens: list[int] = []
    n = row["context"]

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = forward(input_ids=token, cache=cache, position_ids=torch.tensor([[n + len(tokens) - 1]]),
                         use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        start = time.perf_counter()
        logits = forward(input_ids=ids, cache=cache, position_ids=torch.arange(n)[None], use_cache=True,
                         logits_to_keep=1).logits
        prefill_s = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        for _ in range(WARMUP):
            token = step(token)
            tokens.append(int(token))
        times = []
        for _ in range(row["steps"]):
            if split:
                dist.barrier()  # ranks start each timed step together: a step's time is its slowest rank's
            t0 = time.perf_counter()
            token = step(token)
            times.append(time.perf_counter() - t0)
            tokens.append(int(token))
        collective_s = profiled_s = 0.0
        if row["profile_steps"]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(row["profile_steps"]):
                    token = step(token)
                    tokens.append(int(token))
                profiled_s = time.perf_counter() - t0
            collective_s = sum(e.self_cpu_time_total for e in prof.key_averages()
                               if "all_gather" in e.key or "wait_tensor" in e.key) / 1e6
    stats = kvpass.kv_stats(cache)
    return {
        **row,
        "rank": dist.get_rank() if split else 0,
        "prefill_with_compile_s": prefill_s,
        "decode_ms": statistics.median(times) * 1000,
        "collective_share": collective_s / profiled_s if profiled_s else None,
        "kv_bytes": sum(s.kv_bytes for s in stats),
        "slots_per_layer": stats[0].slots,
        "tokens_held": stats[0].real_tokens // cache.layers[0].keys.shape[1],
        "tokens": tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def launch(row: dict) -> list[dict]:
    """Run ``row`` in fresh processes (``torchrun`` for several ranks); every rank's result."""
    with tempfile.TemporaryDirectory() as out:
        worker = [__file__, "--row", json.dumps(row), "--rank-out", out]
        if row["ranks"] == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row['ranks']}",
                   *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(row["threads"])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=choice(MODELS, "model"), default="smollm2-135m", help="(default: %(default)s)")
    p.add_argument("--contexts", type=csv(positive_int), default=[8192], help="prompt lengths (default: 8192)")
    p.add_argument("--ranks", type=csv(positive_int), default=[1, 2], help="rank counts (default: 1,2)")
    p.add_argument("--steps", type=positive_int, default=16, help="decode steps timed (default: %(default)s)")
    p.add_argument("--profile-steps", type=non_negative_int, default=4,
                   help="steps profiled for the collective's share (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="threads of the 1-rank process (default: 2)")
    p.add_argument("--rank-threads", type=positive_int, default=1, help="threads per rank (default: 1)")
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor", help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/distributed_kv.json"), help="JSON output")
    p.add_argument("--row", help=argparse.SUPPRESS)       # internal: run one rank of a row in this process
    p.add_argument("--rank-out", help=argparse.SUPPRESS)  # internal: where that rank writes its result
    args = p.parse_args(argv)
    if args.row:
        result = run_rank(json.loads(args.row))
        Path(args.rank_out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0
    generated = 1 + WARMUP + args.steps + args.profile_steps
    runs = max(args.ranks)
    rows = []
    for context in args.contexts:
        budget = -(-(context + generated) // runs) * runs  # every rank's share the same in every row
        for ranks in args.ranks:
            row = {"model": args.model, "context": context, "ranks": ranks, "budget": budget, "steps": args.steps,
                   "profile_steps": args.profile_steps, "compiler": args.compiler,
                   "threads": args.threads if ranks == 1 else args.rank_threads}
            per_rank = launch(row)
            alone = next((r for r in rows if r["context"] == context and r["ranks"] == 1), None)
            slowest = max(per_rank, key=lambda r: r["decode_ms"])
            summary = {
                **{k: v for k, v in slowest.items() if k not in ("rank", "tokens")},
                "decode_ms_per_rank": [r["decode_ms"] for r in per_rank],
                "kv_bytes_per_rank": [r["kv_bytes"] for r in per_rank],
                "tokens_held_per_rank": [r["tokens_held"] for r in per_rank],
                "collective_share_per_rank": [r["collective_share"] for r in per_rank],
                "ranks_agree": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank),
                "same_tokens_as_one_process": None if alone is None else per_rank[0]["tokens"] == alone["tokens"],
                "context_held": sum(r["tokens_held"] for r in per_rank),
                "tokens": per_rank[0]["tokens"],
            }
            if alone is not None:
                summary["kv_bytes_vs_one_process"] = max(summary["kv_bytes_per_rank"]) / alone["kv_bytes_per_rank"][0]
                summary["decode_vs_one_process"] = summary["decode_ms"] / alone["decode_ms"]
            rows.append(summary)
            share = [f"{s:.1%}" for s in summary["collective_share_per_rank"] if s is not None]
            print(f"ctx {context:>6} ranks {ranks}  decode {summary['decode_ms']:7.1f} ms/tok "
                  f"(per rank {[round(d, 1) for d in summary['decode_ms_per_rank']]})  "
                  f"KV/rank {max(summary['kv_bytes_per_rank']) / 2**20:6.1f} MiB "
                  f"({summary.get('kv_bytes_vs_one_process', 1):.3f} of 1 process)  "
                  f"collective {share}  tokens agree {summary['ranks_agree']}, "
                  f"= 1 process {summary['same_tokens_as_one_process']}  "
                  f"prefill+compile {summary['prefill_with_compile_s']:.0f} s  "
                  f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}", "load_avg_end": os.getloadavg()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
