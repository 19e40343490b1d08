"""Decode cost, KV bytes and peak memory: full cache vs kvpass at fixed budgets.

Each row runs in a fresh process (clean peak RSS, no shared compile caches):

    python benchmarks/decode_floor.py                 # the default grid (SmolLM2-135M and a tiny decoder)
    python benchmarks/decode_floor.py --model tiny --contexts 1024,16384 --budgets 1024

Rows per (model, context): the full cache in eager HF, and kvpass (Inductor) at each budget; per model
also plain Inductor with the full cache at each budget's length (the compiled floor: a step over as
many tokens as kvpass keeps). ``--head-budgets adaptive`` (or ``both``) runs the kvpass rows with head-adaptive
budgets (a packed store: each query reads all heads' slots, masked). With ``--static-cache``, also kvpass keeping
its store in a StaticCache of ``budget`` slots (mode ``kvpass-static``). ``--repeats N`` runs every row in N
processes (rows interleaved) and reports the median one, for steps short enough that process-to-process noise
dominates. Decode time is the median over ``--steps`` greedy steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, StaticCache

import kvpass
from kvpass.apps.eval.runner import peak_rss
from kvpass.validate import choice, csv, positive_int

MODELS = ("smollm2-135m", "gemma3-270m", "tiny")  # tiny: a random 2-layer Llama (mechanics and speed only)


def load_model(name: str):
    if name == "tiny":  # random weights: mechanics and speed only, never accuracy
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                                       attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg).eval()
    from kvpass.models import load

    return load(name)[0]


def run_row(row: dict) -> dict:
    """Prefill ``context`` tokens then ``steps`` decode steps; twice when compiled (the first compiles)."""
    torch.set_num_threads(row["threads"])
    model = load_model(row["model"])
    rss_loaded = peak_rss()
    forward = model.forward
    if row["mode"] in ("kvpass", "kvpass-static"):
        forward = torch.compile(model.forward, backend="kvpass", options={
            "policy": row["policy"], "budget": row["budget"], "compiler": "inductor",
            "head_budgets": row.get("head_budgets", "uniform")})
    elif row["mode"] == "inductor":
        forward = torch.compile(model.forward, backend="inductor")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, row["context"]), generator=g)

    def once(steps: int) -> tuple[float, list[float], DynamicCache | StaticCache, float]:
        if row["mode"] == "kvpass-static":
            cache = StaticCache(config=model.config, max_cache_len=row["budget"])
        else:
            cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = forward(input_ids=ids, cache=cache, position_ids=torch.arange(row["context"])[None],
                             use_cache=True, logits_to_keep=1).logits
            prefill = time.perf_counter() - start
            times = []
            for step in range(steps):
                token = logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                logits = forward(input_ids=token, cache=cache,
                                 position_ids=torch.tensor([[row["context"] + step]]), use_cache=True).logits
                times.append(time.perf_counter() - t0)
        return prefill, times, cache, time.perf_counter() - start

    first_call = compile_s = None
    if row["mode"] != "eager":
        t0 = time.perf_counter()
        once(3)  # compiles the prefill and decode graphs
        first_call = time.perf_counter() - t0
    prefill, times, cache, _ = once(row["steps"])
    if first_call is not None:  # compile time = the warm-up minus the same work at steady state
        compile_s = first_call - prefill - 3 * statistics.median(times)
    return {
        **row,
        "prefill_s": prefill,
        "decode_ms": statistics.median(times) * 1000,
        "kv_bytes": sum(s.kv_bytes for s in kvpass.kv_stats(cache)),
        "kv_slots_layer0": cache.layers[0].keys.shape[-2],
        "peak_rss_bytes": peak_rss(),
        "rss_after_load_bytes": rss_loaded,
        "warmup_with_compile_s": first_call,
        "compile_s": compile_s,
    }


def grid(args) -> list[dict]:
    rows = []
    for model in args.models:
        contexts = args.contexts or ([1024, 4096, 8192] if model != "tiny" else [1024, 4096, 16384])
        base = {"model": model, "steps": args.steps, "threads": args.threads, "policy": args.policy}
        for budget in args.budgets:
            rows.append({**base, "mode": "inductor", "context": budget, "budget": None})
        for context in contexts:
            rows.append({**base, "mode": "eager", "context": context, "budget": None})
            for budget in args.budgets:
                if budget < context:
                    for head_budgets in ("uniform", "adaptive") if args.head_budgets == "both" else [args.head_budgets]:
                        rows.append({**base, "mode": "kvpass", "context": context, "budget": budget,
                                     "head_budgets": head_budgets})
                    if args.static_cache:
                        rows.append({**base, "mode": "kvpass-static", "context": context, "budget": budget})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv(choice(MODELS, "model")), default=["smollm2-135m", "tiny"],
                   help=f"comma-separated, of {', '.join(MODELS)} (default: smollm2-135m,tiny)")
    p.add_argument("--contexts", type=csv(positive_int), default=None, help="prompt lengths (default per model)")
    p.add_argument("--budgets", type=csv(positive_int), default=[1024], help="kvpass budgets (default: %(default)s)")
    p.add_argument("--policy", default="snapkv", choices=sorted(kvpass.POLICIES),
                   help="kvpass policy (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=32, help="decode steps timed (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="processes per row, rows interleaved; the row reports the median one (default: %(default)s)")
    p.add_argument("--static-cache", action="store_true", help="also run kvpass with a StaticCache of budget slots")
    p.add_argument("--head-budgets", choices=("uniform", "adaptive", "both"), default="uniform",
                   help="kvpass option head_budgets of the kvpass rows; both: a row of each (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/decode_floor.json"), help="JSON output")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # honest compile times
    rows = grid(args)
    runs: list[list[dict]] = [[] for _ in rows]
    for repeat in range(args.repeats):  # rows interleaved, so a drift in the machine's speed hits every row alike
        for i, row in enumerate(rows):
            proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"row {row} failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[i].append(result)
            compile_s = result["compile_s"]
            mode = result["mode"] + ("+heads" if result.get("head_budgets") == "adaptive" else "")
            print(f"{result['model']:<13} {mode:<13} ctx {result['context']:>6} "
                  f"budget {str(result['budget']):>5}  decode {result['decode_ms']:7.1f} ms/tok  "
                  f"prefill {result['prefill_s']:6.2f} s  KV {result['kv_bytes'] / 2**20:7.1f} MiB  "
                  f"peak RSS {result['peak_rss_bytes'] / 2**20:6.0f} MiB"
                  + (f"  compile {compile_s:.0f} s" if compile_s else "")
                  + (f"  (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""), flush=True)
    results = []
    for row_runs in runs:  # the median process by decode time, with every process's decode time beside it
        decode = [r["decode_ms"] for r in row_runs]
        median = sorted(row_runs, key=lambda r: r["decode_ms"])[(len(row_runs) - 1) // 2]
        results.append({**median, "decode_ms_per_process": decode})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}", "load_avg_end": os.getloadavg()}
    args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
