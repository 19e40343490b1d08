"""One context's KV split over CPU ranks (option ``distribute="context"``): per-rank KV bytes, decode ms/token and
the collective's share of each step, against one process holding the whole KV.

    python benchmarks/distributed_kv.py                                   # SmolLM2-135M, 8K, 1 and 2 ranks
    python benchmarks/distributed_kv.py --contexts 8192,32768 --ranks 1,2,4
    python benchmarks/distributed_kv.py --rank-budget 2048 --ranks 1,2,4 --prefill-block 512   # capacity vs ranks
    python benchmarks/distributed_kv.py --collectives --contexts 2048,8192,32768 --ranks 2,4   # prefill's transfer

Each row runs in fresh processes. ``ranks 1`` is one process with ``--threads`` torch threads (default 2: the
machine) and no split, kvpass keeping every token; ``ranks N`` is ``torchrun --nproc-per-node N`` with
``--rank-threads`` threads per rank (default 1) and ``distribute="context"``, same total budget, so each rank keeps
``1/N`` of the context. The prompt is the first ``context`` tokens of the Paul Graham essays. Each rank first compiles
on a short prompt through a throwaway cache, then resets its peak resident set (Linux): "peak RSS growth" is the most
the prefill and the steps after it added. After the prefill and 3 warm-up steps, ``--steps`` greedy decode steps are
timed (median) and ``--profile-steps`` more run
under ``torch.profiler``, whose functional all-gather and wait events give the collective's share of a step. Every
row's greedy tokens are compared: across ranks, and with the 1-rank row of the same context.

The budget is the context plus the generated tokens, rounded up to a multiple of ``--ranks``' runs: nothing is
evicted, so the rows show what spreading the KV costs, not what compressing it loses. With a fixed per-rank budget of
``S`` slots, ``N`` ranks hold an ``N * S``-token context: the table's "context held" column. ``--rank-budget S``
runs exactly that: each row's context is the longest that ``N`` ranks of ``S`` slots hold without evicting (``N * S``
less the generated tokens). ``--prefill-block B`` prefills block by block (option ``prefill_block``): each block's
attention over the context so far is split over the ranks like a decode step's, so a rank never holds more than its
store and one block, and its peak memory stays flat as ranks (and the context) grow.

``--collectives`` times only what a block of a split prefill sends, per layer, at the model's shapes: kvpass's
all-gather of every rank's partial output and log-sum-exp for the block's ``--prefill-block`` queries, against a ring
pass of the KV (each rank's share of a ``context``-token store sent around the ring, ``N - 1`` hops of paired sends and
receives), the alternative the distributed-KV issue names. With the queries replicated on every rank (every rank runs
the whole model), a ring would also make every rank attend to the whole context: ``N`` times the attention FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvpass.apps.eval.runner import new_cache, peak_rss, reset_peak_rss, warm_up
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
    if row["prefill_block"]:
        options["prefill_block"] = row["prefill_block"]
    forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
    n = row["context"]
    warm_up(forward, model, ids, -(-row["budget"] // row["ranks"]), row["prefill_block"] or 512)  # (not measured)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    baseline = reset_peak_rss()
    tokens: list[int] = []

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = forward(input_ids=token, cache=cache, position_ids=torch.tensor([[n + len(tokens) - 1]]),
                         use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        cache = new_cache(model)  # (as warm_up makes its own: a cache made outside inference mode recompiles)
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
    stats, peak = kvpass.kv_stats(cache), peak_rss()
    compiled_in_run = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    return {
        **row,
        "rank": dist.get_rank() if split else 0,
        "prefill_s": prefill_s,
        "decode_ms": statistics.median(times) * 1000,
        "collective_share": collective_s / profiled_s if profiled_s else None,
        "kv_bytes": sum(s.kv_bytes for s in stats),
        "slots_per_layer": stats[0].slots,
        "tokens_held": stats[0].real_tokens // cache.layers[0].keys.shape[1],
        "tokens": tokens,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": None if baseline is None else peak - baseline,
        "compiled_in_run": compiled_in_run,  # graphs compiled after the warm-up: 0, or time and RSS include compiling
    }


def run_collectives(row: dict) -> dict:
    """Median seconds per layer of one block's transfer: the partials' all-gather vs the KV's ring pass."""
    import torch.distributed as dist
    from kvpass.models import load_config

    dist.init_process_group("gloo")
    torch.set_num_threads(row["threads"])
    config = load_config(row["model"])
    rank, world = dist.get_rank(), dist.get_world_size()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    block, share = row["prefill_block"], row["context"] // world
    partial = torch.randn(1, heads, block, dim + 1)  # float32: the output and its log-sum-exp, as the graph packs them
    gathered = torch.empty(world * partial.numel())
    kv = torch.randn(1, kv_heads, share, 2 * dim)
    buffers = [torch.empty_like(kv), torch.empty_like(kv)]  # a hop receives into one while sending the other

    def all_gather() -> None:
        dist.all_gather_into_tensor(gathered, partial.flatten())

    def ring() -> None:
        sending = kv
        for hop in range(world - 1):
            incoming = buffers[hop % 2]
            ops = [dist.P2POp(dist.isend, sending, (rank + 1) % world),
                   dist.P2POp(dist.irecv, incoming, (rank - 1) % world)]
            for op in dist.batch_isend_irecv(ops):
                op.wait()
            sending = incoming

    times = {}
    for name, fn in (("all_gather_partials", all_gather), ("ring_kv", ring)):
        samples = []
        for i in range(row["steps"] + 2):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # (two warm-ups)
                samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    return {**row, "rank": rank, **{f"{k}_s": v for k, v in times.items()},
            "all_gather_partials_bytes": gathered.numel() * 4, "ring_kv_bytes": (world - 1) * kv.numel() * 4}


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
    p.add_argument("--rank-budget", type=positive_int,
                   help="instead of --contexts: slots per rank; each row's context is what its ranks hold")
    p.add_argument("--prefill-block", type=non_negative_int, default=0,
                   help="prefill in blocks of this many tokens (option prefill_block; default 0: whole prompt)")
    p.add_argument("--ranks", type=csv(positive_int), default=[1, 2], help="rank counts (default: 1,2)")
    p.add_argument("--steps", type=positive_int, default=16, help="decode steps timed (default: %(default)s)")
    p.add_argument("--profile-steps", type=non_negative_int, default=4,
                   help="steps profiled for the collective's share (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="threads of the 1-rank process (default: 2)")
    p.add_argument("--rank-threads", type=positive_int, default=1, help="threads per rank (default: 1)")
    p.add_argument("--collectives", action="store_true",
                   help="time only a split prefill block's transfer: partials' all-gather vs a ring pass of the KV")
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor", help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/distributed_kv.json"), help="JSON output")
    p.add_argument("--row", help=argparse.SUPPRESS)       # internal: run one rank of a row in this process
    p.add_argument("--rank-out", help=argparse.SUPPRESS)  # internal: where that rank writes its result
    args = p.parse_args(argv)
    if args.row:
        row = json.loads(args.row)
        result = run_collectives(row) if row.get("collectives") else run_rank(row)
        Path(args.rank_out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0
    if args.collectives:
        return collectives(args)
    generated = 1 + WARMUP + args.steps + args.profile_steps
    runs = max(args.ranks)
    rows = []
    if args.rank_budget and args.rank_budget * min(args.ranks) <= generated:
        p.error(f"--rank-budget {args.rank_budget} holds no context on {min(args.ranks)} rank(s) beside the "
                f"{generated} generated tokens; give more than {generated // min(args.ranks)}")
    if args.rank_budget:  # (context, ranks, budget): the longest context each rank count holds at this share
        plan = [(args.rank_budget * n - generated, n, args.rank_budget * n) for n in args.ranks]
    else:  # every rank's share the same in every row of a context
        plan = [(c, n, -(-(c + generated) // runs) * runs) for c in args.contexts for n in args.ranks]
    for context, ranks, budget in plan:
        row = {"model": args.model, "context": context, "ranks": ranks, "budget": budget, "steps": args.steps,
               "profile_steps": args.profile_steps, "compiler": args.compiler,
               "prefill_block": args.prefill_block, "threads": args.threads if ranks == 1 else args.rank_threads}
        per_rank = launch(row)
        alone = next((r for r in rows if r["context"] == context and r["ranks"] == 1), None)
        slowest = max(per_rank, key=lambda r: r["decode_ms"])
        summary = {
            **{k: v for k, v in slowest.items() if k not in ("rank", "tokens")},
            "decode_ms_per_rank": [r["decode_ms"] for r in per_rank],
            "kv_bytes_per_rank": [r["kv_bytes"] for r in per_rank],
            "tokens_held_per_rank": [r["tokens_held"] for r in per_rank],
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in per_rank],
            "rss_growth_bytes_per_rank": [r["rss_growth_bytes"] for r in per_rank],
            "collective_share_per_rank": [r["collective_share"] for r in per_rank],
            "ranks_agree": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank),
            "same_tokens_as_one_process": None if alone is None else per_rank[0]["tokens"] == alone["tokens"],
            "context_held": sum(r["tokens_held"] for r in per_rank),
            "tokens": per_rank[0]["tokens"],
            "compiled_in_run": max(r["compiled_in_run"] for r in per_rank),
        }
        if alone is not None:
            summary["kv_bytes_vs_one_process"] = max(summary["kv_bytes_per_rank"]) / alone["kv_bytes_per_rank"][0]
            summary["decode_vs_one_process"] = summary["decode_ms"] / alone["decode_ms"]
        rows.append(summary)
        share = [f"{s:.1%}" for s in summary["collective_share_per_rank"] if s is not None]
        growths = [g for g in summary["rss_growth_bytes_per_rank"] if g is not None]
        growth = f" (growth {max(growths) / 2**20:.0f} MiB)" if growths else ""
        versus = f"({summary['kv_bytes_vs_one_process']:.3f} of 1 process)" if alone else ""
        print(f"ctx {context:>6} ranks {ranks}  decode {summary['decode_ms']:7.1f} ms/tok "
              f"(per rank {[round(d, 1) for d in summary['decode_ms_per_rank']]})  "
              f"KV/rank {max(summary['kv_bytes_per_rank']) / 2**20:6.1f} MiB {versus}  "
              f"collective {share}  tokens agree {summary['ranks_agree']}, "
              f"= 1 process {summary['same_tokens_as_one_process']}  "
              f"prefill {summary['prefill_s']:.0f} s  peak RSS/rank "
              f"{max(summary['peak_rss_bytes_per_rank']) / 2**20:.0f} MiB{growth}", flush=True)
        if summary["compiled_in_run"]:
            print(f"  warning: {summary['compiled_in_run']} graph(s) compiled after the warm-up: this row's times and "
                  "RSS include compiling", flush=True)
    _write(args, rows)
    return 0


def collectives(args: argparse.Namespace) -> int:
    """``--collectives``: one row per (context, ranks), timed on every rank (the slowest reported)."""
    block = args.prefill_block or 512
    rows = []
    for context in args.contexts:
        for ranks in (n for n in args.ranks if n > 1):
            row = {"model": args.model, "context": context, "ranks": ranks, "prefill_block": block,
                   "steps": args.steps, "threads": args.rank_threads, "collectives": True}
            per_rank = launch(row)
            summary = {**row, **{key: max(r[key] for r in per_rank) for key in per_rank[0] if key.endswith("_s")},
                       "all_gather_partials_bytes": per_rank[0]["all_gather_partials_bytes"],
                       "ring_kv_bytes": per_rank[0]["ring_kv_bytes"]}
            rows.append(summary)
            gathered_mib = summary["all_gather_partials_bytes"] / 2**20
            print(f"ctx {context:>6} ranks {ranks} block {block}: per layer, all-gather of partials "
                  f"{summary['all_gather_partials_s'] * 1e3:7.3f} ms ({gathered_mib:.2f} MiB gathered) vs "
                  f"ring pass of the KV {summary['ring_kv_s'] * 1e3:7.3f} ms "
                  f"({summary['ring_kv_bytes'] / 2**20:.2f} MiB received)", flush=True)
    _write(args, rows)
    return 0


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}", "load_avg_end": os.getloadavg()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
