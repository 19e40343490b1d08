"""A tiered KV store whose lower tier attends in place (options ``offload`` + ``offload_attention``) against full KV
and SnapKV at the same device budget: decode ms/token, device and lower-tier KV bytes, bytes moved per step, tokens.

    python benchmarks/offload.py                                  # SmolLM2-135M, 8K context, device budget 1K
    python benchmarks/offload.py --contexts 8192,32768 --budget 1024 --rows full,snapkv,offload-cpu,offload-disk

Each row runs in a fresh process (so its peak RSS is its own) with ``--threads`` torch threads, compiled by kvpass
with ``--compiler``; the prompt is the first ``context`` tokens of the Paul Graham essays. After the prefill and 3
warm-up steps (which compile), ``--steps`` greedy decode steps are timed (median). Rows:

* ``full``: kvpass keeping every token (budget = context + generated tokens): the uncompressed floor;
* ``snapkv``: SnapKV keeping ``--budget`` tokens per layer (what is evicted is lost);
* ``offload-cpu`` / ``offload-disk``: SnapKV choosing the ``--budget`` tokens the device store keeps, the rest in a
  lower tier in host memory / memory-mapped files (in a temporary directory), attended in place and merged exactly;
* ``sentencekv-cpu`` / ``sentencekv-disk``: SentenceKV attending ``--budget`` tokens per step (32 sinks and 32 recent
  in the device store, the rest gathered from the lower tier by sentence), SnapKV keeping ``3 x budget`` at prefill;
* ``sentencekv-inplace-cpu``: the same with ``offload_attention``: the retrieved tokens attended where the tier lives;
* ``sentencekv-all-cpu``: ``sentencekv-cpu`` with ``semantic_factor`` 0 (the lower tier keeps every token).

``--prefill-block B`` prefills block by block (option ``prefill_block``; not with SentenceKV, which compresses the whole
prompt at once): each block's evictions stream into the lower tier, so the process holds the device store, one
block and the lower tier's resident pages (a disk tier's: one run of attention) whatever the context. Each row first
compiles on a short prompt through a throwaway cache; then the resident set's peak is reset (Linux) and the prefill
and decode steps run: "RSS growth" is that peak less the resident set before the prefill, set beside the KV the row
must hold (device stores, HF's local windows, one block's keys and values for every layer). What a block costs
besides its keys and values (activations, attention temporaries) is the growth of a one-block prompt's full row,
``--contexts B --rows full --prefill-block B``. glibc's heap settings change the figures (``MALLOC_MMAP_THRESHOLD_``
passes to the rows; the results record ``MALLOC_*`` variables).

SentenceKV's steps differ: while a generated sentence is at most one token long a step attends to every kept token
(the lower tier in place), otherwise it retrieves; the median step is a retrieving one, the mean counts both.

"moved/step" is what ``kvpass.kv_stats`` reports the last decode step moved between the device and the lower tiers
(queries there, partial outputs and log-sum-exps back, the evicted token written), as a share of the lower tiers'
KV bytes. On this CPU-only machine "device" and host are the same memory: the figures show the mechanism's cost and
traffic, not a GPU's saving.
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
ROWS = ("full", "snapkv", "offload-cpu", "offload-disk", "sentencekv-cpu", "sentencekv-disk", "sentencekv-inplace-cpu",
        "sentencekv-all-cpu")
WARMUP = 3


def run_row(row: dict) -> dict:
    """Prefill, warm up, time ``steps`` decode steps; this row's figures."""
    from kvpass.models import load
    from kvpass.models.data.niah import corpus_ids

    import kvpass

    torch.set_num_threads(row["threads"])
    model, tokenizer = load(row["model"])
    n = row["context"]
    ids = torch.tensor([corpus_ids(tokenizer)[:n]])
    options = {"policy": "snapkv", "budget": row["budget"], "compiler": row["compiler"]}
    with tempfile.TemporaryDirectory() as tier_dir:
        if row["name"].startswith(("offload", "sentencekv")):
            in_place = row["name"].startswith("offload") or "-inplace" in row["name"]
            options.update(offload=row["name"].rpartition("-")[2], offload_attention=in_place)
            if options["offload"] == "disk":
                options["offload_dir"] = tier_dir
        if row["name"].startswith("sentencekv"):
            options.update(policy="sentencekv", sentence_ends=kvpass.sentence_end_ids(tokenizer),
                           semantic_factor=0 if row["name"].startswith("sentencekv-all") else 3)
        if row["prefill_block"]:
            options["prefill_block"] = row["prefill_block"]
        forward = torch.compile(model.forward, backend="kvpass", options=options, dynamic=True)
        warm_up(forward, model, ids, row["budget"], row["prefill_block"] or 512)  # (compiled: not measured below)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        baseline = reset_peak_rss()
        tokens: list[int] = []

        def step(token: torch.Tensor) -> torch.Tensor:
            logits = forward(input_ids=token, cache=cache, position_ids=torch.tensor([[n + len(tokens) - 1]]),
                             use_cache=True).logits
            return logits[:, -1:].argmax(-1)

        with torch.inference_mode():
            # made as warm_up makes its cache: one made outside inference mode (Gemma-3's sliding layers hold a
            # tensor from the start) fails Dynamo's guards on it, and the run would recompile
            cache = new_cache(model)
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
                t0 = time.perf_counter()
                token = step(token)
                times.append(time.perf_counter() - t0)
                tokens.append(int(token))
        stats = kvpass.kv_stats(cache)
        peak = peak_rss()
        compiled_in_run = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    per_token = sum(s.kv_bytes // max(s.slots, 1) for s in stats)  # one token's keys and values over every layer
    return {
        **row,
        "prefill_s": prefill_s,
        "rss_growth_bytes": None if baseline is None else peak - baseline,
        # the KV the process must hold: its stores, a host tier, one prefill block's (or the prompt's) keys and values
        "held_kv_bytes": sum(s.kv_bytes + (s.tier_bytes if options.get("offload") == "cpu" else 0) for s in stats)
        + (row["prefill_block"] or n) * per_token,
        "decode_ms": statistics.median(times) * 1000,
        "decode_mean_ms": statistics.fmean(times) * 1000,
        "device_kv_bytes": sum(s.kv_bytes for s in stats),
        "tier_kv_bytes": sum(s.tier_bytes for s in stats),
        "tier_tokens_per_layer_head": stats[0].tier_tokens // cache.layers[0].keys.shape[1],
        "moved_bytes_per_step": sum(s.moved_bytes for s in stats),
        "tokens": tokens,
        "peak_rss_bytes": peak,
        "compiled_in_run": compiled_in_run,  # graphs compiled after the warm-up: 0, or time and RSS include compiling
    }


def launch(row: dict) -> dict:
    """Run ``row`` in a fresh process; its result."""
    with tempfile.TemporaryDirectory() as out:
        result = Path(out, "row.json")
        cmd = [sys.executable, __file__, "--row", json.dumps(row), "--row-out", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(row["threads"])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=choice(MODELS, "model"), default="smollm2-135m", help="(default: %(default)s)")
    p.add_argument("--contexts", type=csv(positive_int), default=[8192], help="prompt lengths (default: 8192)")
    p.add_argument("--budget", type=positive_int, default=1024, help="device tokens per layer (default: 1024)")
    p.add_argument("--rows", type=csv(choice(ROWS, "row")), default=list(ROWS), help=f"rows among {ROWS}")
    p.add_argument("--steps", type=positive_int, default=16, help="decode steps timed (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: 2)")
    p.add_argument("--prefill-block", type=non_negative_int, default=0,
                   help="prefill in blocks of this many tokens (option prefill_block; default 0: whole prompt)")
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor", help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/offload.json"), help="JSON output")
    p.add_argument("--row", help=argparse.SUPPRESS)      # internal: run one row in this process
    p.add_argument("--row-out", help=argparse.SUPPRESS)  # internal: where that row writes its result
    args = p.parse_args(argv)
    if args.row:
        Path(args.row_out).write_text(json.dumps(run_row(json.loads(args.row))))
        return 0
    if args.prefill_block and any(r.startswith("sentencekv") for r in args.rows):
        p.error(f"--prefill-block {args.prefill_block}: SentenceKV compresses the whole prompt at once; drop it or the "
                f"sentencekv rows ({[r for r in args.rows if r.startswith('sentencekv')]})")
    generated = 1 + WARMUP + args.steps
    rows = []
    for context in args.contexts:
        for name in args.rows:
            budget = context + generated if name == "full" else args.budget
            row = {"model": args.model, "context": context, "name": name, "budget": budget, "steps": args.steps,
                   "compiler": args.compiler, "threads": args.threads, "prefill_block": args.prefill_block}
            result = launch(row)
            full = next((r for r in rows if r["context"] == context and r["name"] == "full"), None)
            snap = next((r for r in rows if r["context"] == context and r["name"] == "snapkv"), None)
            result["same_tokens_as_full"] = None if full is None else result["tokens"] == full["tokens"]
            result["decode_vs_full"] = None if full is None else result["decode_ms"] / full["decode_ms"]
            result["decode_vs_snapkv"] = None if snap is None else result["decode_ms"] / snap["decode_ms"]
            tier = result["tier_kv_bytes"]
            result["moved_share_of_tier"] = result["moved_bytes_per_step"] / tier if tier else None
            rows.append(result)
            moved = "" if not tier else (f"  moved/step {result['moved_bytes_per_step'] / 2**10:7.1f} KiB "
                                         f"({result['moved_share_of_tier']:.3%} of the tier)")
            ratios = "".join(f"  {result[key]:.2f}x {what}" for key, what in
                             (("decode_vs_full", "full"), ("decode_vs_snapkv", "snapkv")) if result[key] is not None)
            growth = "" if result["rss_growth_bytes"] is None else (
                f" (growth {result['rss_growth_bytes'] / 2**20:.0f} MiB; KV held "
                f"{result['held_kv_bytes'] / 2**20:.0f} MiB)")
            print(f"ctx {context:>6} {name:<18} decode {result['decode_ms']:7.1f} ms/tok (mean "
                  f"{result['decode_mean_ms']:.1f}){ratios}  device KV "
                  f"{result['device_kv_bytes'] / 2**20:6.1f} MiB  tier {tier / 2**20:6.1f} MiB{moved}  "
                  f"tokens = full {result['same_tokens_as_full']}  prefill {result['prefill_s']:.0f} s  "
                  f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB{growth}", flush=True)
            if result["compiled_in_run"]:
                print(f"  warning: {result['compiled_in_run']} graph(s) compiled after the warm-up: this row's "
                      "times and RSS include compiling", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}", "load_avg_end": os.getloadavg(),
            # glibc's heap settings change the RSS figures (BENCHMARKS.md, "What the RSS growth measured")
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
