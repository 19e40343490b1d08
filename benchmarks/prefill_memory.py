"""Peak memory of a prefill vs prompt length: full KV (eager HF) vs kvpass block-wise prefill.

Each (mode, length) runs in a fresh process. The model is loaded and (kvpass) compiled on a short warm-up
prompt first; then the peak-RSS counter is reset (Linux ``/proc/self/clear_refs``) and the prompt is
prefilled, so ``peak_mib`` is the peak *increase* of resident memory during that prefill: every tensor it
allocates (KV, activations, attention temporaries), not the weights. ``kv_bound_mib`` is the KV a
block-wise prefill may hold by design: every layer's store plus one block, L x 2 x H_kv x (budget + block) x D,
a sliding-window layer's store holding its window - 1 tokens instead of the budget (Gemma-3's local layers).
Prompts are random token ids (memory does not depend on content).

    python benchmarks/prefill_memory.py --lengths 2048,4096,8192,16384,32768 --out results/prefill_memory.json

``--measure kv`` counts KV alone instead of every tensor (the issue's "peak KV memory"): the prefill runs under
:class:`KVTracker`, a dispatch mode that sums the storages of live tensors shaped like keys or values,
``[B, H_kv, S, head_dim]``, and keeps their peak. It sees every ATen op, so the block graph is compiled with
``aot_eager`` (Inductor's kernels are opaque to it) and the kvpass ops run their references op by op. The
grouped-query attention's query/output chunks share that shape and are counted too (an over-count), so the
measure needs a model with fewer kv-heads than query heads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvpass.apps.eval.runner import peak_rss, reset_peak_rss
from kvpass.validate import choice, csv, positive_int

MODES = ("full", "blockwise")


class KVTracker(TorchDispatchMode):
    """Live and peak bytes of the storages behind tensors shaped like K/V (``[B, kv_heads, S, head_dim]``).

    A storage counts from the first op that returns a K/V-shaped view of it until the last such view dies.
    Ops of the ``kvpass`` library run their pure-torch references inside the mode, so their temporaries count.
    """

    def __init__(self, kv_heads: int, head_dim: int) -> None:
        from kvpass.ops import REFERENCES

        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.references = REFERENCES
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, K/V-shaped views alive]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reference = self.references.get(func)
        if reference is not None:
            with self:
                out = reference(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == self.kv_heads \
                    and t.shape[3] == self.head_dim:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def run_one(model_name: str, mode: str, length: int, budget: int, block: int, policy: str, compiler: str,
            measure: str = "rss", head_budgets: str = "uniform") -> dict:
    import kvpass.models

    torch.manual_seed(0)
    model, _ = kvpass.models.load(model_name)
    return measure_prefill(model.eval(), mode, length, budget, block, policy, compiler, measure, head_budgets)


def measure_prefill(model: torch.nn.Module, mode: str, length: int, budget: int, block: int, policy: str,
                    compiler: str, measure: str = "rss", head_budgets: str = "uniform") -> dict:
    """One row: ``measure`` "rss" (peak resident-memory increase, every tensor) or "kv" (peak K/V bytes).

    Block-wise rows also give each layer's real tokens per kv head (``head_tokens``) and ``kv_masked_mib``: what
    the same kept tokens would take in a store with one row per head, sized for the fullest head (a masked
    layout); with ``head_budgets`` "adaptive" the heads' shares differ while ``kv_held_mib`` stays at the budget."""
    from transformers import DynamicCache

    from kvpass.runtime.blockwise import BlockwiseRunner

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if measure == "kv":
        if cfg.num_key_value_heads == cfg.num_attention_heads:
            raise SystemExit(f"--measure kv needs grouped-query attention (fewer kv-heads than query heads); "
                             f"this model has {cfg.num_attention_heads} of each")
        compiler = "aot_eager"
    forward = model.forward
    if mode == "blockwise":
        forward = torch.compile(model.forward, backend="kvpass", dynamic=True, options={
            "policy": policy, "budget": budget, "prefill_block": block, "compiler": compiler,
            "head_budgets": head_budgets})

    def prefill(n: int):
        ids = torch.randint(0, cfg.vocab_size, (1, n))
        with torch.inference_mode():
            return forward(input_ids=ids, position_ids=torch.arange(n)[None], cache=DynamicCache(config=cfg),
                           use_cache=True, logits_to_keep=1)

    prefill(2 * block + 7)  # compile (kvpass) and warm up allocator pools
    tracker = KVTracker(cfg.num_key_value_heads, head_dim) if measure == "kv" else None
    if tracker is None:
        track = nullcontext()
    elif mode == "blockwise":  # Dynamo runs no compiled frame under a dispatch mode: enter it inside the runner
        def tracked_call(runner, *args):
            with tracker:
                return run_blocks(runner, *args)

        run_blocks = BlockwiseRunner.__call__
        track = mock.patch.object(BlockwiseRunner, "__call__", tracked_call)
    else:
        track = tracker
    base = reset_peak_rss()
    if base is None and tracker is None:
        raise SystemExit("prefill_memory.py --measure rss reads Linux's peak resident set (/proc/self/status)")
    t0 = time.perf_counter()
    with track:
        out = prefill(length)
    seconds = time.perf_counter() - t0
    peak = (tracker.peak if tracker else peak_rss() - base) / 1024  # KiB
    from kvpass import kv_stats
    from kvpass.apps.eval.runner import cache_bytes

    per_slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # fp32 bytes per token
    # a sliding layer (HF's window, Gemma-3's local layers) holds window - 1 tokens, not the budget or the prompt
    windows = [getattr(layer, "sliding_window", 0) for layer in DynamicCache(config=cfg).layers]
    layer_slot = per_slot // cfg.num_hidden_layers
    bound = layer_slot * sum((w - 1 if w else budget) + block for w in windows)
    full = layer_slot * sum(min(w - 1, length) if w else length for w in windows)
    heads = [s.head_tokens for s in kv_stats(out.cache)] if mode == "blockwise" else None
    # one row per kv head as long as its longest head; a layer left to HF (sliding) holds its window's tokens
    masked = None if heads is None else sum(cfg.num_key_value_heads * (max(h) if h else min(w - 1, length))
                                            for h, w in zip(heads, windows, strict=True)) * 2 * head_dim * 4
    return {
        "mode": mode, "length": length, "budget": budget, "block": block, "policy": policy, "compiler": compiler,
        "measure": measure, "head_budgets": head_budgets, "head_tokens": heads,
        "kv_masked_mib": None if masked is None else round(masked / 2**20, 1),
        "prefill_s": round(seconds, 2), "peak_mib": round(peak / 1024, 1),
        "peak_bytes": round(peak * 1024), "kv_bound_bytes": bound,
        "kv_held_mib": round(cache_bytes(out.cache) / 2**20, 1),
        "kv_full_mib": round(full / 2**20, 1),  # what HF's cache holds after a full prefill
        "kv_bound_mib": round(bound / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=csv(positive_int), default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--modes", type=csv(choice(MODES, "mode")), default=list(MODES))
    p.add_argument("--budget", type=positive_int, default=2048)
    p.add_argument("--block", type=positive_int, default=512)
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--compiler", default="inductor", help="kvpass compiler (--measure kv: always aot_eager)")
    p.add_argument("--head-budgets", choices=("uniform", "adaptive"), default="uniform",
                   help="kvpass option head_budgets of the block-wise rows")
    p.add_argument("--measure", choices=("rss", "kv"), default="rss",
                   help="rss: peak resident-memory increase (every tensor); kv: peak bytes of K/V-shaped tensors")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default="results/prefill_memory.json")
    p.add_argument("--plot", default="benchmarks/figures/issue4/prefill_memory.png")
    p.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        mode, length = choice(MODES, "mode")(args.one[0]), positive_int(args.one[1])
        print(json.dumps(run_one(args.model, mode, length, args.budget, args.block, args.policy, args.compiler,
                                 args.measure, args.head_budgets)))
        return
    rows = []
    for length in args.lengths:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", mode, str(length), "--model", args.model, "--budget",
                   str(args.budget), "--block", str(args.block), "--policy", args.policy, "--compiler", args.compiler,
                   "--threads", str(args.threads), "--measure", args.measure, "--head-budgets", args.head_budgets]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{mode} at {length} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['mode']:>9} {row['length']:>6}: peak +{row['peak_mib']:>7} MiB  "
                  f"KV held {row['kv_held_mib']:>6} "
                  f"MiB (full {row['kv_full_mib']}, bound {row['kv_bound_mib']}, one row per head "
                  f"{row['kv_masked_mib']})  {row['prefill_s']} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    _plot(rows, args.plot, args.measure, args.model)


def _plot(rows: list[dict], path: str, measure: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("full", "o-"), ("blockwise", "s-")):
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            label = "full prefill (eager HF)" if mode == "full" else f"kvpass block-wise (budget {sel[0]['budget']}, " \
                f"block {sel[0]['block']})"
            ax.plot([r["length"] for r in sel], [r["peak_mib"] for r in sel], style, label=f"{label}: peak")
    sel = [r for r in rows if r["mode"] == "full"]
    ax.plot([r["length"] for r in sel], [r["kv_full_mib"] for r in sel], ":", label="full KV size")
    if rows:
        ax.axhline(rows[0]["kv_bound_mib"], ls="--", c="gray", label="budget + block KV bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("MiB")
    what = "peak KV (K/V-shaped tensors)" if measure == "kv" else "peak memory increase (every tensor)"
    ax.set_title(f"Prefill {what}, {model}, fp32, CPU", fontsize=9)
    ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
